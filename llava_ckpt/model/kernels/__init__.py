"""Hand-written CPU kernels for what MindSpore's CPU ops do slowly, compiled on first use.

`small_matmul` (small_matmul.cc): y = x @ w.T for the few rows of a decode step. MindSpore 2.10's CPU MatMul
cost 3-4x as much for 4 rows as for 1 (the weight is read once per row group), which capped batched decoding;
this kernel reads each weight row once for up to 8 rows. Its weight may be float32, float16 or bfloat16
(x and y are float32): a 16-bit weight is widened in registers as it is read, so generate keeps the
checkpoint's 16-bit matrices and still computes in float32, reading 2 bytes per weight (MindSpore's MatMul
would need the float32 copy first). It runs as a MindSpore AOT custom op, eagerly or in compiled graphs.

The source is built with the machine's C++ compiler (`$CXX`, else c++/g++) into
`$XDG_CACHE_HOME/llava-ckpt/kernels` (default ~/.cache/...), once per source version and flag set, written
atomically; with AVX-512 where /proc/cpuinfo lists avx512f (16 lanes), else AVX2. Where it cannot be used
(not a CPU target, compute dtype not float32, no AVX2/FMA/F16C, no compiler, or LLAVA_CKPT_SMALL_MATMUL=0),
MindSpore's MatMul runs instead (on the widened weight) and `small_matmul_status()` says why.

`bf16_matmul` (bf16_matmul.cc): y = x @ w.T for a prefill's many rows in bfloat16 with float32 sums (AVX-512
BF16's vdpbf16ps), x and the (16-bit or float32) weight rounded to bfloat16 as they are packed. MindSpore 2.10's
CPU MatMul has no bfloat16 kernel and its float16 one runs at float32's speed (benchmarks/matmul_dtypes.py), so
this is the only 16-bit prefill there is. It changes the numbers, so it is a mode a caller asks for
(`prefill_matmul("bfloat16")` around building a model), never the default; built only where /proc/cpuinfo lists
avx512_bf16, and `bf16_matmul_status()` says why not elsewhere (the float32 MatMul runs then).

`fused_ops` (fused_ops.cc): a float32 model's work around its matmuls, one op each (RMSNorm, CLIP's LayerNorm and
QuickGELU, heads split with RoPE, a prompt's attention and a decode step's over the KV cache, SiLU * up): at a 7B
prompt MindSpore's CPU ops for it cost 3/4 of the bfloat16 matmuls' time, and at decode time 2/5 of a step. Every
value and sum stays float32, in transformers' order of operations (only the order of a sum's terms differs), so
every float32 model takes them, in both prefill modes. Built as small_matmul is (AVX-512 where /proc/cpuinfo lists
avx512f, else AVX2, meant to give the same numbers); where it cannot be, under another compute dtype (float64:
verify's drift rerun) or with LLAVA_CKPT_FUSED_OPS=0, MindSpore's ops run and `fused_ops_status()` says why.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

from ...io.files import write_atomic

# Row counts the kernel is used for. One row: oneDNN's matrix-vector product reads the weight once too and
# measured the same. Beyond 8: oneDNN's blocked GEMM wins (16 rows measured 1.0-1.2x the kernel's time).
SMALL_ROWS = (2, 8)
ENV_SWITCH = "LLAVA_CKPT_SMALL_MATMUL"
_HERE = os.path.dirname(os.path.abspath(__file__))
# -ffp-contract=off: every product and sum rounded as written (explicit FMA intrinsics stay FMAs). GCC's default
# fused a * b - c * d into an FMA differently in two compiled copies of one loop body (fused_ops' calling thread's
# and its std::thread's), so identical calls gave values 1 ulp apart depending on which thread ran an item.
_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC", "-pthread"]
_BF16_FLAGS = ["-mavx512f", "-mavx512bf16", "-mavx512bw", "-mavx512vl"]
# included by the kernels: the matmuls' AOT entry and argument checks, and every kernel's thread split
HEADERS = ("aot_matmul.h", "threads.h")
# the kernels: source file, the AOT entry point, the threads setter
KERNELS = {"small_matmul": ("small_matmul.cc", "SmallMatmul", "small_matmul_set_threads"),
           "bf16_matmul": ("bf16_matmul.cc", "Bf16Matmul", "bf16_matmul_set_threads"),
           "fused_ops": ("fused_ops.cc", None, "fused_ops_set_threads")}  # entries: FusedOps
PREFILL_MODES = ("float32", "bfloat16")
_prefill = ["float32"]  # the prefill matmul mode Linear cells built now take (prefill_matmul)
# Added where /proc/cpuinfo lists it: 16-lane loads and FMAs halve the instructions per weight, which at
# 16-bit weights is what held the AVX2 build below the memory bandwidth (measured on the EPYC here).
_AVX512_FLAGS = ["-mavx512f"]

_built: dict = {}  # cache folder -> (library path or None, reason)
_ops: dict = {}    # library path -> the custom op
_entries: dict = {}  # library path -> bf16_round, resolved once (verify casts every step's weights through it)
_threads: list = [None]  # the count asked for by set_threads (None: the cores this process may use)


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llava-ckpt", "kernels")


def cpu_flags() -> list:
    """This CPU's feature flags as /proc/cpuinfo lists them ([] where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def _cpu_supports() -> str | None:
    """None if this CPU runs the kernel, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is x86-64 AVX2 code, this machine is {platform.machine()}"
    flags = cpu_flags()
    if not flags:
        return "cannot read /proc/cpuinfo to check for AVX2, FMA and F16C"
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    return f"this CPU lacks {' and '.join(missing)}" if missing else None


def build_flags(kernel: str = "small_matmul") -> list:
    """The compiler flags for this CPU: AVX2 + FMA + F16C, and AVX-512 where it has it (LLAVA_CKPT_AVX512=0
    leaves it out, to measure or to test the AVX2 code); bf16_matmul's add AVX-512 BF16."""
    if kernel == "bf16_matmul":
        return _FLAGS + _BF16_FLAGS
    wide = "avx512f" in cpu_flags() and os.environ.get("LLAVA_CKPT_AVX512", "1") != "0"
    return _FLAGS + (_AVX512_FLAGS if wide else [])


