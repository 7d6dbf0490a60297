"""`llava-ckpt verify` at full size, streamed layer by layer: wall time and peak RSS of the whole process
tree (msrun ranks included), each run its own `llava-ckpt verify --json` process.

  7b-few-layers  the named baseline: 7B widths, 2 text layers (how much of the peak is not per layer)
  7b             the full 7b preset (14.1 GB float16, real names and shapes), float32 compute, the bundled
                 image and prompt, 8 greedy tokens; the weight proof comes first. Targets: peak anonymous <= 4 GiB,
                 wall <= 15 min on 2 cores.
  7b-bf16        the same output, `--dtype bfloat16` (every Linear's product in bfloat16 with float32 sums on both
                 sides, its own tolerance), the weight proof included; the 7b step (float32) is its baseline in
                 the same session. Targets: wall <= 2 min, peak anonymous memory <= 3 GiB.
  weights        `verify --weights-only` of the same output: the bit-for-bit weight proof alone (every tensor
                 back through its op's inverse against its source), the files hashed for the record meanwhile.
                 Baseline in the same session: reading both checkpoints once (cat > /dev/null), the least any
                 proof must do. Target: well under a minute.
  7b, w1/w3 of layer 17 swapped: must fail naming language_model.model.layers.17. The two names are swapped
                 in the converted safetensors header in place (same length, same shape and dtype), so no
                 second 14 GB copy is written; 1 greedy token (the failure is decided before decoding).
                 `negative-weights`: the same damage through --weights-only, which must name both tensors.
  13b-few-layers llava-1.5-13b-hf's widths, 2 text layers: tp 1, and tp 2 (ranks under msrun, the default).
  next           LLaVA-NeXT at full size (the llava-next-mistral-7b preset: Mistral-7B-Instruct-v0.2's sizes, the
                 v1.6 anyres grid), the bundled image (336 x 336: a 2 x 2 grid, 5 tower inputs, 2928 image
                 tokens), 8 greedy tokens; its figures beside the 7b step's (llava-1.5, 576 image tokens).

Inputs are made in --work (make-fixture) unless given (--src-7b / --src-7b-few-layers, e.g. a shared copy);
converted outputs go to --work and are deleted after their runs.

    .venv/bin/python benchmarks/verify.py [--work DIR] [--src-7b DIR] [--skip 13b,negative,...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from common import LLAVA, ROOT, dir_bytes, need_free, run, run_sampled

STEPS = ("baseline", "7b", "7b-bf16", "weights", "negative", "negative-weights", "13b", "next")


def make(work: str, preset: str, given: str | None) -> str:
    if given:
        return given
    src = os.path.join(work, f"hf-{preset}")
    if not os.path.isdir(src):
        t, _ = run(LLAVA + ["make-fixture", src, "--preset", preset], cwd=ROOT)
        print(f"  made {preset}: {dir_bytes(src) / 1e9:.2f} GB in {t:.0f} s", flush=True)
    return src


def convert(src: str, out: str, *extra) -> None:
    shutil.rmtree(out, ignore_errors=True)
    t, _ = run(LLAVA + ["convert", src, out, "--format", "safetensors", *extra], cwd=ROOT)
    print(f"  converted {os.path.basename(src)} -> {os.path.basename(out)} {' '.join(extra)} in {t:.0f} s", flush=True)


def verify(src: str, out: str, tokens: int, *extra) -> dict:
    """One verify process; its figures and the parts of its --json record the report needs."""
    r = run_sampled(LLAVA + ["verify", src, out, "--max-new-tokens", str(tokens), "--json", *extra], cwd=ROOT)
    try:
        rec = json.loads(r["stdout"])
    except json.JSONDecodeError:
        raise SystemExit(f"verify did not finish ({r['returncode']}): {r['stderr'][-2000:]}")
    par = rec.get("msrun") or {}
    row = {"wall_s": round(r["wall_s"], 1), "peak_rss_gib": round(r["peak_rss_mib"] / 1024, 2),
           "peak_anon_gib": round(r["peak_anon_mib"] / 1024, 2), "proof_s": rec["weights"]["seconds"],
           "kind": rec["kind"], "weights_differ": [d["name"] for d in rec["weights"]["differ"]][:4],
           "exit": r["returncode"], "passed": rec["passed"], "first_divergence": rec["first_divergence"],
           "positions": rec["positions"], "greedy": f"{rec['greedy_equal']}/{len(rec['tokens_ms'])}",
           "rel_diff": rec["rel_diff"], "cosine_min": rec["cosine_min"], "seconds": rec["seconds"], "tp": rec["tp"],
           "msrun": {k: par.get(k) for k in ("world", "passed", "greedy_match", "first_divergence", "seconds")}
           if par else None}
    print("  " + json.dumps(row), flush=True)
    return row


def weights_only(src: str, out: str) -> dict:
    """One `verify --weights-only` process; its figures against the read floor of both checkpoints."""
    floor, _ = run(["bash", "-c", f"cat '{src}'/*.safetensors > /dev/null; find '{out}' -name '*.safetensors' "
                                  f"-exec cat {{}} + > /dev/null"])
    r = run_sampled(LLAVA + ["verify", src, out, "--weights-only", "--json"], cwd=ROOT)
    try:
        rec = json.loads(r["stdout"])
    except json.JSONDecodeError:
        raise SystemExit(f"verify --weights-only did not finish ({r['returncode']}): {r['stderr'][-2000:]}")
    w = rec["weights"]
    row = {"wall_s": round(r["wall_s"], 1), "peak_anon_gib": round(r["peak_anon_mib"] / 1024, 2),
           "peak_rss_gib": round(r["peak_rss_mib"] / 1024, 2), "exit": r["returncode"], "passed": rec["passed"],
           "kind": rec["kind"], "tensors": w["tensors"], "pieces": w["pieces"], "gb": round(w["bytes"] / 1e9, 2),
           "proof_s": w["seconds"], "gb_per_s_wall": round(w["bytes"] / 1e9 / r["wall_s"], 2),
           "read_floor_s": round(floor, 1), "vs_read_floor": round(r["wall_s"] / max(floor, 1e-3), 2),
           "differ": [(d["name"], d["elements"]) for d in w["differ"]][:6], "record": rec.get("record")}
    print("  " + json.dumps(row), flush=True)
    return row


def swap_header_names(path: str, a: str, b: str) -> None:
    """Swap two tensor names in a safetensors header, in place (names of equal length: the header keeps its
    size). The data stays: each name now points at the other's bytes."""
    if len(a) != len(b):
        raise SystemExit("names must have the same length")
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        head = f.read(n)
        qa, qb, tmp = (json.dumps(x).encode() for x in (a, b, "\0" * len(a)))
        if head.count(qa) != 1 or head.count(qb) != 1:
            raise SystemExit(f"{a} or {b} not found once in {path}")
        head = head.replace(qa, tmp).replace(qb, qa).replace(tmp, qb)
        f.seek(8)
        f.write(head)
        f.flush()
        os.fsync(f.fileno())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "bench-work"))
    ap.add_argument("--src-7b", default=None, help="an existing `make-fixture --preset 7b` folder")
    ap.add_argument("--src-7b-few-layers", default=None)
    ap.add_argument("--src-next", default=None, help="an existing `make-fixture --preset llava-next-mistral-7b` folder")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--skip", default="", help=f"comma-separated steps to leave out: {', '.join(STEPS)}")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.work, exist_ok=True)
    print(f"verify benchmark on {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    weights = [None]
    if "baseline" not in skip:
        print("7b-few-layers (baseline: 7B widths, 2 text layers)", flush=True)
        src = make(args.work, "7b-few-layers", args.src_7b_few_layers)
        out = os.path.join(args.work, "ms-7b-few-layers")
        convert(src, out)
        results["7b-few-layers"] = verify(src, out, args.max_new_tokens)
        shutil.rmtree(out)
    if {"7b", "7b-bf16", "weights", "negative", "negative-weights"} - skip:
        need_free(args.work, 16 if args.src_7b else 30)
        src = make(args.work, "7b", args.src_7b)
        out = os.path.join(args.work, "ms-7b")
        convert(src, out)
        if "weights" not in skip:
            print("7b --weights-only (the weight proof alone)", flush=True)
            weights[0] = weights_only(src, out)
        if "7b" not in skip:
            print("7b (32 text layers)", flush=True)
            results["7b"] = verify(src, out, args.max_new_tokens)
        if "7b-bf16" not in skip:
            print("7b --dtype bfloat16 (the fast walk)", flush=True)
            results["7b-bf16"] = verify(src, out, args.max_new_tokens, "--dtype", "bfloat16")
        if {"negative", "negative-weights"} - skip:
            p = "language_model.model.layers.17.feed_forward."
            swap_header_names(os.path.join(out, "llava.safetensors"), p + "w1.weight", p + "w3.weight")
        if "negative-weights" not in skip:
            print("7b with layer 17's w1 and w3 swapped, --weights-only", flush=True)
            row = weights_only(src, out)
            if row["passed"] or {n for n, _ in row["differ"]} != {p + "w1.weight", p + "w3.weight"}:
                print("  NEGATIVE CONTROL: THE PROOF DID NOT NAME LAYER 17'S w1 AND w3", flush=True)
        if "negative" not in skip:
            print("7b with layer 17's w1 and w3 swapped", flush=True)
            row = results["7b-w1-w3-swapped-layer-17"] = verify(src, out, 1)
            row["names_layer_17"] = row["first_divergence"] == "language_model.model.layers.17"
            if row["passed"] or not row["names_layer_17"]:
                print("  NEGATIVE CONTROL DID NOT FAIL AT LAYER 17", flush=True)
        shutil.rmtree(out)
    if "13b" not in skip:
        print("13b-few-layers (llava-1.5-13b widths, 2 text layers): tp 1, tp 2 under msrun", flush=True)
        src = make(args.work, "13b-few-layers", None)
        one, two = os.path.join(args.work, "ms-13b-fl"), os.path.join(args.work, "ms-13b-fl-tp2")
        convert(src, one)
        results["13b-few-layers tp1"] = verify(src, one, args.max_new_tokens)
        shutil.rmtree(one)
        convert(src, two, "--tp", "2")
        results["13b-few-layers tp2"] = verify(src, two, args.max_new_tokens)
        shutil.rmtree(two)
    if "next" not in skip:
        print("llava-next-mistral-7b (LLaVA-NeXT, full size, anyres packing)", flush=True)
        need_free(args.work, 16 if args.src_next else 30)
        src = make(args.work, "llava-next-mistral-7b", args.src_next)
        out = os.path.join(args.work, "ms-next-7b")
        convert(src, out)
        results["llava-next-mistral-7b"] = verify(src, out, args.max_new_tokens)
        shutil.rmtree(out)
        if not args.src_next:
            shutil.rmtree(src)
    print("\nsummary")
    base = results.get("7b-few-layers")
    for name, row in results.items():
        ratio = f", peak {row['peak_rss_gib'] / base['peak_rss_gib']:.2f}x the baseline's" if base else ""
        print(f"  {name:28s} {'PASSED' if row['passed'] else 'FAILED'} (exit {row['exit']}, {row['kind'] or 'no'} "
              f"mismatch, first divergence {row['first_divergence']}), wall {row['wall_s'] / 60:.1f} min (weight "
              f"proof {row['proof_s']} s), peak anon {row['peak_anon_gib']} GiB, peak RSS {row['peak_rss_gib']} GiB"
              f"{ratio}")
    if weights[0]:
        w = weights[0]
        print(f"  7b --weights-only            {'PASSED' if w['passed'] else 'FAILED'}: {w['tensors']} tensors, "
              f"{w['gb']} GB in {w['wall_s']} s wall ({w['gb_per_s_wall']} GB/s; the proof itself {w['proof_s']} s), "
              f"peak anon {w['peak_anon_gib']} GiB; {w['vs_read_floor']}x the read floor of both checkpoints "
              f"({w['read_floor_s']} s)")
    if "7b-bf16" in results:
        r = results["7b-bf16"]
        base = results.get("7b")
        vs = f", {r['wall_s'] / base['wall_s']:.2f}x the float32 walk's wall ({base['wall_s']} s)" if base else ""
        print(f"  targets for 7b-bf16: wall <= 2 min: {'met' if r['wall_s'] <= 120 else 'MISSED'} ({r['wall_s']} s"
              f"{vs}); peak anonymous <= 3 GiB: {'met' if r['peak_anon_gib'] <= 3 else 'MISSED'} "
              f"({r['peak_anon_gib']} GiB); logits {r['rel_diff']:.3g} relative, greedy {r['greedy']}")
    if "7b" in results:
        r = results["7b"]
        # anonymous memory: RSS also counts the checkpoints' mapped page-cache pages (verify's transformers side
        # keeps its maps across the greedy tokens), which the kernel can drop
        print(f"  targets for 7b: peak anonymous <= 4 GiB: {'met' if r['peak_anon_gib'] <= 4 else 'MISSED'} "
              f"({r['peak_anon_gib']} GiB; peak RSS {r['peak_rss_gib']} GiB); wall <= 15 min: "
              f"{'met' if r['wall_s'] <= 900 else 'MISSED'} (load average now {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
