"""`verify`: the orchestration. Checks the inputs, runs a tp output's ranks under msrun (by default), then
walks both models layer by layer (streamed.py) and turns the comparisons into one JSON-able result.

Same numbers on both sides: when the converted weights are stored narrower than the source (convert
--dtype bfloat16/float16) or the reference model computes in float16, transformers' weights are rounded
through that dtype before it runs. The comparison then measures the conversion and the model, not the
precision the user chose, and the float32 tolerance can stay at rounding level.

bfloat16 compute is the fast walk: every Linear's product in bfloat16 with float32 sums on both sides (the
reference model's bf16_matmul kernel, transformers' nn.Linear through torch's bfloat16 GEMM, hf_side.py), the rest
in float32. It has its own tolerance (compare.TOLERANCES) and the result says which products ran ("matmul").
"""
from __future__ import annotations

import os

from ..errors import fail
from .compare import TOLERANCES, compare_greedy, compare_logits, first_divergence, known_positions
from .converted import open_converted, stored_dtypes
from .inputs import DEFAULT_IMAGE, DEFAULT_PROMPT, SWAPPED, build_inputs, resolve_source
from .record import start_hashing, stop_hashing, write_verification

# How much narrower than float32: stored dtypes above 0 are applied to transformers' weights.
_NARROW = {"bfloat16": 2, "float16": 1, "float32": 0}
# compute dtype -> (the reference model's cells' dtype, the matrix products' mode: model.kernels.PREFILL_MODES)
COMPUTE = {"float32": ("float32", "float32"), "float16": ("float16", "float32"), "bfloat16": ("float32", "bfloat16")}


