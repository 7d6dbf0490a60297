"""The way forward, shared by convert and shard: planned targets in, rank files out, one pass, flat memory.

For each target tensor, output rows are produced in chunks of about CHUNK bytes by gathering source rows
through the op's row map (engine/ops.py), cast, cut for each rank by the target's split kind (engine/splits.py),
and handed to the rank's writer (a plain rename is read straight into the writer's blocks). Writers hash
what they are given and write it on a thread of their own. Memory holds a few chunks, never a whole
tensor, whatever the model size. The folder is written through the one output transaction (io/output.py).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..io.dtypes import cast, numpy_dtype, itemsize
from ..io.output import staged_output
from ..io.ranks import RankedTensor, rank_folder_name, weights_name
from ..io.readers import FileReader
from ..io.files import write_atomic
from ..io.mindformers import strategy_copy
from ..io.strategy import write_strategy
from ..io.writers import ckpt_load_warning, open_writer
from .mapping import Target
from .ops import row_map
from .splits import rank_shape, split_dim

CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class PlannedTarget:
    """One target tensor as it will be written: its sources resolved to files, its output dtype."""
    target: Target
    infos: tuple          # each source, in the target's source order: a TensorInfo (one file holds it whole)
                          # or an io.ranks.RankedTensor (rank pieces of a checkpoint that shard re-cuts)
    out_dtype: str        # safetensors code
    source_names: tuple   # the sources' names as spelled in their files (for the manifest)
    out_dtype_name: str   # float16 | bfloat16 | float32


def in_file_order(planned, paths) -> list:
    """Planned targets sorted by where their sources sit on disk, so reading is one sequential sweep per file (the
    kernel's readahead then serves a cold cache at full disk speed, and the background hasher, reading the
    same files front to back, finds the pages already cached). The output order follows; MindSpore does not
    care about the order of a checkpoint's tensors."""
    rank = {p: i for i, p in enumerate(paths)}
    return sorted(planned, key=lambda j: min((rank.get(i.path, len(rank)), i.pieces[0][0]) for i in j.infos))


def target_dim(target: Target) -> int | None:
    """The dim `--tp` cuts (None: every rank holds the whole tensor)."""
    return split_dim(target.split, len(target.shape))


def target_rank_shape(target: Target, tp: int) -> tuple:
    return rank_shape(target.shape, target.split, tp)