def _bf16_supports() -> str | None:
    """None if this CPU runs bf16_matmul, else why not."""
    reason = _cpu_supports()
    if reason:
        return reason
    missing = [f for f in ("avx512f", "avx512_bf16", "avx512bw", "avx512vl") if f not in cpu_flags()]
    return f"this CPU lacks {' and '.join(missing)}" if missing else None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(kernel: str) -> tuple:
    """(library path, "") or (None, reason): compiled once per source version into the cache folder."""
    key = (cache_dir(), kernel)
    if key in _built:
        return _built[key]
    folder = key[0]
    source_name, _, set_threads_name = KERNELS[kernel]
    reason = {"small_matmul": _cpu_supports, "bf16_matmul": _bf16_supports, "fused_ops": _cpu_supports}[kernel]()
    path = None
    if reason is None:
        source_path = os.path.join(_HERE, source_name)
        source = b""
        for name in (source_name,) + HEADERS:  # the headers the sources include are part of their version
            with open(os.path.join(_HERE, name), "rb") as f:
                source += f.read()
        flags = build_flags(kernel)
        tag = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
        path = os.path.join(folder, f"{kernel}-{tag}.so")
        if not os.path.isfile(path):
            reason = _compile(path, flags, source_path)
            if reason:
                path = None
    if path is not None:
        try:
            lib = ctypes.CDLL(path)  # the handle MindSpore's loader gets too (dlopen of one path is shared)
            getattr(lib, set_threads_name)(_threads[0] or len(os.sched_getaffinity(0)))
        except (OSError, AttributeError) as e:
            path, reason = None, f"cannot load {path}: {e}"
    _built[key] = (path, reason or "")
    return _built[key]


