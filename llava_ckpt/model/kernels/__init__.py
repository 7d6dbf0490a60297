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
"""
from __future__ import annotations

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
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "small_matmul.cc")
_FLAGS = ["-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC", "-pthread"]
# Added where /proc/cpuinfo lists it: 16-lane loads and FMAs halve the instructions per weight, which at
# 16-bit weights is what held the AVX2 build below the memory bandwidth (measured on the EPYC here).
_AVX512_FLAGS = ["-mavx512f"]

_built: dict = {}  # cache folder -> (library path or None, reason)
_ops: dict = {}    # library path -> the custom op
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


def build_flags() -> list:
    """The compiler flags for this CPU: AVX2 + FMA + F16C, and AVX-512 where it has it (LLAVA_CKPT_AVX512=0
    leaves it out, to measure or to test the AVX2 code)."""
    wide = "avx512f" in cpu_flags() and os.environ.get("LLAVA_CKPT_AVX512", "1") != "0"
    return _FLAGS + (_AVX512_FLAGS if wide else [])


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> tuple:
    """(library path, "") or (None, reason): compiled once per source version into the cache folder."""
    folder = cache_dir()
    if folder in _built:
        return _built[folder]
    reason = _cpu_supports()
    path = None
    if reason is None:
        with open(_SOURCE, "rb") as f:
            source = f.read()
        flags = build_flags()
        tag = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
        path = os.path.join(folder, f"small_matmul-{tag}.so")
        if not os.path.isfile(path):
            reason = _compile(path, flags)
            if reason:
                path = None
    if path is not None:
        try:
            lib = ctypes.CDLL(path)  # the handle MindSpore's loader gets too (dlopen of one path is shared)
            lib.small_matmul_set_threads(_threads[0] or len(os.sched_getaffinity(0)))
        except (OSError, AttributeError) as e:
            path, reason = None, f"cannot load {path}: {e}"
    _built[folder] = (path, reason or "")
    return _built[folder]


def _compile(path: str, flags: list) -> str | None:
    """Build the library at `path` (atomically); the reason on failure, None on success."""
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler found (set CXX)"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "small_matmul.so")
        try:
            proc = subprocess.run([cxx, *flags, _SOURCE, "-o", out], capture_output=True, text=True,
                                  timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"compiling small_matmul.cc failed: {e}"
        if proc.returncode != 0 or not os.path.isfile(out):
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return f"compiling small_matmul.cc with {cxx} failed: {last}"
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
    if device is None:
        import mindspore as ms
        device = ms.get_context("device_target")
    if device != "CPU":
        return f"MindSpore MatMul (device {device})"
    if dtype != "float32":
        return f"MindSpore MatMul (the kernel is float32, compute dtype is {dtype})"
    path, reason = _build()
    return f"small_matmul kernel ({path})" if path else f"MindSpore MatMul ({reason})"


def small_matmul_op(dtype: str):
    """The custom op computing x [M, K] @ w [N, K].T (any M; used for SMALL_ROWS), or None where it cannot run."""
    if not small_matmul_status(dtype).startswith("small_matmul kernel"):
        return None
    path = _build()[0]
    if path not in _ops:
        from mindspore import ops
        _ops[path] = ops.Custom(f"{path}:SmallMatmul", out_shape=lambda x, w: (x[0], w[0]),
                                out_dtype=lambda x, w: x, func_type="aot")
    return _ops[path]


def set_threads(n: int) -> None:
    """Threads the kernel splits its columns over (tp ranks on one machine share the cores out)."""
    _threads[0] = max(1, int(n))
    for path, _ in _built.values():
        if path:
            ctypes.CDLL(path).small_matmul_set_threads(_threads[0])
