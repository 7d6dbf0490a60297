"""Fetch a LLaVA-1.5 checkpoint from the Hugging Face Hub: pinned to a commit, hash-checked, cache-reusing.

huggingface_hub does the transfer (HEAD/GET, redirects, auth, cache layout, in-run resume with Range) but it
checks only file sizes, never contents, on plain HTTP. So this module resolves the revision to a commit,
takes the expected hashes from the hub's tree listing (lfs sha256 for LFS files, git blob sha1 otherwise),
hashes every file it fetched, deletes a file that does not match, and writes a record of what it verified
(`<record dir>/<commit>.json`). A later run, online or offline, trusts a file whose (size, mtime, inode)
still match that record and re-hashes any other.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from .errors import CheckpointError, fail

SMALL_FILES = (
    "config.json", "model.safetensors.index.json", "generation_config.json",
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
HASH_CHUNK = 16 << 20
RETRY_DELAYS = (1.0, 3.0)  # metadata calls: waits between attempts on network errors
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_ID = re.compile(r"[A-Za-z0-9_][\w.-]{0,95}/[A-Za-z0-9_][\w.-]{0,95}")


def is_repo_id(s: str) -> bool:
    """True for `org/name` that is not an existing local path, so `convert` can tell hub ids from folders."""
    return (bool(_REPO_ID.fullmatch(s)) and ".." not in s and "--" not in s
            and not s.endswith((".", "-")) and not os.path.exists(s))


def download(repo: str, revision: str | None = None, local_dir: str | None = None, progress: bool = True,
             endpoint: str | None = None, token: str | None = None) -> dict:
    """Fetch what conversion and verification need; return {path, repo_id, revision, commit_sha, files}.

    `files` lists {path, size, sha256} of every fetched file, each checked against the hub's metadata.
    Environment is read at call time (huggingface_hub reads it at import): HF_ENDPOINT, HF_TOKEN,
    HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE.
    """
    if not is_repo_id(repo):
        raise fail(f"{repo!r} is not a hub repo id (expected org/name)")
    revision = revision or "main"
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    token = token or os.environ.get("HF_TOKEN") or None
    where = _Where(repo, local_dir)
    if _offline():
        return _from_disk(where, revision, progress, why="HF_HUB_OFFLINE is set")
    try:
        return _online(where, revision, progress, endpoint, token)
    except _Unreachable as exc:
        try:
            result = _from_disk(where, revision, progress, why=f"cannot reach {endpoint}")
        except CheckpointError:
            raise fail(f"cannot reach {endpoint} for {repo}@{revision}: {exc}") from None
        print(f"warning: cannot reach {endpoint} ({exc}); using the verified local copy", file=sys.stderr)
        return result


class _Unreachable(Exception):
    """The hub could not be reached (after retries): the caller may fall back to a verified local copy."""


class _Where:
    """Where files, refs and verification records live: the hub cache, or a --local-dir."""

    def __init__(self, repo: str, local_dir: str | None):
        self.repo = repo
        self.cache_dir = _cache_dir()
        self.local_dir = os.path.abspath(local_dir) if local_dir else None
        if self.local_dir:
            self.records = os.path.join(self.local_dir, ".cache", "llava-ckpt")
            self.refs = os.path.join(self.records, "refs")
        else:
            storage = os.path.join(self.cache_dir, "models--" + repo.replace("/", "--"))
            self.records = os.path.join(storage, "llava-ckpt")
            self.refs = os.path.join(storage, "refs")  # the hub's own refs: hub tools see them too

    def root(self, commit: str) -> str:
        if self.local_dir:
            return self.local_dir
        return os.path.join(self.cache_dir, "models--" + self.repo.replace("/", "--"), "snapshots", commit)


# --- online ---------------------------------------------------------------------------------------------

def _online(where: _Where, revision: str, progress: bool, endpoint: str, token: str | None) -> dict:
    from huggingface_hub import HfApi, RepoFile
    repo = where.repo
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(repo, revision, endpoint):
        commit = revision if _COMMIT.fullmatch(revision) else _retry(
            lambda: api.repo_info(repo, revision=revision).sha)
        record = _load_record(where, commit)
        if record is None:
            listing = _retry(lambda: [f for f in api.list_repo_tree(repo, revision=commit, recursive=True)
                                      if isinstance(f, RepoFile)])
            tree = {f.path: {"path": f.path, "size": f.size, "oid": f.blob_id,
                             "lfs_sha256": f.lfs.sha256 if f.lfs else None} for f in listing}
        else:
            tree = {f["path"]: f for f in record["files"]}
        fetch = _Fetcher(where, commit, endpoint, token, progress)
        names = _plan(tree, repo, revision)
        files = {}
        with ThreadPoolExecutor(max_workers=1) as hasher:  # hash file i while file i+1 downloads
            pending = []
            i = 0
            while i < len(names):  # the index, once fetched, appends its shards to `names`
                name = names[i]
                path = fetch(name)
                if name == "config.json":
                    _check_config(path, repo)
                if name == "model.safetensors.index.json":
                    names[i + 1:] = _with_index_shards(names[i + 1:], path, tree, repo)
                i += 1
                pending.append(hasher.submit(_verified, path, tree[name], repo, commit, where))
                _raise_first_failure(pending)
            for job in pending:
                entry = job.result()
                files[entry["path"]] = entry
    _save(where, revision, commit, [files[n] for n in names])
    return _result(where, revision, commit, [files[n] for n in names])


class _Fetcher:
    """hf_hub_download of one file at a pinned commit (no network when the cache already has it)."""

    def __init__(self, where, commit, endpoint, token, progress):
        self.where, self.commit, self.endpoint, self.token, self.progress = where, commit, endpoint, token, progress

    def __call__(self, name: str) -> str:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(self.where.repo, name, revision=self.commit, cache_dir=self.where.cache_dir,
                               local_dir=self.where.local_dir, endpoint=self.endpoint, token=self.token,
                               tqdm_class=_bar_class(name, self.progress))


def _bar_class(name: str, show: bool):
    """huggingface_hub's tqdm (stderr, TTY-aware, HF_HUB_DISABLE_PROGRESS_BARS), labelled with the file name."""
    from huggingface_hub.utils import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["desc"] = name
            if not show:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)
    return Bar


