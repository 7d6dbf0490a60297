"""The mapping kinds a table entry's `op` may name, typed: each declares its row map, its inverse, its output
shape, its manifest layout, the split kinds it allows and the sizes a tensor-parallel degree must divide.

Every op is a permutation / concatenation of its sources' rows (dim 0), described by two index arrays: for each
output row, which source and which row of it. The forward op gathers along them; the inverse op (export back to
HF) scatters along the same arrays, so the two can never disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import fail
from .splits import SPLIT_KINDS


def _rows(shapes) -> list:
    return [s[0] if s else 1 for s in shapes]


def _stacked(shapes, groups):
    """concat_rows / rename: [a; b; c]."""
    rows = _rows(shapes)
    src = np.concatenate([np.full(n, k, dtype=np.int64) for k, n in enumerate(rows)])
    row = np.concatenate([np.arange(n, dtype=np.int64) for n in rows])
    return src, row


def _interleaved(shapes, groups):
    """a_0, b_0, a_1, b_1, ... (MindFormers' w_gate_hidden: its forward reshapes to (.., F, 2))."""
    rows = _rows(shapes)
    if len(set(rows)) != 1:
        raise fail(f"interleave_rows needs sources with equal rows, got {rows}")
    n, k = rows[0], len(rows)
    return np.tile(np.arange(k, dtype=np.int64), n), np.repeat(np.arange(n, dtype=np.int64), k)


def _grouped(shapes, groups):
    """For each of `groups` KV groups g: [q rows of group g; k_g; v_g] (MindFormers' w_qkv: its forward
    reshapes to (.., n_kv, n_rep + 2, head_dim))."""
    rows = _rows(shapes)
    if not groups or any(r % groups for r in rows):
        raise fail(f"qkv_grouped: rows {rows} do not divide into {groups} KV groups")
    src, row = [], []
    for g in range(groups):
        for k, n in enumerate(rows):
            per = n // groups
            src.append(np.full(per, k, dtype=np.int64))
            row.append(np.arange(g * per, (g + 1) * per, dtype=np.int64))
    return np.concatenate(src), np.concatenate(row)


@dataclass(frozen=True)
class Op:
    """One mapping kind. `splits`: the split kinds whose rank pieces stay meaningful for this op's output."""
    name: str
    inverse_name: str
    min_sources: int
    max_sources: int | None
    splits: tuple
    row_map: Callable          # (source shapes, groups) -> (source index, source row) per output row
    needs_groups: bool = False

    def output_shape(self, shapes) -> tuple:
        shapes = [tuple(s) for s in shapes]
        rest = shapes[0][1:]
        if any(s[1:] != rest for s in shapes):
            raise fail(f"op {self.name}: sources disagree beyond dim 0: {shapes}")
        if not shapes[0]:
            return ()
        return (sum(s[0] for s in shapes),) + tuple(rest)

    def layout(self, shapes, groups) -> dict | None:
        """What the manifest records so a reader can undo the op without the table."""
        if self.name == "qkv_grouped":
            return {"kind": self.name, "kv_groups": groups, "rows_per_group": [s[0] // groups for s in shapes]}
        if self.name in ("interleave_rows", "concat_rows"):
            return {"kind": self.name, "source_rows": [s[0] for s in shapes]}
        return None

    def tp_units(self, shapes, groups, split: str) -> list:
        """(what, size) pairs a tensor-parallel degree must divide so that each rank's block of the output
        holds whole units of this op (whole KV groups, whole gate/up pairs), beyond the split dim itself."""
        if split != "column":
            return []
        if self.name == "qkv_grouped":
            return [("KV groups", groups)]
        if self.name == "interleave_rows":
            return [("interleaved row pairs", _rows(shapes)[0])]
        return []

    def check(self, n_sources: int, split: str, groups) -> str | None:
        """Why an entry with this op cannot work as written (None if it can)."""
        if n_sources < self.min_sources or (self.max_sources is not None and n_sources > self.max_sources):
            want = str(self.min_sources) if self.max_sources == self.min_sources else \
                f"{self.min_sources} or more" if self.max_sources is None else f"{self.min_sources}-{self.max_sources}"
            return f"op {self.name!r} takes {want} source(s), the entry lists {n_sources}"
        if split not in SPLIT_KINDS:
            return f"unknown split {split!r} (one of {', '.join(SPLIT_KINDS)})"
        if split not in self.splits:
            return (f"op {self.name!r} cannot be split {split!r}: its rank pieces would not be whole "
                    f"(allowed: {', '.join(self.splits)})")
        if self.needs_groups and groups is None:
            return f"op {self.name!r} needs `groups` (the size name of its group count)"
        return None


RENAME = Op("rename", "rename", 1, 1, ("column", "row", "vocab", "replicated"), _stacked)
# A column split of [q; k; v] would hand rank 0 all of q: only whole-row (replicated) or column-of-input
# (row) cuts keep each rank's piece meaningful.
CONCAT_ROWS = Op("concat_rows", "split_rows", 2, None, ("row", "replicated"), _stacked)
QKV_GROUPED = Op("qkv_grouped", "qkv_ungroup", 3, 3, ("column", "row", "replicated"), _grouped, needs_groups=True)
INTERLEAVE_ROWS = Op("interleave_rows", "deinterleave_rows", 2, None, ("column", "row", "replicated"), _interleaved)

OPS = {op.name: op for op in (RENAME, CONCAT_ROWS, QKV_GROUPED, INTERLEAVE_ROWS)}


def get(name: str) -> Op:
    if name not in OPS:
        raise fail(f"unknown op {name!r} (one of {', '.join(OPS)})")
    return OPS[name]


def row_map(op: str, shapes, groups=None):
    """(source index, source row) for every output row of `op` on sources of `shapes`."""
    return get(op).row_map([tuple(s) for s in shapes], groups)


def forward(op: str, arrays, groups=None) -> np.ndarray:
    """The op on whole arrays (reference semantics; convert streams the same row map in chunks)."""
    src, row = row_map(op, [a.shape for a in arrays], groups)
    out = np.empty((len(src),) + arrays[0].shape[1:], dtype=arrays[0].dtype)
    for k, a in enumerate(arrays):
        out[src == k] = a[row[src == k]]
    return out.reshape(get(op).output_shape([a.shape for a in arrays]))


def inverse(op: str, target: np.ndarray, source_shapes, groups=None) -> list:
    """The sources back from a target, by reading the same row map backwards."""
    src, row = row_map(op, source_shapes, groups)
    flat = target.reshape(len(src), -1)
    out = []
    for k, shape in enumerate(source_shapes):
        sel = src == k
        part = np.empty(tuple(shape), dtype=target.dtype)
        part.reshape((shape[0] if shape else 1, -1))[row[sel]] = flat[sel]
        out.append(part)
    return out
