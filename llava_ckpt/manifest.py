"""manifest.json: what was converted, from what, how, and the sha256 of every file written."""
from __future__ import annotations

import json
import os

from . import __version__
from .errors import fail
from .io.dtypes import BY_NAME, dtype_name
from .io.files import read_json, write_atomic
from .mapping import is_unused
from .tp import SPLIT_KINDS, rank_shape, split_dim

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


def checked_entries(manifest: dict, where: str) -> list:
    """The manifest's tensor entries, refusing any malformed one with a clear error (it is input too)."""
    entries = manifest.get("tensors")
    if not isinstance(entries, list):
        raise fail(f"{where}: 'tensors' is not a list")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise fail(f"{where}: 'files' is not a list of objects")
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    sizes = manifest.get("tp_sizes", {})
    if not isinstance(sizes, dict) or not all(is_int(v) and v > 0 for v in sizes.values()):
        raise fail(f"{where}: 'tp_sizes' is not an object of positive integers")
    checks = [("name", lambda e: isinstance(e.get("name"), str)),
              ("shape", lambda e: isinstance(e.get("shape"), list) and all(map(is_int, e["shape"]))),
              ("dtype", lambda e: e.get("dtype") in BY_NAME),
              ("split", lambda e: e.get("split") in SPLIT_KINDS),
              ("sources", lambda e: isinstance(e.get("sources"), list) and all(isinstance(x, str) for x in e["sources"])),
              ("layout", lambda e: isinstance(e.get("layout", {}), dict))]
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise fail(f"{where}: tensors[{i}] is not an object")
        for field, ok in checks:
            if not ok(e):
                raise fail(f"{where}: tensors[{i}] has an invalid {field!r}: {e.get(field)!r}")
    return entries
