"""`generate` vs transformers' generate, same weights and inputs, same run, on CPU; then tp 2 under msrun.

Model: LLaVA-1.5-7B widths (text 4096 / ffn 11008 / 32 heads / vocab 32064, vision 1024 / 4096 / 16 heads,
image 336 -> 576 image tokens) with a few layers on each side, as benchmarks/forward.py builds it
(vision_feature_layer -1, so both sides run exactly the same vision layers), saved once as an HF folder with
the real llava-1.5 tokenizer, processor and chat template, then converted (tp 1 and tp 2) by llava-ckpt.
Requests: 4 images of different sizes, 4 questions of different lengths, 32 new tokens, greedy, eos ignored
on both sides so every row makes all 32 tokens.

Measured, each after a warm-up batch of the same shape (our first batch compiles the graphs):
- ours: llava_ckpt.generate with batch size 1 and 4 (the public API; a batch's prefill seconds and decode
  tokens/s come from its on_batch report);
- baseline: the same with LLAVA_CKPT_SMALL_MATMUL=0, batched decode steps on MindSpore's MatMul instead of
  the small_matmul kernel;
- transformers: LlavaForConditionalGeneration.generate(do_sample=False), float32, default attention,
  batch 1 and 4 (left padding); prefill = until the first token's logits, decode = the rest, timed by a
  logits processor that stamps every step;
- tp 2: the same batch-4 run on the tp-2 output, two ranks under msrun, against our tp-1 figures.

    .venv/bin/python benchmarks/generate.py [--work DIR] [--layers 2] [--new-tokens 32] [--skip-tp]

--work keeps the HF folder and converted outputs for the next run (about 1.4 GB each, float16).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "model"))  # scale_weights: weights that keep activations O(1)

QUESTIONS = ["What is this?",
             "Describe the picture in detail, please.",
             "Is there anything unusual in this image? Explain what you see, from left to right.",
             "Colors?"]
SIZES = [(640, 480), (336, 336), (1024, 300), (200, 500)]


def make_inputs(work: str, layers: int) -> dict:
    """The HF folder, its tp-1 and tp-2 conversions and the request images (reused when already there)."""
    from llava_ckpt.convert import convert
    hf_dir, tp1, tp2 = (os.path.join(work, n) for n in ("hf", "ms-tp1", "ms-tp2"))
    stamp = os.path.join(work, "made.json")
    want = {"layers": layers}
    if not (os.path.exists(stamp) and json.load(open(stamp)) == want):
        import torch
        from transformers import LlavaConfig, LlavaForConditionalGeneration
        from llava_tiny import scale_weights
        from llava_ckpt.fixture import COPIED, REFERENCE
        for d in (hf_dir, tp1, tp2):
            shutil.rmtree(d, ignore_errors=True)
        cfg = LlavaConfig(
            text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                             vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
            vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                               num_hidden_layers=layers, num_attention_heads=16, image_size=336, patch_size=14,
                               projection_dim=768),
            image_token_index=32000, pad_token_id=32001, vision_feature_layer=-1,
            vision_feature_select_strategy="default")
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(cfg).eval()
        scale_weights(model)
        model.to(torch.float16).save_pretrained(hf_dir, safe_serialization=True)
        del model
        gc.collect()
        for name in COPIED + ["preprocessor_config.json"]:
            shutil.copyfile(os.path.join(REFERENCE, name), os.path.join(hf_dir, name))
        convert(hf_dir, tp1, progress=False)
        convert(hf_dir, tp2, tp=2, progress=False)
        with open(stamp, "w") as f:
            json.dump(want, f)
    from PIL import Image
    images = []
    for i, (w, h) in enumerate(SIZES):
        path = os.path.join(work, f"image{i}.png")
        if not os.path.exists(path):
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    requests = [{"image": p, "prompt": q} for p, q in zip(images, QUESTIONS)]
    return {"hf": hf_dir, "tp1": tp1, "tp2": tp2, "requests": requests}


def ours(ms_dir: str, requests: list, batch: int, new_tokens: int, small_matmul: bool = True) -> dict:
    """ours_here in a child process: its model and compiled graphs are freed when it ends (a compiled graph
    keeps its parameters alive for the life of the process). small_matmul=False: the decode steps' matmuls
    on MindSpore's MatMul instead of the small_matmul kernel (the baseline it replaced)."""
    import subprocess
    from llava_ckpt.model.kernels import ENV_SWITCH
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps([ms_dir, requests, batch, new_tokens])]
    env = dict(os.environ, **{ENV_SWITCH: "1" if small_matmul else "0"})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"ours (batch {batch}, {ms_dir}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ours_here(ms_dir: str, requests: list, batch: int, new_tokens: int) -> dict:
    """Two batches of the same requests through llava_ckpt.generate: the first warms (compiles), the second
    is measured."""
    from llava_ckpt.generate import generate
    from llava_ckpt.model.kernels import small_matmul_status
    reports = []
    t0 = time.perf_counter()
    result = generate(ms_dir, requests[:batch] * 2, max_new_tokens=new_tokens, batch_size=batch, eos=(),
                      on_batch=lambda rows, done, total, stats: reports.append(stats))
    wall = time.perf_counter() - t0
    first, second = reports
    prefill = second["prefill_s"] - first["prefill_s"]
    decode_s = second["decode_s"] - first["decode_s"]
    decode_tokens = second["decode_tokens"] - first["decode_tokens"]
    return {"prefill_s": prefill, "tokens_per_s": decode_tokens / decode_s, "first_prefill_s": first["prefill_s"],
            "tokens": [o["token_ids"] for o in result["outputs"][batch:]], "wall_s": wall,
            "matmul": small_matmul_status(), "peak_rss_gib": largest_process_gib()}


