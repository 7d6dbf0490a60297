"""`benchmarks/generate.py --preset 7b`: the full-size LLaVA-1.5-7B (32 + 24 layers, float16, synthetic weights
with the real names and shapes) answering on this host, float32 compute, against transformers' generate of the
same requests in bfloat16 (the configuration of transformers that fits a 24 GiB host) in the same run.

Each run is its own child process, its whole process tree's anonymous memory (RssAnon) sampled every 0.2 s
(msrun ranks included; each rank's own peak too). Figures:
- ours, tp 1, batch 1 and 4; tp 2 under msrun, batch 4: prefill seconds, decode tokens/s, peak anonymous memory;
- ours with --prefill-matmul bfloat16 (the bf16_matmul kernel: bfloat16 products, float32 sums), tp 1, batch 1
  and 4 (not run, with the reason, where the kernel cannot: its products would be float32 again): the same
  figures, and whether its tokens are ours in float32 (both runs' norms, heads, attention and activations on the
  fused_ops kernels where they build; LLAVA_CKPT_FUSED_OPS=0 for MindSpore's ops);
- ours start with the checkpoint's weight files read once (warm_page_cache), transformers with its weights loaded;
- transformers bfloat16, batch 1 and 4: the same figures;
- this host's memory bandwidth (numpy reading 2 x 1 GiB on 2 threads) and the decode floor it sets: the
  bytes of the weights a step reads (text Linear weights + lm_head, stored dtype) / bandwidth;
- this host's float32 matmul throughput (MindSpore's MatMul, [608 x 4096] x [4096 x 11008]), and what our
  prefill reaches of it (its matmul FLOPs / prefill seconds).
Needs about 45 GB free in --work (HF folder, tp-1 and tp-2 outputs, 14 GB each), kept for the next run
unless --clean.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import need_free, run_sampled  # noqa: E402

CLI = [sys.executable, "-m", "llava_ckpt.cli"]


def make(work: str, skip_tp: bool = False) -> dict:
    paths = {n: os.path.join(work, n) for n in ("hf", "tp1", "tp2")}
    steps = [("hf", ["make-fixture", paths["hf"], "--preset", "7b"]), ("tp1", ["convert", paths["hf"], paths["tp1"]])]
    if not skip_tp:
        steps.append(("tp2", ["convert", paths["hf"], paths["tp2"], "--tp", "2"]))
    for name, cmd in steps:
        if not os.path.exists(os.path.join(paths[name], "config.json")):
            t = time.perf_counter()
            subprocess.run(CLI + cmd, check=True, capture_output=True)
            print(f"made {name} in {time.perf_counter() - t:.0f} s", flush=True)
    return paths


def bandwidth() -> float:
    """Bytes/s two threads read from memory (numpy's sum releases the GIL), best of 3."""
    arrays = [np.ones(2 ** 28, np.float32) for _ in range(2)]
    best = 0.0
    for _ in range(3):
        threads = [threading.Thread(target=a.sum) for a in arrays]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        best = max(best, sum(a.nbytes for a in arrays) / (time.perf_counter() - t))
    return best


def matmul_flops() -> float:
    """FLOP/s of MindSpore's float32 MatMul at a 7B prefill's shape, best of 3 (child process)."""
    code = ("import time, numpy as np, mindspore as ms; from mindspore import Tensor, ops\n"
            "ms.runtime.launch_blocking(); mm = ops.MatMul(transpose_b=True)\n"
            "x = Tensor(np.ones((608, 4096), np.float32)); w = Tensor(np.ones((11008, 4096), np.float32))\n"
            "mm(x, w).asnumpy(); best = 9.0\n"
            "for _ in range(3):\n t = time.perf_counter(); mm(x, w).asnumpy(); best = min(best, time.perf_counter() - t)\n"
            "print(2 * 608 * 4096 * 11008 / best)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def weight_bytes_per_step(cfg: dict) -> int:
    """The bytes a decode step reads: every text Linear weight and lm_head, float16 (embedding: one row)."""
    tc = cfg["text_config"]
    h, f, v, layers = tc["hidden_size"], tc["intermediate_size"], tc["vocab_size"], tc["num_hidden_layers"]
    kv = tc["num_key_value_heads"] * tc["head_dim"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * f
    return 2 * (layers * per_layer + v * h)


def prefill_flops(cfg: dict, batch: int, length: int) -> float:
    """Matmul FLOPs of a prefill: text layers over the prompt, the vision tower over its patches, the projector."""
    tc, vc = cfg["text_config"], cfg["vision_config"]
    h, f, layers = tc["hidden_size"], tc["intermediate_size"], tc["num_hidden_layers"]
    kv = tc["num_key_value_heads"] * tc["head_dim"]
    text = layers * (2 * length * (h * (h + 2 * kv) + h * h + 3 * h * f) + 4 * length * length * h)
    p = (vc["image_size"] // vc["patch_size"]) ** 2 + 1
    vh, vf = vc["hidden_size"], vc["intermediate_size"]
    vlayers = vc["num_hidden_layers"] - 1  # LLaVA-1.5 takes the features of the second-to-last layer
    vision = vlayers * (2 * p * (4 * vh * vh + 2 * vh * vf) + 4 * p * p * vh)
    adapter = 2 * (p - 1) * (vh * h + h * h)
    return batch * (text + vision + adapter)


def child(kind: str, folder: str, requests: list, batch: int, new_tokens: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps([kind, folder, requests, batch, new_tokens])]
    r = run_sampled(cmd, interval=0.2)
    if r["returncode"] != 0:
        raise RuntimeError(f"{kind} batch {batch} failed:\n{r['stderr'][-3000:]}")
    out = json.loads(r["stdout"].strip().splitlines()[-1])
    return dict(out, peak_anon_gib=r["peak_anon_mib"] / 1024,
                per_process_gib=[round(x / 1024, 2) for x in r["peak_anon_per_process_mib"][:3]], wall_s=r["wall_s"])


def warm_page_cache(folder: str) -> float:
    """Read the folder's weight files once (seconds taken), so our prefill starts with the weights in the page
    cache, as a served model's are; transformers' from_pretrained reads its weights into its own memory before its
    clock starts. Without this our prefill measured 39 s in a run where the checkpoint had been evicted (the HF
    and converted checkpoints, 28 GB, do not fit the page cache together), 29.6 s warm."""
    t = time.perf_counter()
    buf = bytearray(64 << 20)
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".ckpt")):
            with open(os.path.join(folder, name), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    return time.perf_counter() - t


def run_child(kind: str, folder: str, requests: list, batch: int, new_tokens: int) -> dict:
    if kind in ("ours", "ours-bf16"):
        from llava_ckpt.generate import generate
        warm_page_cache(folder)
        stats = []
        result = generate(folder, requests[:batch], max_new_tokens=new_tokens, batch_size=batch, eos=(),
                          on_batch=lambda rows, done, total, s: stats.append(s),
                          prefill_matmul="bfloat16" if kind == "ours-bf16" else "float32")
        s = stats[-1]
        return {"prefill_s": s["prefill_s"], "tokens_per_s": s["decode_tokens"] / s["decode_s"],
                "length": None, "tokens": [o["token_ids"] for o in result["outputs"]],
                "prompt_text": [o["prompt_text"] for o in result["outputs"]],
                "prefill_matmul": result["prefill_matmul"]}
    import torch
    from transformers import LlavaForConditionalGeneration
    from generate import theirs
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    out = theirs(folder, requests, batch, new_tokens, model, runs=1)
    return {"prefill_s": out["prefill_s"], "tokens_per_s": out["tokens_per_s"], "tokens": out["tokens"]}


def images(work: str) -> list:
    """generate.py's four requests (images of different sizes, questions of different lengths)."""
    from PIL import Image
    from generate import QUESTIONS, SIZES
    out = []
    for i, ((w, h), q) in enumerate(zip(SIZES, QUESTIONS)):
        path = os.path.join(work, f"image{i}.png")
        if not os.path.exists(path):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        out.append({"image": path, "prompt": q})
    return out


def main(args, requests=None) -> None:
    work = os.path.abspath(args.work or os.path.join(os.path.dirname(HERE), "bench-work", "generate-7b"))
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(os.path.join(work, "tp1" if args.skip_tp else "tp2", "manifest.json")):
        need_free(work, 30 if args.skip_tp else 45)
    paths = make(work, args.skip_tp)
    requests = requests or images(work)
    from llava_ckpt.engine.config import load_config
    cfg = load_config(paths["tp1"])
    n = args.new_tokens
    bw = bandwidth()
    flops = matmul_flops()
    step_bytes = weight_bytes_per_step(cfg)
    print(f"host: memory bandwidth {bw / 1e9:.1f} GB/s (2 threads), float32 MatMul {flops / 1e9:.0f} GFLOP/s; a "
          f"decode step reads {step_bytes / 1e9:.2f} GB of weights -> floor {step_bytes / bw:.2f} s per step; "
          f"{n} new tokens, greedy, eos ignored", flush=True)
    from llava_ckpt.model.kernels import bf16_matmul_status
    bf16 = bf16_matmul_status("float32", "CPU")
    kinds = [("ours", paths["tp1"]), ("ours-bf16", paths["tp1"]), ("transformers", paths["hf"])]
    if not bf16.startswith("bf16_matmul kernel"):  # --prefill-matmul bfloat16 would run float32 products again
        print(f"ours-bf16: not run, {bf16}", flush=True)
        kinds.pop(1)
    figures = {}
    for batch in (1, 4):
        for kind, folder in kinds:
            figures[kind, batch] = f = child(kind, folder, requests, batch, n)
            extra = ""
            if kind == "ours-bf16":
                same = f["tokens"] == figures["ours", batch]["tokens"]
                extra = f"; {f['prefill_matmul']}; tokens {'identical' if same else 'differ'} to float32's"
            if kind == "ours":
                reached = prefill_flops(cfg, batch, 608) / f["prefill_s"]
                extra = (f", prefill at {reached / 1e9:.0f} GFLOP/s = {reached / flops:.0%} of the MatMul figure; "
                         f"decode {f['tokens_per_s'] / (batch * bw / step_bytes):.0%} of the bandwidth floor")
            print(f"{kind:12s} batch {batch}: prefill {f['prefill_s']:.1f} s, decode {f['tokens_per_s']:.2f} tokens/s, "
                  f"peak anonymous {f['peak_anon_gib']:.2f} GiB, whole run {f['wall_s']:.0f} s{extra}", flush=True)
        o, t = figures["ours", batch], figures["transformers", batch]
        line = (f"batch {batch}: ours / transformers-bf16: decode {o['tokens_per_s'] / t['tokens_per_s']:.2f}x, "
                f"prefill time {o['prefill_s'] / t['prefill_s']:.2f}x")
        if ("ours-bf16", batch) in figures:
            b = figures["ours-bf16", batch]
            line += (f"; ours with bfloat16 prefill: decode {b['tokens_per_s'] / t['tokens_per_s']:.2f}x, prefill time "
                     f"{b['prefill_s'] / t['prefill_s']:.2f}x")
        print(line, flush=True)
    o1, o4 = figures["ours", 1], figures["ours", 4]
    print(f"batch-4 decode throughput / batch 1 (ours): {o4['tokens_per_s'] / o1['tokens_per_s']:.2f}x "
          f"(goal >= 2.5x)", flush=True)
    if not args.skip_tp:
        p = child("ours", paths["tp2"], requests, 4, n)
        print(f"tp 2 under msrun, batch 4: prefill {p['prefill_s']:.1f} s, decode {p['tokens_per_s']:.2f} tokens/s, "
              f"peak anonymous {p['peak_anon_gib']:.2f} GiB for the tree, largest processes {p['per_process_gib']} GiB; "
              f"tokens {'identical' if p['tokens'] == o4['tokens'] else 'DIFFER'} to tp 1", flush=True)
    same_answers(paths, requests[0], skip_tp=args.skip_tp)
    if args.clean:
        shutil.rmtree(work)


def same_answers(paths: dict, request: dict, new_tokens: int = 16, skip_tp: bool = False) -> None:
    """verify's layer-streamed float32 walk gives transformers' greedy tokens for an image and a question (its
    choices after the reference model's tokens: all of them when verify's greedy check matched); generate (tp 1, and tp 2 under msrun) on the same image and question must give the same prompt
    text and the same tokens (up to and including an eos, where generate stops)."""
    ask = ["--image", request["image"], "--prompt", request["prompt"], "--max-new-tokens", str(new_tokens), "--json"]
    t = time.perf_counter()
    v = subprocess.run(CLI + ["verify", paths["hf"], paths["tp1"]] + ask, capture_output=True, text=True)
    if v.returncode not in (0, 1):
        print(f"same answers: verify failed ({v.returncode}): {v.stderr.strip().splitlines()[-1:]}", flush=True)
        return
    ref = json.loads(v.stdout)
    print(f"same answers: verify (tp 1, {time.perf_counter() - t:.0f} s, passed {ref['passed']}): transformers' "
          f"greedy tokens {ref['tokens_hf']}", flush=True)
    for name in ("tp1",) + (() if skip_tp else ("tp2",)):
        g = subprocess.run(CLI + ["generate", paths[name], "--batch-size", "1"] + ask, capture_output=True, text=True)
        if g.returncode != 0:
            print(f"same answers: generate {name} failed: {g.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        out = json.loads(g.stdout)["outputs"][0]
        ours = out["token_ids"]
        same_text = out["prompt_text"] == ref["prompt"]
        same_tokens = ours == ref["tokens_hf"][:len(ours)] and (len(ours) == len(ref["tokens_hf"]) or
                                                                 out["finish_reason"] == "stop")
        print(f"same answers: generate {name}: prompt text {'identical' if same_text else 'DIFFERS'}, tokens "
              f"{'identical' if same_tokens else 'DIFFER: ' + str(ours)}", flush=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    print(json.dumps(run_child(*json.loads(sys.argv[2]))))
