"""`check`: re-hash every file an output's manifest lists and report any damage, file by file; and say whether
the output's verification record (verification.json, written by verify) still applies to it.

One sequential read per file: while a file is hashed whole, the byte ranges of its replicated tensors are
hashed too, so a tp > 1 output also learns, at no extra read, whether every rank holds the same bytes for
the tensors that are meant to be identical on all ranks (and which tensor a damaged rank lost). The record
is compared with the same hashes (only files it names that the manifest does not list are hashed again).
"""
from __future__ import annotations

import hashlib
import os
import re

from .errors import CheckpointError, fail
from .io.files import sha256_file
from .io.manifest import NAME, output_layout, output_ranks, read_manifest
from .io.mindformers import PREDICT_YAML
from .io.paths import is_plain_name, within
from .io.ranks import weight_paths
from .io.readers import read_index
from .io.verification import read_record, status as record_status

WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".bin", ".pt", ".pth", ".pkl", ".npy", ".npz")


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


def _layout(manifest: dict, where: str) -> tuple:
    """(the files a complete output of this manifest's kind must have, {rank file: rank} of a tp > 1 output);
    nothing is known of an export's HF folder."""
    if manifest.get("command") == "export":
        return [], {}
    tp, fmt = output_layout(manifest, where)
    ranks = output_ranks(manifest, where)
    weights = weight_paths(tp, fmt, ranks)
    if tp == 1:
        return weights, {}
    return weights + ["strategy.ckpt"], {rel: r for r, rel in zip(ranks, weights)}


def check(out: str) -> dict:
    """{"ok", "checked" (files hashed), "problems" (one line each, naming the file), "verification" (the
    record's verdict and whether it still applies: io.verification.status, or None without a record)} for the
    output in `out`. `ok` is about the files and the manifest; a stale record is reported, not a problem (the
    files can be intact and simply not the ones that were verified), a damaged record is one."""
    if not os.path.isdir(out):
        raise fail(f"{out} is not a folder" if os.path.exists(out) else f"{out} does not exist")
    where = os.path.join(out, NAME)
    manifest = read_manifest(out)
    entries = _entries(manifest, where)
    problems: list = []
    try:
        expected, rank_files = _layout(manifest, where)
    except CheckpointError as exc:
        expected, rank_files = [], {}
        problems.append(str(exc))
    checked = 0
    listed: set = set()
    tensors = manifest.get("tensors")
    replicated = [t.get("name") for t in tensors if isinstance(t, dict) and t.get("split_dim", 0) is None] \
        if isinstance(tensors, list) and rank_files else []
    rank_parts: dict = {}  # rank file -> {tensor: sha256 of its bytes}
    digests: dict = {}     # rel -> sha256, for the verification record
    for i, entry in enumerate(entries):
        rel = entry.get("path") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not is_plain_name(rel):
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
        if not within(path, out):
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
        ranges = {}
        if rel in rank_files and replicated:
            try:
                index = read_index(path)
                ranges = {n: index[n].pieces for n in replicated if n in index}
            except (CheckpointError, OSError, ValueError) as exc:  # damaged: the hash below says so too
                ranges = {}
                problems.append(f"{rel}: cannot list its tensors ({exc})")
        digest, parts = _hash_file(path, ranges)
        digests[rel] = digest
        if digest != sha:
            problems.append(f"{rel}: sha256 {digest[:16]}... differs from the manifest's {sha[:16]}...: corrupted")
        if rel in rank_files and parts:
            rank_parts[(rank_files[rel], rel)] = parts
    for rel in expected:
        if rel not in listed:
            problems.append(f"{where}: does not list {rel}, which a complete output has")
    for dirpath, dirnames, filenames in os.walk(out):
        dirnames.sort()
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), out).replace(os.sep, "/")
            if rel != NAME and rel not in listed and name.endswith(WEIGHT_SUFFIXES):
                problems.append(f"{rel}: weight file not listed in the manifest")
    problems += _replicas_differ(rank_parts)
    if PREDICT_YAML in listed and os.path.isfile(os.path.join(out, PREDICT_YAML)):
        problems += _predict_yaml_problems(out, manifest, where)
    verification = None
    try:
        record = read_record(out)
        if record is not None:
            verification = record_status(out, record, digests)
    except CheckpointError as exc:
        problems.append(str(exc))
    return {"ok": not problems, "checked": checked, "problems": problems, "verification": verification}


def _predict_yaml_problems(out: str, manifest: dict, where: str) -> list:
    """What OUT/predict_llava.yaml says that contradicts the weights (sizes from config.json, qkv_concat, format,
    parameter dtype, tensor parallelism): MindFormers would refuse them, or build a model they do not fit."""
    from .engine.config import load_config
    from .io.mindformers import contradictions, predict_config, stored_dtype
    try:
        cfg = load_config(out)
        tp, fmt = output_layout(manifest, where)
        fused = bool((manifest.get("options") or {}).get("fuse_qkv"))
        expected = predict_config(cfg, out, fmt, tp, stored_dtype(manifest.get("tensors") or []), fused)
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        return [f"{PREDICT_YAML}: cannot say what it should hold ({exc})"]
    return contradictions(os.path.join(out, PREDICT_YAML), expected)


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


def format_verification(v: dict | None) -> str | None:
    """One line (two when stale) about the verification record, for the human-readable report (None: there
    is no record, nothing to say)."""
    if v is None:
        return None
    what = "weight proof only" if v["weights_only"] else "weight proof and numeric walk"
    kind = f", {v['kind']}" if v["kind"] else ""
    line = (f"verification: {v['verdict'].upper()}{kind} ({what}, {v['weights_proven']} tensors; llava-ckpt "
            f"{v['version']}, {v['written']})")
    if v["sources_missing"]:
        line += f"; {len(v['sources_missing'])} source files it names are not there to re-check"
    if v["status"] == "stale":
        shown = "; ".join(v["changed"][:4]) + (f"; and {len(v['changed']) - 4} more" if len(v["changed"]) > 4 else "")
        return line + f"\nverification: STALE, no longer applies: {shown}"
    return line + ", still applies"
