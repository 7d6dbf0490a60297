"""The streaming core shared by convert and shard: targets in, rank files out, one pass, flat memory.

For each target tensor, output rows are produced in chunks of about CHUNK bytes by gathering source rows
through the op's row map (llava_ckpt/mapping.py), cast, cut for each rank by the target's split kind,
and handed to the rank's writer (a plain rename is read straight into the writer's blocks). Writers hash
what they are given and write it on a thread of their own. Memory holds a few chunks, never a whole
tensor, whatever the model size.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .errors import fail
from .io.atomic import discard, publish_dir, staging_dir
from .io.dtypes import numpy_dtype, itemsize
from .io.files import sha256_file, write_atomic
from .io.source import FileReader
from .io.writers import open_writer
from .manifest import write_manifest
from .mapping import Target
from .ops import row_map
from .strategy import write_strategy
from .tp import rank_shape, split_dim

CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Job:
    """One target as it will be written: its sources resolved to files, its output dtype, its row map key."""
    target: Target
    infos: tuple          # TensorInfo of each source, in the target's source order
    out_dtype: str        # safetensors code
    source_names: tuple   # the sources' names as spelled in their files (for the manifest)
    out_dtype_name: str   # float16 | bfloat16 | float32


def in_file_order(jobs, paths) -> list:
    """Jobs sorted by where their sources sit on disk, so reading is one sequential sweep per file (the
    kernel's readahead then serves a cold cache at full disk speed, and the background hasher, reading the
    same files front to back, finds the pages already cached). The output order follows; MindSpore does not
    care about the order of a checkpoint's tensors."""
    rank = {p: i for i, p in enumerate(paths)}
    return sorted(jobs, key=lambda j: min((rank.get(i.path, len(rank)), i.pieces[0][0]) for i in j.infos))


def target_dim(target: Target) -> int | None:
    """The dim `--tp` cuts (None: every rank holds the whole tensor)."""
    return split_dim(target.split, len(target.shape))


def target_rank_shape(target: Target, tp: int) -> tuple:
    return rank_shape(target.shape, target.split, tp)


class _HashFiles(threading.Thread):
    """sha256 of source files on a background thread, overlapping the conversion's own reads."""

    def __init__(self, paths, known=None):
        super().__init__(name="hash sources", daemon=True)
        self.paths = list(paths)
        self.known = dict(known or {})
        self.result: dict = {}
        self.error = None
        self.stop = False

    def run(self):
        try:
            for path in self.paths:
                if path in self.known:
                    self.result[path] = self.known[path]
                    continue
                self.result[path] = sha256_file(path, stopped=lambda: self.stop)
        except OSError as exc:
            self.error = exc


def hash_files_in_background(paths, known=None) -> _HashFiles:
    thread = _HashFiles(paths, known)
    thread.start()
    return thread


def _gather(reader: FileReader, job: Job, src: np.ndarray, row: np.ndarray, a: int, b: int) -> np.ndarray:
    """Output rows [a, b) of the job's target, in the source dtype."""
    idx, rows = src[a:b], row[a:b]
    first = int(idx[0])
    if (idx == first).all() and rows[-1] - rows[0] == b - a - 1:  # one contiguous run: read it straight
        return reader.read_rows(job.infos[first], int(rows[0]), int(rows[-1]) + 1)
    shape = job.target.shape
    out = np.empty((b - a,) + tuple(shape[1:]), dtype=numpy_dtype(job.infos[0].dtype))
    for k in np.unique(idx):
        sel = idx == k
        wanted = rows[sel]
        lo, hi = int(wanted.min()), int(wanted.max()) + 1
        block = reader.read_rows(job.infos[int(k)], lo, hi)
        out[sel] = block[wanted - lo]
    return out


def _direct_run(job: Job, row, out_np, dim) -> bool:
    """True when the target is its one source's bytes unchanged (rename, no cast, not cut along dim 1)."""
    return (dim != 1 and len(job.infos) == 1 and numpy_dtype(job.infos[0].dtype) == out_np
            and bool((row == np.arange(len(row))).all()))


def _chunk_rows(job: Job) -> int:
    row_bytes = max(1, job.infos[0].row_bytes, itemsize(job.out_dtype) * int(np.prod(job.target.shape[1:] or (1,))))
    return max(1, CHUNK // row_bytes)


def _spans(n_rows: int, step: int, dim, tp: int) -> list:
    """(rank or None for every rank, first row, end row) chunks; under a dim-0 split no chunk crosses ranks."""
    if dim == 0:
        per = n_rows // tp
        return [(r, a, min(a + step, (r + 1) * per)) for r in range(tp) for a in range(r * per, (r + 1) * per, step)]
    return [(None, a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def write_jobs(jobs, writers, tp: int, progress: bool = True, total_bytes: int | None = None) -> None:
    """Stream every job into the rank writers (writers[r] for rank r), in order."""
    reader = FileReader()
    maps: dict = {}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
               file=sys.stderr, desc="writing", leave=False)
    try:
        for job in jobs:
            t = job.target
            key = (t.op, t.source_shapes, t.groups)
            if key not in maps:
                maps[key] = row_map(t.op, t.source_shapes, t.groups)
            src, row = maps[key]
            out_np = numpy_dtype(job.out_dtype)
            dim = target_dim(t) if tp > 1 else None
            rshape = target_rank_shape(t, tp)
            rbytes = int(np.prod(rshape)) * out_np.itemsize
            for w in writers:
                w.begin(t.name, rshape, job.out_dtype, rbytes)
            spans = _spans(len(src), _chunk_rows(job), dim, tp)
            direct = _direct_run(job, row, out_np, dim)
            for rank, a, b in spans:
                if direct:  # same dtype, one contiguous source run: pread straight into the writers' blocks
                    info = job.infos[0]
                    first = int(row[a]) * info.row_bytes
                    n = (b - a) * info.row_bytes
                    for w in ([writers[rank]] if rank is not None else writers):
                        w.fill(n, lambda view, off: reader.read_bytes(info, first + off, first + off + len(view), view))
                    bar.update(n * (1 if rank is not None else len(writers)))
                    continue
                data = _gather(reader, job, src, row, a, b)
                if data.dtype != out_np:
                    data = data.astype(out_np)
                if rank is not None:
                    writers[rank].write(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
                elif dim == 1:
                    cols = t.shape[1] // tp
                    for r, w in enumerate(writers):
                        w.write(np.ascontiguousarray(data[:, r * cols:(r + 1) * cols]).reshape(-1).view(np.uint8))
                else:
                    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
                    for w in writers:
                        w.write(flat)
                bar.update(data.nbytes * (tp if rank is None and dim is None else 1))
            for w in writers:
                w.end()
    finally:
        bar.close()
        reader.close()


def open_rank_writers(stage: str, fmt: str, jobs, tp: int, layout_dir: bool) -> tuple:
    """One writer per rank: STAGE/llava.<fmt>, or STAGE/rank_<r>/llava.<fmt> when layout_dir."""
    specs = [(j.target.name, target_rank_shape(j.target, tp), j.out_dtype) for j in jobs]
    paths, writers = [], []
    try:
        for r in range(tp):
            folder = os.path.join(stage, f"rank_{r}") if layout_dir else stage
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"llava.{fmt}")
            writers.append(open_writer(path, fmt, specs))
            paths.append(path)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return paths, writers


def output_bytes(jobs, tp: int) -> int:
    """Bytes of tensor data the writers will produce, all ranks together."""
    total = 0
    for j in jobs:
        n = int(np.prod(j.target.shape)) * itemsize(j.out_dtype)
        total += n * tp if target_dim(j.target) is None else n
    return total


def check_free_space(folder: str, need: int) -> None:
    free = shutil.disk_usage(folder).free
    margin = 64 << 20
    if free < need + margin:
        raise fail(f"not enough free space in {folder}: the output needs {need / 2**30:.2f} GiB, "
                   f"{free / 2**30:.2f} GiB is free")


def copy_side_files(stage: str, side_files, expected=None) -> list:
    """Copy config / tokenizer / processor files into the output (fsynced), returning manifest `files`
    entries. `expected`: name -> sha256 the copy must have (shard re-checks its input's record)."""
    entries = []
    for name, path in side_files:
        with open(path, "rb") as f:
            data = f.read()
        sha = write_atomic(os.path.join(stage, name), data)
        if expected and name in expected and expected[name] != sha:
            raise fail(f"{path} does not match the sha256 its manifest records: corrupted? "
                       "(llava-ckpt check names the damage)")
        entries.append({"path": name, "size": len(data), "sha256": sha})
    return entries


def write_output(out: str, src: str, jobs, fmt: str, tp: int, source_files, manifest: dict, progress: bool,
                 known_hashes=None, expected_hashes=None, inputs_key: str = "files", side_files=(),
                 expected_side=None) -> dict:
    """Write all ranks, the strategy file (tp > 1) and the manifest into OUT, atomically.

    `source_files` [(name, path)] are hashed on a background thread while the data streams, except those in
    `known_hashes` (path -> sha256 already verified, e.g. by `download`), which are recorded as given.
    An input whose hash differs from `expected_hashes[path]` (its manifest's record) fails the run, and the
    hashes are recorded under manifest["source"][inputs_key]. `side_files` [(name, path)] (config, tokenizer,
    processor, chat template) are copied beside the weights so the output stands alone.
    """
    stage = staging_dir(out, src)
    try:
        total = output_bytes(jobs, tp)
        check_free_space(stage, total)
        hasher = hash_files_in_background([p for _, p in source_files], known_hashes)
        paths, writers = open_rank_writers(stage, fmt, jobs, tp, layout_dir=tp > 1)
        try:
            write_jobs(jobs, writers, tp, progress, total)
            digests = [w.close() for w in writers]
        except BaseException:
            for w in writers:
                w.abort()
            hasher.stop = True
            raise
        files = [{"path": os.path.relpath(p, stage), "size": os.path.getsize(p), "sha256": d}
                 for p, d in zip(paths, digests)]
        files += copy_side_files(stage, side_files, expected_side)
        if tp > 1:
            path = os.path.join(stage, "strategy.ckpt")
            write_strategy(path, [(j.target.name, j.target.split, j.target.shape) for j in jobs], tp)
            files.append({"path": "strategy.ckpt", "size": os.path.getsize(path), "sha256": sha256_file(path)})
        hasher.join()
        if hasher.error:
            raise hasher.error
        for path, sha in (expected_hashes or {}).items():
            if hasher.result.get(path) != sha:
                raise fail(f"{path} does not match the sha256 its manifest records: corrupted? "
                           "(llava-ckpt check names the damage)")
        source = dict(manifest.get("source", {}))
        source[inputs_key] = [{"name": n, "size": os.path.getsize(p), "sha256": hasher.result[p]}
                           for n, p in source_files]
        manifest = dict(manifest, source=source, tp=tp, format=fmt, files=files)
        manifest["options"] = dict(manifest.get("options", {}), format=fmt, tp=tp)
        write_manifest(stage, manifest)
        publish_dir(stage, out, synced=True)  # writers, strategy and manifest each fsynced their file
    except OSError as exc:
        discard(stage)
        name = exc.filename
        if isinstance(name, str) and name.startswith(stage + os.sep):  # name the file as it would be in OUT
            name = os.path.join(out, os.path.relpath(name, stage))
        raise fail(f"{exc.strerror or exc} while writing {name or out}") from None
    except BaseException:
        discard(stage)
        raise
    return {"out": os.path.abspath(out), "format": fmt, "tp": tp, "tensors": len(jobs),
            "bytes": sum(f["size"] for f in files), "files": [f["path"] for f in files]}

