"""What this machine's CPU can run, read from /proc/cpuinfo by the tests themselves (never from the code under
test), for the tests of the AVX-512 BF16 paths to skip on machines without them."""

BF16_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512bw", "avx512vl")


def flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def bf16_lacks() -> str:
    """'' where the CPU has every flag bf16_matmul needs, else which it lacks."""
    have = flags()
    if not have:
        return "no /proc/cpuinfo"
    missing = [f for f in BF16_FLAGS if f not in have]
    return f"the CPU lacks {' and '.join(missing)}" if missing else ""
