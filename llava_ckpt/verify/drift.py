"""Numeric drift: every weight is exact (the proof passed), yet a module's output differs from transformers'. Is
it the precision of the kernels, or do the two modules compute something different?

The module that diverged runs again on both sides on one and the same input (transformers' input to it, kept by
the walk), so nothing upstream is in the figure: once as the walk ran it (its compute dtype) and once in float64,
with the same weights (the stored values, exactly). transformers' own modules keep float32 where they force it
(RMSNorm statistics, attention softmax), and so does the reference model, so float64 takes every other rounding
away. A difference of rounding then shrinks by orders of magnitude; a difference of the model (another
activation, another epsilon, a term too many or too few) stays about as large as it was.

Measured on the tiny fixture, a correct conversion, each module on transformers' input: float32 1e-7 - 5e-7
relative; float64 below 1e-12 for the modules without softmax or RMSNorm, 5e-8 - 3e-7 for those with them (the
float32 stages both sides keep). A divergence is over the tolerance (1e-3 in float32), so a shrink by SHRINK
is far above that floor.
"""
from __future__ import annotations

import numpy as np

from .compare import compare_module
from .streamed import HEAD, module_names

SHRINK = 10  # float64 at least this much closer than the compute dtype: the difference was rounding


def _previous(cfg: dict, name: str) -> str | None:
    """The module whose output is `name`'s input (None: the pixels)."""
    names = module_names(cfg)
    i = names.index(name)
    if name == HEAD:
        return names[i - 2]  # the rerun of lm_head takes the last decoder layer's output: norm_out and head
    return names[i - 1] if i else None


def _run(hf, ms, name: str, x, input_ids, pixel_values, dtype, image_sizes=None):
    """(transformers' output, the reference model's output) of module `name` on input `x` (numpy), both as
    float64 numpy arrays; both sides compute in `dtype` (numpy)."""
    import torch

    def theirs(t):
        return t.detach().to(torch.float64).numpy()

    def mine(t):
        return t.asnumpy().astype(np.float64)

    inp = None if x is None else np.asarray(x, dtype=dtype)
    t_in = None if inp is None else torch.from_numpy(np.ascontiguousarray(inp))
    m_in = None if inp is None else ms.Tensor(inp.astype(ms.target))
    if name == "vision_encoder.embeddings":
        return (theirs(hf.vision_embeddings(pixel_values, image_sizes)),
                mine(ms.vision_embeddings(pixel_values, image_sizes)[0]))
    if name == "vision_encoder.ln_pre":
        return theirs(hf.ln_pre(t_in)), mine(ms.ln_pre(m_in))
    if name.startswith("vision_encoder.transformer.resblocks."):
        i = int(name.rsplit(".", 1)[1])
        return theirs(hf.vision_block(i, t_in)), mine(ms.vision_block(i, m_in))
    if name == "adapter":
        return theirs(hf.projector(t_in)), mine(ms.adapter(m_in))
    if name == "image_packing":
        return theirs(hf.pack(t_in, image_sizes)), mine(ms.pack(m_in, image_sizes))
    if name == "language_model.model.tok_embeddings":
        return theirs(hf.merge(input_ids, t_in)), mine(ms.merge(input_ids, m_in))
    if name.startswith("language_model.model.layers."):
        from ..model.llama import causal_bias
        i = int(name.rsplit(".", 1)[1])
        ctx = hf.begin(t_in)
        out = theirs(hf.decoder_layer(i, t_in, ctx))
        cos, sin = (ms.Tensor(p[0].detach().numpy().astype(ms.target)) for p in ctx["position_embeddings"])
        s = inp.shape[1]
        causal = ms.Tensor(causal_bias(s))
        return out, mine(ms.decoder_prefill(i, m_in, cos, sin, causal)[0])
    if name == "language_model.model.norm_out":
        return theirs(hf.norm(t_in)), mine(ms.norm_and_logits(m_in)[0])
    if name == HEAD:
        return theirs(hf.lm_head(hf.norm(t_in))), mine(ms.norm_and_logits(m_in)[1])
    raise ValueError(f"no rerun for module {name!r}")


def rerun(name: str, walk_sides: tuple, wide_sides: tuple, cfg: dict, hf_outputs: dict, input_ids, pixel_values,
          walk_rel: float | None, compute: str, rtol: float, image_sizes=None) -> dict:
    """Module `name` again on transformers' input to it: with the walk's own sides (`walk_sides`: HfSide, MsSide
    in the compute dtype) and with float64 ones (`wide_sides`). Returns the figures and the verdict."""
    prev = _previous(cfg, name)
    x = None if prev is None else hf_outputs[prev]
    s = int(np.asarray(input_ids).shape[1])

    def rel(pair):
        theirs, mine = pair
        if mine.ndim == 3 and name.startswith("language_model."):
            theirs, mine = theirs[:, :s], mine[:, :s]
        return compare_module(name, theirs, mine, rtol)["rel_diff"]

    # the walk's transformers side computes in float32 for either compute dtype (its weights rounded to float16
    # for a float16 run); the reference model's side casts its input to its own compute dtype
    same_input = rel(_run(*walk_sides, name, x, input_ids, pixel_values, np.float32, image_sizes))
    wide = rel(_run(*wide_sides, name, x, input_ids, pixel_values, np.float64, image_sizes))
    shrinks = same_input is not None and wide is not None and (same_input <= rtol or wide * SHRINK <= same_input)
    if same_input is not None and same_input <= rtol:
        why = (f"on transformers' own input it agrees within the tolerance ({same_input:.3g}): the difference is "
               "rounding that built up in the modules before it")
    elif shrinks:
        why = f"in float64 the difference shrinks from {same_input:.3g} to {wide:.3g}: the kernels' rounding"
    else:
        why = (f"in float64 the difference stays ({same_input:.3g} -> {wide:.3g}): the two modules compute "
               "something different")
    return {"module": name, "compute_dtype": compute, "rel_diff_walk": walk_rel, "rel_diff_same_input": same_input,
            "rel_diff_float64": wide, "verdict": "kernel precision" if shrinks else "model difference",
            "explanation": why}
