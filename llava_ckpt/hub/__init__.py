"""Fetch a LLaVA-1.5 checkpoint from the Hugging Face Hub: pinned to a commit, hash-checked, cache-reusing.

The public API is `download` and `is_repo_id`. The online path below resolves the revision to a commit,
takes the expected hashes from the hub's tree listing (remote), fetches each file (transfer: resumable for
the weights), checks it (records: deleted when it does not match) and writes the record of what checked out.
Without the network (HF_HUB_OFFLINE, or an unreachable hub) the files come from disk, checked against that
record (records.from_disk). `where` says where all of it lives.
"""
from __future__ import annotations

import os
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import CheckpointError, fail
from ..io.hf_folder import INDEX
from . import records, remote, transfer, where

__all__ = ["download", "is_repo_id"]

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
    place = where.Where(repo, local_dir)
    if where.offline():
        return records.from_disk(place, revision, progress, why="HF_HUB_OFFLINE is set")
    try:
        return _online(place, revision, progress, endpoint, token)
    except remote.Unreachable as exc:
        try:
            found = records.from_disk(place, revision, progress, why=f"cannot reach {endpoint}")
        except CheckpointError:
            raise fail(f"cannot reach {endpoint} for {repo}@{revision}: {exc}") from None
        print(f"warning: cannot reach {endpoint} ({exc}); using the verified local copy", file=sys.stderr)
        return found


def _online(place: where.Where, revision: str, progress: bool, endpoint: str, token: str | None) -> dict:
    from huggingface_hub import HfApi
    repo = place.repo
    api = HfApi(endpoint=endpoint, token=token)
    with remote.hub_errors(repo, revision, endpoint):
        commit = revision if where.is_commit(revision) else remote.commit_of(api, repo, revision)
        record = records.load_record(place, commit)
        if record is None:
            tree = remote.expected_files(api, repo, commit)
        else:  # verified before: the record holds the same metadata, and the files' stat keys
            tree = {f["path"]: f for f in record["files"]}
        fetch = transfer.Fetcher(place, commit, endpoint, token, progress)
        names = remote.plan(tree, repo, revision)
        files = {}
        with ThreadPoolExecutor(max_workers=1) as hasher:  # hash file i while file i+1 downloads
            pending = []
            i = 0
            while i < len(names):  # the index, once fetched, appends its shards to `names`
                name = names[i]
                path, entry = fetch(name, tree[name])
                if name == "config.json":
                    remote.check_config(path, repo)
                if name == INDEX:
                    names[i + 1:] = remote.with_index_shards(names[i + 1:], path, tree, repo)
                i += 1
                if entry is not None:  # streamed here and hashed on the way in
                    pending.append(_done(entry))
                else:
                    pending.append(hasher.submit(records.verified, path, tree[name], repo, commit, place))
                _raise_first_failure(pending)
            for job in pending:
                entry = job.result()
                files[entry["path"]] = entry
    records.save(place, revision, commit, [files[n] for n in names])
    return records.result(place, revision, commit, [files[n] for n in names])


def _done(value) -> Future:
    job = Future()
    job.set_result(value)
    return job


def _raise_first_failure(jobs) -> None:
    for job in jobs:
        if job.done() and job.exception() is not None:
            raise job.exception()
