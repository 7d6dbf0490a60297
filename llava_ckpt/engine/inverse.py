"""The way back: HF tensors streamed out of MindSpore tensors, by reading each op's row map backwards.

For each HF tensor (a source of the table), the rows of the target that hold its rows are found by inverting the
op's row map (engine/ops.py), read in chunks from the rank pieces (io/ranks.py: replicas compared as they are
read), cast and written; a run of rows held as-is by one file is read straight into the writer's blocks.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from tqdm import tqdm

from ..io.dtypes import cast, itemsize, numpy_dtype
from ..io.ranks import RankedTensor
from ..io.readers import FileReader
from ..io.writers import SafetensorsWriter
from .forward import CHUNK
from .ops import row_map

MIN_RUN = 256 << 10  # source rows whose target rows run contiguously for less than this are read as one span


def source_rows(target, k: int, maps: dict) -> np.ndarray:
    """For each row of the target's source k, the target row that holds it: the op's row map read backwards."""
    key = (target.op, target.source_shapes, target.groups)
    if key not in maps:
        maps[key] = row_map(target.op, target.source_shapes, target.groups)
    src, row = maps[key]
    sel = np.flatnonzero(src == k)
    inv = np.empty(len(sel), dtype=np.int64)
    inv[row[sel]] = sel
    return inv


def _chunks(inv: np.ndarray, step: int, rt: RankedTensor):
    """(first, end) source-row chunks of at most `step` rows: along runs of contiguous target rows when the runs
    are long, and never across a rank block, so most chunks are one contiguous read from one file."""
    n = len(inv)
    starts = np.flatnonzero(np.diff(inv) != 1) + 1
    runs = list(zip([0, *starts.tolist()], [*starts.tolist(), n]))
    row_bytes = itemsize(rt.dtype) * int(np.prod(rt.shape[1:], dtype=np.int64))
    if len(runs) > 1 and n * row_bytes / len(runs) < MIN_RUN:
        runs = [(0, n)]
    banded = rt.ranks > 1 and not rt.replicated
    for a, b in runs:
        c = a
        while c < b:
            end = min(c + step, b)
            if banded and inv[end - 1] - inv[c] == end - 1 - c:
                end = min(end, c + rt.row_end(int(inv[c])) - int(inv[c]))
            yield c, end
            c = end


def write_tensor(o, writer, reader: FileReader, maps: dict, bar) -> None:
    """Stream one HF tensor into `writer`, chunk by chunk."""
    rt = o.tensor
    inv = source_rows(o.target, o.k, maps)
    in_np, out_np = numpy_dtype(rt.dtype), numpy_dtype(o.code)
    trailing = int(np.prod(rt.shape[1:], dtype=np.int64)) if rt.shape else 1
    step = max(1, CHUNK // max(1, trailing * max(in_np.itemsize, out_np.itemsize)))
    writer.begin(o.name, o.shape, o.code, o.nbytes)
    for c, end in _chunks(inv, step, rt):
        lo, hi = int(inv[c]), int(inv[end - 1]) + 1
        contiguous = hi - lo == end - c
        held = rt.sole_holder(lo, hi) if contiguous and in_np == out_np else None
        if held:  # the bytes as they are in one file: pread straight into the writer's blocks
            info, first = held
            start, n = first * info.row_bytes, (end - c) * info.row_bytes
            writer.fill(n, lambda view, off: reader.read_bytes(info, start + off, start + off + len(view), view))
            bar.update(n)
            continue
        rows = inv[c:end]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        block = rt.read_rows(reader, lo, hi)
        data = cast(block if contiguous else block[rows - lo], o.code)
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        writer.write(flat)
        bar.update(flat.nbytes)
    writer.end()


def write_files(stage: str, groups: dict, total: int, progress: bool) -> list:
    """Write every safetensors file of `groups` (file name -> planned HF tensors), one after the other; their
    manifest `files` entries."""
    reader = FileReader()
    maps: dict = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
               file=sys.stderr, desc="exporting", leave=False)
    files = []
    try:
        for fname, outs in groups.items():
            path = os.path.join(stage, fname)
            writer = SafetensorsWriter(path, [(o.name, o.shape, o.code) for o in outs], {"format": "pt"})
            try:
                for o in outs:
                    write_tensor(o, writer, reader, maps, bar)
                digest = writer.close()
            except BaseException:
                writer.abort()
                raise
            files.append({"path": fname, "size": os.path.getsize(path), "sha256": digest})
    finally:
        bar.close()
        reader.close()
    return files
