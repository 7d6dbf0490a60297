"""`verify`: run converted weights in the reference MindSpore model and compare with transformers.

Both sides get the same inputs (the source's own processor: tokenizer, chat template, image processor).
What is compared: the logits at every prompt position, every intermediate module output (to name the
first one that diverges), and K greedy tokens. transformers runs first and is freed before the MindSpore
model is built, so the two models are never in memory together.

Same numbers on both sides: when the converted weights are stored narrower than the source (convert
--dtype bfloat16/float16) or the reference model computes in float16, transformers' weights are rounded
through that dtype before it runs. The comparison then measures the conversion and the model, not the
precision the user chose, and the float32 tolerance can stay at rounding level.

The bundled image (assets/default_image.png, a house, a tree and the sun) was drawn with pillow.
"""
from __future__ import annotations

import gc
import json
import os
import re
import time
from collections.abc import Mapping

import numpy as np

from .errors import fail

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_IMAGE = os.path.join(ASSETS, "default_image.png")
DEFAULT_PROMPT = "Describe this image in one sentence."

# Tolerances by the reference model's compute dtype. Differences are measured relative to the largest
# |value| on the transformers side (logits: max |logit| over all positions), so they do not depend on
# the checkpoint's logit scale.
TOLERANCES = {
    # float32 on both sides on identical weights: only summation order differs. Measured on the tiny
    # fixture: below 1e-6 relative for logits and every module. 1e-3 leaves a wide margin for 32-layer 7B
    # models and CPU/Ascend kernel differences, while any mapping mistake (swapped, transposed or
    # misplaced tensor) moves logits by 10-100% of their scale.
    "float32": {"logits_rtol": 1e-3, "cosine_min": 0.99999, "module_rtol": 1e-3},
    # float16 activations (weights identical, rounded the same way on both sides): every matmul output
    # is rounded to 11 bits, ~5e-4 relative, and that compounds through the layers. Measured on the
    # tiny fixture: ~1.5e-3 relative. 3e-2 / 0.999 stays below the injected mapping errors in
    # tests/test_verify.py: relative logit errors 0.18-1.1, cosine <= 0.98; the subtlest (vision q and k
    # swapped) shows 0.09 at its own module, 3x the module tolerance.
    "float16": {"logits_rtol": 3e-2, "cosine_min": 0.999, "module_rtol": 3e-2},
}
# How much narrower than float32: stored dtypes above 0 are applied to transformers' weights.
_NARROW = {"bfloat16": 2, "float16": 1, "float32": 0}
_CODES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def verify(hf_src: str, ms_dir: str, image: str | None = None, prompt: str | None = None,
           max_new_tokens: int = 16, dtype: str = "float32", device_target: str = "CPU",
           jit: bool = True, msrun: bool = False) -> dict:
    """Compare the converted checkpoint in `ms_dir` with the HF checkpoint `hf_src`; returns a JSON-able dict.

    `dtype` is the reference model's compute dtype (float32 or float16). Raises CheckpointError for bad
    input (missing folders, names that do not match the model); a numerical mismatch is not an error, it
    is `passed: False` with the first diverging module named.
    """
    if dtype not in TOLERANCES:
        raise fail(f"verify dtype must be one of {', '.join(TOLERANCES)}, got {dtype!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise fail(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    hf_src = _resolve_source(hf_src)
    from .config import load_config
    from .hf_source import read_tensors
    cfg = load_config(hf_src)
    read_tensors(hf_src)  # safetensors only, every header valid, nothing outside the folder: before torch reads it
    tensors, tp = open_converted(ms_dir)
    if msrun:
        from .tp_run import rank_count
        rank_count(ms_dir)  # a tp-1 folder is refused before the slow part
    stored = stored_dtypes(tensors)
    # storage rounding first, then the float16 compute cast: the order our side applies them in
    narrow = sorted({d for d in stored.values() if _NARROW.get(d, 0) > 0}, key=_NARROW.get, reverse=True)
    if dtype == "float16" and narrow[-1:] != ["float16"]:
        narrow.append("float16")
    inputs = build_inputs(hf_src, image, prompt)
    n_vision = _vision_layers_run(cfg)
    t0 = time.perf_counter()
    hf = run_hf(hf_src, inputs, narrow, max_new_tokens, n_vision)
    t_hf = time.perf_counter() - t0
    gc.collect()

    from .model import build_and_load, Runner, trace_names
    t0 = time.perf_counter()
    try:
        model, _ = build_and_load(cfg, tensors, dtype=dtype, device_target=device_target)
    finally:
        for source in getattr(tensors, "ranks", [tensors]):
            if hasattr(source, "close"):
                source.close()
    runner = Runner(model, jit=jit)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    ours = runner.forward(ids, pixels, trace=True)
    gen = runner.generate(ids, pixels, max_new_tokens, eos=hf["eos"], first=ours)
    t_ms = time.perf_counter() - t0

    tol = TOLERANCES[dtype]
    parallel = None
    if msrun:  # the real thing: N ranks under msrun, each loading only its own rank file
        from .tp_run import run_ranks
        par = run_ranks(ms_dir, cfg, ids, pixels, dtype=dtype, jit=jit)
        parallel = compare_logits(hf["logits"][0], par["logits"][0], tol)
        parallel_ok = parallel.pop("logits_ok") and parallel.pop("cosine_ok") and parallel.pop("top1_ok")
        parallel.update(world=par["world"], seconds=round(par["seconds"], 2), attempts=par["attempts"],
                        passed=bool(parallel_ok))
    result = compare_logits(hf["logits"][0], ours["logits"][0], tol)
    modules = compare_modules(trace_names(cfg), hf["trace"], ours["trace"], tol["module_rtol"])
    greedy = compare_greedy(hf["tokens"], hf["step_logits"], gen["tokens"], result["tolerance_abs"])
    first = next((m["name"] for m in modules if not m["ok"]), None)
    replicas = sorted(getattr(tensors, "replica_mismatch", ()))
    checks = {"logits": result.pop("logits_ok"), "cosine": result.pop("cosine_ok"), "top1": result.pop("top1_ok"),
              "greedy": greedy.pop("greedy_ok"), "modules": first is None, "replicas": not replicas}
    if parallel is not None:
        checks["msrun_logits"] = parallel["passed"]
    decode = inputs["decode"]
    result.update(greedy)
    result.update({
        "passed": all(checks.values()),
        "checks": checks,
        "first_divergence": first,
        "modules": modules,
        "tp": tp,
        "msrun": parallel,
        "fused_qkv": model.fused,
        "compute_dtype": dtype,
        "stored_dtypes": sorted(set(stored.values())),
        "hf_weights_rounded_to": narrow,
        "replica_mismatch": replicas,
        "thresholds": dict(tol),
        "positions": int(ids.shape[1]),
        "image_tokens": int((ids == cfg["image_token_index"]).sum()),
        "prompt": inputs["text"],
        "image": inputs["image"],
        "text_hf": decode(hf["tokens"]),
        "text_ms": decode(gen["tokens"]),
        "hf_src": os.path.abspath(hf_src),
        "ms_dir": os.path.abspath(ms_dir),
        "seconds": {"transformers": round(t_hf, 2), "mindspore": round(t_ms, 2)},
    })
    return result


def _resolve_source(hf_src: str) -> str:
    if os.path.isdir(hf_src):
        return hf_src
    from .hub import is_repo_id, download
    if not is_repo_id(hf_src):
        raise fail(f"{hf_src} is neither a checkpoint folder nor a hub repo id")
    return download(hf_src, progress=False)["path"]


def _vision_layers_run(cfg: dict) -> int:
    n, f = cfg["vision_config"]["num_hidden_layers"], cfg["vision_feature_layer"]
    return n + f + 1 if f < 0 else f


# ---------------------------------------------------------------- converted weights (tp 1 or N ranks)

class RankTensors(Mapping):
    """Full tensors reassembled from rank_<r>/ files: split ones concatenated along their split dim,
    replicated ones taken from rank 0 after checking every other rank holds the same values."""

    def __init__(self, ranks: list, split_dims: dict):
        self.ranks, self.split_dims = ranks, split_dims
        self.replica_mismatch = set()

    def __getitem__(self, name):
        parts = [r[name] for r in self.ranks]
        dim = self.split_dims.get(name)
        if dim is None:
            if any(p.shape != parts[0].shape or not np.array_equal(p.view(np.uint8), parts[0].view(np.uint8))
                   for p in parts[1:]):
                self.replica_mismatch.add(name)
            return parts[0]
        return np.concatenate(parts, axis=dim)

    def __iter__(self):
        return iter(self.ranks[0])

    def __len__(self):
        return len(self.ranks[0])

    def dtypes(self) -> dict:
        return stored_dtypes(self.ranks[0])


def open_converted(ms_dir: str):
    """(lazy name -> array mapping, tp degree) for a convert/shard output folder."""
    from .io import load_tensors
    if not os.path.isdir(ms_dir):
        raise fail(f"{ms_dir} is not a folder")
    rank_dirs = sorted((d for d in os.listdir(ms_dir) if re.fullmatch(r"rank_\d+", d)
                        and os.path.isdir(os.path.join(ms_dir, d))), key=lambda d: int(d[5:]))
    if not rank_dirs:
        return load_tensors(ms_dir), 1
    if [int(d[5:]) for d in rank_dirs] != list(range(len(rank_dirs))):
        raise fail(f"{ms_dir}: rank folders are not rank_0..rank_{len(rank_dirs) - 1}: {', '.join(rank_dirs)}")
    from .manifest import read_manifest
    manifest = read_manifest(ms_dir)
    split_dims = {}
    kinds = {"column": 0, "vocab": 0, "row": 1, "replicated": None}
    for entry in manifest.get("tensors", []):
        if "split_dim" in entry:
            split_dims[entry["name"]] = entry["split_dim"]
        elif entry.get("split") in kinds:
            split_dims[entry["name"]] = kinds[entry["split"]]
        else:
            raise fail(f"{ms_dir}/manifest.json: no split kind for {entry.get('name')!r}")
    ranks = [load_tensors(os.path.join(ms_dir, d)) for d in rank_dirs]
    names = set(ranks[0].keys())
    for d, r in zip(rank_dirs[1:], ranks[1:]):
        if set(r.keys()) != names:
            raise fail(f"{ms_dir}: {d} holds different tensor names than rank_0")
    unknown = sorted(names - set(split_dims))
    if unknown:
        raise fail(f"{ms_dir}/manifest.json does not list {', '.join(unknown[:5])}")
    return RankTensors(ranks, split_dims), len(ranks)


def stored_dtypes(tensors) -> dict:
    """name -> dtype name, from file headers when the mapping has them (no tensor data is read)."""
    if hasattr(tensors, "dtypes"):
        return tensors.dtypes()
    infos = getattr(tensors, "infos", None)
    if isinstance(infos, dict):
        return {n: _CODES.get(i.dtype, str(i.dtype)) for n, i in infos.items()}
    return {n: str(np.asarray(v).dtype) for n, v in tensors.items()}


# ---------------------------------------------------------------- inputs and the transformers side

def build_inputs(hf_src: str, image: str | None, prompt: str | None) -> dict:
    """Tokenized prompt and pixels from the checkpoint's own processor (real tokenizer and chat template)."""
    from PIL import Image
    from transformers import AutoProcessor
    path = image or DEFAULT_IMAGE
    try:
        with Image.open(path) as im:
            picture = im.convert("RGB")
    except FileNotFoundError:
        raise fail(f"image {path} does not exist") from None
    except OSError as exc:
        raise fail(f"cannot read image {path}: {exc}") from None
    try:
        processor = AutoProcessor.from_pretrained(hf_src)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot load the processor (tokenizer, image processor) from {hf_src}: {exc}") from None
    question = prompt or DEFAULT_PROMPT
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    else:
        text = f"USER: <image>\n{question} ASSISTANT:"
    batch = processor(images=picture, text=text, return_tensors="np")
    tokenizer = processor.tokenizer
    return {"input_ids": np.asarray(batch["input_ids"]).astype(np.int64),
            "pixel_values": np.asarray(batch["pixel_values"], dtype=np.float32),
            "text": text, "image": os.path.abspath(path),
            "decode": lambda ids: tokenizer.decode(ids, skip_special_tokens=False)}


def run_hf(hf_src: str, inputs: dict, round_to: list, max_new_tokens: int, n_vision: int) -> dict:
    """transformers' logits, intermediates (via hooks, named like ours) and greedy tokens, in float32."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would interleave with our report
    try:
        model = LlavaForConditionalGeneration.from_pretrained(hf_src, dtype=torch.float32, use_safetensors=True,
                                                              attn_implementation="eager").eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    torch_dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    with torch.no_grad():
        for p in model.parameters():
            for name in round_to:
                p.copy_(p.to(torch_dtypes[name]).to(torch.float32))
    captured = {}

    def keep(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            captured[name] = out.detach().to(torch.float32).numpy().copy()
        return hook

    def keep_input(name):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            captured[name] = h.detach().to(torch.float32).numpy().copy()
        return hook

    vt = model.model.vision_tower
    vt = getattr(vt, "vision_model", vt)
    lm = model.model.language_model
    hooks = [vt.embeddings.register_forward_hook(keep("vision_encoder.embeddings")),
             vt.pre_layrnorm.register_forward_hook(keep("vision_encoder.ln_pre")),
             model.model.multi_modal_projector.register_forward_hook(keep("adapter")),
             lm.layers[0].register_forward_pre_hook(keep_input("language_model.model.tok_embeddings"),
                                                    with_kwargs=True),
             lm.norm.register_forward_hook(keep("language_model.model.norm_out"))]
    hooks += [vt.encoder.layers[i].register_forward_hook(keep(f"vision_encoder.transformer.resblocks.{i}"))
              for i in range(n_vision)]
    hooks += [layer.register_forward_hook(keep(f"language_model.model.layers.{i}"))
              for i, layer in enumerate(lm.layers)]
    ids = torch.from_numpy(inputs["input_ids"])
    pixels = torch.from_numpy(inputs["pixel_values"])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits.to(torch.float32).numpy()
    for h in hooks:
        h.remove()
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = model.generation_config.pad_token_id
    # a fresh config: plain greedy, whatever sampling or penalties the checkpoint's generation_config sets
    plain = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=eos or None, pad_token_id=pad if pad is not None else (eos or [0])[0],
                             output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, generation_config=plain)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    step_logits = np.stack([s[0].to(torch.float32).numpy() for s in out.logits])
    del model, out
    return {"logits": logits, "trace": captured, "tokens": tokens, "step_logits": step_logits, "eos": tuple(eos)}


# ---------------------------------------------------------------- comparisons

def compare_logits(hf: np.ndarray, ours: np.ndarray, tol: dict) -> dict:
    """hf, ours: [positions, vocab]. Top-1 disagreements are acceptable only at near-ties: where the
    transformers margin between its choice and ours is within twice the tolerance (rounding can flip it)."""
    hf, ours = hf.astype(np.float64), ours.astype(np.float64)
    scale = max(float(np.abs(hf).max()), 1e-6)
    diff = float(np.abs(ours - hf).max())
    cos = (hf * ours).sum(-1) / np.maximum(np.linalg.norm(hf, axis=-1) * np.linalg.norm(ours, axis=-1), 1e-30)
    top_hf, top_ours = hf.argmax(-1), ours.argmax(-1)
    rows = np.arange(hf.shape[0])
    margins = hf[rows, top_hf] - hf[rows, top_ours]
    abs_tol = tol["logits_rtol"] * scale
    return {
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "rel_diff": diff / scale,
        "tolerance_abs": abs_tol,
        "cosine_min": float(cos.min()),
        "top1_agreement": float((top_hf == top_ours).mean()),
        "logits_ok": bool(diff <= abs_tol) and bool(np.isfinite(ours).all()),
        "cosine_ok": bool(cos.min() >= tol["cosine_min"]),
        "top1_ok": bool((margins <= 2 * abs_tol).all()),
    }


def compare_modules(names: list, hf: dict, ours: list, rtol: float) -> list:
    """Per-module relative difference, in execution order; the first one over `rtol` is where it breaks."""
    out = []
    for name, mine in zip(names, ours):
        theirs = hf.get(name)
        if theirs is None or theirs.shape != mine.shape:
            shape = None if theirs is None else list(theirs.shape)
            out.append({"name": name, "rel_diff": None, "ok": False,
                        "note": f"shape {list(mine.shape)} vs transformers {shape}"})
            continue
        scale = max(float(np.abs(theirs).max()), 1e-6)
        rel = float(np.abs(mine.astype(np.float64) - theirs).max()) / scale
        out.append({"name": name, "rel_diff": rel, "ok": bool(rel <= rtol) and bool(np.isfinite(mine).all())})
    return out


def compare_greedy(hf_tokens: list, hf_steps: np.ndarray, ours: list, abs_tol: float) -> dict:
    """Token-by-token. A first mismatch is accepted only where transformers' own margin between the two
    candidates is within twice the logit tolerance: a near-tie that rounding may legitimately flip."""
    n = min(len(hf_tokens), len(ours))
    first = next((i for i in range(n) if hf_tokens[i] != ours[i]), None)
    if first is None and len(hf_tokens) != len(ours):
        first = n
    ok, margin = first is None, None
    if first is not None and first < len(hf_steps) and first < len(ours):
        margin = float(hf_steps[first][hf_tokens[first]] - hf_steps[first][ours[first]])
        ok = margin <= 2 * abs_tol
    return {"greedy_match": first is None, "greedy_ok": ok, "greedy_first_mismatch": first,
            "greedy_mismatch_margin": margin, "tokens_hf": list(hf_tokens), "tokens_ms": list(ours),
            "greedy_equal": sum(1 for a, b in zip(hf_tokens, ours) if a == b) if first is None else first}


# ---------------------------------------------------------------- report

def format_report(result: dict) -> str:
    """A few human-readable lines; `--json` prints the whole dict instead."""
    mark = lambda ok: "ok" if ok else "FAIL"  # noqa: E731
    c = result["checks"]
    lines = [
        f"verify: {'PASSED' if result['passed'] else 'FAILED'}  ({result['ms_dir']} vs {result['hf_src']})",
        f"  setup    : tp={result['tp']}, fused_qkv={result['fused_qkv']}, compute {result['compute_dtype']}, "
        f"stored {'/'.join(result['stored_dtypes'])}, transformers weights rounded to "
        f"{'/'.join(result['hf_weights_rounded_to']) or 'nothing (float32)'}",
        f"  inputs   : {result['positions']} positions ({result['image_tokens']} image tokens), "
        f"prompt {json.dumps(result['prompt'], ensure_ascii=False)}",
        f"  logits   : max |diff| {result['max_abs_diff']:.3g} (max |logit| {result['max_abs_logit']:.3g}, "
        f"tolerance {result['tolerance_abs']:.3g})  {mark(c['logits'])}",
        f"  cosine   : min {result['cosine_min']:.7f} (>= {result['thresholds']['cosine_min']})  {mark(c['cosine'])}",
        f"  top-1    : {100 * result['top1_agreement']:.1f}% of positions agree  {mark(c['top1'])}",
        f"  greedy   : {result['greedy_equal']}/{len(result['tokens_hf'])} tokens equal"
        + ("" if result["greedy_match"] else f", first mismatch at {result['greedy_first_mismatch']}"
           + (f" (margin {result['greedy_mismatch_margin']:.3g})" if result["greedy_mismatch_margin"] is not None
              else "")) + f"  {mark(c['greedy'])}",
        f"    transformers: {json.dumps(result['text_hf'], ensure_ascii=False)}",
        f"    mindspore   : {json.dumps(result['text_ms'], ensure_ascii=False)}",
    ]
    worst = max((m for m in result["modules"] if m["rel_diff"] is not None), key=lambda m: m["rel_diff"],
                default=None)
    if result["first_divergence"]:
        m = next(m for m in result["modules"] if m["name"] == result["first_divergence"])
        detail = f"rel diff {m['rel_diff']:.3g}" if m["rel_diff"] is not None else m.get("note", "")
        lines.append(f"  first divergence: {result['first_divergence']} ({detail}; "
                     f"tolerance {result['thresholds']['module_rtol']:g})")
    elif worst is not None:
        lines.append(f"  modules  : all {len(result['modules'])} within {result['thresholds']['module_rtol']:g} "
                     f"(largest {worst['rel_diff']:.3g} at {worst['name']})")
    if result["replica_mismatch"]:
        lines.append(f"  replicas : ranks disagree on {', '.join(result['replica_mismatch'][:5])}")
    par = result.get("msrun")
    if par:
        lines.append(f"  msrun    : {par['world']} tensor-parallel ranks, each loading only its rank file: max |diff| "
                     f"{par['max_abs_diff']:.3g}, cosine {par['cosine_min']:.7f}, top-1 "
                     f"{100 * par['top1_agreement']:.1f}%  {mark(par['passed'])} ({par['seconds']} s)")
    lines.append(f"  time     : transformers {result['seconds']['transformers']} s, "
                 f"mindspore {result['seconds']['mindspore']} s")
    return "\n".join(lines)