def _retry(call):
    """Retry a metadata call on network errors; HTTP errors (404, 401...) are not retried."""
    import httpx2
    for delay in (*RETRY_DELAYS, None):
        try:
            return call()
        except httpx2.TransportError as exc:
            if delay is None:
                raise _Unreachable(f"{type(exc).__name__}: {exc}") from None
            time.sleep(delay)


class _hub_errors:
    """Turn huggingface_hub / network exceptions into one-line CheckpointErrors."""

    def __init__(self, repo, revision, endpoint):
        self.repo, self.revision, self.endpoint = repo, revision, endpoint

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (CheckpointError, _Unreachable)):
            return False
        import httpx2
        from huggingface_hub import errors as e
        repo, rev = self.repo, self.revision
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, e.GatedRepoError):
            raise fail(f"{repo} is gated: accept its conditions on the hub, then set HF_TOKEN "
                       f"(HTTP {status})") from None
        if isinstance(exc, e.RepositoryNotFoundError):
            raise fail(f"repository {repo} not found on {self.endpoint} "
                       f"(HTTP {status}; if it is private, set HF_TOKEN)") from None
        if isinstance(exc, e.RevisionNotFoundError):
            raise fail(f"revision {rev!r} not found in {repo}") from None
        if isinstance(exc, e.RemoteEntryNotFoundError):
            raise fail(f"{repo}@{rev}: a listed file is missing on the hub: {_one_line(exc)}") from None
        if isinstance(exc, e.HfHubHTTPError) and status in (401, 403):
            raise fail(f"access to {repo} denied (HTTP {status}): set HF_TOKEN to a token that can read it") from None
        if isinstance(exc, e.HfHubHTTPError):
            raise fail(f"hub error for {repo}@{rev} (HTTP {status}): {_one_line(exc)}") from None
        if isinstance(exc, (httpx2.TransportError, e.LocalEntryNotFoundError)):
            raise _Unreachable(_one_line(exc)) from None
        if isinstance(exc, OSError):  # e.g. huggingface_hub's size consistency check, disk full
            raise fail(f"download of {repo}@{rev} failed: {_one_line(exc)}") from None
        return False


def _one_line(exc) -> str:
    return " ".join(str(exc).split())[:300]


def _plan(tree: dict, repo: str, revision: str) -> list[str]:
    """Files to fetch, config first (to refuse a non-LLaVA repo before any weights move). No pickles."""
    if "config.json" not in tree:
        raise fail(f"{repo}@{revision} has no config.json: not a transformers checkpoint")
    weights = sorted(p for p in tree if "/" not in p and p.endswith(".safetensors"))
    if not weights:
        pickles = sorted(p for p in tree if p.endswith(PICKLE_SUFFIXES))
        extra = f" (only pickle weights: {', '.join(pickles[:3])}; they are never loaded)" if pickles else ""
        raise fail(f"{repo}@{revision} has no .safetensors weights{extra}")
    small = [n for n in SMALL_FILES if n in tree]
    if "model.safetensors.index.json" in tree:
        return small  # shards come from the index, once it is here
    return small + weights


def _with_index_shards(rest: list[str], index_path: str, tree: dict, repo: str) -> list[str]:
    shards = sorted(set(_read_json(index_path, "model.safetensors.index.json").get("weight_map", {}).values()))
    if not shards:
        raise fail(f"{repo}: model.safetensors.index.json has no weight_map")
    missing = [s for s in shards if s not in tree]
    if missing:
        raise fail(f"{repo}: shard {missing[0]} named in model.safetensors.index.json is not in the repo")
    return rest + [s for s in shards if s not in rest]


