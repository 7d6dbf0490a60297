"""The human-readable verify report (`--json` prints the whole result dict instead)."""
from __future__ import annotations

import json

from .proof import SHOWN, describe


def _mark(ok) -> str:
    return "ok" if ok else "FAIL"


def _divergence(modules: list, name: str, rtol: float) -> str:
    m = next(m for m in modules if m["name"] == name)
    detail = f"rel diff {m['rel_diff']:.3g}" if m["rel_diff"] is not None else m.get("note", "")
    return f"{name} ({detail}; tolerance {rtol:g})"


def _weights(w: dict) -> list:
    """The weight proof: one line, and one more per differing tensor (the first few)."""
    cast = f", cast {', '.join(w['casts'])} rounding to nearest even" if w["casts"] else ""
    head = (f"  weights  : {w['tensors']} tensors, every rank ({w['pieces']} source/rank pieces), read back through "
            f"their op's inverse{cast}: ")
    figures = f"({w['bytes'] / 1e9:.2f} GB in {w['seconds']} s, {w['gb_per_s']} GB/s)"
    if w["passed"]:
        return [head + f"bit for bit equal to their source {figures}  ok"]
    lines = [head + f"{len(w['differ'])} differ from their source {figures}  FAIL"]
    lines += [f"    {describe(d)}" for d in w["differ"][:SHOWN]]
    if len(w["differ"]) > SHOWN:
        lines.append(f"    ... and {len(w['differ']) - SHOWN} more (--json lists them all)")
    return lines


def _verdict(result: dict) -> list:
    kind = result.get("kind")
    if kind == "conversion error":
        return ["  verdict  : conversion error: the converted weights differ from their source (above)"]
    if kind == "numeric drift":
        lines = ["  verdict  : numeric drift: every weight is exact, the outputs differ"]
        d = result.get("drift")
        if d:
            lines.append(f"  rerun    : {d['module']} on transformers' input: {d['verdict']} ({d['explanation']})")
        return lines
    return []


def _record(result: dict) -> list:
    lines = []
    mismatch = result.get("manifest_mismatch")
    if mismatch:
        lines.append(f"  files    : {len(mismatch)} differ from the sha256 the manifest lists ({', '.join(mismatch[:4])}"
                     f"{', ...' if len(mismatch) > 4 else ''}): not what convert wrote (llava-ckpt check names them)")
    if result.get("record"):
        return lines + [f"  record   : {result['record']}"]
    if result.get("record_error"):
        return lines + [f"  record   : not written: {result['record_error']}"]
    return lines


def format_report(result: dict) -> str:
    """A few lines: setup, inputs, each check with its figure and verdict, where it first diverges."""
    if result.get("weights_only"):
        return "\n".join([
            f"verify --weights-only: {'PASSED' if result['passed'] else 'FAILED'}  ({result['ms_dir']} vs "
            f"{result['hf_src']})",
            f"  setup    : tp={result['tp']}, fused_qkv={result['fused_qkv']}, stored "
            f"{'/'.join(result['stored_dtypes'])}; no model run"] + _weights(result["weights"]) + _verdict(result)
            + _record(result))
    c = result["checks"]
    rtol = result["thresholds"]["module_rtol"]
    lines = [
        f"verify: {'PASSED' if result['passed'] else 'FAILED'}  ({result['ms_dir']} vs {result['hf_src']})",
        f"  setup    : tp={result['tp']}, fused_qkv={result['fused_qkv']}, compute {result['compute_dtype']}, "
        f"stored {'/'.join(result['stored_dtypes'])}, transformers weights rounded to "
        f"{'/'.join(result['hf_weights_rounded_to']) or 'nothing (float32)'}; streamed layer by layer",
        f"  inputs   : {result['positions']} positions ({result['image_tokens']} image tokens), "
        f"prompt {json.dumps(result['prompt'], ensure_ascii=False)}",
        *_weights(result["weights"]),
        f"  logits   : max |diff| {result['max_abs_diff']:.3g} (max |logit| {result['max_abs_logit']:.3g}, "
        f"tolerance {result['tolerance_abs']:.3g})  {_mark(c['logits'])}",
        f"  cosine   : min {result['cosine_min']:.7f} (>= {result['thresholds']['cosine_min']})  {_mark(c['cosine'])}",
        f"  top-1    : {100 * result['top1_agreement']:.1f}% of positions agree  {_mark(c['top1'])}",
        f"  greedy   : {result['greedy_equal']}/{len(result['tokens_ms'])} tokens equal"
        + ("" if result["greedy_match"] else f", first mismatch at {result['greedy_first_mismatch']}"
           + (f" (margin {result['greedy_mismatch_margin']:.3g})" if result["greedy_mismatch_margin"] is not None
              else "")) + f"  {_mark(c['greedy'])}",
        f"    transformers: {json.dumps(result['text_hf'], ensure_ascii=False)}",
        f"    mindspore   : {json.dumps(result['text_ms'], ensure_ascii=False)}",
    ]
    worst = max((m for m in result["modules"] if m["rel_diff"] is not None), key=lambda m: m["rel_diff"],
                default=None)
    if result["first_divergence"]:
        lines.append(f"  first divergence: {_divergence(result['modules'], result['first_divergence'], rtol)}")
    elif worst is not None:
        lines.append(f"  modules  : all {len(result['modules'])} within {rtol:g} "
                     f"(largest {worst['rel_diff']:.3g} at {worst['name']})")
    if result["replica_mismatch"]:
        lines.append(f"  replicas : ranks disagree on {', '.join(result['replica_mismatch'][:5])}")
    par = result.get("msrun")
    if par:
        lines.append(f"  msrun    : {par['world']} tensor-parallel ranks, each loading only its rank file: max |diff| "
                     f"{par['max_abs_diff']:.3g}, cosine {par['cosine_min']:.7f}, top-1 "
                     f"{100 * par['top1_agreement']:.1f}%, greedy {par['greedy_equal']}/{len(par['tokens'])} "
                     f"tokens equal  {_mark(par['passed'])} ({par['seconds']} s)")
        if par["first_divergence"]:
            lines.append(f"    first divergence under msrun: {_divergence(par['modules'], par['first_divergence'], rtol)}")
    lines += _verdict(result)
    s = result["seconds"]
    lines.append(f"  time     : weight proof {result['weights']['seconds']} s, transformers {s['transformers']} s, "
                 f"mindspore {s['mindspore']} s" + (f", msrun {par['seconds']} s" if par else ""))
    lines += _record(result)
    return "\n".join(lines)