def largest_process_gib() -> float:
    """Peak RSS of the largest process: this one, or one it waited for (msrun and, through it, the ranks)."""
    import resource
    kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return round(kib / 2 ** 20, 2)


def theirs(hf_dir: str, requests: list, batch: int, new_tokens: int, model=None, runs: int = 2) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LogitsProcessorList
    processor = AutoProcessor.from_pretrained(hf_dir)
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": r["prompt"]}]}],
                                           add_generation_prompt=True) for r in requests[:batch]]
    pictures = [Image.open(r["image"]).convert("RGB") for r in requests[:batch]]
    inputs = processor(images=pictures, text=texts, return_tensors="pt", padding=True)
    stamps = []

    def stamp(input_ids, scores):  # called once per new token, after its logits
        stamps.append(time.perf_counter())
        return scores

    measured = []
    for _ in range(runs):  # warm-up, then measured
        stamps.clear()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 logits_processor=LogitsProcessorList([stamp]))
        measured.append((stamps[0] - t0, batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])))
    tokens = out[:, inputs["input_ids"].shape[1]:].tolist()
    return {"prefill_s": measured[-1][0], "tokens_per_s": measured[-1][1], "tokens": tokens}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="folder for the HF and converted checkpoints (kept)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip-tp", action="store_true")
    ap.add_argument("--preset", choices=["7b-few-layers", "7b"], default="7b-few-layers",
                    help="7b: the full 32-layer model, 128 new tokens, against transformers-bf16 (generate_full.py)")
    ap.add_argument("--clean", action="store_true", help="--preset 7b: delete --work at the end")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.preset == "7b":
        import generate_full
        if args.new_tokens == 32:
            args.new_tokens = 128
        generate_full.main(args, None)
        return
    if args.child:
        print(json.dumps(ours_here(*json.loads(args.child))))
        return
    work = args.work or tempfile.mkdtemp(prefix="bench-generate-")
    os.makedirs(work, exist_ok=True)
    t = time.perf_counter()
    made = make_inputs(work, args.layers)
    print(f"inputs in {work} ({time.perf_counter() - t:.0f} s): {args.layers}+{args.layers}-layer 7B-width LLaVA, "
          f"{args.new_tokens} new tokens, greedy, float32 compute on CPU, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    import torch
    from transformers import LlavaForConditionalGeneration
    figures = {}
    for batch in (1, 4):
        figures[("ours", batch)] = ours(made["tp1"], made["requests"], batch, args.new_tokens)
        figures[("matmul", batch)] = ours(made["tp1"], made["requests"], batch, args.new_tokens, small_matmul=False)
        gc.collect()
        hf = LlavaForConditionalGeneration.from_pretrained(made["hf"], dtype=torch.float32).eval()
        figures[("transformers", batch)] = theirs(made["hf"], made["requests"], batch, args.new_tokens, hf)
        del hf
        gc.collect()
        o, h, m = figures[("ours", batch)], figures[("transformers", batch)], figures[("matmul", batch)]
        same = sum(a == b for a, b in zip(o["tokens"], h["tokens"]))
        same_m = sum(a == b for a, b in zip(m["tokens"], h["tokens"]))
        print(f"batch {batch}, baseline {m['matmul']}: prefill {m['prefill_s']:.2f} s, decode "
              f"{m['tokens_per_s']:.2f} tokens/s, peak RSS {m['peak_rss_gib']} GiB; {same_m}/{batch} rows identical "
              f"to transformers", flush=True)
        print(f"batch {batch}, ours on {o['matmul']}: decode {o['tokens_per_s'] / m['tokens_per_s']:.2f}x the "
              f"baseline, peak RSS {o['peak_rss_gib']} GiB", flush=True)
        print(f"batch {batch}: prefill ours {o['prefill_s']:.2f} s (first batch incl. compile "
              f"{o['first_prefill_s']:.1f} s), transformers {h['prefill_s']:.2f} s; decode ours "
              f"{o['tokens_per_s']:.2f} tokens/s, transformers {h['tokens_per_s']:.2f} tokens/s "
              f"-> ours/transformers {o['tokens_per_s'] / h['tokens_per_s']:.2f}x; "
              f"{same}/{batch} rows with identical tokens", flush=True)
    o1, o4 = figures[("ours", 1)], figures[("ours", 4)]
    h1, h4 = figures[("transformers", 1)], figures[("transformers", 4)]
    m1, m4 = figures[("matmul", 1)], figures[("matmul", 4)]
    print(f"batch-4 decode throughput / batch 1: ours {o4['tokens_per_s'] / o1['tokens_per_s']:.2f}x, "
          f"baseline (MindSpore MatMul) {m4['tokens_per_s'] / m1['tokens_per_s']:.2f}x, "
          f"transformers {h4['tokens_per_s'] / h1['tokens_per_s']:.2f}x (target for ours: >= 2.5x)")
    print(f"targets: ours at least as fast per token as transformers at batch 1 "
          f"({'met' if o1['tokens_per_s'] >= h1['tokens_per_s'] else 'NOT met'}) and batch 4 "
          f"({'met' if o4['tokens_per_s'] >= h4['tokens_per_s'] else 'NOT met'}); batch-4 throughput >= 2.5x "
          f"batch 1 ({'met' if o4['tokens_per_s'] >= 2.5 * o1['tokens_per_s'] else 'NOT met'})", flush=True)
    if not args.skip_tp:
        try:
            p = ours(made["tp2"], made["requests"], 4, args.new_tokens)
        except RuntimeError as exc:
            print(f"tp 2 under msrun FAILED: {str(exc).strip().splitlines()[-1]}")
            return
        same = p["tokens"] == o4["tokens"]
        print(f"tp 2 under msrun, batch 4: prefill {p['prefill_s']:.2f} s, decode {p['tokens_per_s']:.2f} tokens/s "
              f"(tp 1 in one process: {o4['prefill_s']:.2f} s, {o4['tokens_per_s']:.2f} tokens/s -> tp2/tp1 "
              f"decode {p['tokens_per_s'] / o4['tokens_per_s']:.2f}x); whole run incl. msrun start, load, compile "
              f"{p['wall_s']:.0f} s vs {o4['wall_s']:.0f} s; largest process's peak RSS {p['peak_rss_gib']} GiB; "
              f"tokens {'identical' if same else 'DIFFER'} to tp 1")


if __name__ == "__main__":
    main()
