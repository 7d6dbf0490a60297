"""Fetch a LLaVA-1.5 checkpoint from the Hugging Face Hub: pinned to a commit, hash-checked, cache-reusing.

huggingface_hub does the transfer of small files (HEAD/GET, redirects, auth, cache layout) but it checks only
file sizes, never contents, on plain HTTP. So this module resolves the revision to a commit, takes the expected
hashes from the hub's tree listing (lfs sha256 for LFS files, git blob sha1 otherwise), hashes every file it
fetched, deletes a file that does not match, and writes a record of what it verified
(`<record dir>/<commit>.json`). A later run, online or offline, trusts a file whose (size, mtime, inode)
still match that record and re-hashes any other.

LFS files (the weights) are streamed here instead, into a partial file with a stable name (`blobs/<sha256>.incomplete`
in the hub cache, `<local_dir>/.cache/llava-ckpt/incomplete/<sha256>.incomplete` for a --local-dir) that survives a
failed or killed run: the next run hashes the bytes already there and asks only for the rest (`Range: bytes=N-`),
hashing as bytes arrive, then moves the verified file to where hf_hub_download would have put it.
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
from .hf_source import PICKLE_SUFFIXES

SMALL_FILES = (
    "config.json", "model.safetensors.index.json", "generation_config.json",
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
)
HASH_CHUNK = 16 << 20
RETRY_DELAYS = (1.0, 3.0)  # metadata calls: waits between attempts on network errors
STREAM_RETRIES = 5  # LFS transfers: in-run resumptions in a row without a byte received, as huggingface_hub does
STREAM_RETRY_DELAY = 1.0
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
                path, entry = fetch(name, tree[name])
                if name == "config.json":
                    _check_config(path, repo)
                if name == "model.safetensors.index.json":
                    names[i + 1:] = _with_index_shards(names[i + 1:], path, tree, repo)
                i += 1
                if entry is not None:  # streamed here and hashed on the way in
                    pending.append(_done(entry))
                else:
                    pending.append(hasher.submit(_verified, path, tree[name], repo, commit, where))
                _raise_first_failure(pending)
            for job in pending:
                entry = job.result()
                files[entry["path"]] = entry
    _save(where, revision, commit, [files[n] for n in names])
    return _result(where, revision, commit, [files[n] for n in names])


class _Fetcher:
    """Fetch one file at a pinned commit (no network when it is already in place).

    Returns (path, entry): entry is the verified record entry when the file was streamed and hashed here, None
    when the caller still has to verify the file (small files via hf_hub_download, files already on disk).
    """

    def __init__(self, where, commit, endpoint, token, progress):
        self.where, self.commit, self.endpoint, self.token, self.progress = where, commit, endpoint, token, progress

    def __call__(self, name: str, want: dict) -> tuple[str, dict | None]:
        if want.get("lfs_sha256") and want.get("size") is not None:
            return self._resumable(name, want)
        from huggingface_hub import hf_hub_download
        return hf_hub_download(self.where.repo, name, revision=self.commit, cache_dir=self.where.cache_dir,
                               local_dir=self.where.local_dir, endpoint=self.endpoint, token=self.token,
                               tqdm_class=_bar_class(name, self.progress)), None

    # -- LFS files: resumable across runs --------------------------------------------------------------

    def _resumable(self, name: str, want: dict) -> tuple[str, dict | None]:
        from huggingface_hub.utils import WeakFileLock
        sha = want["lfs_sha256"]
        if self.where.local_dir:
            found = self._local_dir_existing(name, sha)
            if found:
                return found, None
            from huggingface_hub._local_folder import get_local_download_paths
            paths = get_local_download_paths(_Path(self.where.local_dir), name)
            final, lock = str(paths.file_path), str(paths.lock_path)
            partial = os.path.join(self.where.records, "incomplete", f"{sha}.incomplete")
        else:
            storage = os.path.join(self.where.cache_dir, "models--" + self.where.repo.replace("/", "--"))
            final = os.path.join(storage, "snapshots", self.commit, *name.split("/"))
            blob = os.path.join(storage, "blobs", sha)
            lock = os.path.join(self.where.cache_dir, ".locks", os.path.basename(storage), f"{sha}.lock")
            partial = blob + ".incomplete"
            if os.path.exists(final):
                return final, None
            if os.path.exists(blob):  # same content under another commit: link it, the caller verifies it
                self._link(blob, final, new_blob=False, lock=lock)
                return final, None
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        waited_from = time.time_ns()
        with WeakFileLock(lock):
            if self._placed_meanwhile(final, partial, waited_from):  # another process finished it first
                return final, None  # the caller verifies it
            got = self._stream(name, want["size"], partial)
            if got != sha:
                _remove(partial)
                raise fail(f"{name}: sha256 {got} does not match the hub's {sha} ({self.where.repo}@{self.commit}); "
                           "the file was deleted, run again to re-download")
            self._place(partial, final)
        if self.where.local_dir:  # takes the same lock itself
            from huggingface_hub._local_folder import write_download_metadata
            write_download_metadata(_Path(self.where.local_dir), name, commit_hash=self.commit, etag=sha)
        return final, {**want, "sha256": got, "stat": _stat_key(final)}

    def _placed_meanwhile(self, final: str, partial: str, since_ns: int) -> bool:
        if self.where.local_dir:
            return os.path.isfile(final) and os.stat(final).st_mtime_ns >= since_ns
        blob = partial[:-len(".incomplete")]
        if not os.path.exists(blob):
            return False
        if not os.path.lexists(final):
            self._link(blob, final, new_blob=False)
        return True

    def _local_dir_existing(self, name: str, sha: str) -> str | None:
        """A --local-dir file that is already there (as hf_hub_download would reuse it), or a cached copy of it."""
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub._local_folder import read_download_metadata, write_download_metadata
        local_dir = _Path(self.where.local_dir)
        path = os.path.join(self.where.local_dir, *name.split("/"))
        meta = read_download_metadata(local_dir, name)
        if os.path.isfile(path) and meta is not None and (meta.commit_hash == self.commit or meta.etag == sha):
            if meta.commit_hash != self.commit:
                write_download_metadata(local_dir, name, commit_hash=self.commit, etag=sha)
            return path
        cached = try_to_load_from_cache(self.where.repo, name, cache_dir=self.where.cache_dir, revision=self.commit)
        if isinstance(cached, str):
            import shutil
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            shutil.copyfile(cached, tmp)
            os.replace(tmp, path)
            write_download_metadata(local_dir, name, commit_hash=self.commit, etag=sha)
            return path
        return None

    def _stream(self, name: str, size: int, partial: str) -> str:
        """Bring `partial` to `size` bytes, resuming from what it holds; return the sha256 of the whole file."""
        import httpx2
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
        url = hf_hub_url(self.where.repo, name, revision=self.commit, endpoint=self.endpoint)
        os.makedirs(os.path.dirname(partial), exist_ok=True)
        with open(partial, "ab"):
            pass
        with open(partial, "r+b") as f:
            have = os.fstat(f.fileno()).st_size
            if have > size:  # not a prefix of this file
                f.truncate(0)
                have = 0
            sha256 = _hash_prefix(f, have)
            bar_class = _bar_class(name, self.progress)
            with bar_class(total=size, initial=have, unit="B", unit_scale=True, unit_divisor=1024) as bar:
                failures, restarted = 0, False
                while have < size:
                    headers = build_hf_headers(token=self.token)
                    headers["Accept-Encoding"] = "identity"  # a compressed reply would not honour Range
                    if have:
                        headers["Range"] = f"bytes={have}-"
                    got_bytes = False
                    try:
                        with get_session().stream("GET", url, headers=headers,
                                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as reply:
                            if have and reply.status_code == 416 and not restarted:
                                restarted = True  # the server disowns our prefix: start over
                                have, sha256 = _restart(f, bar)
                                continue
                            hf_raise_for_status(reply)
                            if have and not _continues_at(reply, have):
                                if reply.status_code != 200:  # a 206 from elsewhere: ask again for everything
                                    have, sha256 = _restart(f, bar)
                                    continue
                                have, sha256 = _restart(f, bar)  # a 200 is the whole file: take it from byte 0
                            for chunk in reply.iter_bytes():
                                if not chunk:
                                    continue
                                if have + len(chunk) > size:
                                    f.close()
                                    _remove(partial)
                                    raise fail(f"{name}: the hub sent more than the {size} bytes it lists "
                                               f"({self.where.repo}@{self.commit}); the partial file was deleted, "
                                               "run again to re-download")
                                f.write(chunk)
                                sha256.update(chunk)
                                have += len(chunk)
                                bar.update(len(chunk))
                                got_bytes = True
                        if have < size and not got_bytes:
                            raise httpx2.RemoteProtocolError(f"{name}: the reply ended at byte {have} of {size}")
                    except (httpx2.NetworkError, httpx2.TimeoutException, httpx2.RemoteProtocolError):
                        failures = 0 if got_bytes else failures + 1
                        if failures > STREAM_RETRIES:
                            raise
                        time.sleep(STREAM_RETRY_DELAY)
                        continue
                    failures = 0
            f.flush()
            os.fsync(f.fileno())
        return sha256.hexdigest()

    def _place(self, partial: str, final: str) -> None:
        """Move a verified partial file to where hf_hub_download would have put it."""
        if self.where.local_dir:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(partial, final)
        else:
            blob = partial[:-len(".incomplete")]
            os.replace(partial, blob)
            self._link(blob, final, new_blob=True)
        _fsync_dir(os.path.dirname(partial))

    def _link(self, blob: str, pointer: str, new_blob: bool, lock: str | None = None) -> None:
        from huggingface_hub.file_download import _create_symlink
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        if lock is None:
            _create_symlink(blob, pointer, new_blob=new_blob)
            return
        from huggingface_hub.utils import WeakFileLock
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        with WeakFileLock(lock):
            if not os.path.exists(pointer):
                _create_symlink(blob, pointer, new_blob=new_blob)


def _Path(p):
    from pathlib import Path
    return Path(p)


def _hash_prefix(f, n: int):
    """sha256 of the first n bytes of an open file (the part of a partial download already on disk)."""
    sha256 = hashlib.sha256()
    f.seek(0)
    left = n
    while left:
        block = f.read(min(HASH_CHUNK, left))
        if not block:
            break
        sha256.update(block)
        left -= len(block)
    f.seek(n)
    return sha256


def _restart(f, bar):
    f.seek(0)
    f.truncate(0)
    bar.initial = 0  # so the rate shown does not count the discarded prefix
    bar.reset(total=bar.total)
    return 0, hashlib.sha256()


def _continues_at(reply, offset: int) -> bool:
    """True when a reply to `Range: bytes=<offset>-` carries exactly the bytes from `offset` on."""
    if reply.status_code != 206:
        return False
    m = re.match(r"\s*bytes\s+(\d+)-", reply.headers.get("Content-Range", ""))
    return bool(m) and int(m.group(1)) == offset


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _done(value):
    from concurrent.futures import Future
    job = Future()
    job.set_result(value)
    return job


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
