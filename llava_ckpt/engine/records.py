"""The manifest's tensor records: one entry per output tensor (how it was made, from which HF tensors and files,
how it is split), written by convert and shard and checked when a command reads them back."""
from __future__ import annotations

from ..errors import fail
from ..io.dtypes import BY_NAME, dtype_name
from .mapping import unused_kind
from .splits import SPLIT_KINDS, rank_shape, split_dim


def tensor_entries(jobs, tp: int, unused, file_names: dict | None = None) -> list:
    """One entry per output tensor: how it was made (op, layout, sources and the files and dtype they came
    from, so export can rebuild the source folder), how it is split, and for the table's [unused] tensors that
    MindFormers' LlavaVlm never uses them and whether it builds them (`unused`: mapping.unused_names).
    `file_names`: source path -> its name in the source folder."""
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
        kind = unused_kind(t.name, unused)
        if kind:  # LlavaVlm's forward never applies it; whether it builds the parameter (so the weight loads)
            entry["unused_by_llavavlm"] = True
            entry["built_by_llavavlm"] = kind == "built"
        entries.append(entry)
    return entries


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


def split_layout(entries) -> dict:
    """name -> [split kind, whole shape] of every tensor of checked manifest entries: what the reference
    model's tensor-parallel cells are built from (model/parallel.py). Plain lists, so it travels as JSON."""
    return {e["name"]: [e["split"], list(e["shape"])] for e in entries}
