"""verification.json, what `verify` proved about an output: written into MS_DIR by every verify that ran (passed
or failed), read by `check`. The manifest is the list of what was written; this record is what was proven, and
it holds only while the files it names are the files it was proven on: each with its sha256 (MS_DIR's files,
the HF source's, the image). `status` says whether it still applies.

The record is not one of the manifest's `files` (verify writes it after convert has published the output, and
a later verify replaces it); convert, shard and export never copy it, so an output written again has none.
"""
from __future__ import annotations

import os

from .. import __version__
from ..errors import fail
from .files import read_json, sha256_file, write_json
from .paths import is_plain_name, within

NAME = "verification.json"
STATUSES = ("current", "stale")


def output_files(folder: str) -> list:
    """Every regular file in `folder` and below (relative, '/'-separated, sorted), but the record itself and
    hidden files (staging leftovers): what a record covers."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != NAME and not name.startswith(".") and os.path.isfile(os.path.join(root, name)):
                found.append(rel)
    return found


def write_record(folder: str, record: dict) -> str:
    """Write the record into `folder` atomically (temp file, fsync, rename); returns its path."""
    path = os.path.join(folder, NAME)
    write_json(path, {"tool": "llava-ckpt", "version": __version__, "record": "verification", **record})
    return path


def read_record(folder: str) -> dict | None:
    """The folder's record, None when it has none; a damaged one is an error naming it."""
    path = os.path.join(folder, NAME)
    if not os.path.lexists(path):
        return None
    record = read_json(path)
    where = path
    if not isinstance(record, dict) or record.get("record") != "verification" or record.get("tool") != "llava-ckpt":
        raise fail(f"{where} is not a llava-ckpt verification record")
    for side, key in (("ms_dir", "path"), ("source", "name")):
        files = record.get(side, {}).get("files") if isinstance(record.get(side), dict) else None
        if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get(key), str)
                                                  and isinstance(f.get("sha256"), str) for f in files):
            raise fail(f"{where}: '{side}.files' is not a list of files with their sha256")
    return record


def _changed_source(entry: dict, root: str) -> str | None:
    """Why one of the record's source files no longer is what it was proven against (None: it is). Size and
    mtime first; a file that differs in either is hashed to decide (a copy keeps the content, not the mtime)."""
    path = os.path.join(root, entry["name"])
    if not is_plain_name(entry["name"]):
        return f"source {entry['name']!r} is not a plain name"
    try:
        st = os.stat(path)
    except OSError:
        return None  # gone: nothing to compare with (reported as missing, not as changed)
    if st.st_size == entry.get("size") and st.st_mtime_ns == entry.get("mtime_ns"):
        return None
    if sha256_file(path) != entry["sha256"]:
        return f"source {path} changed"
    return None


def status(folder: str, record: dict, known: dict | None = None) -> dict:
    """Whether `record` still applies to `folder`: {"status": current | stale, "changed": [why, ...],
    "sources_missing": [...], plus the record's verdict, kind, version and what it proved}. It is stale when a
    file of `folder` it names changed or is gone, a file the manifest lists is not in it, or a source file it
    was proven against changed (a source that is gone leaves it current: its sha256 says what it was). The
    image and prompt are inputs of the test, not of the output: they are recorded, not checked.

    `known`: rel path -> sha256 of files the caller has hashed already (check hashes the manifest's files);
    the others are hashed here."""
    known = dict(known or {})
    changed = []
    recorded = {f["path"]: f for f in record["ms_dir"]["files"]}
    for rel, entry in recorded.items():
        path = os.path.join(folder, rel)
        if not is_plain_name(rel) or not within(path, folder):
            changed.append(f"{rel}: not a plain path inside {folder}")
            continue
        if not os.path.isfile(path):
            changed.append(f"{rel} is gone")
            continue
        digest = known.get(rel) or sha256_file(path)
        if digest != entry["sha256"]:
            changed.append(f"{rel} changed")
    for rel in known:
        if rel not in recorded:
            changed.append(f"{rel} was not there when it was written")
    root = record["source"].get("path", "")
    missing = [f["name"] for f in record["source"]["files"] if not os.path.isfile(os.path.join(root, f["name"]))]
    changed += [why for why in (_changed_source(f, root) for f in record["source"]["files"]) if why]
    weights = record.get("weight_proof") or {}
    return {"status": "stale" if changed else "current", "changed": changed, "sources_missing": missing,
            "verdict": record.get("verdict"), "kind": record.get("kind"), "weights_only": record.get("weights_only"),
            "written": record.get("written"), "version": record.get("version"),
            "weights_proven": weights.get("tensors"), "weights_passed": weights.get("passed")}
