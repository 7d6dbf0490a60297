"""`check`: re-hash every file an output's manifest lists and report any damage, file by file.

One sequential read per file: while a file is hashed whole, the byte ranges of its replicated tensors are
hashed too, so a tp > 1 output also learns, at no extra read, whether every rank holds the same bytes for
the tensors that are meant to be identical on all ranks (and which tensor a damaged rank lost).
"""
from __future__ import annotations

import hashlib
import os
import re

from .errors import CheckpointError, fail
from .io.files import sha256_file
from .io.source import read_index
from .manifest import NAME, read_manifest

WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".bin", ".pt", ".pth", ".pkl", ".npy", ".npz")
RANK_FILE = re.compile(r"^rank_(\d+)/llava\.(ckpt|safetensors)$")


def _plain(rel) -> bool:
    """A relative path inside OUT: no absolute path, no `..`, no empty or `.` parts, no backslashes."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _hash_file(path: str, ranges: dict) -> tuple:
    """(sha256 of the file, {name: sha256 of its byte ranges}) in one sequential read."""
    parts = {name: hashlib.sha256() for name in ranges}
    spans = sorted((start, start + length, name) for name, pieces in ranges.items() for start, length in pieces)

    def hash_ranges(pos, view):
        end = pos + len(view)
        for a, b, name in spans:
            if a < end and b > pos:
                parts[name].update(view[max(a, pos) - pos:min(b, end) - pos])
    whole = sha256_file(path, on_block=hash_ranges if spans else None)
    return whole, {name: h.hexdigest() for name, h in parts.items()}


def _entries(manifest: dict, where: str) -> list:
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise fail(f"{where} lists no output files (no `files`): cannot check anything")
    return files


def _expected_paths(manifest: dict) -> list:
    """The files a complete output of this manifest's kind must have."""
    tp, fmt = manifest.get("tp"), manifest.get("format")
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1 or fmt not in ("ckpt", "safetensors"):
        return []
    if tp == 1:
        return [f"llava.{fmt}"]
    return [f"rank_{r}/llava.{fmt}" for r in range(tp)] + ["strategy.ckpt"]


def check(out: str) -> dict:
    """{"ok", "checked" (files hashed), "problems" (one line each, naming the file)} for the output in `out`."""
    if not os.path.isdir(out):
        raise fail(f"{out} is not a folder" if os.path.exists(out) else f"{out} does not exist")
    where = os.path.join(out, NAME)
    manifest = read_manifest(out)
    entries = _entries(manifest, where)
    root = os.path.realpath(out)
    problems: list = []
    checked = 0
    listed: set = set()
    tensors = manifest.get("tensors")
    replicated = [t.get("name") for t in tensors if isinstance(t, dict) and t.get("split_dim", 0) is None] \
        if isinstance(tensors, list) and manifest.get("tp", 1) != 1 else []
    rank_parts: dict = {}  # rank file -> {tensor: sha256 of its bytes}
    for i, entry in enumerate(entries):
        rel = entry.get("path") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not _plain(rel):
            problems.append(f"{where}: files[{i}] path {rel!r} is not a plain path inside {out}; not opened")
            continue
        if not isinstance(size, int) or not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            problems.append(f"{where}: files[{i}] ({rel}) has no valid size and sha256")
            continue
        if rel in listed:
            problems.append(f"{where}: {rel} is listed twice")
            continue
        listed.add(rel)
        path = os.path.join(out, rel)
        if not os.path.lexists(path):
            problems.append(f"{rel}: missing")
            continue
        if not _inside(root, path):
            problems.append(f"{rel}: resolves outside {out} ({os.path.realpath(path)}); not opened")
            continue
        if not os.path.isfile(path):
            problems.append(f"{rel}: not a regular file")
            continue
        checked += 1
        actual = os.path.getsize(path)
        if actual != size:
            problems.append(f"{rel}: {actual} bytes, the manifest says {size} (truncated or changed)")
            continue
        match = RANK_FILE.match(rel)
        ranges = {}
        if match and replicated:
            try:
                index = read_index(path)
                ranges = {n: index[n].pieces for n in replicated if n in index}
            except (CheckpointError, OSError, ValueError) as exc:  # damaged: the hash below says so too
                ranges = {}
                problems.append(f"{rel}: cannot list its tensors ({exc})")
        digest, parts = _hash_file(path, ranges)
        if digest != sha:
            problems.append(f"{rel}: sha256 {digest[:16]}... differs from the manifest's {sha[:16]}...: corrupted")
        if match and parts:
            rank_parts[(int(match.group(1)), rel)] = parts
    for rel in _expected_paths(manifest):
        if rel not in listed:
            problems.append(f"{where}: does not list {rel}, which a complete output has")
    for dirpath, dirnames, filenames in os.walk(out):
        dirnames.sort()
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), out).replace(os.sep, "/")
            if rel != NAME and rel not in listed and name.endswith(WEIGHT_SUFFIXES):
                problems.append(f"{rel}: weight file not listed in the manifest")
    problems += _replicas_differ(rank_parts)
    return {"ok": not problems, "checked": checked, "problems": problems}


def _replicas_differ(rank_parts: dict) -> list:
    """Replicated tensors whose bytes differ between ranks, each blamed on the files outside the majority."""
    problems = []
    names = sorted({n for parts in rank_parts.values() for n in parts})
    for name in names:
        by_hash: dict = {}
        for key, parts in sorted(rank_parts.items()):
            if name in parts:
                by_hash.setdefault(parts[name], []).append(key[1])
        if len(by_hash) > 1:
            majority = max(by_hash.values(), key=len)
            for files in by_hash.values():
                if files is not majority:
                    problems += [f"{rel}: replicated tensor {name!r} differs from {majority[0]}" for rel in files]
    return problems
