"""`generate`: answer questions about images with a converted checkpoint, in the reference MindSpore model.

Requests are (image, question) pairs. Each question goes inside the checkpoint's own chat template through
its transformers processor (llava_ckpt.prompts), as Hugging Face users do. Requests run in batches of
`batch_size`: one forward pass per batch, rows left-padded with an attention mask and per-row positions,
one KV cache, rows stopping at an eos token of generation_config.json (as transformers' generate does
for LLaVA); a batch gives the same tokens as its requests one at a time. A --tp output runs as that many
tensor-parallel ranks under msrun (runtime/msrun.py, each batch a job for `batch_job`), same tokens as tp 1.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from .errors import fail

DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_NEW_TOKENS = 128
# Prompt lengths are padded (on the left, masked) up to a multiple of this, so batches of similar prompts
# reuse one compiled prefill and decode graph instead of compiling one per length.
LENGTH_BUCKET = 16


# ---------------------------------------------------------------- requests

def pair_requests(images, prompts) -> list:
    """--image/--prompt pairs, in order: [{"image", "prompt"}]."""
    images, prompts = list(images or ()), list(prompts or ())
    if len(images) != len(prompts):
        raise fail(f"{len(images)} --image and {len(prompts)} --prompt: give one --prompt per --image, in order")
    if not images:
        raise fail("no requests: give --image IMG --prompt TEXT (repeatable) or --requests FILE.jsonl")
    return [{"image": i, "prompt": p} for i, p in zip(images, prompts)]


def read_requests(path: str) -> list:
    """A JSON-lines file of {"image": path, "prompt": text}; relative image paths are relative to the file's
    folder. Blank lines are skipped; a bad line is named by its number."""
    if not os.path.exists(path):
        raise fail(f"requests file {path} does not exist")
    if not os.path.isfile(path):
        raise fail(f"requests file {path} is not a regular file")
    folder = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise fail(f"{path} line {number}: not UTF-8 text") from None
            if not line:
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise fail(f"{path} line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(item, dict):
                raise fail(f"{path} line {number}: expected an object {{\"image\": path, \"prompt\": text}}, "
                           f"got {type(item).__name__}")
            for key, what in (("image", "a path"), ("prompt", "text")):
                if key not in item:
                    raise fail(f"{path} line {number}: no {key!r} (each line is {{\"image\": path, \"prompt\": text}})")
                if not isinstance(item[key], str):
                    raise fail(f"{path} line {number}: {key!r} must be {what}, got {type(item[key]).__name__}")
            image = item["image"]
            out.append({"image": image if os.path.isabs(image) else os.path.join(folder, image),
                        "prompt": item["prompt"]})
    if not out:
        raise fail(f"requests file {path} holds no requests")
    return out


# ---------------------------------------------------------------- the converted folder

def open_output(ms_dir: str) -> dict:
    """Check `ms_dir` is a convert/shard output with what generate needs, opened by the one opener
    (io/checkpoint.py: its weight files there, of the sizes its manifest records, every header valid); returns
    {"checkpoint", "cfg", "tp", "rank_dirs", "layout", "dtypes" (each tensor's stored dtype), "tp_units" (the
    sizes --tp must divide)}."""
    from .engine.config import load_config
    from .io.checkpoint import open_checkpoint
    from .io.manifest import NAME, read_ms_output
    hint = "generate takes what convert or shard wrote"
    if not os.path.lexists(os.path.join(ms_dir, NAME)):
        read_ms_output(ms_dir, hint)  # names what the folder is instead
    if not os.path.isfile(os.path.join(ms_dir, "config.json")):
        raise fail(f"{ms_dir} has no config.json: convert it again with this version of llava-ckpt (convert "
                   "copies the source's config, generation config, tokenizer and processor files)")
    cfg = load_config(ms_dir)
    checkpoint = open_checkpoint(ms_dir, "what convert or shard wrote", hint)
    return {"checkpoint": checkpoint, "cfg": cfg, "tp": checkpoint.tp, "rank_dirs": checkpoint.rank_dirs,
            "layout": checkpoint.layout(), "dtypes": {n: e["dtype"] for n, e in checkpoint.entries.items()},
            "tp_units": list(checkpoint.manifest.get("tp_sizes", {}).items())}


# ---------------------------------------------------------------- batches

def check_requests(requests: list, cfg: dict, folder: str, max_new_tokens: int) -> list:
    """Every request's image read (PIL) and its prompt's length floor checked against the context, before
    transformers, MindSpore or msrun start (bad input fails in well under a second). Returns the requests with
    their pictures."""
    from .engine.config import image_token_count
    from .prompts import check_length, load_image, prompt_floor
    out = []
    for n, req in enumerate(requests, 1):
        if not isinstance(req, dict) or not isinstance(req.get("image"), str) or not isinstance(req.get("prompt"), str):
            raise fail(f"request {n}: expected {{\"image\": path, \"prompt\": text}}, got {req!r:.80}")
        picture = load_image(req["image"])
        floor = prompt_floor(folder, req["prompt"], image_token_count(cfg))
        if floor is not None:
            check_length(floor, max_new_tokens, cfg, f"request {n}'s prompt", exact=False)
        out.append(dict(req, picture=picture))
    return out


def prepare(requests: list, processor, cfg: dict, max_new_tokens: int, raw: bool = False) -> list:
    """Every request's prompt formatted and tokenized by the processor and its exact length checked, before
    any model is loaded. `requests` come from check_requests (pictures read). Returns [{"image", "prompt",
    "prompt_text", "ids", "pixels", "size"}]."""
    from .prompts import check_length, encode, format_prompt
    out = []
    for n, req in enumerate(requests, 1):
        text = format_prompt(processor, req["prompt"], raw)
        ids, pixels, size = encode(processor, req["picture"], text)
        check_length(len(ids), max_new_tokens, cfg, f"request {n}'s prompt")
        out.append({"image": req["image"], "prompt": req["prompt"], "prompt_text": text, "ids": ids,
                    "pixels": pixels, "size": size})
    return out


def pad_left(rows: list, pad_id: int, limit: int | None = None) -> tuple:
    """Token rows -> (input_ids [B, S] int32, attention_mask [B, S] int8), padded on the left to the longest
    row rounded up to LENGTH_BUCKET (never past `limit`)."""
    longest = max(len(r) for r in rows)
    length = -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET
    if limit is not None:
        length = max(longest, min(length, limit))
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int8)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def run_batch(runner, arrays: dict, job: dict, progress=None) -> dict:
    """One batch on a loaded Runner: {"tokens", "finish", "prefill_s", "decode_s", "decode_tokens"}.
    progress(): called after every prefill layer and decode step."""
    from .model.sampling import chooser
    choose = chooser(bool(job.get("do_sample")), job.get("temperature", 1.0), job.get("top_p", 1.0),
                     job.get("seed"))
    out = runner.generate_batch(arrays["input_ids"], arrays["attention_mask"], arrays["pixel_values"],
                                int(job["max_new_tokens"]), eos=tuple(job.get("eos", ())), choose=choose,
                                pad_id=int(job.get("pad_id", 0)), on_step=progress,
                                image_sizes=arrays.get("image_sizes"))
    out["tokens"] = [[int(t) for t in row] for row in out["tokens"]]
    return out


def batch_job(ctx, job: dict, arrays: dict):
    """Handler of an msrun rank (runtime/rank.py): one batch on this rank's whole model, loaded once."""
    from .model.parallel import rank_runner
    return run_batch(rank_runner(ctx, generating=True), arrays, job, progress=ctx.progress), {}


