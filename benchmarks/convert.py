"""Benchmark `llava-ckpt convert` against `cp -r` + `sync` of the same input folder, interleaved runs.

Baseline (named in the issue): copying the input folder and syncing it, which is the least any
converter that reads every byte and writes every byte must do. Our convert fsyncs its output too and
hashes input and output for the manifest. Also reported: peak RSS of the convert process.
For reference, MindFormers' own research/llava/convert_weight.py was measured on this machine (NOTES.md)
at 52-65 s and 17-18.6 GiB peak RSS on the 14.1 GB checkpoint, against 10.8 s for cp -r.

    python benchmarks/convert.py --preset 7b-few-layers --runs 3
    python benchmarks/convert.py --preset 7b --runs 3      # needs about 45 GB free; cleans up after
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from common import LLAVA, ROOT, copy_and_sync, dir_bytes, drop_caches, median, need_free, run

sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="7b-few-layers", choices=["7b-few-layers", "7b", "tiny"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "bench-work"))
    ap.add_argument("--extra", default="", help="extra convert options, e.g. '--fuse-qkv --dtype bfloat16'")
    ap.add_argument("--keep", action="store_true", help="keep the generated input for the next run")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, f"hf-{args.preset}")
    size_gib = {"7b": 13.2, "7b-few-layers": 1.9, "tiny": 0.01}[args.preset]
    need_free(args.workdir, size_gib * 3.3)
    if not os.path.isdir(src):
        print(f"generating the {args.preset} fixture ...", flush=True)
        t, _ = run(LLAVA + ["make-fixture", src, "--preset", args.preset], cwd=ROOT)
        print(f"  {dir_bytes(src) / 1e9:.2f} GB in {t:.1f} s")
    in_bytes = dir_bytes(src)
    out = os.path.join(args.workdir, "out")
    copy = os.path.join(args.workdir, "copy")
    cold = drop_caches()
    print(f"input {in_bytes / 1e9:.2f} GB; page cache dropped before each run: {cold}")
    ours, base, rss = [], [], []
    try:
        for i in range(args.runs):
            drop_caches()
            t, _ = copy_and_sync(src, copy)
            base.append(t)
            shutil.rmtree(copy)
            drop_caches()
            t, peak = run(LLAVA + ["convert", src, out, "--json"] + args.extra.split(), cwd=ROOT)
            ours.append(t)
            rss.append(peak)
            print(f"run {i + 1}: cp -r + sync {base[-1]:.2f} s | convert {ours[-1]:.2f} s, peak RSS {peak:.0f} MiB",
                  flush=True)
            shutil.rmtree(out)
    finally:
        for p in (out, copy):
            shutil.rmtree(p, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    ratio = median(ours) / median(base)
    print(f"\npreset {args.preset} {args.extra}: convert median {median(ours):.2f} s, cp -r + sync median "
          f"{median(base):.2f} s, ratio {ratio:.2f} (target <= 1.3); "
          f"throughput {in_bytes / median(ours) / 1e9:.2f} GB/s; peak RSS max {max(rss):.0f} MiB (target <= 1024)")


if __name__ == "__main__":
    main()