def verify(hf_src: str, ms_dir: str, image: str | None = None, prompt: str | None = None,
           max_new_tokens: int = 16, dtype: str = "float32", device_target: str = "CPU",
           msrun: bool | None = None, timeout: float = 300.0, weights_only: bool = False,
           progress: bool = False) -> dict:
    """Compare the converted checkpoint in `ms_dir` with the HF checkpoint `hf_src`; returns a JSON-able dict.

    First the weight proof (proof.py): every converted tensor, on every rank, read back through its op's
    inverse and compared bit for bit with its source cast to its stored dtype. `weights_only` stops there (no
    model is built or run). Then the numeric walk: `dtype` is the compute dtype (float32; float16: the
    reference model's activations; bfloat16: every Linear's product on both sides, this module's docstring).
    `msrun`: run a tp output's rank files as real tensor-parallel ranks (default: yes for a tp output; False
    keeps only the reassembled single-process check); the ranks walk their rank files layer by layer as
    this process does (one layer's slices in memory per rank); `timeout` bounds one msrun attempt (seconds).
    Raises CheckpointError for bad input (missing folders, names that do not match the model); a mismatch is
    not an error, it is `passed: False` with its kind ("conversion error": tensors differ from their source;
    "numeric drift": every tensor is exact, the outputs differ) and the first diverging module named.
    """
    if dtype not in TOLERANCES:
        raise fail(f"verify dtype must be one of {', '.join(TOLERANCES)}, got {dtype!r}")
    cells, matmul = COMPUTE[dtype]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise fail(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise fail(f"timeout must be a positive number of seconds, got {timeout!r}")
    hf_src = resolve_source(hf_src)
    from ..engine.config import image_token_count, load_config
    from ..io.hf_folder import read_tensors
    from ..prompts import check_length, load_image, prompt_floor
    from .proof import plan_proof, prove
    # every input checked before transformers or MindSpore start: safetensors only, every header valid,
    # nothing outside the folders, the image readable, the prompt not longer than the context
    read_tensors(hf_src, SWAPPED)
    cfg = load_config(hf_src)
    converted = open_converted(ms_dir)
    tensors, tp = converted["tensors"], converted["tp"]
    _check_same_model(cfg, ms_dir, hf_src, tensors)
    if weights_only:
        try:
            planned = plan_proof(hf_src, converted["checkpoint"], cfg)
            hashing = start_hashing(hf_src, ms_dir)
            try:
                weights = prove(planned, progress)
            except BaseException:
                stop_hashing(hashing)
                raise
        finally:
            if hasattr(tensors, "close"):
                tensors.close()
        result = _weights_result(weights, cfg, tp, tensors, hf_src, ms_dir)
        return write_verification(result, hashing, {"device": None})
    image_path = image or DEFAULT_IMAGE
    picture = load_image(image_path)
    if matmul == "bfloat16":
        _check_bf16_matmul(device_target)
    floor = prompt_floor(hf_src, prompt or DEFAULT_PROMPT, image_token_count(cfg))
    if floor is not None:
        check_length(floor, max_new_tokens, cfg, "the prompt", exact=False)
    try:
        use_msrun = tp > 1 if msrun is None else bool(msrun)
        if use_msrun and tp == 1:  # refused before the slow part
            raise fail(f"{ms_dir} is a tp-1 output: running ranks under msrun needs a --tp output")
        stored = stored_dtypes(tensors)
        # storage rounding first, then the float16 compute cast: the order our side applies them in
        storage = sorted({d for d in stored.values() if _NARROW.get(d, 0) > 0}, key=_NARROW.get, reverse=True)
        narrow = list(storage)
        if dtype == "float16" and narrow[-1:] != ["float16"]:
            narrow.append("float16")
        inputs = build_inputs(hf_src, image_path, prompt, picture)
        ids, pixels, sizes = inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"]
        check_length(ids.shape[1], max_new_tokens, cfg, "the prompt")
        eos = inputs["eos"]
        from .ms_side import MsSide
        from .weights import Arena
        arena = Arena()  # one step's weights, either side's: the two never run a step at the same time
        ms = MsSide(cfg, tensors, dtype=cells, device_target=device_target, arena=arena, matmul=matmul)  # names only
        planned = plan_proof(hf_src, converted["checkpoint"], cfg)
        hashing = start_hashing(hf_src, ms_dir, inputs["image"])  # every file the record names, meanwhile
        try:
            weights = prove(planned, progress)  # before the numeric walk
            ranks = None
            if use_msrun:  # N real ranks, each loading only its own rank file; this process holds no model now
                from .ranks import run_ranks
                ranks = run_ranks(converted["rank_dirs"], cfg, converted["layout"], ids, pixels, dtype=cells,
                                  matmul=matmul, device=device_target, timeout=timeout, trace=True,
                                  max_new_tokens=max_new_tokens, eos=eos, streamed=True, image_sizes=sizes)
            from .hf_side import HfSide
            from .streamed import walk
            tol = TOLERANCES[dtype]
            hf = HfSide(hf_src, cfg, narrow, arena, matmul=matmul)
            try:
                got = walk(hf, ms, cfg, ids, pixels, max_new_tokens, eos, tol["module_rtol"],
                           rank_trace=ranks["trace"] if ranks else None,
                           rank_logits=ranks["logits"][0] if ranks else None, image_sizes=sizes)
                replicas = sorted(getattr(tensors, "replica_mismatch", ()))
                result = _result(got, ranks, cfg, inputs, tol, tp, ms.fused, dtype, stored, narrow, replicas,
                                 hf_src, ms_dir, weights)
                result["matmul"] = _matmul_note(matmul, device_target)
                if result["kind"] == "numeric drift":
                    result["drift"] = _drift(result, got, (hf, ms), hf_src, cfg, tensors, storage, arena,
                                             device_target, ids, pixels, dtype, tol["module_rtol"], sizes)
            finally:
                hf.close()
                ms.close()
        except BaseException:
            stop_hashing(hashing)  # a verify that ends in an error records nothing
            raise
    finally:
        if hasattr(tensors, "close"):
            tensors.close()
    return write_verification(result, hashing, {"device": device_target, "max_new_tokens": max_new_tokens})


def _check_bf16_matmul(device: str) -> None:
    """bfloat16 compute needs the bf16_matmul kernel on this machine (AVX-512 BF16): refused, with why, before
    anything runs, rather than comparing float32 products with transformers' bfloat16 ones."""
    from ..model.kernels import bf16_matmul_status
    status = bf16_matmul_status("float32", device)
    if not status.startswith("bf16_matmul kernel"):
        raise fail(f"verify --dtype bfloat16 needs the bf16_matmul kernel, which cannot run here: "
                   f"{status.split('(', 1)[-1].rstrip(')')}; use --dtype float32")


def _matmul_note(matmul: str, device: str) -> str:
    """What the Linears' products ran on, both sides."""
    if matmul == "float32":
        return "float32 on both sides"
    from ..model.kernels import bf16_matmul_status, fused_ops_status
    return ("bfloat16 products, float32 sums: the reference model's " + bf16_matmul_status("float32", device)
            + " (its float32 norms, heads, attention, activations: " + fused_ops_status("float32", device)
            + "); transformers' nn.Linear through torch's bfloat16 GEMM (its output rounded to bfloat16)")


def _check_same_model(cfg: dict, ms_dir: str, hf_src: str, tensors) -> None:
    """The config.json convert copied beside the weights names the model they are; another family member's
    source (a LLaVA-NeXT output against a llava-1.5 folder) is named as such, before anything is compared."""
    from ..engine.config import model_title, read_config
    if not os.path.isfile(os.path.join(ms_dir, "config.json")):
        return  # a bare checkpoint: its tensor names are checked against the source's model instead
    theirs = read_config(ms_dir)
    text = theirs.get("text_config") if isinstance(theirs.get("text_config"), dict) else {}
    mine = (cfg.get("model_type"), cfg["text_config"].get("model_type"))
    if (theirs.get("model_type"), text.get("model_type", mine[1])) != mine:
        if hasattr(tensors, "close"):
            tensors.close()
        raise fail(f"{ms_dir} holds a conversion of a {theirs.get('model_type')!r} ({text.get('model_type')!r}) "
                   f"checkpoint, {hf_src} is {model_title(cfg)}: verify a conversion against its own source")


def _drift(result, got, walk_sides, hf_src, cfg, tensors, storage, arena, device_target, ids, pixels, dtype,
           rtol, image_sizes=None) -> dict:
    """Every weight is exact and the outputs differ: rerun the module that diverged (the first one, else the one
    furthest over its tolerance) on transformers' input, in the compute dtype and in float64 (drift.py)."""
    from .drift import rerun
    from .hf_side import HfSide
    from .ms_side import MsSide
    single = [ok for name, ok in result["checks"].items() if not name.startswith("msrun_")]
    if all(single):  # only the ranks under msrun differ: this process's cells agree, a rerun here would too
        par = result["msrun"]
        return {"module": par["first_divergence"], "compute_dtype": dtype, "verdict": "tensor-parallel difference",
                "explanation": "the single process agrees with transformers; only the msrun ranks differ (their "
                               "parallel cells or collectives), the weights are exact"}
    modules = [m for m in result["modules"] if m["rel_diff"] is not None]
    if not modules:
        return None
    module = result["first_divergence"] or max(modules, key=lambda m: m["rel_diff"])["name"]
    walk_rel = next(m["rel_diff"] for m in result["modules"] if m["name"] == module)
    hf64 = HfSide(hf_src, cfg, storage, arena, compute="float64")
    ms64 = MsSide(cfg, tensors, dtype="float64", device_target=device_target, arena=arena)
    try:
        return rerun(module, walk_sides, (hf64, ms64), cfg, got["hf_outputs"], ids, pixels, walk_rel, dtype, rtol,
                     image_sizes)
    finally:
        hf64.close()
        ms64.close()


def _kind(weights: dict, numerics_ok: bool):
    """What a mismatch is: the weights themselves differ from their source, or every weight is exact and the
    numbers differ (the model or its kernels)."""
    if not weights["passed"]:
        return "conversion error"
    return None if numerics_ok else "numeric drift"


def _weights_result(weights: dict, cfg: dict, tp: int, tensors, hf_src: str, ms_dir: str) -> dict:
    """verify --weights-only: the proof alone (no MindSpore, no transformers model)."""
    from ..engine.mapping import detect_options, table_for
    return {"passed": weights["passed"], "weights_only": True, "kind": _kind(weights, True),
            "checks": {"weights": weights["passed"]}, "weights": weights, "tp": tp,
            "fused_qkv": detect_options(table_for(cfg), tensors.keys()).get("fuse_qkv", False),
            "stored_dtypes": sorted(set(stored_dtypes(tensors).values())),
            "hf_src": os.path.abspath(hf_src), "ms_dir": os.path.abspath(ms_dir)}


def _result(got, ranks, cfg, inputs, tol, tp, fused, dtype, stored, narrow, replicas, hf_src, ms_dir,
            weights) -> dict:
    result = compare_logits(got["hf_logits"], got["ms_logits"], tol)
    greedy = compare_greedy(got["tokens_hf"], got["hf_step_logits"], got["tokens_ms"], result["tolerance_abs"])
    modules = got["modules"]
    first = first_divergence(modules)
    checks = {"weights": weights["passed"], "logits": result.pop("logits_ok"), "cosine": result.pop("cosine_ok"),
              "top1": result.pop("top1_ok"), "greedy": greedy.pop("greedy_ok"), "modules": first is None,
              "replicas": not replicas}
    parallel = None
    if ranks is not None:
        parallel = _ranks_result(got, ranks, tol)
        checks["msrun_logits"] = parallel["logits_ok"]
        checks["msrun_greedy"] = parallel["greedy_ok"]
        checks["msrun_modules"] = parallel["first_divergence"] is None
    ids, decode = inputs["input_ids"], inputs["decode"]
    result.update(greedy)
    numerics_ok = all(ok for name, ok in checks.items() if name != "weights")
    result.update({
        "passed": all(checks.values()),
        "kind": _kind(weights, numerics_ok),
        "checks": checks,
        "weights": weights,
        "first_divergence": first,
        "modules": modules,
        "tp": tp,
        "msrun": parallel,
        "fused_qkv": fused,
        "compute_dtype": dtype,
        "stored_dtypes": sorted(set(stored.values())),
        "hf_weights_rounded_to": narrow,
        "replica_mismatch": replicas,
        "drift": None,
        "thresholds": dict(tol),
        "positions": int(ids.shape[1]),
        "image_tokens": int((ids == cfg["image_token_index"]).sum()),
        "prompt": inputs["text"],
        "image": inputs["image"],
        "text_hf": decode(got["tokens_hf"]),
        "text_ms": decode(got["tokens_ms"]),
        "hf_src": os.path.abspath(hf_src),
        "ms_dir": os.path.abspath(ms_dir),
        "seconds": got["seconds"],
    })
    return result


def _ranks_result(got, ranks, tol) -> dict:
    """The msrun ranks against transformers: logits, greedy tokens and the first diverging module."""
    par = compare_logits(got["hf_logits"], ranks["logits"][0], tol)
    tokens = known_positions(ranks.get("tokens", []), got["tokens_hf"], got["tokens_ms"])
    greedy = compare_greedy(got["tokens_hf"], got["hf_step_logits"], tokens, par["tolerance_abs"])
    par["logits_ok"] = par.pop("logits_ok") and par.pop("cosine_ok") and par.pop("top1_ok")
    modules = got["rank_modules"]
    first = first_divergence(modules)
    par.update(world=ranks["world"], seconds=round(ranks["seconds"], 2), attempts=ranks["attempts"],
               greedy_match=greedy["greedy_match"], greedy_ok=greedy["greedy_ok"],
               greedy_first_mismatch=greedy["greedy_first_mismatch"], greedy_equal=greedy["greedy_equal"],
               tokens=greedy["tokens_ms"], first_divergence=first, modules=modules)
    par["passed"] = bool(par["logits_ok"] and greedy["greedy_ok"] and first is None)
    return par