def _compile(path: str, flags: list, source: str) -> str | None:
    """Build the library at `path` (atomically); the reason on failure, None on success."""
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler found (set CXX)"
    name = os.path.basename(source)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "kernel.so")
        try:
            proc = subprocess.run([cxx, *flags, source, "-o", out], capture_output=True, text=True,
                                  timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"compiling {name} failed: {e}"
        if proc.returncode != 0 or not os.path.isfile(out):
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return f"compiling {name} with {cxx} failed: {last}"
        try:
            with open(out, "rb") as f:
                write_atomic(path, f.read())
        except OSError as e:
            return f"cannot write the compiled kernel to {os.path.dirname(path)}: {e.strerror or e}"
    return None


def small_matmul_status(dtype: str = "float32", device: str | None = None) -> str:
    """What batched decode steps' matmuls run on: the kernel's library, or why MindSpore's MatMul runs
    instead. `device`: the target asked for (default: MindSpore's current one)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"MindSpore MatMul ({ENV_SWITCH}=0)"
    return _status("small_matmul", dtype, device, "the kernel is float32")


def _status(kernel: str, dtype: str, device: str | None, float32_only: str) -> str:
    """'<kernel> kernel (<library>)' where it runs for `dtype` on `device` (default: MindSpore's current
    target), else 'MindSpore MatMul (<why not>)'."""
    if device is None:
        import mindspore as ms
        device = ms.get_context("device_target")
    if device != "CPU":
        return f"MindSpore MatMul (device {device})"
    if dtype != "float32":
        return f"MindSpore MatMul ({float32_only}, compute dtype is {dtype})"
    path, reason = _build(kernel)
    return f"{kernel} kernel ({path})" if path else f"MindSpore MatMul ({reason})"


def small_matmul_op(dtype: str):
    """The custom op computing x [M, K] @ w [N, K].T (any M; used for SMALL_ROWS), or None where it cannot run."""
    if not small_matmul_status(dtype).startswith("small_matmul kernel"):
        return None
    return _custom(_build("small_matmul")[0], "small_matmul")


def _custom(path: str, kernel: str):
    """The MindSpore AOT custom op of a built kernel: x [M, K], w [N, K] -> [M, N] in x's dtype."""
    if path not in _ops:
        from mindspore import ops
        _ops[path] = ops.Custom(f"{path}:{KERNELS[kernel][1]}", out_shape=lambda x, w: (x[0], w[0]),
                                out_dtype=lambda x, w: x, func_type="aot")
    return _ops[path]


def set_threads(n: int) -> None:
    """Threads the kernels split their columns over (tp ranks on one machine share the cores out)."""
    _threads[0] = max(1, int(n))
    for path, _ in _built.values():
        if path:
            lib = ctypes.CDLL(path)
            for _, _, setter in KERNELS.values():
                if hasattr(lib, setter):
                    getattr(lib, setter)(_threads[0])


def bf16_matmul_status(dtype: str = "float32", device: str | None = None) -> str:
    """What a bfloat16 prefill's matmuls run on: the kernel's library, or why MindSpore's float32 MatMul runs
    instead."""
    return _status("bf16_matmul", dtype, device, "bf16_matmul takes float32 activations")


def check_prefill_mode(mode: str) -> None:
    if mode not in PREFILL_MODES:
        from ...errors import fail
        raise fail(f"prefill matmul must be one of {', '.join(PREFILL_MODES)}, got {mode!r}")


@contextlib.contextmanager
def prefill_matmul(mode: str):
    """`with prefill_matmul("bfloat16"):` the Linear cells built inside take bf16_matmul for their many-row
    products (where it runs; bf16_matmul_status says which). Outside, cells are built with float32 products."""
    check_prefill_mode(mode)
    before, _prefill[0] = _prefill[0], mode
    try:
        yield
    finally:
        _prefill[0] = before


_ROUND_TYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


def round_to_bfloat16(src, out) -> bool:
    """`src` (float32, float16 or bfloat16 numpy array, C-contiguous) rounded to bfloat16 (to nearest even, as
    bf16_matmul rounds its operands) into `out` (2-byte, as many elements), on the kernel's threads. False where
    the kernel is not built here: the caller casts another way (the same rounding, slower)."""
    import numpy as np
    path, _ = _build("bf16_matmul")
    kind = _ROUND_TYPES.get(str(src.dtype))
    if path is None or kind is None:
        return False
    if not (src.flags.c_contiguous and out.flags.c_contiguous and out.dtype.itemsize == 2 and out.size == src.size):
        raise ValueError("round_to_bfloat16 needs C-contiguous arrays of the same size, out 2-byte")
    fn = _entries.get(path)
    if fn is None:
        fn = _entries[path] = ctypes.CDLL(path).bf16_round
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p]
    if fn(src.ctypes.data, kind, np.int64(src.size), out.ctypes.data) != 0:
        raise ValueError(f"bf16_round refused dtype {src.dtype}")
    return True


def prefill_matmul_op(dtype: str, bias: bool = False, residual: bool = False):
    """The bf16_matmul custom op for the Linear cells being built now, or None (float32 products: the default
    mode, a compute dtype other than float32, or no kernel here). bias: the entry taking (x, w, bias [N]);
    residual: the one taking (x, w, r [M, N]) and giving r + x @ w.T."""
    if _prefill[0] != "bfloat16" or not bf16_matmul_status(dtype).startswith("bf16_matmul kernel"):
        return None
    path = _build("bf16_matmul")[0]
    if not (bias or residual):
        return _custom(path, "bf16_matmul")
    entry = "Bf16MatmulBias" if bias else "Bf16MatmulAdd"
    key = f"{path}:{entry}"
    if key not in _ops:
        from mindspore import ops
        _ops[key] = ops.Custom(key, out_shape=lambda x, w, b: (x[0], w[0]), out_dtype=lambda x, w, b: x,
                               func_type="aot")
    return _ops[key]