def _check_options(max_new_tokens, batch_size, dtype, device, do_sample, temperature, top_p, seed):
    from .model.sampling import check_sampling
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise fail(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise fail(f"batch_size must be a positive integer, got {batch_size!r}")
    if dtype not in ("float32", "float16"):
        raise fail(f"dtype must be float32 or float16, got {dtype!r}")
    if device not in ("CPU", "Ascend", "GPU"):
        raise fail(f"device must be CPU, Ascend or GPU, got {device!r}")
    if do_sample:
        check_sampling(temperature, top_p)
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise fail(f"seed must be a non-negative integer, got {seed!r}")


# ---------------------------------------------------------------- the command

def generate(ms_dir: str, requests: list, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             batch_size: int = DEFAULT_BATCH_SIZE, dtype: str = "float32", device: str = "CPU", raw: bool = False,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             eos=None, timeout: float = 600.0, on_batch=None, prefill_matmul: str = "float32") -> dict:
    """Answer `requests` ([{"image": path, "prompt": text}]) with the converted checkpoint in `ms_dir`.

    Greedy unless do_sample (then temperature / top-p, reproducible with `seed`). `eos`: token ids that end
    an answer (default: generation_config.json's). on_batch(outputs, done, total) is called as each batch
    finishes, outputs in input order. `timeout`: seconds the msrun ranks may take per batch (tp > 1).
    `prefill_matmul` "bfloat16": the prompts' matrix products (prefill, vision tower) in bfloat16 with float32
    sums where the CPU has AVX-512 BF16 (model/kernels: bf16_matmul), faster and no longer float32's numbers;
    "float32" (the default) keeps every product in float32. The result's "prefill_matmul" says which ran.
    Returns {"tp", "outputs": [{"image", "prompt", "prompt_text", "token_ids", "text", "finish_reason"}],
    "prefill_s", "decode_tokens_per_s", "matmul" (what batched decode steps multiply with), ...}.
    """
    from .model.kernels import check_prefill_mode
    from .prompts import load_processor, special_ids
    _check_options(max_new_tokens, batch_size, dtype, device, do_sample, temperature, top_p, seed)
    check_prefill_mode(prefill_matmul)
    if not requests:
        raise fail("no requests to answer")
    t_start = time.perf_counter()
    info = open_output(ms_dir)
    cfg, tp = info["cfg"], info["tp"]
    checked = check_requests(requests, cfg, ms_dir, max_new_tokens)
    processor = load_processor(ms_dir)
    default_eos, pad_id = special_ids(ms_dir, processor.tokenizer)
    eos = default_eos if eos is None else tuple(int(e) for e in eos)
    prepared = prepare(checked, processor, cfg, max_new_tokens, raw)
    if do_sample and seed is None:
        seed = int(np.random.SeedSequence().entropy % (1 << 63))  # reported, so the run can be repeated
    from .engine.config import context_limit
    from .model.anyres import stack_images
    limit = context_limit(cfg)[0] - max_new_tokens
    jobs = []
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start:start + batch_size]
        ids, mask = pad_left([p["ids"] for p in chunk], pad_id, limit)
        arrays = {"input_ids": ids, "attention_mask": mask, "pixel_values": stack_images([p["pixels"] for p in chunk])}
        if chunk[0]["size"] is not None:  # LLaVA-NeXT: how many of each row's patches are real
            arrays["image_sizes"] = np.array([p["size"] for p in chunk], dtype=np.int64)
        jobs.append({"handler": f"{__name__}:batch_job", "max_new_tokens": max_new_tokens, "eos": list(eos), "pad_id": pad_id,
                     "do_sample": bool(do_sample), "temperature": float(temperature), "top_p": float(top_p),
                     "seed": None if seed is None else [int(seed), len(jobs)], "arrays": arrays,
                     "start": start, "count": len(chunk)})
    from .model.memory import check_fits  # the largest batch against this host's memory, before any model loads
    memory = check_fits(cfg, info["layout"], tp, [(j["count"], j["arrays"]["input_ids"].shape[1]) for j in jobs],
                        max_new_tokens, dtype, device, info["tp_units"], info["dtypes"])
    decode = processor.tokenizer.decode
    outputs = [None] * len(prepared)
    stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_tokens": 0, "done": 0}

    def finished(index: int, result: dict) -> None:
        job = jobs[index]
        batch = []
        for row, (tokens, finish) in enumerate(zip(result["tokens"], result["finish"])):
            p = prepared[job["start"] + row]
            item = {"image": p["image"], "prompt": p["prompt"], "prompt_text": p["prompt_text"],
                    "token_ids": [int(t) for t in tokens], "finish_reason": finish,
                    "text": decode([int(t) for t in tokens], skip_special_tokens=True).strip()}
            outputs[job["start"] + row] = item
            batch.append(item)
        stats["prefill_s"] += float(result["prefill_s"])
        stats["decode_s"] += float(result["decode_s"])
        stats["decode_tokens"] += int(result["decode_tokens"])
        stats["done"] += len(batch)
        if on_batch is not None:
            on_batch(batch, stats["done"], len(prepared), dict(stats))

    run_info = {}
    if tp == 1:
        from .model import Runner, build_and_load
        from .model.kernels import prefill_matmul as matmul_mode
        from .model.loading import run_ops_blocking
        run_ops_blocking()
        tensors = info["checkpoint"].arrays()
        try:
            with matmul_mode(prefill_matmul):
                model, _ = build_and_load(cfg, tensors, dtype=dtype, device_target=device, stored=True)
        finally:
            tensors.close()
        runner = Runner(model, jit=False)
        runner.reserve_cache(max(j["count"] for j in jobs),  # the largest batch's cache, touched before any prefill
                             max(j["arrays"]["input_ids"].shape[1] for j in jobs) + max_new_tokens)
        for index, job in enumerate(jobs):
            finished(index, run_batch(runner, job["arrays"], job))
    else:
        from .runtime.msrun import run_jobs
        specs = [{k: v for k, v in job.items() if k not in ("start", "count")} for job in jobs]
        run = run_jobs(info["rank_dirs"], {"cfg": cfg, "layout": info["layout"], "prefill_matmul": prefill_matmul},
                       specs, dtype=dtype, jit=False,
                       device=device, timeout=timeout, on_result=finished)
        run_info = {"attempts": run["attempts"]}
    return dict({
        "tp": tp,
        "outputs": outputs,
        "prefill_s": round(stats["prefill_s"], 3),
        "decode_tokens_per_s": round(stats["decode_tokens"] / stats["decode_s"], 2) if stats["decode_s"] else None,
        "decode_tokens": stats["decode_tokens"],
        "seconds": round(time.perf_counter() - t_start, 2),
        "batch_size": batch_size,
        "batches": len(jobs),
        "max_new_tokens": max_new_tokens,
        "dtype": dtype,
        "device": device,
        "matmul": _matmul_status(dtype, device),
        "prefill_matmul": _prefill_status(prefill_matmul, dtype, device),
        "do_sample": bool(do_sample),
        "seed": seed,
        "ms_dir": os.path.abspath(ms_dir),
        "memory_floor": memory,
    }, **run_info)


def _prefill_status(mode: str, dtype: str, device: str) -> str:
    """What the prompts' matrix products ran on."""
    if mode == "float32":
        return "float32 (MindSpore MatMul)"
    from .model.kernels import bf16_matmul_status, fused_ops_status
    status = bf16_matmul_status(dtype, device)
    if not status.startswith("bf16_matmul"):
        return f"float32, no bfloat16 here: {status}"
    return f"bfloat16: {status}; norms, heads, attention, activations: {fused_ops_status(dtype, device)}"


def _matmul_status(dtype: str, device: str) -> str:
    from .model.kernels import small_matmul_status
    return small_matmul_status(dtype, device)


def format_outputs(outputs: list) -> str:
    """One block per request: image, question, answer."""
    blocks = []
    for o in outputs:
        blocks.append(f"image   : {o['image']}\nquestion: {o['prompt']}\nanswer  : {o['text']}"
                      + ("" if o["finish_reason"] == "stop" else "  [length limit]"))
    return "\n\n".join(blocks)
