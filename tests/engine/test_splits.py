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


@pytest.mark.parametrize("dp,mp,opt", [(2, 2, 2), (4, 1, 4), (4, 2, 2), (2, 4, 2), (4, 2, -1)])
@pytest.mark.parametrize("kind,shape", [("column", (16, 4)), ("row", (16, 8)), ("replicated", (16,)),
                                        ("vocab", (32, 4))])
def test_rank_boxes_follow_mindspore_optimizer_slices(dp, mp, opt, kind, shape):
    """Each rank's box is the slice tests/training.py cuts by hand (MindSpore's rule; the shard tests hold both
    to ms.transform_checkpoints)."""
    from llava_ckpt.engine.splits import rank_boxes
    from training import training_piece
    full = np.arange(int(np.prod(shape))).reshape(shape)
    tmap = tensor_map(kind, len(shape)) if mp > 1 else [-1] * len(shape)
    size = dp * (1 if 0 in tmap else mp) if opt == -1 else opt  # -1: every device the tensor is not cut over
    pieces = [training_piece(full, kind, dp, mp, size, r) for r in range(dp * mp)]
    whole, boxes = rank_boxes([dp, mp], tmap, pieces[0].shape, dp * mp, opt)
    assert whole == shape
    for r, box in enumerate(boxes):
        assert np.array_equal(full[tuple(slice(a, b) for a, b in box)], pieces[r]), (r, box)


def test_rank_boxes_refuse_what_does_not_fit():
    from llava_ckpt.engine.splits import rank_boxes
    with pytest.raises(CheckpointError, match="opt_weight_shard_size 3 does not fit"):
        rank_boxes([2, 2], [0, -1], (4, 4), 4, 3)
    with pytest.raises(CheckpointError, match="for 4 devices"):
        rank_boxes([2, 2], [0, -1], (4, 4), 8, 0)
    with pytest.raises(CheckpointError, match="2 entries for a 1-d tensor"):
        rank_boxes([1, 2], [0, -1], (4,), 2, 0)
