"""Benchmark `llava-ckpt export` (MindSpore -> HF) against `cp -r` + `sync` of the same bytes, interleaved runs.

The round trip: the HF input is converted once (`convert`, options from --extra), then each run times, from a
cold page cache, copying the converted folder and syncing it (the baseline: reading and writing every byte, the
least any exporter must do) and `export` of it (which also hashes its input against convert's manifest, hashes
every file it writes and fsyncs them). Peak RSS of the export process is reported, and every exported file's
sha256 (from export's manifest) is compared with the HF source file's (from convert's manifest): the round
trip must give the same files back.

    python benchmarks/export.py --preset 7b-few-layers --runs 3
    python benchmarks/export.py --src /path/to/llava-1.5-7b-hf --workdir /scratch --runs 3   # ~45 GB free
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from common import (LLAVA, ROOT, clean_up, add_common_args, copy_and_sync, dir_bytes, drop_caches, median,
                    need_free, prepare_input, read_floor, run)

sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_common_args(ap, "7b-few-layers")
    ap.add_argument("--src", default=None, help="an existing HF checkpoint folder (default: make the preset's)")
    args = ap.parse_args()
    if args.src:
        src = args.src
        os.makedirs(args.workdir, exist_ok=True)
        need_free(args.workdir, dir_bytes(src) / 2**30 * 2.2)
    else:
        src = prepare_input(args.workdir, args.preset, 3.3)
    ms = os.path.join(args.workdir, "ms")
    out = os.path.join(args.workdir, "hf-out")
    copy = os.path.join(args.workdir, "copy")
    shutil.rmtree(ms, ignore_errors=True)
    ours, base, rss, floor = [], [], [], []
    try:
        t, peak = run(LLAVA + ["convert", src, ms, "--json"] + args.extra.split(), cwd=ROOT)
        ms_bytes = dir_bytes(ms)
        print(f"convert {src} {args.extra}: {t:.2f} s, peak RSS {peak:.0f} MiB, {ms_bytes / 1e9:.2f} GB; "
              f"page cache dropped before each run: {drop_caches()}", flush=True)
        for i in range(args.runs):
            base.append(copy_and_sync(ms, copy))
            floor.append(read_floor(ms)[0] if not os.path.isdir(os.path.join(ms, "rank_0")) else float("nan"))
            drop_caches()
            t, peak = run(LLAVA + ["export", ms, out, "--json"], cwd=ROOT)
            if i == 0:
                round_trip_check(ms, out)
            shutil.rmtree(out, ignore_errors=True)
            ours.append(t)
            rss.append(peak)
            print(f"run {i + 1}: cp -r + sync {base[-1]:.2f} s | cold read {floor[-1]:.2f} s | export {t:.2f} s, "
                  f"peak RSS {peak:.0f} MiB", flush=True)
    finally:
        clean_up((out, copy, ms), None if args.keep or args.src else src)
    ratio = median(ours) / median(base)
    print(f"\nexport of a {args.preset if not args.src else os.path.basename(src)} convert output {args.extra}: "
          f"export median {median(ours):.2f} s, cp -r + sync median {median(base):.2f} s, ratio {ratio:.2f} "
          f"(target <= 1.3); throughput {ms_bytes / median(ours) / 1e9:.2f} GB/s; peak RSS max {max(rss):.0f} MiB "
          f"(target <= 1024); against a cold read of the input ({median(floor):.2f} s): "
          f"{median(ours) / median(floor):.2f}")


def round_trip_check(ms: str, out: str) -> None:
    """Every exported weight file has the sha256 of the HF source file convert read (both manifests record it)."""
    with open(os.path.join(ms, "manifest.json")) as f:
        source = {e["name"]: e["sha256"] for e in json.load(f)["source"]["files"]}
    with open(os.path.join(out, "manifest.json")) as f:
        written = {e["path"]: e["sha256"] for e in json.load(f)["files"] if e["path"].endswith(".safetensors")}
    if source != written:
        raise SystemExit(f"round trip differs: {sorted(k for k in source if source[k] != written.get(k))}")
    print(f"  round trip: all {len(written)} weight files have the source's sha256", flush=True)


if __name__ == "__main__":
    main()
