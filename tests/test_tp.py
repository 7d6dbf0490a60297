"""Tensor-parallel rules (llava_ckpt/tp.py): split dims, rank blocks, merging, strategy tensor maps, degrees."""
import numpy as np
import pytest

from llava_ckpt.errors import CheckpointError
from llava_ckpt.tp import (
    check_divides, full_shape, kind_of_tensor_map, merge, rank_shape, rank_slice, split_dim, tensor_map, valid_degrees,
)


def test_split_axis_and_tensor_map():
    assert split_dim("column", 2) == 0 and tensor_map("column", 2) == [0, -1]
    assert split_dim("column", 1) == 0 and tensor_map("column", 1) == [0]
    assert split_dim("vocab", 2) == 0 and tensor_map("vocab", 2) == [0, -1]
    assert split_dim("row", 2) == 1 and tensor_map("row", 2) == [-1, 0]
    assert split_dim("row", 1) is None and tensor_map("row", 1) == [-1]
    assert split_dim("replicated", 4) is None and tensor_map("replicated", 4) == [-1, -1, -1, -1]
    assert tensor_map("replicated", 0) == []
    for bad in [("row", 3), ("column", 0), ("diagonal", 2), ("column", -1)]:
        with pytest.raises(CheckpointError):
            split_dim(*bad)


def test_rank_slice_blocks_cover_the_tensor():
    full = np.arange(8 * 12).reshape(8, 12)
    for kind, axis in [("column", 0), ("row", 1)]:
        for tp in (1, 2, 4):
            parts = [full[rank_slice(full.shape, kind, tp, r)] for r in range(tp)]
            assert all(p.shape[axis] == full.shape[axis] // tp for p in parts)
            assert np.array_equal(np.concatenate(parts, axis=axis), full)
    assert full[rank_slice(full.shape, "replicated", 4, 3)].shape == full.shape
    with pytest.raises(CheckpointError, match="equal parts"):
        rank_slice((6, 4), "column", 4, 0)
    with pytest.raises(CheckpointError):
        rank_slice((8, 4), "column", 4, 4)


def test_merge_inverts_rank_slices_and_refuses_differing_replicas():
    full = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
    for kind in ("column", "row", "vocab", "replicated"):
        for tp in (1, 2, 4):
            parts = [np.ascontiguousarray(full[rank_slice(full.shape, kind, tp, r)]) for r in range(tp)]
            assert rank_shape(full.shape, kind, tp) == parts[0].shape
            assert full_shape(parts[0].shape, kind, tp) == full.shape
            assert np.array_equal(merge(parts, kind), full)
    parts = [full.copy(), full.copy()]
    parts[1][3, 4] += 1
    with pytest.raises(CheckpointError, match="w.*rank 0 and rank 1"):
        merge(parts, "replicated", "w")


def test_tensor_maps_read_back_to_kinds():
    for kind, ndim, back in [("column", 2, "column"), ("vocab", 2, "column"), ("row", 2, "row"),
                             ("replicated", 3, "replicated"), ("row", 1, "replicated")]:
        assert kind_of_tensor_map(tensor_map(kind, ndim)) == back


def test_degrees_name_what_they_do_not_divide():
    units = [("dim 0 of wq", 64), ("heads of wq", 4), ("dim 0 of embed", 32064)]
    assert valid_degrees(units, 16) == [1, 2, 4]
    check_divides(units, 4)
    with pytest.raises(CheckpointError, match=r"--tp 3 must divide .*64 \(dim 0 of wq\).*Valid: 1, 2, 4"):
        check_divides(units, 3)
    with pytest.raises(CheckpointError, match="positive integer"):
        check_divides(units, 0)
