"""Benchmark `llava-ckpt shard SRC OUT --tp M` re-cutting a tp-N output (any layout to any layout) against
`cp -r` + `sync` of the same source folder, run in the same session, interleaved with ours.

The source is `convert --tp N` of the preset's synthetic HF checkpoint (real names and shapes; the full 7B by
default), made once; the HF fixture is removed after that unless --keep. Reported per run: wall time (cold page
cache where the machine allows), the ratio to the baseline's, and the peak anonymous memory (RssAnon) of the
shard process tree; the bytes written. shard reads every replica of a replicated tensor to compare them, so it
reads more than cp does when the source has many ranks.

    python benchmarks/reshard.py --from-tp 8 --tp 2 --runs 2    # full 7B: about 45 GB free; cleans up after
"""
from __future__ import annotations

import argparse
import os
import shutil

from common import (LLAVA, ROOT, clean_up, add_common_args, copy_and_sync, dir_bytes, drop_caches, median, need_free,
                    prepare_input, run, run_sampled)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_common_args(ap, "7b")
    ap.add_argument("--from-tp", type=int, default=8)
    ap.add_argument("--tp", type=int, default=2)
    args = ap.parse_args()
    src_hf = prepare_input(args.workdir, args.preset, 3.6)
    src = os.path.join(args.workdir, f"tp{args.from_tp}")
    out, copy = os.path.join(args.workdir, f"out-tp{args.tp}"), os.path.join(args.workdir, "copy")
    try:
        if not os.path.isdir(src):
            t, _ = run(LLAVA + ["convert", src_hf, src, "--tp", str(args.from_tp)] + args.extra.split(), cwd=ROOT)
            print(f"source: convert --tp {args.from_tp} {args.extra} in {t:.1f} s", flush=True)
        if not args.keep:
            shutil.rmtree(src_hf, ignore_errors=True)
        size = dir_bytes(src)
        need_free(args.workdir, 2.2 * size / 2**30)
        print(f"source {size / 1e9:.2f} GB (tp {args.from_tp}); page cache dropped before each run: "
              f"{drop_caches()}", flush=True)
        base, ours, anon = [], [], []
        for i in range(args.runs):
            base.append(copy_and_sync(src, copy))
            drop_caches()
            got = run_sampled(LLAVA + ["shard", src, out, "--tp", str(args.tp), "--json"], cwd=ROOT)
            if got["returncode"]:
                raise SystemExit(f"shard failed: {got['stderr']}")
            written = dir_bytes(out)
            shutil.rmtree(out)
            ours.append(got["wall_s"])
            anon.append(got["peak_anon_mib"])
            print(f"run {i + 1}: cp -r + sync {base[-1]:.2f} s | shard tp{args.from_tp} -> tp{args.tp} "
                  f"{ours[-1]:.2f} s ({written / 1e9:.2f} GB written), ratio {ours[-1] / base[-1]:.2f}, "
                  f"peak anonymous memory {anon[-1]:.0f} MiB", flush=True)
    finally:
        clean_up((out, copy), None if args.keep else src)
    print()
    print(f"preset {args.preset} tp{args.from_tp} -> tp{args.tp}: shard median {median(ours):.2f} s vs cp -r + sync "
          f"median {median(base):.2f} s, ratio {median(ours) / median(base):.2f}; peak anonymous memory max "
          f"{max(anon):.0f} MiB")


if __name__ == "__main__":
    main()
