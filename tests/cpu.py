"""What this machine's CPU can run, read from /proc/cpuinfo by the tests themselves (never from the code under
test), for the tests of the kernels' paths to skip on machines without them."""
import platform

AVX2_FLAGS = ("avx2", "fma", "f16c")  # small_matmul and fused_ops (AVX-512 where there, else AVX2)
BF16_FLAGS = AVX2_FLAGS + ("avx512f", "avx512_bf16", "avx512bw", "avx512vl")


def flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def lacks(required) -> str:
    """'' where this x86-64 CPU lists every flag in `required`, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not x86-64 ({platform.machine()})"
    have = flags()
    if not have:
        return "no /proc/cpuinfo"
    missing = [f for f in required if f not in have]
    return f"the CPU lacks {' and '.join(missing)}" if missing else ""


def bf16_lacks() -> str:
    """'' where the CPU has every flag bf16_matmul needs, else which it lacks."""
    return lacks(BF16_FLAGS)


def avx2_lacks() -> str:
    """'' where the CPU runs the AVX2 kernels (small_matmul, fused_ops), else why not."""
    return lacks(AVX2_FLAGS)
