"""Benchmark `llava-ckpt convert --tp N` (straight from HF, one pass) against `cp -r` + `sync` of the input.

Baseline: copying the input folder and syncing, in the same session, interleaved with our runs.
Also reported: peak RSS of the convert process. Targets (issue 3): ratio <= 1.5, peak RSS <= 1 GiB.

    python benchmarks/shard.py --preset 7b --tp 2 8 --runs 3    # needs about 50 GB free; cleans up after
"""
from __future__ import annotations

import argparse
import os
import shutil

from common import (LLAVA, ROOT, add_common_args, clean_up, copy_and_sync, dir_bytes, drop_caches, median,
                    prepare_input, run)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_common_args(ap, "7b")
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 8])
    args = ap.parse_args()
    src = prepare_input(args.workdir, args.preset, 3.6)
    out, copy = os.path.join(args.workdir, "out-tp"), os.path.join(args.workdir, "copy")
    print(f"input {dir_bytes(src) / 1e9:.2f} GB; page cache dropped before each run: {drop_caches()}")
    results = {tp: ([], []) for tp in args.tp}
    base = []
    try:
        for i in range(args.runs):
            base.append(copy_and_sync(src, copy))
            for tp in args.tp:
                cmd = LLAVA + ["convert", src, out, "--tp", str(tp), "--json"] + args.extra.split()
                drop_caches()
                t, peak = run(cmd, cwd=ROOT)
                written = dir_bytes(out)
                shutil.rmtree(out)
                results[tp][0].append(t)
                results[tp][1].append(peak)
                print(f"run {i + 1}: cp -r + sync {base[-1]:.2f} s | convert --tp {tp} {t:.2f} s "
                      f"({written / 1e9:.2f} GB written), peak RSS {peak:.0f} MiB", flush=True)
    finally:
        clean_up((out, copy), None if args.keep else src)
    print()
    for tp, (times, rss) in results.items():
        print(f"preset {args.preset} --tp {tp} {args.extra}: median {median(times):.2f} s vs cp -r + sync median "
              f"{median(base):.2f} s, ratio {median(times) / median(base):.2f} (target <= 1.5); "
              f"peak RSS max {max(rss):.0f} MiB (target <= 1024)")


if __name__ == "__main__":
    main()
