"""What a download proved. huggingface_hub checks only sizes on plain HTTP, so every fetched file is hashed
here against the hub's metadata (lfs sha256, or git's blob sha1 for small files); a file that does not match
is deleted. What checked out goes into a record, `<records>/<commit>.json`, with each file's (size, mtime,
inode): a later run, online or offline, trusts a file that still matches it and re-hashes any other. The
offline path lives here because it is nothing but checking the files on disk against that record."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import suppress

from ..errors import CheckpointError, fail
from ..io.files import read_json, sha256_file, write_atomic
from .where import Where, is_commit


def hashes(path: str, git: bool = False) -> tuple[str, str | None]:
    """sha256 (and git's blob sha1 when asked) in one pass over the file."""
    if not git:
        return sha256_file(path), None
    sha1 = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    sha256 = sha256_file(path, on_block=lambda offset, view: sha1.update(view))
    return sha256, sha1.hexdigest()


def stat_key(path: str) -> list[int]:
    st = os.stat(path)  # follows the snapshot symlink to the blob
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def verified(path: str, want: dict, repo: str, commit: str, where: Where) -> dict:
    """Return the file's record entry; a file that does not match the hub's metadata is deleted, then raised."""
    name = want["path"]
    if want.get("stat") and want["stat"] == stat_key(path):
        return want  # verified earlier and untouched since
    size = os.path.getsize(path)
    if size != want["size"]:
        discard(path, name, where)
        raise fail(f"{name}: {size} bytes, the hub lists {want['size']} ({repo}@{commit}); "
                   "the file was deleted, run again to re-download")
    lfs = want.get("lfs_sha256")
    sha256, sha1 = hashes(path, git=not lfs)
    expected, got, kind = (lfs, sha256, "sha256") if lfs else (want.get("oid"), sha1, "git sha1")
    if expected and got != expected:
        discard(path, name, where)
        raise fail(f"{name}: {kind} {got} does not match the hub's {expected} ({repo}@{commit}); "
                   "the file was deleted, run again to re-download")
    return {**want, "sha256": sha256, "stat": stat_key(path)}


def discard(path: str, name: str, where: Where) -> None:
    """Remove a bad file so nothing uses it: the snapshot link and its blob, or the local-dir copy."""
    paths = [path]
    if os.path.islink(path):
        paths.append(os.path.realpath(path))
    if where.local_dir:
        paths.append(os.path.join(where.local_dir, ".cache", "huggingface", "download", name + ".metadata"))
    for p in paths:
        with suppress(FileNotFoundError):
            os.remove(p)


def _record_path(where: Where, commit: str) -> str:
    return os.path.join(where.records, f"{commit}.json")


def load_record(where: Where, commit: str) -> dict | None:
    """The record of an earlier verified download of `commit`; None when there is none or it is unreadable."""
    try:
        record = read_json(_record_path(where, commit), "verification record")
    except CheckpointError:  # missing, not a file, not JSON: as if there were none
        return None
    if isinstance(record, dict) and record.get("commit_sha") == commit and record.get("files"):
        return record
    return None


def save(where: Where, revision: str, commit: str, files: list[dict]) -> None:
    """Write the verification record and the ref, atomically and durably, only after everything checked out."""
    write_atomic(_record_path(where, commit), json.dumps(
        {"repo_id": where.repo, "commit_sha": commit, "files": files}, indent=1))
    if revision != commit:
        write_atomic(os.path.join(where.refs, revision), commit)


def from_disk(where: Where, revision: str, progress: bool, why: str) -> dict:
    """No network: the files must be present and must match the record of an earlier verified download."""
    repo = where.repo
    commit = revision if is_commit(revision) else _read_ref(where, revision)
    record = load_record(where, commit) if commit else None
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
        if progress and not (want.get("stat") == stat_key(path)):
            print(f"re-hashing {want['path']} (changed since it was verified)", file=sys.stderr)
        files.append(verified(path, want, repo, commit, where))
    if files != record["files"]:
        save(where, revision, commit, files)
    return result(where, revision, commit, files)


def _read_ref(where: Where, revision: str) -> str | None:
    try:
        with open(os.path.join(where.refs, revision), encoding="utf-8") as f:
            ref = f.read().strip()
        return ref if is_commit(ref) else None
    except OSError:
        return None


def result(where: Where, revision: str, commit: str, files: list[dict]) -> dict:
    """What download returns: where the files are, which commit, and {path, size, sha256} of each."""
    return {"path": where.root(commit), "repo_id": where.repo, "revision": revision, "commit_sha": commit,
            "files": [{"path": f["path"], "size": f["size"], "sha256": f["sha256"]} for f in files]}
