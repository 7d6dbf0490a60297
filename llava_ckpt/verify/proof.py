"""The weight proof: every tensor of a converted output, on every rank (replicas included), read back through
its op's inverse and compared bit for bit with the Hugging Face tensor it was made from, cast to the dtype it
was written in.

It goes back the way export does: the plan back (export/plan.py: for each HF source tensor, the target and op it
went into, from the table), each op's row map read backwards and the rank pieces read as one (engine/inverse.py's
write_tensor, io/ranks.py), but the HF tensor it streams out is not written: `_Expect` compares it, chunk by
chunk, with the source's own bytes put through io.dtypes.cast (convert's rounding, to nearest even). A tensor
that every rank holds whole is proven on each rank separately. Nothing about the model runs, so it also covers
what no prompt exercises (embedding and lm_head rows of tokens a prompt does not use, the vision layer LLaVA
does not run, ln_post); a difference is reported per tensor: which one (and which rank), how many elements
differ, the largest difference and the first differing index (in the converted tensor and in the source).

Memory: a few chunks (engine.forward.CHUNK) whatever the model size; time: one read of both checkpoints.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

from ..errors import fail
from ..io.dtypes import cast, dtype_name, numpy_dtype

UNSIGNED = {2: np.uint16, 4: np.uint32}
SHOWN = 8  # differing tensors a report line names


@dataclasses.dataclass(frozen=True)
class ProofItem:
    """One HF source tensor against one view of the converted tensor it went into (all ranks read as one, or one
    rank's whole replica)."""
    out: object        # export.plan.PlannedHfTensor, its code the converted tensor's own dtype
    source: object     # io.readers.TensorInfo of the HF tensor
    rank: int | None   # the rank whose replica this is (None: every rank's piece, read as one tensor)


def plan_proof(hf_src: str, source, cfg: dict) -> dict:
    """Everything the proof will compare, checked before anything is read: {"items", "tensors", "bytes",
    "skipped"}. The converted output's names, shapes and ops must be the table's (export.plan.plan_export)."""
    from ..engine.mapping import detect_layout, table_for, to_canonical
    from ..io.checkpoint import open_checkpoint
    from ..export.plan import plan_export
    from ..io.hf_folder import read_tensors
    from ..io.ranks import single
    if isinstance(source, str):  # a path: opened here (the caller may pass what it opened already)
        source = open_checkpoint(source)
    table = table_for(cfg)
    outs = plan_export(source, table, cfg, None, os.path.join(hf_src, "config.json"))
    tensors, _ = read_tensors(hf_src)
    wanted = {o.target.sources[o.k] for o in outs}
    layout = table["layouts"][detect_layout(table, tensors, wanted)]
    by_canonical = {to_canonical(n, layout): info for n, info in tensors.items()}
    items = []
    for o in outs:
        hub = o.target.sources[o.k]
        info = by_canonical.get(hub)
        if info is None:
            raise fail(f"{hf_src} has no tensor {hub!r} (hub spelling), which {o.target.name} was made from")
        if tuple(info.shape) != tuple(o.shape):
            raise fail(f"{info.path}: tensor {info.name!r} has shape {list(info.shape)}, config.json implies "
                       f"{list(o.shape)}")
        rt = o.tensor
        views = [(r, single(p)) for r, p in enumerate(rt.pieces)] if rt.replicated and rt.ranks > 1 \
            else [(None, rt)]
        for rank, view in views:
            items.append(ProofItem(dataclasses.replace(o, tensor=view, code=rt.dtype), info, rank))
    items.sort(key=lambda it: (it.source.path, it.source.pieces[0][0], -1 if it.rank is None else it.rank))
    return {"items": items, "tensors": len({o.target.name for o in outs}), "bytes": sum(it.out.nbytes for it in items),
            "skipped": len(source.skipped)}


class _Expect:
    """What engine/inverse.write_tensor writes to, comparing instead of writing: the bytes it is handed are the
    converted tensor's, in the HF tensor's order and layout; each chunk is compared with the same elements of the
    HF tensor, cast to the converted dtype. Differences are counted; the first and the largest remembered."""

    def __init__(self, reader, item: ProofItem):
        self.reader, self.item = reader, item
        self.got_np = numpy_dtype(item.out.code)
        self.src_np = numpy_dtype(item.source.dtype)
        self.view = UNSIGNED[self.got_np.itemsize]
        self.pos = 0          # elements compared so far
        self.differ = 0
        self.first = None     # flat index (in the HF tensor) of the first differing element
        self.largest = 0.0
        self._buf = np.empty(0, np.uint8)
        # the source as a map of its file's pages where it is one run: compared without a copy out of the page
        # cache (a pread of every source byte was 13% of a 7B proof's samples, measured with perf)
        self._source = reader.mapped(item.source)
        if self._source is not None:
            self._source = self._source.reshape(-1).view(np.ndarray)  # slices without memmap objects per chunk

    def begin(self, name, shape, code, nbytes):
        self.pos = 0

    def fill(self, n: int, read):
        if self._buf.size < n:
            self._buf = np.empty(n, np.uint8)
        buf = self._buf[:n]
        read(memoryview(buf), 0)
        self.write(buf)

    def write(self, flat: np.ndarray):
        got = np.frombuffer(flat, dtype=self.got_np)
        n = got.size
        if self._source is not None:
            source = self._source[self.pos:self.pos + n]
        else:
            size = self.src_np.itemsize
            raw = self.reader.read_bytes(self.item.source, self.pos * size, (self.pos + n) * size)
            source = np.frombuffer(raw, dtype=self.src_np)
        want = cast(source, self.item.out.code)
        a, b = got.view(self.view), want.view(self.view)
        if not np.array_equal(a, b):
            wrong = np.flatnonzero(a != b)
            self.differ += int(wrong.size)
            if self.first is None:
                self.first = self.pos + int(wrong[0])
            with np.errstate(invalid="ignore", over="ignore"):
                d = np.abs(got[wrong].astype(np.float64) - want[wrong].astype(np.float64))
            self.largest = max(self.largest, float(np.nanmax(d)) if not np.isnan(d).all() else float("nan"))
        self.pos += n

    def end(self):
        self._source = None  # the map goes with its last view


def _difference(item: ProofItem, expect: _Expect, maps: dict) -> dict:
    """The report entry of one item that differs: names, counts and the first differing index on both sides."""
    from ..engine.inverse import source_rows
    o = item.out
    src_index = [int(i) for i in np.unravel_index(expect.first, o.shape)] if o.shape else []
    target_row = int(source_rows(o.target, o.k, maps)[src_index[0] if src_index else 0])
    index = [target_row] + src_index[1:] if src_index else []
    rank = item.rank
    rt = o.tensor
    if rank is None and rt.ranks > 1 and not rt.replicated:  # which rank holds that element
        rank = rt.holder_of(index)
    largest = expect.largest
    return {"name": o.target.name, "source": o.name, "rank": rank, "elements": expect.differ,
            "of": int(np.prod(o.shape, dtype=np.int64)), "max_abs_diff": largest if np.isfinite(largest) else str(largest),
            "index": index, "source_index": src_index,
            "dtype": dtype_name(o.code), "source_dtype": dtype_name(item.source.dtype)}


def prove(planned: dict, progress: bool = False) -> dict:
    """Run the proof over plan_proof's items: {"passed", "tensors", "pieces", "bytes", "seconds", "gb_per_s",
    "casts", "rounding", "differ" (one entry per source tensor and rank view that differs, in read order)}."""
    from tqdm import tqdm
    from ..engine.inverse import write_tensor
    from ..io.readers import FileReader
    start = time.perf_counter()
    reader, maps, differ = FileReader(), {}, []
    casts = sorted({f"{dtype_name(it.source.dtype)} -> {dtype_name(it.out.code)}" for it in planned["items"]
                    if it.source.dtype != it.out.code})
    bar = tqdm(total=planned["bytes"], unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
               file=sys.stderr, desc="proving weights", leave=False)
    try:
        for item in planned["items"]:
            expect = _Expect(reader, item)
            write_tensor(item.out, expect, reader, maps, bar)
            if expect.differ:
                differ.append(_difference(item, expect, maps))
    finally:
        bar.close()
        reader.close()
    seconds = time.perf_counter() - start
    return {"passed": not differ, "tensors": planned["tensors"], "pieces": len(planned["items"]),
            "bytes": planned["bytes"], "skipped_training_state": planned["skipped"], "seconds": round(seconds, 2),
            "gb_per_s": round(planned["bytes"] / 1e9 / max(seconds, 1e-9), 2), "casts": casts,
            "rounding": "to nearest, ties to even (io.dtypes.cast, as convert writes them)", "differ": differ}


def describe(entry: dict) -> str:
    """One differing tensor in a line."""
    rank = f" (rank {entry['rank']})" if entry["rank"] is not None else ""
    largest = entry["max_abs_diff"]
    largest = f"{largest:.3g}" if isinstance(largest, float) else largest
    return (f"{entry['name']}{rank}: {entry['elements']} of {entry['of']} elements differ, largest {largest}, "
            f"first at {entry['index']} (source {entry['source']} {entry['source_index']})")
