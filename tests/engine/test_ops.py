"""The typed mapping kinds (llava_ckpt/ops.py): row maps, exact inverses, declared splits and TP units."""
import numpy as np
import pytest

from llava_ckpt.engine import ops
from llava_ckpt.engine.ops import forward, inverse


def test_ops_have_exact_inverses():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((8, 3)), rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    for op, arrays, groups in [("rename", [q], None), ("concat_rows", [q, k, v], None),
                               ("qkv_grouped", [q, k, v], 2), ("interleave_rows", [k, v], None)]:
        fused = forward(op, arrays, groups)
        back = inverse(op, fused, [a.shape for a in arrays], groups)
        assert all(np.array_equal(a, b) for a, b in zip(arrays, back)), op


def test_row_layouts_by_hand():
    q = np.arange(8)[:, None] + 100  # 2 KV groups of 2 heads x 2 rows
    k = np.arange(4)[:, None] + 200
    v = np.arange(4)[:, None] + 300
    grouped = forward("qkv_grouped", [q, k, v], 2)[:, 0]
    assert grouped.tolist() == [100, 101, 102, 103, 200, 201, 300, 301, 104, 105, 106, 107, 202, 203, 302, 303]
    inter = forward("interleave_rows", [k, v])[:, 0]
    assert inter.tolist() == [200, 300, 201, 301, 202, 302, 203, 303]
    assert forward("concat_rows", [k, v])[:, 0].tolist() == [200, 201, 202, 203, 300, 301, 302, 303]


def test_each_op_declares_the_splits_that_keep_pieces_whole():
    assert ops.get("concat_rows").check(3, "column", None) and "cannot be split 'column'" in \
        ops.get("concat_rows").check(3, "column", None)
    assert ops.get("concat_rows").check(3, "replicated", None) is None
    assert "takes 1 source" in ops.get("rename").check(2, "column", None)
    assert "needs `groups`" in ops.get("qkv_grouped").check(3, "column", None)
    assert ops.get("qkv_grouped").check(3, "column", 8) is None
    assert ops.get("rename").check(1, "vocab", None) is None
    assert "cannot be split 'vocab'" in ops.get("interleave_rows").check(2, "vocab", None)


def test_tp_units_keep_kv_groups_and_gate_up_pairs_whole():
    q, kv = (8, 3), (4, 3)
    assert ops.get("qkv_grouped").tp_units([q, kv, kv], 2, "column") == [("KV groups", 2)]
    assert ops.get("qkv_grouped").tp_units([q, kv, kv], 2, "replicated") == []
    assert ops.get("interleave_rows").tp_units([kv, kv], None, "column") == [("interleaved row pairs", 4)]
    # a column block of a grouped q/k/v holds whole groups exactly when the degree divides the group count
    fused = forward("qkv_grouped", [np.arange(8)[:, None], 100 + np.arange(4)[:, None], 200 + np.arange(4)[:, None]], 2)
    halves = np.split(fused[:, 0], 2)
    assert halves[0].tolist() == [0, 1, 2, 3, 100, 101, 200, 201]
    with pytest.raises(Exception, match="do not divide into 3"):
        ops.row_map("qkv_grouped", [q, kv, kv], 3)
