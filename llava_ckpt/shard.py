"""`shard`: cut a tp-1 output of `convert` into N tensor-parallel ranks, by the split kinds its manifest
records (which came from the mapping table). Same streaming core and atomic output as convert."""
from __future__ import annotations

import os

from .errors import fail
from .hf_source import SIDE_FILES, inside
from .io.dtypes import code_for
from .io.load import weights_file
from .io.source import read_index
from .manifest import checked_entries, read_manifest
from .mapping import Target
from .stream import Job, target_rank_shape, write_output
from .tp import check_divides


def shard(converted_dir: str, out: str, tp: int, progress: bool = True) -> dict:
    """Write OUT/rank_<r>/llava.<fmt> for r < tp, OUT/strategy.ckpt and OUT/manifest.json."""
    if not os.path.isdir(converted_dir):
        raise fail(f"{converted_dir} is not a folder")
    manifest = read_manifest(converted_dir)
    where = os.path.join(converted_dir, "manifest.json")
    if not isinstance(manifest.get("mapping"), dict):
        raise fail(f"{where}: 'mapping' is not an object")
    if manifest.get("tp", 1) != 1:
        raise fail(f"{converted_dir} is already split into {manifest['tp']} ranks; shard takes a tp-1 output")
    path = weights_file(converted_dir)
    infos = read_index(path)
    entries = checked_entries(manifest, where)
    listed = [e["name"] for e in entries]
    if sorted(listed) != sorted(infos):
        extra = sorted(set(infos) - set(listed))
        missing = sorted(set(listed) - set(infos))
        raise fail(f"{path} does not match its manifest (missing: {missing[:4]}, unlisted: {extra[:4]})")
    jobs = []
    for e in entries:
        info = infos[e["name"]]
        if list(info.shape) != list(e["shape"]) or code_for(e["dtype"]) != info.dtype:
            raise fail(f"{path}: tensor {e['name']!r} is {list(info.shape)} {info.dtype}, the manifest says "
                       f"{e['shape']} {e['dtype']}")
        target = Target(e["name"], (e["name"],), "rename", e["split"], (tuple(info.shape),))
        jobs.append(Job(target, (info,), info.dtype, tuple(e["sources"]), e["dtype"]))
    # the split dims, plus the whole units (heads, KV groups, gate/up pairs) convert recorded from the table
    check_divides([u for j in jobs for u in j.target.tp_units()] + list(manifest.get("tp_sizes", {}).items()), tp)
    tensors = [dict(e, rank_shape=list(target_rank_shape(j.target, tp))) for e, j in zip(entries, jobs)]
    fmt = "ckpt" if path.endswith(".ckpt") else "safetensors"
    recorded = {os.path.realpath(path): f["sha256"] for f in manifest["files"]
                if f.get("path") == os.path.basename(path)}
    new_manifest = {
        "command": "shard",
        "source": dict(manifest.get("source", {}), converted=os.path.abspath(converted_dir)),
        "mapping": manifest.get("mapping"),
        "options": dict(manifest.get("options", {})),
        "tp_sizes": manifest.get("tp_sizes", {}),
        "tensors": tensors,
    }
    listed = {f.get("path"): f.get("sha256") for f in manifest["files"]}
    side = [(n, inside(converted_dir, n, where)) for n in SIDE_FILES if n in listed]
    missing = [n for n, p in side if not os.path.isfile(p)]
    if missing:
        raise fail(f"{converted_dir}: {', '.join(missing)} listed in its manifest but missing")
    return write_output(out, converted_dir, jobs, fmt, tp, [(os.path.basename(path), os.path.realpath(path))],
                        new_manifest, progress, expected_hashes=recorded, inputs_key="converted_files",
                        side_files=side, expected_side=listed)