FUSED_SWITCH = "LLAVA_CKPT_FUSED_OPS"


def fused_ops_status(dtype: str = "float32", device: str | None = None) -> str:
    """What a float32 model's norms, heads, attention and activations run on: the kernel's library, or why
    MindSpore's ops run instead."""
    if os.environ.get(FUSED_SWITCH, "1") == "0":
        return f"MindSpore ops ({FUSED_SWITCH}=0)"
    return _status("fused_ops", dtype, device, "the fused ops are float32").replace("MindSpore MatMul",
                                                                                          "MindSpore ops")


class FusedOps:
    """fused_ops.cc's entries as MindSpore AOT custom ops (float32 in and out):
    rms_norm(x [R, H], w [H], eps [1]) -> [R, H]; layer_norm(x [R, H], gamma, beta [H], eps [1]) -> [R, H];
    quick_gelu(x [N]) -> [N];
    split_heads(heads, kv, d, rope)(q_src [B, S, Wq], k_src, v_src, columns [heads + 2 kv] int64[, cos, sin
    [Bc, S, d]]) -> q [B, heads, S, d], k, v [B, kv, S, d] (columns: each head's first column in its source);
    attention(q, k, v [B, kv, T, d], bias [Bb, S, T], scale [1]) -> [B, S, heads * d];
    attention_cached(q, k, v [B, kv, S, d], k_cache [B, kv, d, T], v_cache [B, kv, T, d], bias [Bb, S, T + S],
    scale [1]) -> [B, S, heads * d] (a decode step: the new positions over the cache's slots and themselves);
    silu_mul(gate, up [R, F]) -> [R, F]; silu_mul_pairs(pairs [R, 2F] interleaved (gate, up)) -> [R, F]."""

    def __init__(self, path: str):
        from mindspore import ops
        self.path, self._split = path, {}
        f32 = self._f32
        self.rms_norm = ops.Custom(f"{path}:RmsNorm", out_shape=lambda x, w, e: x, out_dtype=f32, func_type="aot")
        self.layer_norm = ops.Custom(f"{path}:LayerNorm", out_shape=lambda x, g, b, e: x, out_dtype=f32,
                                     func_type="aot")
        self.quick_gelu = ops.Custom(f"{path}:QuickGelu", out_shape=lambda x: x, out_dtype=f32, func_type="aot")
        self.attention = ops.Custom(f"{path}:Attention", out_shape=lambda q, k, v, b, s: [q[0], q[2], q[1] * q[3]],
                                    out_dtype=f32, func_type="aot")
        self.attention_cached = ops.Custom(f"{path}:AttentionCached",
                                           out_shape=lambda q, k, v, kc, vc, b, s: [q[0], q[2], q[1] * q[3]],
                                           out_dtype=f32, func_type="aot")
        self.silu_mul = ops.Custom(f"{path}:SiluMul", out_shape=lambda g, u: g, out_dtype=f32, func_type="aot")
        self.silu_mul_pairs = ops.Custom(f"{path}:SiluMulPairs", out_shape=lambda y: [y[0], y[1] // 2],
                                         out_dtype=f32, func_type="aot")

    @staticmethod
    def _f32(*_):
        import mindspore as ms
        return ms.float32

    def split_heads(self, heads: int, kv: int, d: int, rope: bool):
        key = (heads, kv, d, rope)
        if key not in self._split:
            import mindspore as ms
            from mindspore import ops

            def shapes(src, *_):
                return [[src[0], heads, src[1], d], [src[0], kv, src[1], d], [src[0], kv, src[1], d]]
            self._split[key] = ops.Custom(f"{self.path}:{'SplitHeadsRope' if rope else 'SplitHeads'}",
                                          out_shape=shapes, out_dtype=lambda *_: [ms.float32] * 3, func_type="aot")
        return self._split[key]


def fused_ops(dtype: str):
    """The fused ops for a cell of compute dtype `dtype` (FusedOps), or None: a compute dtype other than
    float32, no kernel here, or switched off (MindSpore's ops run then)."""
    if not fused_ops_status(dtype).startswith("fused_ops kernel"):
        return None
    path = _build("fused_ops")[0]
    if path not in _ops:
        _ops[path] = FusedOps(path)
    return _ops[path]
