"""verify under msrun: the prompt job its ranks run (runtime/msrun.py launches them), and its handlers.

`run_ranks` sends one prompt to a tp output's ranks. With `streamed` (what verify sends) each rank walks its own
rank file layer by layer like verify's own walk (streamed.rank_walk: one layer's slices in memory at a time);
otherwise it runs the whole rank model (model.parallel.rank_runner: loaded and compiled once), the path generate
takes. Rank 0's logits, module outputs and greedy tokens come back.
"""
from __future__ import annotations

import numpy as np

from ..errors import fail


def run_ranks(rank_dirs: list, cfg: dict, layout: dict, input_ids, pixel_values, dtype: str = "float32",
              jit: bool = True, device: str = "CPU", timeout: float = 300.0, retries: int = 1, trace: bool = False,
              max_new_tokens: int = 0, eos=(), streamed: bool = False, image_sizes=None,
              matmul: str = "float32") -> dict:
    """One prompt batch on the ranks under msrun: {"logits" (rank 0's full-vocab prompt logits [B, S, V]
    float32), "trace" (list of arrays in model.trace_names(cfg) order, if trace), "tokens" (greedy new tokens of
    a batch-1 prompt, stopping after an eos token, if max_new_tokens > 0), "world", "seconds", "attempts"}.

    `cfg` is the normalized LLaVA config, `layout` the split layout (engine.records.split_layout of the output's
    manifest). jit=True compiles each rank's forward (graph mode, AllReduce/AllGather inside the graph);
    jit=False runs PyNative; `streamed` walks layer by layer, eagerly (`jit` does not apply). `matmul`: the
    ranks' prefill products (model.kernels.prefill_matmul's modes)."""
    from ..runtime.msrun import run_jobs
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise fail(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if max_new_tokens and ids.shape[0] != 1:
        raise fail("greedy tokens are for one prompt at a time (generate runs batches)")
    job = {"handler": f"{__name__}:{'streamed_forward' if streamed else 'model_forward'}", "trace": bool(trace),
           "max_new_tokens": int(max_new_tokens), "eos": [int(e) for e in eos],
           "arrays": {"input_ids": ids.astype(np.int32), "pixel_values": np.asarray(pixel_values, np.float32)}}
    if image_sizes is not None:  # LLaVA-NeXT's
        job["arrays"]["image_sizes"] = np.asarray(image_sizes, dtype=np.int64)
    context = {"cfg": cfg, "layout": layout, "prefill_matmul": matmul}
    run = run_jobs(rank_dirs, context, [job], dtype=dtype, jit=jit, device=device, timeout=timeout, retries=retries)
    r = run["results"][0]
    out = {"logits": r["logits"], "world": run["world"], "seconds": run["seconds"], "attempts": run["attempts"]}
    if trace:
        out["trace"] = [r[k] for k in sorted(k for k in r if k.startswith("trace_"))]
    if max_new_tokens > 0:
        out["tokens"] = list(r["tokens"])
    return out


def model_forward(ctx, job: dict, arrays: dict):
    """Handler: the prompt on this rank's whole model (compiled once), optionally every intermediate and greedy
    tokens."""
    from ..model.parallel import rank_runner
    runner = rank_runner(ctx)
    ids, pixels = arrays["input_ids"], arrays["pixel_values"]
    sizes = arrays.get("image_sizes")
    fwd = runner.forward(ids, pixels, trace=bool(job.get("trace")), image_sizes=sizes)
    out = {"logits": np.asarray(fwd["logits"], dtype=np.float32)}
    for i, t in enumerate(fwd.get("trace", [])):
        out[f"trace_{i:04d}"] = np.asarray(t, dtype=np.float32)
    meta = {}
    if int(job.get("max_new_tokens", 0)) > 0:
        gen = runner.generate(ids, pixels, int(job["max_new_tokens"]), eos=tuple(job.get("eos", ())), first=fwd,
                              image_sizes=sizes)
        meta["tokens"] = [int(t) for t in gen["tokens"]]
    return meta, out


def streamed_forward(ctx, job: dict, arrays: dict):
    """Handler: the prompt layer by layer on this rank's slices (streamed.rank_walk), then greedy decoding."""
    from ..io import load_tensors
    from .ms_side import MsSide
    from .streamed import rank_walk
    cfg = ctx.context["cfg"]
    tensors = load_tensors(ctx.rank_dir)
    ms = MsSide(cfg, tensors, dtype=ctx.dtype, device_target=ctx.device, rank=ctx.rank, world=ctx.world,
                layout=ctx.context["layout"], matmul=ctx.context.get("prefill_matmul", "float32"))
    new_tokens = int(job.get("max_new_tokens", 0))
    try:
        got = rank_walk(ms, cfg, arrays["input_ids"], arrays["pixel_values"], new_tokens,
                        eos=tuple(job.get("eos", ())), trace=bool(job.get("trace")) and ctx.rank == 0,
                        image_sizes=arrays.get("image_sizes"))
    finally:
        ms.close()
        tensors.close()
    out = {"logits": np.asarray(got["logits"], dtype=np.float32)}
    out.update({f"trace_{i:04d}": t for i, t in enumerate(got["trace"])})
    meta = {"tokens": got["tokens"]} if new_tokens > 0 else {}
    return meta, out
