"""Talking to the hub's API: resolve a revision to a commit, list the files with the hashes the hub expects,
choose the ones conversion needs, retry network errors, and turn every huggingface_hub or network exception
into one line. Kept apart from the byte transfer so that one place decides what a failure means: a clean
error, or `Unreachable` (the caller may fall back to a verified local copy)."""
from __future__ import annotations

import time

from ..errors import CheckpointError, fail
from ..io.hf_folder import INDEX, PICKLE_SUFFIXES, SIDE_FILES
from ..io.files import read_json

# config.json first, to refuse a non-LLaVA repo before any weights move; then the index, which names the shards
_FIRST = ("config.json", INDEX)
SMALL_FILES = _FIRST + tuple(n for n in SIDE_FILES if n not in _FIRST)
RETRY_DELAYS = (1.0, 3.0)  # metadata calls: waits between attempts on network errors


class Unreachable(Exception):
    """The hub could not be reached (after retries): the caller may fall back to a verified local copy."""


def commit_of(api, repo: str, revision: str) -> str:
    """The commit sha a branch or tag points at now."""
    return retry(lambda: api.repo_info(repo, revision=revision).sha)


def expected_files(api, repo: str, commit: str) -> dict:
    """path -> {path, size, oid (git blob sha1), lfs_sha256} of every file at the commit, from the tree API."""
    from huggingface_hub import RepoFile
    listing = retry(lambda: [f for f in api.list_repo_tree(repo, revision=commit, recursive=True)
                             if isinstance(f, RepoFile)])
    return {f.path: {"path": f.path, "size": f.size, "oid": f.blob_id,
                     "lfs_sha256": f.lfs.sha256 if f.lfs else None} for f in listing}


def retry(call):
    """Retry a metadata call on network errors; HTTP errors (404, 401...) are not retried."""
    import httpx2
    for delay in (*RETRY_DELAYS, None):
        try:
            return call()
        except httpx2.TransportError as exc:
            if delay is None:
                raise Unreachable(f"{type(exc).__name__}: {exc}") from None
            time.sleep(delay)


class hub_errors:
    """Turn huggingface_hub / network exceptions into one-line CheckpointErrors."""

    def __init__(self, repo, revision, endpoint):
        self.repo, self.revision, self.endpoint = repo, revision, endpoint

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (CheckpointError, Unreachable)):
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
            raise fail(f"{repo}@{rev}: a listed file is missing on the hub: {one_line(exc)}") from None
        if isinstance(exc, e.HfHubHTTPError) and status in (401, 403):
            raise fail(f"access to {repo} denied (HTTP {status}): set HF_TOKEN to a token that can read it") from None
        if isinstance(exc, e.HfHubHTTPError):
            raise fail(f"hub error for {repo}@{rev} (HTTP {status}): {one_line(exc)}") from None
        if isinstance(exc, (httpx2.TransportError, e.LocalEntryNotFoundError)):
            raise Unreachable(one_line(exc)) from None
        if isinstance(exc, OSError):  # e.g. huggingface_hub's size consistency check, disk full
            raise fail(f"download of {repo}@{rev} failed: {one_line(exc)}") from None
        return False


def one_line(exc) -> str:
    return " ".join(str(exc).split())[:300]


def plan(tree: dict, repo: str, revision: str) -> list[str]:
    """Files to fetch, config first (to refuse a non-LLaVA repo before any weights move). No pickles."""
    if "config.json" not in tree:
        raise fail(f"{repo}@{revision} has no config.json: not a transformers checkpoint")
    weights = sorted(p for p in tree if "/" not in p and p.endswith(".safetensors"))
    if not weights:
        pickles = sorted(p for p in tree if p.endswith(PICKLE_SUFFIXES))
        extra = f" (only pickle weights: {', '.join(pickles[:3])}; they are never loaded)" if pickles else ""
        raise fail(f"{repo}@{revision} has no .safetensors weights{extra}")
    small = [n for n in SMALL_FILES if n in tree]
    if INDEX in tree:
        return small  # shards come from the index, once it is here
    return small + weights


def with_index_shards(rest: list[str], index_path: str, tree: dict, repo: str) -> list[str]:
    """`rest` plus the shards the fetched index names, each of which must be in the repo."""
    index = read_json(index_path, INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise fail(f"{repo}: {INDEX} is not a safetensors index (needs a weight_map object of file names)")
    shards = sorted(set(weight_map.values()))
    if not shards:
        raise fail(f"{repo}: {INDEX} has no weight_map")
    missing = [s for s in shards if s not in tree]
    if missing:
        raise fail(f"{repo}: shard {missing[0]} named in {INDEX} is not in the repo")
    return rest + [s for s in shards if s not in rest]


def check_config(path: str, repo: str) -> None:
    from ..engine.config import normalize_config
    normalize_config(read_json(path, f"{repo}/config.json"), where=f"{repo}/config.json")
