"""Rank folders and tensors read across ranks (llava_ckpt/io/ranks.py), checked against tests/oracles.py."""
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from llava_ckpt.errors import CheckpointError
from llava_ckpt.io.ranks import rank_folders, rank_weight_file, ranked_tensor
from llava_ckpt.io.readers import FileReader, read_index
from llava_ckpt.engine.splits import rank_blocks
from oracles import rank_slice


def _write_ranks(tmp_path, full, kind, tp):
    pieces = []
    for r in range(tp):
        folder = tmp_path / f"rank_{r}"
        folder.mkdir(exist_ok=True)
        path = folder / "w.safetensors"
        save_file({"w": np.ascontiguousarray(full[rank_slice(full.shape, kind, tp, r)])}, str(path))
        pieces.append(read_index(str(path))["w"])
    return pieces


@pytest.mark.parametrize("kind,dim", [("column", 0), ("row", 1), ("replicated", None)])
def test_rows_of_the_whole_tensor_from_rank_pieces(tmp_path, kind, dim):
    full = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    pieces = _write_ranks(tmp_path, full, kind, 2)
    t = ranked_tensor("w", pieces, dim, [0, 1] if dim is not None else [0, 0], 2 if dim is not None else 1)
    assert t.shape == (8, 6)
    with FileReader() as reader:
        for lo, hi in [(0, 8), (0, 3), (3, 5), (4, 8), (7, 8)]:
            assert np.array_equal(t.read_rows(reader, lo, hi), full[lo:hi])
    assert (t.sole_holder(0, 4) is not None) == (dim == 0)  # one rank alone holds rows 0..3 only when cut on dim 0
    assert t.sole_holder(3, 5) is None


def test_replicas_that_differ_are_named(tmp_path):
    full = np.ones((4, 2), np.float16)
    pieces = _write_ranks(tmp_path, full, "replicated", 3)
    save_file({"w": np.full((4, 2), 2, np.float16)}, str(tmp_path / "rank_2" / "w.safetensors"))
    pieces[2] = read_index(str(tmp_path / "rank_2" / "w.safetensors"))["w"]
    t = ranked_tensor("w", pieces, None, [0, 0, 0], 1)
    with FileReader() as reader, pytest.raises(CheckpointError, match="w: replicated tensor differs between rank 0 and rank 2"):
        t.read_rows(reader, 0, 4)


def test_data_parallel_replicas_of_split_blocks(tmp_path):
    """dev_matrix [2, 2], tensor_map [0, -1]: ranks 0,2 hold block 0 and ranks 1,3 block 1 (row-major ranks)."""
    dim, blocks, n = rank_blocks([2, 2], [0, -1], 4)
    assert (dim, blocks, n) == (0, [0, 1, 0, 1], 2)
    full = np.arange(12, dtype=np.float32).reshape(4, 3)
    halves = [full[:2], full[2:]]
    pieces = []
    for r, b in enumerate(blocks):
        (tmp_path / f"rank_{r}").mkdir()
        save_file({"w": np.ascontiguousarray(halves[b])}, str(tmp_path / f"rank_{r}" / "w.safetensors"))
        pieces.append(read_index(str(tmp_path / f"rank_{r}" / "w.safetensors"))["w"])
    t = ranked_tensor("w", pieces, dim, blocks, n)
    with FileReader() as reader:
        assert np.array_equal(t.read_rows(reader, 0, 4), full)
    assert rank_blocks([2, 2], [1, -1], 4)[1] == [0, 0, 1, 1]
    assert rank_blocks([1, 4], [-1, -1], 4) == (None, [0, 0, 0, 0], 1)
    with pytest.raises(CheckpointError, match="for 4 devices"):
        rank_blocks([1, 4], [0, -1], 2)
    with pytest.raises(CheckpointError, match="more than one dim"):
        rank_blocks([2, 2], [1, 0], 4)


def test_pieces_that_disagree_are_refused(tmp_path):
    a = _write_ranks(tmp_path, np.zeros((4, 2), np.float32), "column", 2)
    save_file({"w": np.zeros((3, 2), np.float32)}, str(tmp_path / "rank_1" / "w.safetensors"))
    a[1] = read_index(str(tmp_path / "rank_1" / "w.safetensors"))["w"]
    with pytest.raises(CheckpointError, match="rank 1 holds \\[3, 2\\]"):
        ranked_tensor("w", a, 0, [0, 1], 2)


