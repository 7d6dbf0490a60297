"""Tolerances and the comparisons: logits, one module's output, greedy tokens.

Differences are measured relative to the largest |value| on the transformers side (logits: max |logit|
over all positions), so they do not depend on the checkpoint's logit scale.
"""
from __future__ import annotations

import numpy as np

TOLERANCES = {
    # float32 on both sides on identical weights: only summation order differs. Measured on the tiny
    # fixture: below 1e-6 relative for logits and every module. 1e-3 leaves a wide margin for 32-layer 7B
    # models and CPU/Ascend kernel differences, while any mapping mistake (swapped, transposed or
    # misplaced tensor) moves logits by 10-100% of their scale.
    "float32": {"logits_rtol": 1e-3, "cosine_min": 0.99999, "module_rtol": 1e-3},
    # float16 activations (weights identical, rounded the same way on both sides): every matmul output
    # is rounded to 11 bits, ~5e-4 relative, and that compounds through the layers. Measured on the
    # tiny fixture: ~1.5e-3 relative. 3e-2 / 0.999 stays below the injected mapping errors in
    # tests/verify/test_verify_run.py: relative logit errors 0.18-1.1, cosine <= 0.98; the subtlest (vision
    # q and k swapped) shows 0.09 at its own module, 3x the module tolerance.
    "float16": {"logits_rtol": 3e-2, "cosine_min": 0.999, "module_rtol": 3e-2},
    # bfloat16 products (verify --dtype bfloat16: every Linear's inputs rounded to 8 bits on both sides, float32
    # sums; transformers' GEMM also rounds its output to bfloat16, the reference kernel does not). Measured: tiny
    # fixture 7.5e-3 relative (logits and the largest module), cosine 0.99996; the full-size 7B 9.7e-3, cosine
    # 0.99994, 8/8 greedy tokens. 3e-2 / 0.999 still fails the injected mapping errors of
    # tests/verify/test_verify_bfloat16.py at their own module: 0.32 (w1/w3), 0.63 (plain qkv fused), and the
    # subtlest, vision q and k swapped, 0.092 (3x the tolerance). What it gives up: smaller model differences
    # pass, e.g. exact GELU for CLIP's QuickGELU (1.2e-2 at its module), which the float32 walk names.
    "bfloat16": {"logits_rtol": 3e-2, "cosine_min": 0.999, "module_rtol": 3e-2},
}


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


def compare_module(name: str, theirs: np.ndarray, mine: np.ndarray, rtol: float) -> dict:
    """One module's output; the first one over `rtol` (in execution order) is where a conversion breaks."""
    if theirs is None or mine is None or theirs.shape != mine.shape:
        shapes = [None if a is None else list(a.shape) for a in (mine, theirs)]
        return {"name": name, "rel_diff": None, "ok": False, "note": f"shape {shapes[0]} vs transformers {shapes[1]}"}
    scale = max(float(np.abs(theirs).max()), 1e-6)
    rel = float(np.abs(mine.astype(np.float64) - theirs).max()) / scale
    return {"name": name, "rel_diff": rel, "ok": bool(rel <= rtol) and bool(np.isfinite(mine).all())}


def first_divergence(modules: list):
    return next((m["name"] for m in modules if not m["ok"]), None)


def compare_greedy(hf_tokens: list, hf_steps, ours: list, abs_tol: float) -> dict:
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


def known_positions(tokens: list, hf_tokens: list, ms_tokens: list) -> list:
    """Another decoding's `tokens` (the msrun ranks') cut to the steps transformers' choices are known for:
    transformers chose after the reference model's prefixes (`ms_tokens`), so after its first choice that
    differs from the reference model's token, its own decoding would follow another prefix, unknown here."""
    if hf_tokens != ms_tokens[:len(hf_tokens)]:
        return list(tokens)[:len(hf_tokens)]
    return list(tokens)