def _read_rows(reader: FileReader, source, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a source: one file's tensor, or rank pieces joined (replicas compared)."""
    if isinstance(source, RankedTensor):
        return source.read_rows(reader, lo, hi)
    return reader.read_rows(source, lo, hi)


def _row_bytes(source) -> int:
    per = itemsize(source.dtype)
    for d in tuple(source.shape)[1:]:
        per *= d
    return per


def _held_bytes(source, lo: int, hi: int):
    """(TensorInfo, byte offset) of source rows [lo, hi) when one file holds them as they are, else None."""
    if isinstance(source, RankedTensor):
        held = source.sole_holder(lo, hi)
        return None if held is None else (held[0], held[1] * held[0].row_bytes)
    return source, lo * source.row_bytes


def _gather(reader: FileReader, item: PlannedTarget, src: np.ndarray, row: np.ndarray, a: int, b: int) -> np.ndarray:
    """Output rows [a, b) of the item's target, in the source dtype."""
    idx, rows = src[a:b], row[a:b]
    first = int(idx[0])
    if (idx == first).all() and rows[-1] - rows[0] == b - a - 1:  # one contiguous run: read it straight
        return _read_rows(reader, item.infos[first], int(rows[0]), int(rows[-1]) + 1)
    shape = item.target.shape
    out = np.empty((b - a,) + tuple(shape[1:]), dtype=numpy_dtype(item.infos[0].dtype))
    for k in np.unique(idx):
        sel = idx == k
        wanted = rows[sel]
        lo, hi = int(wanted.min()), int(wanted.max()) + 1
        block = _read_rows(reader, item.infos[int(k)], lo, hi)
        out[sel] = block[wanted - lo]
    return out


def _direct_run(item: PlannedTarget, row, out_np, dim) -> bool:
    """True when the target is its one source's bytes unchanged (rename, no cast, not cut along dim 1)."""
    return (dim != 1 and len(item.infos) == 1 and numpy_dtype(item.infos[0].dtype) == out_np
            and bool((row == np.arange(len(row))).all()))


def _chunk_rows(item: PlannedTarget) -> int:
    row_bytes = max(1, _row_bytes(item.infos[0]), itemsize(item.out_dtype) * int(np.prod(item.target.shape[1:] or (1,))))
    return max(1, CHUNK // row_bytes)


def _spans(n_rows: int, step: int, dim, tp: int) -> list:
    """(rank or None for every rank, first row, end row) chunks; under a dim-0 split no chunk crosses ranks."""
    if dim == 0:
        per = n_rows // tp
        return [(r, a, min(a + step, (r + 1) * per)) for r in range(tp) for a in range(r * per, (r + 1) * per, step)]
    return [(None, a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def write_targets(planned, writers, tp: int, progress: bool = True, total_bytes: int | None = None) -> None:
    """Stream every planned target into the rank writers (writers[r] for rank r; None for a rank not written
    here, whose rows are then not read either), in order."""
    present = [w for w in writers if w is not None]
    reader = FileReader()
    maps: dict = {}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
               file=sys.stderr, desc="writing", leave=False)
    try:
        for item in planned:
            t = item.target
            key = (t.op, t.source_shapes, t.groups)
            if key not in maps:
                maps[key] = row_map(t.op, t.source_shapes, t.groups)
            src, row = maps[key]
            out_np = numpy_dtype(item.out_dtype)
            dim = target_dim(t) if tp > 1 else None
            rshape = target_rank_shape(t, tp)
            rbytes = int(np.prod(rshape)) * out_np.itemsize
            for w in present:
                w.begin(t.name, rshape, item.out_dtype, rbytes)
            spans = _spans(len(src), _chunk_rows(item), dim, tp)
            direct = _direct_run(item, row, out_np, dim)
            for rank, a, b in spans:
                if rank is not None and writers[rank] is None:
                    continue
                held = _held_bytes(item.infos[0], int(row[a]), int(row[a]) + b - a) if direct else None
                if held:  # same dtype, one contiguous run one file holds: pread straight into the writers' blocks
                    info, first = held
                    n = (b - a) * info.row_bytes
                    for w in ([writers[rank]] if rank is not None else present):
                        w.fill(n, lambda view, off: reader.read_bytes(info, first + off, first + off + len(view), view))
                    bar.update(n * (1 if rank is not None else len(present)))
                    continue
                data = cast(_gather(reader, item, src, row, a, b), item.out_dtype)
                if rank is not None:
                    writers[rank].write(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
                elif dim == 1:
                    cols = t.shape[1] // tp
                    for r, w in enumerate(writers):
                        if w is not None:
                            w.write(np.ascontiguousarray(data[:, r * cols:(r + 1) * cols]).reshape(-1).view(np.uint8))
                else:
                    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
                    for w in present:
                        w.write(flat)
                if rank is not None:
                    bar.update(data.nbytes)
                else:  # every written rank got all of it (replicated) or its columns (dim 1)
                    bar.update(data.nbytes * len(present) // (tp if dim == 1 else 1))
            for w in present:
                w.end()
    finally:
        bar.close()
        reader.close()


def open_rank_writers(stage: str, fmt: str, planned, tp: int, layout_dir: bool, ranks=None) -> tuple:
    """One writer per rank: STAGE/llava.<fmt>, or STAGE/rank_<r>/llava.<fmt> when layout_dir. `ranks`: only
    those (the others' entries are None)."""
    specs = [(j.target.name, target_rank_shape(j.target, tp), j.out_dtype) for j in planned]
    paths, writers = [], []
    try:
        for r in range(tp):
            if ranks is not None and r not in ranks:
                paths.append(None)
                writers.append(None)
                continue
            folder = os.path.join(stage, rank_folder_name(r)) if layout_dir else stage
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, weights_name(fmt))
            writers.append(open_writer(path, fmt, specs))
            paths.append(path)
    except BaseException:
        for w in writers:
            if w is not None:
                w.abort()
        raise
    return paths, writers


def output_bytes(planned, tp: int, written: int | None = None) -> int:
    """Bytes of tensor data the writers will produce, all ranks together (`written` of the tp ranks)."""
    written = tp if written is None else written
    total = 0
    for j in planned:
        n = int(np.prod(j.target.shape)) * itemsize(j.out_dtype)
        total += n * written if target_dim(j.target) is None else n * written // tp
    return total


def write_checkpoint(out: str, src: str, planned, fmt: str, tp: int, inputs, manifest: dict, progress: bool,
                     known_hashes=None, expected_hashes=None, inputs_key: str = "files", side_files=(),
                     expected_side=None, overwrite: bool = False, ranks=None, extra_files=()) -> dict:
    """Write all ranks, the side files, the strategy file (tp > 1) and the manifest into OUT, atomically.

    `inputs` [(name, path)] are hashed while the data streams and recorded under manifest["source"][inputs_key]
    (io.output.staged_output says how `known_hashes` and `expected_hashes` count); `side_files` [(name, path)]
    (config, tokenizer, processor, chat template) are copied beside the weights so the output stands alone.
    `overwrite`: replace an OUT that holds another output (io.output.check_out). `ranks`: write only those rank
    folders (one node's part; the same bytes as the full run's, the full strategy file beside them; the manifest
    records which). `extra_files` [(name, text)]: small files written beside them (the MindFormers predict config).
    A tp > 1 output carries its strategy twice: strategy.ckpt, and strategy/ for MindFormers' loader
    (io/mindformers.py)."""
    ranks = None if ranks is None or list(ranks) == list(range(tp)) else sorted(ranks)
    total = output_bytes(planned, tp, None if ranks is None else len(ranks))
    manifest = dict(manifest, tp=tp, format=fmt, **({"ranks": ranks} if ranks is not None else {}))
    where = os.path.abspath(out)  # now: when OUT is the current folder, the swap leaves the process in a gone one
    with staged_output(out, src, total, manifest, inputs, known_hashes, expected_hashes, inputs_key,
                       overwrite) as staged:
        paths, writers = open_rank_writers(staged.stage, fmt, planned, tp, tp > 1, ranks)
        try:
            write_targets(planned, writers, tp, progress, total)
            digests = [w.close() if w is not None else None for w in writers]
        except BaseException:
            for w in writers:
                if w is not None:
                    w.abort()
            raise
        for path, digest in zip(paths, digests):
            if path is not None:
                staged.add(os.path.relpath(path, staged.stage), digest)
        staged.copy_side_files(side_files, expected_side)
        if tp > 1:
            layouts = [(j.target.name, j.target.split, j.target.shape) for j in planned]
            for rel in ("strategy.ckpt", strategy_copy()):
                write_strategy(os.path.join(staged.stage, rel), layouts, tp)
                staged.add(rel)
        for name, text in extra_files:
            staged.add(name, write_atomic(os.path.join(staged.stage, name), text))
    files = staged.files
    weights = [f for f in files if f["path"].endswith(weights_name(fmt))]
    largest = max(weights, key=lambda f: f["size"])
    what = largest["path"] if tp == 1 else f"each of {weights_name(fmt)} of the {len(weights)} rank folders"
    warning = ckpt_load_warning(what, largest["size"]) if fmt == "ckpt" else None
    return {"out": where, "format": fmt, "tp": tp, "ranks": ranks if ranks is not None else list(range(tp)),
            "tensors": len(planned),
            "bytes": sum(f["size"] for f in files), "files": [f["path"] for f in files],
            "warnings": [warning] if warning else []}
