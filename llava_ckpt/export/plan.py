"""The plan back: every HF tensor export writes, which MindSpore tensor and op it comes from, and the files it goes
into. The Targets planned for the options MS_SRC's names reveal give each tensor's op (there is no reverse table);
everything is checked against the table and config.json before a byte is written."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..engine.mapping import detect_options, plan
from ..errors import fail
from ..io.dtypes import BY_NAME, casts_lose, code_for, dtype_name, itemsize
from ..io.hf_folder import INDEX
from ..io.manifest import NAME as MANIFEST
from ..io.ranks import RankedTensor
from ..io.checkpoint import Checkpoint

def parse_size(size) -> int:
    """'5GB' (10**9, as transformers counts), '500MB', '2GiB' (2**30), '123' (bytes) -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise fail(f"--max-shard-size {size!r} is not a size such as 5GB, 500MB or 2GiB")
        unit = (m.group(2) or "B").upper()
        power = "BKMGT".index(unit[0])
        value = int(float(m.group(1)) * ((1024 if "I" in unit else 1000) ** power))
    if value <= 0:
        raise fail(f"--max-shard-size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class PlannedHfTensor:
    """One HF tensor to write: source `k` of `target`, read back from `tensor` (the MindSpore tensor)."""
    name: str
    shape: tuple
    code: str
    target: object
    k: int
    tensor: RankedTensor
    file: str | None
    casts: tuple = ()     # the dtypes this tensor went through: the HF source's (if recorded), stored, written

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.code)


def _listing(names, limit=6) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def plan_export(source: Checkpoint, table: dict, cfg: dict, dtype: str | None, where: str) -> list:
    """Every HF tensor to write, checked against the table and config.json. Nothing is written here."""
    names = list(source.tensors)
    options = detect_options(table, names)
    targets = plan(table, cfg, options)
    by_name = {t.name: t for t in targets}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise fail(f"{source.path}: tensor(s) that the {table['name']} table does not know and that are not "
                   f"training state: {_listing(unknown)}")
    missing = [t.name for t in targets if t.name not in source.tensors]
    if missing:
        raise fail(f"{source.path}: missing tensors: {_listing(missing)}")
    out_code = code_for(dtype) if dtype else None
    outs = []
    for t in targets:
        rt = source.tensors[t.name]
        if tuple(rt.shape) != tuple(t.shape):
            raise fail(f"{rt.pieces[0].path}: tensor {t.name!r} has shape {list(rt.shape)}, but {where} implies "
                       f"{list(t.shape)}")
        entry = source.entries.get(t.name)
        hf_names, files, code = t.sources, [None] * len(t.sources), out_code or rt.dtype
        if entry is not None:
            recorded_shapes = entry.get("source_shapes", [list(s) for s in t.source_shapes])
            if (entry["op"] != t.op or entry["split"] != t.split or len(entry["sources"]) != len(t.sources)
                    or recorded_shapes != [list(s) for s in t.source_shapes]):
                raise fail(f"{source.path}/{MANIFEST}: {t.name!r} was made by {entry['op']} of "
                           f"{len(entry['sources'])} source(s) {recorded_shapes}, split {entry['split']}; the table "
                           f"says {t.op} of {len(t.sources)} {[list(s) for s in t.source_shapes]}, split {t.split}")
            # same shapes, other grouping (e.g. another KV-head count): the rows would come back scrambled
            recorded = (entry.get("layout"), entry.get("groups"))
            if recorded != (t.layout(), t.groups):
                raise fail(f"{where} implies {t.name!r} laid out as {t.layout() or 'plain rows'} in "
                           f"{t.groups} groups, but {source.path}/{MANIFEST} records "
                           f"{entry.get('layout') or 'plain rows'} in {entry.get('groups')} groups: it was "
                           "converted with another config")
            hf_names = entry["sources"]
            if isinstance(entry.get("source_files"), list) and len(entry["source_files"]) == len(t.sources):
                files = [_plain_file(f, source) for f in entry["source_files"]]
            if not out_code and entry.get("source_dtype") in BY_NAME:
                code = code_for(entry["source_dtype"])
        casts = ((entry["source_dtype"],) if entry is not None and entry.get("source_dtype") in BY_NAME else ()) + \
            (dtype_name(rt.dtype), dtype_name(code))
        for k, (name, shape) in enumerate(zip(hf_names, t.source_shapes)):
            outs.append(PlannedHfTensor(name, tuple(shape), code, t, k, rt, files[k], casts))
    seen = set()
    for o in outs:
        if o.name in seen:
            raise fail(f"{source.path}: HF tensor {o.name!r} would be written twice")
        seen.add(o.name)
    return outs


def _plain_file(name, source: Checkpoint) -> str:
    if (not isinstance(name, str) or not name.endswith(".safetensors") or "/" in name or "\\" in name
            or name.startswith(".") or name == INDEX):
        raise fail(f"{source.path}/{MANIFEST}: source file {name!r} is not a plain .safetensors file name")
    return name


def round_trip(outs: list) -> dict:
    """Whether the HF tensors written are the source's own bits: {"exact", "lossy": {"a -> b -> c": number of
    tensors}} over the dtypes each went through (the HF source's, when MS_SRC's manifest records it; stored;
    written). A step that narrows (float32 -> 16 bits, or float16 <-> bfloat16) loses information for good."""
    lossy: dict = {}
    for o in outs:
        if casts_lose(o.casts):
            key = " -> ".join(o.casts)
            lossy[key] = lossy.get(key, 0) + 1
    return {"exact": not lossy, "lossy": lossy}


def assign_files(outs: list, max_bytes: int) -> dict:
    """file name -> its tensors (sorted by name). The source's own files when every tensor records one (a
    convert output), else model-0000k-of-0000n.safetensors cut at `max_bytes` as transformers cuts them."""
    if outs and all(o.file for o in outs):
        groups: dict = {}
        for o in outs:
            groups.setdefault(o.file, []).append(o)
    else:
        shards, cur, size = [], [], 0
        for o in outs:
            if cur and size + o.nbytes > max_bytes:
                shards.append(cur)
                cur, size = [], 0
            cur.append(o)
            size += o.nbytes
        if cur:
            shards.append(cur)
        groups = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}
    return {f: sorted(g, key=lambda o: o.name) for f, g in sorted(groups.items())}
