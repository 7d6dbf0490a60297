"""manifest.json: what was converted, from what, how, and the sha256 of every file written."""
from __future__ import annotations

import json
import os

from . import __version__
from .errors import fail
from .io.dtypes import dtype_name
from .io.files import read_json, write_atomic
from .mapping import is_unused
from .tp import rank_shape, split_dim

NAME = "manifest.json"


def tensor_entries(jobs, tp: int, unused, file_names: dict | None = None) -> list:
    """One entry per output tensor: how it was made (op, layout, sources and the files and dtype they came
    from, so export can rebuild the source folder) and how it is split. `file_names`: source path -> its
    name in the source folder."""
    entries = []
    for j in jobs:
        t = j.target
        entry = {"name": t.name, "shape": list(t.shape), "dtype": j.out_dtype_name, "sources": list(j.source_names),
                 "op": t.op, "split": t.split, "split_dim": split_dim(t.split, len(t.shape))}
        if file_names is not None:
            entry["source_files"] = [file_names[i.path] for i in j.infos]
            entry["source_shapes"] = [list(s) for s in t.source_shapes]
            entry["source_dtype"] = dtype_name(j.infos[0].dtype)
        layout = t.layout()
        if layout:
            entry["layout"] = layout
        if t.groups:
            entry["groups"] = t.groups
        if tp > 1:
            entry["rank_shape"] = list(rank_shape(t.shape, t.split, tp))
        if is_unused(t.name, unused):
            entry["unused_by_llavavlm"] = True
        entries.append(entry)
    return entries


def write_manifest(folder: str, manifest: dict) -> str:
    manifest = dict(manifest, tool="llava-ckpt", version=__version__)
    return write_atomic(os.path.join(folder, NAME), json.dumps(manifest, indent=1) + "\n")


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, NAME)
    if not os.path.lexists(path):
        raise fail(f"{folder} has no {NAME}: not an output of llava-ckpt convert")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("tool") != "llava-ckpt":
        raise fail(f"{path} is not a llava-ckpt manifest")
    return manifest
