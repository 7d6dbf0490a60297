"""Rank folders (`rank_<r>/`, one weights file each): the one scan that finds them, and tensors cut across
ranks read as one.

A RankedTensor answers "rows [lo, hi) of the whole tensor" from the rank pieces, chunk by chunk, so the whole
tensor is never in memory; pieces that should be replicas are compared as they are read, and a difference
names the tensor and the two ranks. Which rank holds which block comes from engine/splits.py (split kinds, or
a MindSpore layout through splits.rank_blocks).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from ..errors import fail
from .paths import inside
from .readers import FileReader, TensorInfo

RANK_FOLDER = re.compile(r"rank_([0-9]+)")
WEIGHT_SUFFIXES = (".ckpt", ".safetensors")


def rank_folder_name(rank: int) -> str:
    return f"rank_{rank}"


def weights_name(fmt: str) -> str:
    """The weights file of an output (or of one of its rank folders): llava.ckpt or llava.safetensors."""
    return f"llava.{fmt}"


def weight_paths(tp: int, fmt: str) -> list:
    """The weight files an output of `tp` ranks in `fmt` holds, relative to it, in rank order."""
    if tp == 1:
        return [weights_name(fmt)]
    return [f"{rank_folder_name(r)}/{weights_name(fmt)}" for r in range(tp)]


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
    """One tensor held by one or more ranks: `pieces[r]` is rank r's TensorInfo, `blocks[r]` the block of the
    split dim it holds (all 0 when no dim is split: every rank holds a replica)."""
    name: str
    shape: tuple          # the whole tensor
    dtype: str
    pieces: tuple
    dim: int | None
    blocks: tuple
    n_blocks: int

    @property
    def ranks(self) -> int:
        return len(self.pieces)

    def holders(self, block: int) -> list:
        return [r for r, b in enumerate(self.blocks) if b == block]

    def sole_holder(self, lo: int, hi: int):
        """(TensorInfo, first row in it) when one rank alone holds whole rows [lo, hi) (nothing to compare
        with, nothing to join), else None: a caller may then copy those bytes straight from that file."""
        if self.dim == 1 and self.n_blocks > 1:
            return None
        if self.dim is None or self.n_blocks == 1:
            return (self.pieces[0], lo) if self.ranks == 1 else None
        per = self.shape[0] // self.n_blocks
        block = lo // per
        holders = self.holders(block)
        if (hi - 1) // per != block or len(holders) != 1:
            return None
        return self.pieces[holders[0]], lo - block * per

    def read_rows(self, reader: FileReader, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) along dim 0 of the whole tensor (replicas compared as they are read)."""
        if self.dim is None or self.n_blocks == 1:
            return self._agreed(reader, 0, lo, hi)
        if self.dim == 1:
            return np.concatenate([self._agreed(reader, b, lo, hi) for b in range(self.n_blocks)], axis=1)
        per = self.shape[0] // self.n_blocks
        parts = []
        for b in range(lo // per, (hi - 1) // per + 1):
            a, c = max(lo, b * per), min(hi, (b + 1) * per)
            parts.append(self._agreed(reader, b, a - b * per, c - b * per))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _agreed(self, reader: FileReader, block: int, lo: int, hi: int) -> np.ndarray:
        holders = self.holders(block)
        first = reader.read_rows(self.pieces[holders[0]], lo, hi)
        for r in holders[1:]:
            other = reader.read_rows(self.pieces[r], lo, hi)
            if not np.array_equal(first.reshape(-1).view(np.uint8), other.reshape(-1).view(np.uint8)):
                raise fail(f"{self.name}: replicated tensor differs between rank {holders[0]} and rank {r} "
                           f"({os.path.basename(self.pieces[holders[0]].path)} and "
                           f"{os.path.basename(self.pieces[r].path)})")
        return first


def ranked_tensor(name: str, pieces, dim, blocks, n_blocks: int) -> RankedTensor:
    """Join rank pieces (TensorInfo per rank, in rank order) into one RankedTensor, checking that they agree on
    dtype and shape and that the blocks really cut `dim` into `n_blocks` equal parts."""
    pieces = tuple(pieces)
    first = pieces[0]
    for r, p in enumerate(pieces[1:], 1):
        if p.dtype != first.dtype or tuple(p.shape) != tuple(first.shape):
            raise fail(f"{name}: rank {r} holds {list(p.shape)} {p.dtype}, rank 0 holds {list(first.shape)} "
                       f"{first.dtype} ({p.path})")
    shape = list(first.shape)
    if dim is not None and n_blocks > 1:
        if dim >= len(shape):
            raise fail(f"{name}: cannot be split along dim {dim}, it has {len(shape)} dims")
        if dim > 1 or (dim == 1 and len(shape) != 2):
            raise fail(f"{name}: split along dim {dim} of a {len(shape)}-d tensor is not supported")
        if sorted(set(blocks)) != list(range(n_blocks)):
            raise fail(f"{name}: the ranks do not hold every one of its {n_blocks} blocks")
        shape[dim] *= n_blocks
    else:
        dim, blocks, n_blocks = None, (0,) * len(pieces), 1
    return RankedTensor(name, tuple(shape), first.dtype, pieces, dim, tuple(blocks), n_blocks)


def single(info: TensorInfo) -> RankedTensor:
    """A tensor held whole by one file."""
    return RankedTensor(info.name, tuple(info.shape), info.dtype, (info,), None, (0,), 1)
