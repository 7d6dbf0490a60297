"""Reference MindSpore LLaVA forward vs transformers' forward, same config, weights and inputs, on CPU.

Default config: LLaVA-1.5-7B widths (text 4096 / ffn 11008 / 32 heads / vocab 32064, vision 1024 / 4096 /
16 heads, image 336 -> 576 image tokens) with 2 layers on each side. vision_feature_layer is -1 here so both
sides run exactly the same vision layers (with -2, transformers also runs the last layer, which LLaVA
discards and the reference model skips). Weights are random, scaled to keep activations O(1). Repeats are
interleaved (ours, theirs, ours, ...) so machine noise hits both; medians are reported.
Then: wall time and peak RSS of `llava-ckpt verify` on the tiny fixture, in a child process.

    .venv/bin/python benchmarks/forward.py [--repeats 3] [--layers 2] [--skip-verify]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "model"))  # the independent HF renamer


def build(layers: int, text_tokens: int):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from llava_tiny import scale_weights, to_ms
    cfg = LlavaConfig(
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                         max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=layers, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768),
        image_token_index=32000, vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    scale_weights(hf)
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1], rng.integers(3, 32000, 5), [32000] * 576,
                          rng.integers(3, 32000, text_tokens)])[None].astype(np.int64)
    pixels = rng.standard_normal((1, 3, 336, 336)).astype(np.float32)
    return hf, to_ms(hf), ids, pixels


def bench_forward(repeats: int, layers: int, text_tokens: int) -> dict:
    import torch
    from llava_ckpt.engine.config import normalize_config
    from llava_ckpt.model import Runner, build_and_load
    t = time.perf_counter()
    hf, weights, ids, pixels = build(layers, text_tokens)
    print(f"built {layers}+{layers}-layer 7B-width models in {time.perf_counter() - t:.1f} s; "
          f"{ids.shape[1]} positions, torch threads {torch.get_num_threads()}", flush=True)
    model, _ = build_and_load(normalize_config(hf.config.to_dict()), weights)
    del weights
    runner = Runner(model)
    t = time.perf_counter()
    first = runner.forward(ids, pixels)
    compile_s = time.perf_counter() - t
    tids, tpix, mask = torch.from_numpy(ids), torch.from_numpy(pixels), torch.ones(ids.shape, dtype=torch.long)

    def theirs():
        with torch.no_grad():
            return hf(input_ids=tids, pixel_values=tpix, attention_mask=mask).logits.numpy()

    want = theirs()  # warm-up, and a sanity check that both compute the same thing
    diff = float(np.abs(first["logits"] - want).max() / np.abs(want).max())
    ours_t, theirs_t = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        runner.forward(ids, pixels)
        ours_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs()
        theirs_t.append(time.perf_counter() - t)
        print(f"  forward: ours {ours_t[-1]:.2f} s, transformers {theirs_t[-1]:.2f} s", flush=True)
    n_new = 8
    t = time.perf_counter()
    runner.generate(ids, pixels, n_new, first=first)
    ours_gen = time.perf_counter() - t  # includes compiling the decode-step graph
    t = time.perf_counter()
    runner.generate(ids, pixels, n_new, first=first)
    ours_gen2 = time.perf_counter() - t
    from transformers import LogitsProcessorList
    stamps = []

    def stamp(input_ids, scores):  # called once per generated token: the gaps are the cached steps
        stamps.append(time.perf_counter())
        return scores

    with torch.no_grad():
        hf.generate(input_ids=tids, pixel_values=tpix, attention_mask=mask, max_new_tokens=n_new,
                    min_new_tokens=n_new, do_sample=False, logits_processor=LogitsProcessorList([stamp]))
    theirs_gen = stamps[-1] - stamps[0]  # n_new - 1 cached steps
    med_o, med_t = statistics.median(ours_t), statistics.median(theirs_t)
    return {"positions": int(ids.shape[1]), "compile_s": compile_s, "rel_diff": diff,
            "ours_s": med_o, "theirs_s": med_t, "ratio": med_o / med_t,
            "paired_ratio": statistics.median(o / t for o, t in zip(ours_t, theirs_t)),
            "ours_all": ours_t, "theirs_all": theirs_t,
            "decode_ours_s_per_token": ours_gen2 / (n_new - 1), "decode_ours_first_s": ours_gen,
            "decode_theirs_s_per_token": max(theirs_gen, 0.0) / (n_new - 1)}


def bench_verify() -> dict:
    """make-fixture + convert outside the measurement, then `llava-ckpt verify` as its own process."""
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        fx, out = os.path.join(tmp, "fx"), os.path.join(tmp, "ms")
        subprocess.run([py, "-m", "llava_ckpt.cli", "make-fixture", fx], check=True, capture_output=True)
        subprocess.run([py, "-m", "llava_ckpt.cli", "convert", fx, out, "--json"], check=True, capture_output=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        proc = subprocess.run([py, "-m", "llava_ckpt.cli", "verify", fx, out], capture_output=True, text=True)
        wall = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    status = proc.stdout.splitlines()[0] if proc.stdout else proc.stderr.strip().splitlines()[-1]
    return {"wall_s": wall, "peak_rss_mib": peak / 1024, "exit": proc.returncode, "status": status,
            "rss_note": "" if peak > before else " (not above the earlier children's peak: upper bound)"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=40, help="text tokens after the 576 image tokens")
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--skip-forward", action="store_true")
    args = ap.parse_args()
    if not args.skip_verify:
        v = bench_verify()
        print(f"verify on the tiny fixture: {v['wall_s']:.1f} s wall (whole process, imports included), "
              f"peak RSS {v['peak_rss_mib']:.0f} MiB{v['rss_note']}, exit {v['exit']}: {v['status']}", flush=True)
    if not args.skip_forward:
        r = bench_forward(args.repeats, args.layers, args.text_tokens)
        print(f"forward, {r['positions']} positions, float32 CPU, median of {args.repeats}:")
        print(f"  reference MindSpore (graph mode): {r['ours_s']:.2f} s   (first call incl. compile "
              f"{r['compile_s']:.1f} s)")
        print(f"  transformers (default sdpa)     : {r['theirs_s']:.2f} s")
        print(f"  ratio ours/theirs               : {r['ratio']:.2f} of medians, {r['paired_ratio']:.2f} median of "
              f"paired runs   (logits rel diff {r['rel_diff']:.1e})")
        print(f"  greedy decode per token         : ours {r['decode_ours_s_per_token']:.3f} s, transformers "
              f"{r['decode_theirs_s_per_token']:.3f} s (KV cache, 7 steps)")
        print(f"  load average during the run     : {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