def _check_config(path: str, repo: str) -> None:
    from .config import normalize_config
    normalize_config(_read_json(path, f"{repo}/config.json"), where=f"{repo}/config.json")


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as exc:
        raise fail(f"{what} is not valid JSON: {exc}") from None


def _raise_first_failure(jobs) -> None:
    for job in jobs:
        if job.done() and job.exception() is not None:
            raise job.exception()


# --- verification -----------------------------------------------------------------------------------------

def _hashes(path: str, git: bool = False) -> tuple[str, str | None]:
    """sha256 (and git blob sha1 when asked) in one pass over the file, 16 MiB at a time."""
    size = os.path.getsize(path)
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size) if git else None
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            sha256.update(view[:n])
            if sha1:
                sha1.update(view[:n])
    return sha256.hexdigest(), sha1.hexdigest() if sha1 else None


def _stat_key(path: str) -> list[int]:
    st = os.stat(path)  # follows the snapshot symlink to the blob
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _verified(path: str, want: dict, repo: str, commit: str, where: _Where) -> dict:
    """Return the file's record entry; a file that does not match the hub's metadata is deleted, then raised."""
    name = want["path"]
    if want.get("stat") and want["stat"] == _stat_key(path):
        return want  # verified earlier and untouched since
    size = os.path.getsize(path)
    if size != want["size"]:
        _discard(path, name, where)
        raise fail(f"{name}: {size} bytes, the hub lists {want['size']} ({repo}@{commit}); "
                   "the file was deleted, run again to re-download")
    lfs = want.get("lfs_sha256")
    sha256, sha1 = _hashes(path, git=not lfs)
    expected, got, kind = (lfs, sha256, "sha256") if lfs else (want.get("oid"), sha1, "git sha1")
    if expected and got != expected:
        _discard(path, name, where)
        raise fail(f"{name}: {kind} {got} does not match the hub's {expected} ({repo}@{commit}); "
                   "the file was deleted, run again to re-download")
    return {**want, "sha256": sha256, "stat": _stat_key(path)}


def _discard(path: str, name: str, where: _Where) -> None:
    """Remove a bad file so nothing uses it: the snapshot link and its blob, or the local-dir copy."""
    paths = [path]
    if os.path.islink(path):
        paths.append(os.path.realpath(path))
    if where.local_dir:
        paths.append(os.path.join(where.local_dir, ".cache", "huggingface", "download", name + ".metadata"))
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


# --- records and offline ------------------------------------------------------------------------------------

def _record_path(where: _Where, commit: str) -> str:
    return os.path.join(where.records, f"{commit}.json")


def _load_record(where: _Where, commit: str) -> dict | None:
    try:
        with open(_record_path(where, commit), encoding="utf-8") as f:
            record = json.load(f)
        return record if record.get("commit_sha") == commit and record.get("files") else None
    except (OSError, ValueError):
        return None


def _save(where: _Where, revision: str, commit: str, files: list[dict]) -> None:
    """Write the verification record and the ref, atomically, only after everything checked out."""
    _write_atomic(_record_path(where, commit), json.dumps(
        {"repo_id": where.repo, "commit_sha": commit, "files": files}, indent=1))
    if revision != commit:
        _write_atomic(os.path.join(where.refs, revision), commit)


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _from_disk(where: _Where, revision: str, progress: bool, why: str) -> dict:
    """No network: the files must be present and must match the record of an earlier verified download."""
    repo = where.repo
    commit = revision if _COMMIT.fullmatch(revision) else _read_ref(where, revision)
    record = _load_record(where, commit) if commit else None
    if record is None:
        place = where.local_dir or where.cache_dir
        raise fail(f"{why}, and {repo}@{revision} has no verified download in {place}: "
                   "run `llava-ckpt download` online once")
    root = where.root(commit)
    files = []
    for want in record["files"]:
        path = os.path.join(root, want["path"])
        if not os.path.isfile(path):
            raise fail(f"{why}, and {want['path']} of {repo}@{revision} is missing from {root}")
        if progress and not (want.get("stat") == _stat_key(path)):
            print(f"re-hashing {want['path']} (changed since it was verified)", file=sys.stderr)
        files.append(_verified(path, want, repo, commit, where))
    if files != record["files"]:
        _save(where, revision, commit, files)
    return _result(where, revision, commit, files)


def _read_ref(where: _Where, revision: str) -> str | None:
    try:
        with open(os.path.join(where.refs, revision), encoding="utf-8") as f:
            ref = f.read().strip()
        return ref if _COMMIT.fullmatch(ref) else None
    except OSError:
        return None


def _result(where: _Where, revision: str, commit: str, files: list[dict]) -> dict:
    return {"path": where.root(commit), "repo_id": where.repo, "revision": revision, "commit_sha": commit,
            "files": [{"path": f["path"], "size": f["size"], "sha256": f["sha256"]} for f in files]}


def _offline() -> bool:
    from huggingface_hub import constants
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE


def _cache_dir() -> str:
    """The hub cache as the environment says now (huggingface_hub froze it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE
