"""Rank folders (`rank_<r>/`, one weights file each): the one scan that finds them, and tensors cut across
ranks read as one.

A RankedTensor answers "rows [lo, hi) of the whole tensor" from the rank pieces, chunk by chunk, so the whole
tensor is never in memory; pieces that should be replicas are compared as they are read, and a difference
names the tensor and the two ranks. Which rank holds which part comes from engine/splits.py (split kinds, or
a MindSpore layout through splits.rank_boxes).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import fail
from .paths import inside
from .dtypes import numpy_dtype
from .readers import FileReader, TensorInfo

RANK_FOLDER = re.compile(r"rank_([0-9]+)")
WEIGHT_SUFFIXES = (".ckpt", ".safetensors")


def rank_folder_name(rank: int) -> str:
    return f"rank_{rank}"


def weights_name(fmt: str) -> str:
    """The weights file of an output (or of one of its rank folders): llava.ckpt or llava.safetensors."""
    return f"llava.{fmt}"


def weight_paths(tp: int, fmt: str, ranks=None) -> list:
    """The weight files an output of `tp` ranks in `fmt` holds, relative to it, in rank order (`ranks`: only
    those were written, by shard --ranks)."""
    if tp == 1:
        return [weights_name(fmt)]
    return [f"{rank_folder_name(r)}/{weights_name(fmt)}" for r in (range(tp) if ranks is None else ranks)]


def rank_folders(folder: str, tp: int | None = None) -> list:
    """Paths of folder/rank_0 .. rank_{N-1}: the one scan of rank folders.

    With `tp` (what an output's manifest records) exactly rank_0 .. rank_{tp-1} must be there (none for tp 1):
    a missing one, or one the manifest does not count, is named. Without it (rank folders that distributed
    training saved) the folders found must be rank_0 .. rank_{N-1}, N >= 0. Either way names with leading
    zeros (rank_01) and rank folders that resolve outside `folder` are refused."""
    found = {}
    for entry in sorted(os.listdir(folder)):
        m = RANK_FOLDER.fullmatch(entry)
        path = os.path.join(folder, entry)
        if not m or not os.path.isdir(path):
            continue
        if str(int(m.group(1))) != m.group(1):
            raise fail(f"{path}: rank folders are named rank_0, rank_1, ... (no leading zeros)")
        inside(folder, entry, path)
        found[int(m.group(1))] = path
    if tp is not None:
        wanted = range(tp) if tp > 1 else range(0)
        missing = [rank_folder_name(r) for r in wanted if r not in found]
        extra = [rank_folder_name(r) for r in sorted(found) if r not in wanted]
        if missing or extra:
            parts = ([f"{', '.join(missing)} missing"] if missing else []) + \
                    ([f"{', '.join(extra)} not part of it"] if extra else [])
            layout = f"rank_0 .. rank_{tp - 1}" if tp > 1 else "no rank folders"
            raise fail(f"{folder}: its manifest records tp {tp} ({layout}): {'; '.join(parts)}")
        return [found[r] for r in wanted]
    if sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise fail(f"{folder}: rank folders are not rank_0..rank_{max(found)}: "
                   f"{', '.join(rank_folder_name(r) for r in missing)} missing")
    return [found[r] for r in range(len(found))]


def output_weight_files(folder: str, tp: int, fmt: str) -> list:
    """[(path relative to `folder`, real path)] of the weight files a convert / shard output of `tp` ranks in
    `fmt` holds (its manifest says which), each a regular file resolving inside `folder`; the rank folders are
    checked by the one scan first, so a missing or extra one is named."""
    rank_folders(folder, tp)
    out = []
    for rel in weight_paths(tp, fmt):
        path = os.path.join(folder, rel)
        real = inside(folder, rel, path) if os.path.lexists(path) else None
        if real is None or not os.path.isfile(real):
            if tp == 1:
                raise fail(f"no llava.ckpt or llava.safetensors in {folder}: its manifest records {rel}")
            raise fail(f"{os.path.dirname(path)}: no {weights_name(fmt)} (missing rank file)")
        out.append((rel, real))
    return out


def rank_weight_file(rank_dir: str, preferred=("llava.ckpt", "llava.safetensors")) -> str:
    """The one weights file (.ckpt or .safetensors) of a rank folder: `preferred` names first, else the only
    one there is. A missing file, or several checkpoints to choose from, is an error naming the folder."""
    for name in preferred:
        if os.path.lexists(os.path.join(rank_dir, name)):
            return _regular(rank_dir, name)
    names = sorted(n for n in os.listdir(rank_dir) if n.endswith(WEIGHT_SUFFIXES))
    if not names:
        raise fail(f"{rank_dir}: no .ckpt or .safetensors file (missing rank file)")
    if len(names) > 1:
        raise fail(f"{rank_dir} holds {len(names)} checkpoints ({', '.join(names[:4])}); keep one per rank folder")
    return _regular(rank_dir, names[0])


def _regular(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    real = inside(folder, name, path)
    if not os.path.isfile(real):
        raise fail(f"{path} is not a regular file")
    return real


@dataclass(frozen=True)
class RankedTensor:
    """One tensor held by one or more ranks: `pieces[r]` is rank r's TensorInfo, `boxes[r]` the part of the whole
    tensor it holds, as a (lo, hi) range per dim. Ranks with the same box hold replicas; the distinct boxes tile
    the whole tensor exactly (boxed_tensor checks that)."""
    name: str
    shape: tuple          # the whole tensor
    dtype: str
    pieces: tuple
    boxes: tuple

    @property
    def ranks(self) -> int:
        return len(self.pieces)

    @property
    def replicated(self) -> bool:
        """Every rank holds the whole tensor."""
        return len(self._distinct) == 1

    @cached_property
    def _distinct(self) -> dict:
        """box -> the ranks holding it, in rank order."""
        out: dict = {}
        for r, box in enumerate(self.boxes):
            out.setdefault(box, []).append(r)
        return out

    def row_end(self, row: int) -> int:
        """The end of the row band holding `row`: the first dim-0 boundary of a piece after it, so a chunk that
        stops there is read from whole rows of the same pieces."""
        if not self.shape:
            return 1
        return min(box[0][1] for box in self._distinct if box[0][0] <= row < box[0][1])

    def holder_of(self, index) -> int:
        """The first rank whose piece holds element `index` of the whole tensor."""
        for r, box in enumerate(self.boxes):
            if all(lo <= i < hi for i, (lo, hi) in zip(index, box)):
                return r
        raise ValueError(f"{self.name}: index {list(index)} is outside {list(self.shape)}")

    def sole_holder(self, lo: int, hi: int):
        """(TensorInfo, first row in it) when one rank alone holds whole rows [lo, hi) (nothing to compare
        with, nothing to join), else None: a caller may then copy those bytes straight from that file."""
        for box, holders in self._distinct.items():
            if not box or not box[0][0] <= lo < box[0][1]:
                continue
            whole_rows = all(b == (0, n) for b, n in zip(box[1:], self.shape[1:]))
            if hi <= box[0][1] and whole_rows and len(holders) == 1:
                return self.pieces[holders[0]], lo - box[0][0]
            return None
        return (self.pieces[0], lo) if not self.shape and self.ranks == 1 else None

    def read_rows(self, reader: FileReader, lo: int, hi: int, mismatched: set | None = None) -> np.ndarray:
        """Rows [lo, hi) along dim 0 of the whole tensor (replicas compared as they are read: a difference is an
        error naming the tensor and both ranks, or, given `mismatched`, the name is added to it and the first
        holder's copy used)."""
        if self.replicated:
            return self._agreed(reader, self._distinct[self.boxes[0]], lo, hi, mismatched)
        out = np.empty((hi - lo,) + tuple(self.shape[1:]), dtype=numpy_dtype(self.dtype))
        for box, holders in self._distinct.items():
            a, c = max(lo, box[0][0]), min(hi, box[0][1])
            if a >= c:
                continue
            part = self._agreed(reader, holders, a - box[0][0], c - box[0][0], mismatched)
            out[(slice(a - lo, c - lo),) + tuple(slice(b0, b1) for b0, b1 in box[1:])] = part
        return out

    def _agreed(self, reader: FileReader, holders, lo: int, hi: int, mismatched: set | None = None) -> np.ndarray:
        first = reader.read_rows(self.pieces[holders[0]], lo, hi)
        for r in holders[1:]:
            other = reader.read_rows(self.pieces[r], lo, hi)
            if not np.array_equal(first.reshape(-1).view(np.uint8), other.reshape(-1).view(np.uint8)):
                if mismatched is not None:
                    mismatched.add(self.name)
                    continue
                what = "replicated tensor" if self.replicated else "slice held by several ranks"
                raise fail(f"{self.name}: {what} differs between rank {holders[0]} and rank {r} "
                           f"({os.path.basename(self.pieces[holders[0]].path)} and "
                           f"{os.path.basename(self.pieces[r].path)})")
        return first


def boxed_tensor(name: str, pieces, boxes, rank_names=None) -> RankedTensor:
    """Join rank pieces (TensorInfo per rank) and the box each holds (engine.splits.rank_boxes) into one
    RankedTensor, checking that they agree on dtype, that each piece has its box's shape, and that the distinct
    boxes tile the whole tensor: no two overlap, none is missing. `rank_names`: how to name rank i in messages
    (default "rank i")."""
    pieces, boxes = tuple(pieces), tuple(tuple(tuple(b) for b in box) for box in boxes)
    label = (lambda i: rank_names[i]) if rank_names else (lambda i: f"rank {i}")
    first = pieces[0]
    for r, (p, box) in enumerate(zip(pieces, boxes)):
        if r and p.dtype != first.dtype:
            raise fail(f"{name}: {label(r)} holds {p.dtype}, {label(0)} holds {first.dtype} ({p.path})")
        if tuple(p.shape) != tuple(hi - lo for lo, hi in box):
            if r and tuple(p.shape) != tuple(first.shape):
                raise fail(f"{name}: {label(r)} holds {list(p.shape)} {p.dtype}, {label(0)} holds "
                           f"{list(first.shape)} {first.dtype} ({p.path})")
            raise fail(f"{name}: {label(r)} holds {list(p.shape)}, its layout gives it "
                       f"{[hi - lo for lo, hi in box]} ({p.path})")
    shape = tuple(max(box[d][1] for box in boxes) for d in range(len(first.shape)))
    distinct: dict = {}
    for r, box in enumerate(boxes):
        distinct.setdefault(box, r)
    keys = list(distinct)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if all(max(x[0], y[0]) < min(x[1], y[1]) for x, y in zip(a, b)):
                raise fail(f"{name}: {label(distinct[a])} and {label(distinct[b])} hold overlapping slices "
                           f"({[list(x) for x in a]} and {[list(y) for y in b]})")
    volume = sum(int(np.prod([hi - lo for lo, hi in box], dtype=np.int64)) for box in keys)
    if volume != int(np.prod(shape, dtype=np.int64)):
        raise fail(f"{name}: the ranks do not hold every part of its {list(shape)} (a slice is missing)")
    return RankedTensor(name, shape, first.dtype, pieces, boxes)


def ranked_tensor(name: str, pieces, dim, blocks, n_blocks: int) -> RankedTensor:
    """Rank pieces cut along one dim: rank r holds block blocks[r] of `n_blocks` equal blocks along `dim`
    (dim None: every rank holds a replica). Checked as boxed_tensor checks."""
    pieces = tuple(pieces)
    first = pieces[0]
    for r, p in enumerate(pieces[1:], 1):
        if p.dtype != first.dtype or tuple(p.shape) != tuple(first.shape):
            raise fail(f"{name}: rank {r} holds {list(p.shape)} {p.dtype}, rank 0 holds {list(first.shape)} "
                       f"{first.dtype} ({p.path})")
    piece = list(first.shape)
    if dim is not None and n_blocks > 1:
        if dim >= len(piece):
            raise fail(f"{name}: cannot be split along dim {dim}, it has {len(piece)} dims")
        if sorted(set(blocks)) != list(range(n_blocks)):
            raise fail(f"{name}: the ranks do not hold every one of its {n_blocks} blocks")
    else:
        dim, blocks = None, (0,) * len(pieces)
    boxes = [tuple((b * n, (b + 1) * n) if d == dim else (0, n) for d, n in enumerate(piece)) for b in blocks]
    return boxed_tensor(name, pieces, boxes)


def single(info: TensorInfo) -> RankedTensor:
    """A tensor held whole by one file."""
    return RankedTensor(info.name, tuple(info.shape), info.dtype, (info,), (tuple((0, n) for n in info.shape),))
