"""The split rules, in one place: the split kinds a mapping table may name and every rule about them.

A split kind says how `--tp N` cuts a tensor (Megatron's rules):
  column      dim 0: output rows of an [out, in] weight, and its bias
  row         dim 1: input columns of an [out, in] weight; a 1-D row bias is added after the all-reduce,
              so every rank holds it whole
  vocab       dim 0 of an embedding or lm_head (rows = vocabulary entries)
  replicated  every rank holds the whole tensor
Rank r holds the r-th of N equal contiguous blocks along the split dim. Convert, shard, the strategy file,
the manifest, verify, export and the tensor-parallel cells of the reference model all import these
functions; none of them spells a split dim out again.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import fail

SPLIT_DIMS = {"column": 0, "vocab": 0, "row": 1, "replicated": None}
SPLIT_KINDS = tuple(SPLIT_DIMS)


def check_kind(kind: str) -> str:
    if kind not in SPLIT_DIMS:
        raise fail(f"unknown split kind {kind!r} (one of {', '.join(SPLIT_KINDS)})")
    return kind


def check_degree(tp) -> int:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise fail(f"--tp must be a positive integer, got {tp!r}")
    return tp


def split_dim(kind: str, ndim: int) -> int | None:
    """The dim `kind` cuts on a tensor of `ndim` dims, or None when every rank holds it whole
    (replicated, or a 1-D bias under a row split)."""
    dim = SPLIT_DIMS[check_kind(kind)]
    if not isinstance(ndim, int) or ndim < 0:
        raise fail(f"bad number of dims {ndim!r} for split kind {kind!r}")
    if dim is None or dim >= ndim:
        if kind in ("column", "vocab") and ndim == 0:
            raise fail(f"split kind {kind!r} needs a tensor of at least 1 dim, got a 0-d tensor")
        return None
    if kind == "row" and ndim != 2:
        raise fail(f"split kind 'row' needs a 2-D [out, in] weight or a 1-D bias, got {ndim} dims")
    return dim


def rank_shape(shape: Sequence[int], kind: str, tp: int) -> tuple:
    """The shape one rank holds."""
    shape = [int(d) for d in shape]
    dim = split_dim(kind, len(shape))
    if dim is not None and tp > 1:
        shape[dim] //= tp
    return tuple(shape)




def merge(parts: Sequence[np.ndarray], kind: str, name: str = "tensor") -> np.ndarray:
    """The whole tensor from its rank pieces (in rank order). Replicas must be bit-identical: a difference
    is an error naming the tensor and the ranks, since there would be no right answer to pick."""
    if not parts:
        raise fail(f"{name}: no rank pieces to merge")
    dim = split_dim(kind, parts[0].ndim)
    if dim is None:
        first = np.ascontiguousarray(parts[0]).view(np.uint8)
        for r, p in enumerate(parts[1:], 1):
            if p.shape != parts[0].shape or not np.array_equal(np.ascontiguousarray(p).view(np.uint8), first):
                raise fail(f"{name}: replicated tensor differs between rank 0 and rank {r}")
        return parts[0]
    return np.concatenate(parts, axis=dim)


def tensor_map(kind: str, ndim: int) -> list:
    """MindSpore's tensor_map for `kind` with dev_matrix [1, N]: per dim, 0 = the model-parallel axis
    (indexed from the right of dev_matrix), -1 = not split."""
    dim = split_dim(kind, ndim)
    tmap = [-1] * ndim
    if dim is not None:
        tmap[dim] = 0
    return tmap



def distinct_units(units: Sequence[tuple]) -> dict:
    """{description: size} with one description (the first) per distinct size: what a manifest records."""
    out: dict = {}
    seen = set()
    for what, size in units:
        if size not in seen:
            seen.add(size)
            out[what] = size
    return out


def indivisible(units: Sequence[tuple], tp: int) -> list:
    """'size (what)' for each distinct size in `units` that `tp` does not divide."""
    return [f"{size} ({what})" for what, size in distinct_units(units).items() if size % tp]


def valid_degrees(units: Sequence[tuple], limit: int = 128) -> list:
    """Every degree up to `limit` that divides all `units`."""
    sizes = set(size for _, size in units)
    return [n for n in range(1, limit + 1) if all(size % n == 0 for size in sizes)]


def check_divides(units: Sequence[tuple], tp) -> None:
    """Exit early, naming what `tp` does not divide and the valid degrees. `units`: (what, size) pairs,
    every size that is cut (split dims, whole heads, KV groups, gate/up pairs)."""
    check_degree(tp)
    if tp == 1:
        return
    bad = indivisible(units, tp)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise fail(f"--tp {tp} must divide every size that is split; it does not divide {shown}. "
                   f"Valid: {', '.join(map(str, valid_degrees(units)))}")


def rank_blocks(dev_matrix: Sequence[int], tmap: Sequence[int], n_ranks: int, name: str = "tensor") -> tuple:
    """(split dim or None, block index of each rank, number of blocks) for a MindSpore layout that cuts at most
    one dim (rank_boxes says how ranks map onto blocks). dev_matrix [1, N] is convert's tensor parallelism."""
    shape, boxes = rank_boxes(dev_matrix, tmap, [1] * len(tmap), n_ranks, 0, name)
    split = [d for d, n in enumerate(shape) if n > 1]
    if not split:
        return None, [0] * n_ranks, 1
    if len(split) > 1:
        raise fail(f"{name}: tensor_map {list(tmap)} splits more than one dim; only one split dim is supported")
    dim = split[0]
    return dim, [box[dim][0] for box in boxes], shape[dim]