def test_rank_folders_and_their_files(tmp_path):
    assert rank_folders(str(tmp_path)) == []
    for r in (0, 1, 3):
        (tmp_path / f"rank_{r}").mkdir()
    with pytest.raises(CheckpointError, match="rank_2 missing"):
        rank_folders(str(tmp_path))
    # with the tp a manifest records: the missing and the uncounted folders are named
    with pytest.raises(CheckpointError, match=r"records tp 2 \(rank_0 \.\. rank_1\): rank_3 not part of it"):
        rank_folders(str(tmp_path), 2)
    with pytest.raises(CheckpointError, match=r"records tp 4 .*: rank_2 missing"):
        rank_folders(str(tmp_path), 4)
    with pytest.raises(CheckpointError, match=r"records tp 1 \(no rank folders\): rank_0, rank_1, rank_3 not part"):
        rank_folders(str(tmp_path), 1)
    os.rmdir(tmp_path / "rank_3")
    assert [os.path.basename(d) for d in rank_folders(str(tmp_path))] == ["rank_0", "rank_1"]
    assert rank_folders(str(tmp_path), 2) == rank_folders(str(tmp_path))
    with pytest.raises(CheckpointError, match="missing rank file"):
        rank_weight_file(str(tmp_path / "rank_0"))
    (tmp_path / "rank_0" / "a-1_1.ckpt").write_bytes(b"x")
    assert rank_weight_file(str(tmp_path / "rank_0")).endswith("a-1_1.ckpt")
    (tmp_path / "rank_0" / "a-2_1.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="2 checkpoints"):
        rank_weight_file(str(tmp_path / "rank_0"))
    (tmp_path / "rank_0" / "llava.ckpt").write_bytes(b"x")
    assert rank_weight_file(str(tmp_path / "rank_0")).endswith("llava.ckpt")


def _pieces_of(tmp_path, arrays):
    pieces = []
    for r, a in enumerate(arrays):
        folder = tmp_path / f"rank_{r}"
        folder.mkdir(exist_ok=True)
        save_file({"w": np.ascontiguousarray(a)}, str(folder / "w.safetensors"))
        pieces.append(read_index(str(folder / "w.safetensors"))["w"])
    return pieces


def test_boxes_cut_on_two_dims_read_back_whole(tmp_path):
    """Optimizer parallelism on a row-split weight cuts dim 0 and dim 1 at once: four quarters, read as one."""
    from llava_ckpt.io.ranks import boxed_tensor
    full = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    boxes = [((0, 4), (0, 3)), ((0, 4), (3, 6)), ((4, 8), (0, 3)), ((4, 8), (3, 6))]
    t = boxed_tensor("w", _pieces_of(tmp_path, [full[a:b, c:d] for (a, b), (c, d) in boxes]), boxes)
    assert t.shape == (8, 6) and not t.replicated
    with FileReader() as reader:
        for lo, hi in [(0, 8), (3, 5), (7, 8)]:
            assert np.array_equal(t.read_rows(reader, lo, hi), full[lo:hi])
    assert t.row_end(1) == 4 and t.row_end(4) == 8 and t.holder_of((5, 4)) == 3
    assert t.sole_holder(0, 2) is None  # a row is split between two ranks


def test_overlapping_or_missing_slices_are_named(tmp_path):
    from llava_ckpt.io.ranks import boxed_tensor
    full = np.zeros((4, 4), np.float32)
    overlap = [((0, 4), (0, 2)), ((0, 2), (0, 4))]
    pieces = _pieces_of(tmp_path, [full[a:b, c:d] for (a, b), (c, d) in overlap])
    with pytest.raises(CheckpointError, match=r"w: rank 0 and rank 1 hold overlapping slices"):
        boxed_tensor("w", pieces, overlap)
    gap = [((0, 2), (0, 2)), ((2, 4), (2, 4))]
    (tmp_path / "gap").mkdir()
    pieces = _pieces_of(tmp_path / "gap", [full[a:b, c:d] for (a, b), (c, d) in gap])
    with pytest.raises(CheckpointError, match=r"w: the ranks do not hold every part of its \[4, 4\]"):
        boxed_tensor("w", pieces, gap)
