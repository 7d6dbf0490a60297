"""The bf16_matmul kernel (model/kernels/bf16_matmul.cc): bfloat16 products summed in float32, what a bfloat16
prefill runs. Its answer is x and w rounded to bfloat16 (to nearest even) and multiplied exactly, up to float32
summation, for every row count, width and depth around its tile and block edges and each weight dtype; the
same bits whatever the thread count; only Linear cells built in kernels.prefill_matmul("bfloat16") take it,
for many rows only; where the CPU lacks AVX-512 BF16 the float32 MatMul runs and the status says why."""
import os

import ml_dtypes
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from llava_ckpt.model import kernels
from llava_ckpt.model.layers import Linear
from cpu import bf16_lacks, flags as _real_flags


pytestmark = pytest.mark.skipif(bool(bf16_lacks()), reason=bf16_lacks() or "runs")


@pytest.fixture(autouse=True)
def cpu():
    ms.set_context(device_target="CPU")


def bf16(a):
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)


def reference(x, w):
    """x and w rounded to bfloat16 (w from its own dtype), multiplied in float64."""
    return bf16(x).astype(np.float64) @ bf16(np.asarray(w, np.float32)).astype(np.float64).T


def op():
    with kernels.prefill_matmul("bfloat16"):
        got = kernels.prefill_matmul_op("float32")
    assert got is not None, kernels.bf16_matmul_status()
    return got


@pytest.mark.parametrize("rows", [1, 8, 23])
# 4099: 3 blocks of K; (48, 64) and (100, 2080): whole 48-column blocks of whole 16-pair groups, packed in
# registers straight from w, beside edge blocks packed through the zeroed buffer
@pytest.mark.parametrize("n_out,k_in", [(1, 1), (47, 3), (49, 257), (150, 1030), (20, 4099), (48, 64), (100, 2080)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_bf16_matmul_is_the_bfloat16_product(rows, n_out, k_in, dtype):
    rng = np.random.default_rng(rows * 7919 + n_out * 31 + k_in)
    x = rng.standard_normal((rows, k_in)).astype(np.float32)
    w = rng.standard_normal((n_out, k_in)).astype(np.float32).astype({"float32": np.float32, "float16": np.float16,
                                                                       "bfloat16": ml_dtypes.bfloat16}[dtype])
    got = op()(Tensor(x), Tensor(w)).asnumpy()
    assert got.shape == (rows, n_out) and got.dtype == np.float32
    want = reference(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k_in))
    if k_in > 8:  # and it is not float32's product: the rounding to bfloat16 is there
        assert np.abs(got - x.astype(np.float64) @ np.asarray(w, np.float64).T).max() > 1e-4


def test_the_same_bits_whatever_the_thread_count():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 300)).astype(np.float32)
    w = rng.standard_normal((500, 300)).astype(np.float16)
    runs = []
    try:
        for threads in (1, 2, 3):
            kernels.set_threads(threads)
            runs.append(op()(Tensor(x), Tensor(w)).asnumpy())
    finally:
        kernels.set_threads(len(os.sched_getaffinity(0)))
    assert all(np.array_equal(runs[0], r) for r in runs[1:])


def test_only_cells_built_in_the_mode_take_it_for_many_rows():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    with kernels.prefill_matmul("bfloat16"):
        fast = Linear(64, 32, False, "float32")
    plain = Linear(64, 32, False, "float32")
    assert fast.prefill_matmul is not None and plain.prefill_matmul is None
    for cell in (fast, plain):
        cell.weight.set_data(Tensor(w))
    many = rng.standard_normal((kernels.SMALL_ROWS[1] + 1, 32)).astype(np.float32)
    np.testing.assert_allclose(fast(Tensor(many)).asnumpy(), reference(many, w), rtol=1e-5, atol=1e-4)
    few = rng.standard_normal((kernels.SMALL_ROWS[1], 32)).astype(np.float32)  # a decode step: float32 kernel
    np.testing.assert_allclose(fast(Tensor(few)).asnumpy(), few.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):
        with kernels.prefill_matmul("bfloat16"):
            raise RuntimeError("a failed build")
    assert Linear(4, 4, False, "float32").prefill_matmul is None  # the mode ends with its block


def test_an_unknown_mode_is_refused():
    from llava_ckpt.errors import CheckpointError
    with pytest.raises(CheckpointError, match="prefill matmul must be one of float32, bfloat16, got 'int8'"):
        with kernels.prefill_matmul("int8"):
            pass


def test_without_avx512_bf16_the_float32_matmul_runs_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "cpu_flags", lambda: [f for f in _real_flags() if f != "avx512_bf16"])
    kernels._built.clear()
    try:
        assert kernels.bf16_matmul_status() == "MindSpore MatMul (this CPU lacks avx512_bf16)"
        with kernels.prefill_matmul("bfloat16"):
            layer = Linear(3, 2, False, "float32")
        assert layer.prefill_matmul is None
        layer.weight.set_data(Tensor(np.arange(6, dtype=np.float32).reshape(3, 2)))
        x = np.ones((kernels.SMALL_ROWS[1] + 1, 2), np.float32)
        np.testing.assert_array_equal(layer(Tensor(x)).asnumpy(), np.tile([[1, 5, 9]], (len(x), 1)))
        assert not list(tmp_path.rglob("bf16_matmul-*.so"))
    finally:
        kernels._built.clear()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_to_bfloat16_rounds_to_nearest_even_as_the_matmul_does(dtype):
    """The kernel's own cast (verify's transformers side holds its Linear weights in it): bit for bit ml_dtypes'
    rounding of the float32 value, for ordinary values, ties, the extremes of float16 and infinities, over
    lengths that split unevenly across the threads."""
    rng = np.random.default_rng(5)
    n = 100_003
    a = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 300.0], n)).astype(np.float32)
    a[:8] = [np.inf, -np.inf, 6e-8, -6e-8, 65504.0, 0.0, -0.0, 1.0 + 2.0 ** -8]  # the last a tie: rounds to even
    src = a.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    out = np.empty(n, ml_dtypes.bfloat16)
    for threads in (1, 2, 3):
        kernels.set_threads(threads)
        out[:] = 0
        assert kernels.round_to_bfloat16(src, out)
        want = src.astype(np.float32).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))
    kernels.set_threads(len(os.sched_getaffinity(0)))
    assert float(out[7]) == 1.0  # the tie went to the even neighbour, not up