def _coord(rank: int, dev: Sequence[int], axis: int) -> int:
    """Rank `rank`'s coordinate on device axis `axis`: ranks are laid out row-major over dev_matrix (the last
    axis varies fastest)."""
    inner = 1
    for d in dev[axis + 1:]:
        inner *= d
    return (rank // inner) % dev[axis]


def rank_boxes(dev_matrix: Sequence[int], tmap: Sequence[int], piece_shape: Sequence[int], n_ranks: int,
               opt_shard_size: int = 0, name: str = "tensor") -> tuple:
    """(whole shape, box of each rank) of a tensor saved under a MindSpore layout, where a box is the (lo, hi)
    range of each dim of the whole tensor that rank holds and `piece_shape` what each rank's file holds.

    A tensor dim whose tensor_map entry m names a device axis (indexed from the right of dev_matrix) is cut into
    as many equal blocks as that axis has devices; rank r holds the block of its coordinate on that axis.
    Optimizer parallelism (opt_weight_shard_size k > 1, -1 for all) cuts dim 0 of each such block again into k
    equal parts over the device axes the tensor is not cut on, taken from the right (the innermost first, an
    axis larger than what is left contributing its inner part); the rank's part is its mixed-radix coordinate
    over those axes, the leftmost most significant. This is how MindSpore's checkpoint transform lays optimizer
    shards out (parallel/_tensor.py, _construct_tensor_layout_for_opt_shard). Ranks with equal boxes hold
    replicas."""
    dev = [int(d) for d in dev_matrix]
    if not dev or any(d < 1 for d in dev):
        raise fail(f"{name}: invalid dev_matrix {list(dev_matrix)}")
    total = 1
    for d in dev:
        total *= d
    if total != n_ranks:
        raise fail(f"{name}: its layout is for {total} devices (dev_matrix {dev}), there are {n_ranks} ranks")
    piece = [int(n) for n in piece_shape]
    if len(tmap) != len(piece):
        raise fail(f"{name}: tensor_map {list(tmap)} has {len(tmap)} entries for a {len(piece)}-d tensor")
    used = {}
    for dim, m in enumerate(tmap):
        if m == -1:
            continue
        if not 0 <= m < len(dev):
            raise fail(f"{name}: tensor_map {list(tmap)} names a device axis outside dev_matrix {dev}")
        axis = len(dev) - 1 - m
        if axis in used.values():
            raise fail(f"{name}: tensor_map {list(tmap)} cuts two dims over the same device axis")
        if dev[axis] > 1:
            used[dim] = axis
    repeated = [a for a in range(len(dev)) if a not in used.values() and dev[a] > 1]
    k = int(opt_shard_size)
    if k == -1:
        k = 1
        for a in repeated:
            k *= dev[a]
    opt_axes, left = [], k
    if k > 1:
        if not piece:
            raise fail(f"{name}: a 0-d tensor cannot be optimizer-sharded (opt_weight_shard_size {k})")
        for a in reversed(repeated):
            part = min(dev[a], left)
            if dev[a] % part or left % part:
                break
            opt_axes.insert(0, (a, part))
            left //= part
            if left == 1:
                break
        if left != 1:
            raise fail(f"{name}: opt_weight_shard_size {k} does not fit the device axes it is not cut on "
                       f"(dev_matrix {dev}, tensor_map {list(tmap)})")
    whole = [n * (dev[used[d]] if d in used else 1) for d, n in enumerate(piece)]
    if k > 1:
        whole[0] *= k
    boxes = []
    for r in range(n_ranks):
        box = []
        for d, n in enumerate(piece):
            b = _coord(r, dev, used[d]) if d in used else 0
            if d == 0 and k > 1:
                part = 0
                for a, size in opt_axes:
                    part = part * size + _coord(r, dev, a) % size
                b = b * k + part
            box.append((b * n, (b + 1) * n))
        boxes.append(tuple(box))
    return tuple(whole), boxes
