"""The split rules (llava_ckpt/engine/splits.py): split dims, rank shapes, merging, strategy tensor maps and the
rank blocks they describe, degrees; held to tests/oracles.py's independent spelling of the rule."""
import numpy as np
import pytest

from llava_ckpt.engine.splits import (
    SPLIT_KINDS, check_divides, merge, rank_blocks, rank_shape, split_dim, tensor_map, valid_degrees,
)
from llava_ckpt.errors import CheckpointError
from oracles import rank_slice


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


def test_merge_inverts_rank_slices_and_refuses_differing_replicas():
    full = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
    for kind in ("column", "row", "vocab", "replicated"):
        for tp in (1, 2, 4):
            parts = [np.ascontiguousarray(full[rank_slice(full.shape, kind, tp, r)]) for r in range(tp)]
            assert rank_shape(full.shape, kind, tp) == parts[0].shape
            assert np.array_equal(merge(parts, kind), full)
    parts = [full.copy(), full.copy()]
    parts[1][3, 4] += 1
    with pytest.raises(CheckpointError, match="w.*rank 0 and rank 1"):
        merge(parts, "replicated", "w")


def test_tensor_maps_describe_the_blocks_each_rank_holds():
    """A strategy file's tensor_map, read back the way a MindSpore layout is read (rank_blocks), names the split
    dim of the kind and gives rank r block r."""
    for kind in SPLIT_KINDS:
        for ndim in (1, 2):
            dim, blocks, n = rank_blocks([1, 4], tensor_map(kind, ndim), 4)
            assert dim == split_dim(kind, ndim), (kind, ndim)
            assert (blocks, n) == (([0, 1, 2, 3], 4) if dim is not None else ([0] * 4, 1)), (kind, ndim)


def test_degrees_name_what_they_do_not_divide():
    units = [("dim 0 of wq", 64), ("heads of wq", 4), ("dim 0 of embed", 32064)]
    assert valid_degrees(units, 16) == [1, 2, 4]
    check_divides(units, 4)
    with pytest.raises(CheckpointError, match=r"--tp 3 must divide .*64 \(dim 0 of wq\).*Valid: 1, 2, 4"):
        check_divides(units, 3)
    with pytest.raises(CheckpointError, match="positive integer"):
        check_divides(units, 0)
