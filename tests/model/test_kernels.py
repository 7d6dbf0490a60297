"""The small_matmul kernel: right answers for every row count and width, the same bits whatever the thread
count, built once and reused, and MindSpore's MatMul wherever it cannot run (switched off, or no compiler)."""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from llava_ckpt.model import kernels
from llava_ckpt.model.layers import Linear

from cpu import avx2_lacks

pytestmark = pytest.mark.skipif(bool(avx2_lacks()), reason=avx2_lacks() or "runs")


def reference(x, w):
    return (x.astype(np.float64) @ w.astype(np.float64).T)


@pytest.fixture(autouse=True)
def cpu():
    ms.set_context(device_target="CPU")


def test_the_kernel_is_what_decode_steps_run_here():
    assert kernels._cpu_supports() is None  # the package's own probe agrees with /proc/cpuinfo
    assert kernels.small_matmul_status().startswith("small_matmul kernel ("), kernels.small_matmul_status()
    assert kernels.small_matmul_op("float32") is not None
    assert kernels.small_matmul_op("float16") is None  # float32 compute only (its weight may be 16-bit)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 17])
@pytest.mark.parametrize("n_out,k_in", [(1, 8), (3, 5), (70, 37), (130, 64), (257, 130)])
def test_small_matmul_equals_x_times_w_transposed(rows, n_out, k_in):
    rng = np.random.default_rng(rows * 1000 + n_out + k_in)
    x = rng.standard_normal((rows, k_in)).astype(np.float32)
    w = rng.standard_normal((n_out, k_in)).astype(np.float32)
    got = kernels.small_matmul_op("float32")(Tensor(x), Tensor(w)).asnumpy()
    assert got.shape == (rows, n_out) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(x, w), rtol=1e-5, atol=1e-5 * np.sqrt(k_in))


def _sixteen(name):
    import ml_dtypes
    return {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[name]


@pytest.fixture(scope="module")
def build_cache(tmp_path_factory):
    """A kernel cache folder of this module's own (not the user's), shared by its parametrized runs."""
    return str(tmp_path_factory.mktemp("kernel-cache"))


@pytest.mark.parametrize("avx512", ["1", "0"])
@pytest.mark.parametrize("weight_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3, 4, 8])
def test_sixteen_bit_weights_are_widened_exactly(rows, weight_dtype, avx512, monkeypatch, build_cache):
    """x @ w.T with w stored in 16 bits equals float64 x @ (w widened) within float32 rounding: the widening
    itself is exact. Both the AVX-512 build (where the CPU has it) and the AVX2 one; widths with tails."""
    monkeypatch.setenv("LLAVA_CKPT_AVX512", avx512)
    monkeypatch.setenv("XDG_CACHE_HOME", build_cache)  # each flag set compiled once for the whole module
    kernels._built.clear()
    try:
        rng = np.random.default_rng(rows)
        for n_out, k_in in ((70, 37), (257, 130), (64, 4096)):
            x = rng.standard_normal((rows, k_in)).astype(np.float32)
            w = rng.standard_normal((n_out, k_in)).astype(_sixteen(weight_dtype))
            got = kernels.small_matmul_op("float32")(Tensor(x), Tensor.from_numpy(w)).asnumpy()
            assert got.dtype == np.float32 and got.shape == (rows, n_out)
            np.testing.assert_allclose(got, reference(x, w.astype(np.float32)), rtol=1e-5, atol=1e-5 * np.sqrt(k_in))
        assert ("-mavx512f" in kernels.build_flags()) == (avx512 == "1" and "avx512f" in _flags())
    finally:
        kernels._built.clear()


def _flags():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])


def test_a_linear_with_a_16_bit_weight_computes_in_float32():
    """A Linear whose weight kept its stored float16 (load_weights(stored=True)): 1 to 8 rows through the
    kernel, more through one widened temporary, the same numbers as the float32 weight gives."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((96, 40)).astype(np.float16)
    layer = Linear(96, 40, False, "float32")
    layer.weight.set_dtype(ms.float16)
    layer.weight.set_data(Tensor.from_numpy(w))
    for rows in (1, 2, kernels.SMALL_ROWS[1], kernels.SMALL_ROWS[1] + 1, 40):
        x = rng.standard_normal((1, rows, 40)).astype(np.float32)
        got = layer(Tensor(x)).asnumpy()
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, reference(x.reshape(-1, 40), w.astype(np.float32)).reshape(1, rows, 96),
                                   rtol=1e-5, atol=1e-4)
    assert layer.weight.dtype == ms.float16  # nothing widened in place


def test_same_bits_whatever_the_thread_count():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((4, 300)).astype(np.float32))
    w = Tensor(rng.standard_normal((1000, 300)).astype(np.float32))
    op = kernels.small_matmul_op("float32")
    results = []
    try:
        for threads in (1, 2, 3, 7):
            kernels.set_threads(threads)
            results.append(op(x, w).asnumpy())
    finally:
        kernels.set_threads(len(os.sched_getaffinity(0)))
    for other in results[1:]:
        assert np.array_equal(results[0], other)


def test_linear_in_a_compiled_graph_uses_it_for_few_rows_and_matmul_beyond(monkeypatch):
    """Row counts in SMALL_ROWS go to the kernel; a wrong kernel result would show in those cases."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    layer = Linear(96, 40, True, "float32")
    assert layer.small_matmul is not None
    layer.weight.set_data(Tensor(w))
    layer.bias.set_data(Tensor(b))
    run = ms.jit(layer)
    for rows in (1, 2, 3, kernels.SMALL_ROWS[1], kernels.SMALL_ROWS[1] + 1, 40):
        x = rng.standard_normal((1, rows, 40)).astype(np.float32)
        got = run(Tensor(x)).asnumpy()
        np.testing.assert_allclose(got, reference(x.reshape(-1, 40), w).reshape(1, rows, 96) + b,
                                   rtol=1e-5, atol=1e-4)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.small_matmul_op("float32") is None
    assert "LLAVA_CKPT_SMALL_MATMUL=0" in kernels.small_matmul_status()
    assert Linear(8, 8, False, "float32").small_matmul is None


def test_without_a_working_compiler_matmul_runs_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    status = kernels.small_matmul_status()
    assert status.startswith("MindSpore MatMul (compiling small_matmul.cc with /bin/false failed"), status
    assert kernels.small_matmul_op("float32") is None
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
    layer = Linear(3, 2, False, "float32")
    layer.weight.set_data(Tensor(np.arange(6, dtype=np.float32).reshape(3, 2)))
    np.testing.assert_array_equal(layer(Tensor(np.ones((1, 2), np.float32))).asnumpy(), [[1, 5, 9]])


def test_built_once_then_reused_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    first = kernels.small_matmul_status()
    (lib,) = tmp_path.rglob("small_matmul-*.so")
    assert first == f"small_matmul kernel ({lib})"
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temporary left beside it
    stamp = lib.stat().st_mtime_ns
    kernels._built.clear()  # as a new process would start
    monkeypatch.setenv("CXX", "/bin/false")  # a rebuild would fail: the cached library must be used
    assert kernels.small_matmul_status() == first
    assert lib.stat().st_mtime_ns == stamp


def test_an_unwritable_cache_falls_back_with_a_reason(monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.delenv("CXX", raising=False)
    status = kernels.small_matmul_status()
    assert status.startswith("MindSpore MatMul (cannot write the compiled kernel to "), status
