"""The prefill's matrix products by compute dtype: what a 16-bit prefill path could start from.

One linear layer of the 7B's prefill (x [S, K] @ w [N, K].T, S = 594 positions: llava-1.5's bundled prompt) at
the text model's three shapes, timed in this process: MindSpore's CPU MatMul in float32, float16 and bfloat16
(where it has a kernel), our bf16_matmul custom op on the float16 weight (model/kernels: what
`generate --prefill-matmul bfloat16` runs), and torch's F.linear in float32 and bfloat16 (oneDNN; AVX-512 BF16
where /proc/cpuinfo lists avx512_bf16). MindSpore runs its ops blocking, as the reference model does. The named
baseline is torch bfloat16, what transformers in bfloat16 runs; each figure is printed with its ratio to it.

    .venv/bin/python benchmarks/matmul_dtypes.py [--positions 594] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

SHAPES = {"q/k/v/o 4096x4096": (4096, 4096), "gate/up 11008x4096": (11008, 4096), "down 4096x11008": (4096, 11008)}


def timed(fn, runs: int) -> float:
    fn()  # warm-up (first-call dispatch, oneDNN primitive creation)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=594)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from llava_ckpt.model import kernels
    from llava_ckpt.model.kernels import cpu_flags
    from llava_ckpt.model.loading import run_ops_blocking
    import mindspore as ms
    import torch
    from mindspore import Tensor, ops
    ms.set_context(device_target="CPU")
    run_ops_blocking()
    with kernels.prefill_matmul("bfloat16"):
        bf16_op = kernels.prefill_matmul_op("float32")
    print(f"bf16_matmul: {kernels.bf16_matmul_status()}")
    flags = set(cpu_flags())
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; avx512f {'avx512f' in flags}, "
          f"avx512_bf16 {'avx512_bf16' in flags}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"mindspore {ms.__version__}")
    rng = np.random.default_rng(0)
    mm = ops.MatMul(transpose_b=True)
    totals: dict = {}
    for label, (n, k) in SHAPES.items():
        x = rng.standard_normal((args.positions, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32) / np.float32(np.sqrt(k))
        flop = 2 * args.positions * n * k
        rows = {}
        for dt in ("float32", "bfloat16"):
            a, b = torch.from_numpy(x).to(getattr(torch, dt)), torch.from_numpy(w).to(getattr(torch, dt))
            rows[f"torch {dt}"] = timed(lambda: torch.nn.functional.linear(a, b), args.runs)
        for dt in ("float32", "float16", "bfloat16"):
            a, b = Tensor(x).astype(getattr(ms, dt)), Tensor(w).astype(getattr(ms, dt))
            try:
                rows[f"mindspore {dt}"] = timed(lambda: mm(a, b).asnumpy() if dt != "bfloat16"
                                                else mm(a, b).astype(ms.float32).asnumpy(), args.runs)
            except (RuntimeError, TypeError, ValueError) as e:
                rows[f"mindspore {dt}"] = str(e).strip().splitlines()[0][:90]
        if bf16_op is not None:
            a, b = Tensor(x), Tensor(w.astype(np.float16))
            rows["bf16_matmul (ours)"] = timed(lambda: bf16_op(a, b).asnumpy(), args.runs)
        base = rows["torch bfloat16"]
        print(f"\n{label} ({args.positions} positions, {flop / 1e9:.1f} GFLOP); baseline torch bfloat16")
        for name, t in rows.items():
            if isinstance(t, str):
                print(f"  {name:20s} no kernel: {t}")
                continue
            totals[name] = totals.get(name, 0.0) + t
            print(f"  {name:20s} {t * 1e3:8.1f} ms  {flop / t / 1e9:6.0f} GFLOP/s  "
                  f"{t / base:5.2f}x the baseline's time")
    ratios = ", ".join(f"{name} {t / totals['torch bfloat16']:.2f}x" for name, t in totals.items())
    print(f"\nall three shapes: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
