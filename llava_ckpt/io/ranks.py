"""A rank folder set (`rank_<r>/` folders, one weights file each) and tensors cut across its ranks, read as one.

A RankedTensor answers "rows [lo, hi) of the whole tensor" from the rank pieces, chunk by chunk, so the whole
tensor is never in memory; pieces that should be replicas are compared as they are read, and a difference
names the tensor and the two ranks. Which rank holds which block comes from tp.py (split kinds, or a MindSpore
layout through tp.rank_blocks).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from ..errors import fail
from .source import FileReader, TensorInfo

RANK_DIR = re.compile(r"rank_(\d+)")
WEIGHT_SUFFIXES = (".ckpt", ".safetensors")


def rank_dirs(folder: str) -> list:
    """Paths of folder/rank_0 .. rank_{N-1} (an empty list when there are none). Gaps, duplicates such as
    rank_01, and rank folders that are links leading outside `folder` are refused."""
    found = {}
    root = os.path.realpath(folder)
    for entry in sorted(os.listdir(folder)):
        m = RANK_DIR.fullmatch(entry)
        path = os.path.join(folder, entry)
        if not m or not os.path.isdir(path):
            continue
        if str(int(m.group(1))) != m.group(1):
            raise fail(f"{path}: rank folders are named rank_0, rank_1, ... (no leading zeros)")
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise fail(f"{path} resolves outside {folder} ({os.path.realpath(path)})")
        found[int(m.group(1))] = path
    if not found:
        return []
    if sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise fail(f"{folder}: rank folders are not rank_0..rank_{max(found)}: "
                   f"{', '.join(f'rank_{r}' for r in missing)} missing")
    return [found[r] for r in range(len(found))]


def rank_weight_file(rank_dir: str, preferred=("llava.ckpt", "llava.safetensors")) -> str:
    """The one weights file (.ckpt or .safetensors) of a rank folder: `preferred` names first, else the only
    one there is. A missing file, or several checkpoints to choose from, is an error naming the folder."""
    for name in preferred:
        if os.path.lexists(os.path.join(rank_dir, name)):
            return _inside_file(rank_dir, name)
    names = sorted(n for n in os.listdir(rank_dir) if n.endswith(WEIGHT_SUFFIXES))
    if not names:
        raise fail(f"{rank_dir}: no .ckpt or .safetensors file (missing rank file)")
    if len(names) > 1:
        raise fail(f"{rank_dir} holds {len(names)} checkpoints ({', '.join(names[:4])}); keep one per rank folder")
    return _inside_file(rank_dir, names[0])


def _inside_file(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    root = os.path.realpath(folder)
    if os.path.commonpath([root, real]) != root:
        raise fail(f"{path} resolves outside {folder} ({real})")
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
