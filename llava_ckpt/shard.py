"""`shard`: cut a tp-1 output of `convert` into N tensor-parallel ranks, by the split kinds its manifest
records (which came from the mapping table). Same streaming core and output transaction as convert."""
from __future__ import annotations

import os

from .engine.forward import PlannedTarget, target_rank_shape, write_checkpoint
from .engine.mapping import Target
from .engine.records import checked_entries
from .engine.splits import check_divides
from .errors import fail
from .io.dtypes import code_for
from .io.manifest import NAME, checked_weight_files, output_layout, read_ms_output, recorded_side_files
from .io.readers import read_index


def shard(converted_dir: str, out: str, tp: int, progress: bool = True, overwrite: bool = False) -> dict:
    """Write OUT/rank_<r>/llava.<fmt> for r < tp, OUT/strategy.ckpt and OUT/manifest.json. `overwrite`:
    replace an OUT that holds another llava-ckpt output."""
    manifest = read_ms_output(converted_dir, "shard takes what convert wrote")
    where = os.path.join(converted_dir, NAME)
    if not isinstance(manifest.get("mapping"), dict):
        raise fail(f"{where}: 'mapping' is not an object")
    source_tp, fmt = output_layout(manifest, where)
    if source_tp != 1:
        raise fail(f"{converted_dir} is already split into {source_tp} ranks; shard takes a tp-1 output")
    (name, _), = checked_weight_files(converted_dir, manifest)
    path = os.path.join(converted_dir, name)
    infos = read_index(path)
    entries = checked_entries(manifest, where)
    listed = [e["name"] for e in entries]
    if sorted(listed) != sorted(infos):
        extra = sorted(set(infos) - set(listed))
        missing = sorted(set(listed) - set(infos))
        raise fail(f"{path} does not match its manifest (missing: {missing[:4]}, unlisted: {extra[:4]})")
    planned = []
    for e in entries:
        info = infos[e["name"]]
        if list(info.shape) != list(e["shape"]) or code_for(e["dtype"]) != info.dtype:
            raise fail(f"{path}: tensor {e['name']!r} is {list(info.shape)} {info.dtype}, the manifest says "
                       f"{e['shape']} {e['dtype']}")
        target = Target(e["name"], (e["name"],), "rename", e["split"], (tuple(info.shape),))
        planned.append(PlannedTarget(target, (info,), info.dtype, tuple(e["sources"]), e["dtype"]))
    # the split dims, plus the whole units (heads, KV groups, gate/up pairs) convert recorded from the table
    check_divides([u for p in planned for u in p.target.tp_units()] + list(manifest.get("tp_sizes", {}).items()), tp)
    tensors = [dict(e, rank_shape=list(target_rank_shape(p.target, tp))) for e, p in zip(entries, planned)]
    recorded = {os.path.realpath(path): f["sha256"] for f in manifest["files"]
                if f.get("path") == os.path.basename(path)}
    new_manifest = {
        "command": "shard",
        "source": dict(manifest.get("source", {}), converted=os.path.abspath(converted_dir)),
        "mapping": manifest.get("mapping"),
        "options": {k: v for k, v in manifest.get("options", {}).items() if k not in ("tp", "format")},
        "tp_sizes": manifest.get("tp_sizes", {}),
        "tensors": tensors,
    }
    listed = {f.get("path"): f.get("sha256") for f in manifest["files"]}
    side = recorded_side_files(converted_dir, manifest, where)
    return write_checkpoint(out, converted_dir, planned, fmt, tp, [(os.path.basename(path), os.path.realpath(path))],
                            new_manifest, progress, expected_hashes=recorded, inputs_key="converted_files",
                            side_files=side, expected_side=listed, overwrite=overwrite)
