"""Benchmark `llava-ckpt convert` against `cp -r` + `sync` of the same input folder, interleaved runs.

Baseline (named in the issue): copying the input folder and syncing it, which is the least any
converter that reads every byte and writes every byte must do. Our convert fsyncs its output too and
hashes input and output for the manifest. Also reported: peak RSS of the convert process.
For reference, MindFormers' own research/llava/convert_weight.py was measured on a machine like this one
at 52-65 s and 17-18.6 GiB peak RSS on the 14.1 GB checkpoint, against 10.8 s for cp -r.

    python benchmarks/convert.py --preset 7b-few-layers --runs 3
    python benchmarks/convert.py --preset 7b --runs 3      # needs about 45 GB free; cleans up after
"""
from __future__ import annotations

import argparse
import os
import sys

from common import (LLAVA, ROOT, clean_up, add_common_args, cold_run, copy_and_sync, dir_bytes, drop_caches, median,
                    prepare_input, read_floor)

sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_common_args(ap, "7b-few-layers")
    args = ap.parse_args()
    src = prepare_input(args.workdir, args.preset, 3.3)
    in_bytes = dir_bytes(src)
    out = os.path.join(args.workdir, "out")
    copy = os.path.join(args.workdir, "copy")
    cold = drop_caches()
    print(f"input {in_bytes / 1e9:.2f} GB; page cache dropped before each run: {cold}")
    ours, base, rss, floor = [], [], [], []
    try:
        for i in range(args.runs):
            base.append(copy_and_sync(src, copy))
            floor.append(read_floor(src)[0])
            t, peak = cold_run(LLAVA + ["convert", src, out, "--json"] + args.extra.split(), out)
            ours.append(t)
            rss.append(peak)
            print(f"run {i + 1}: cp -r + sync {base[-1]:.2f} s | cold read {floor[-1]:.2f} s | convert {t:.2f} s, "
                  f"peak RSS {peak:.0f} MiB", flush=True)
    finally:
        clean_up((out, copy), None if args.keep else src)
    ratio = median(ours) / median(base)
    print(f"\npreset {args.preset} {args.extra}: convert median {median(ours):.2f} s, cp -r + sync median "
          f"{median(base):.2f} s, ratio {ratio:.2f} (target <= 1.3); "
          f"throughput {in_bytes / median(ours) / 1e9:.2f} GB/s; peak RSS max {max(rss):.0f} MiB (target <= 1024); "
          f"against a cold read of the input ({median(floor):.2f} s): {median(ours) / median(floor):.2f}")


if __name__ == "__main__":
    main()
