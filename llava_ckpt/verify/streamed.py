"""The layer-streamed walk: both sides run module by module on the same image and prompt, each module's
weights read just before it runs and freed right after, so memory holds one module's weights at a time
(plus the KV caches and activations), whatever the depth.

Each side feeds its own outputs forward (end to end, as the whole models would), and every module's output
is compared as soon as both sides have it: the first one over the tolerance names where a conversion
breaks. Greedy decoding keeps per-layer KV caches on both sides and walks the layers again for every new
token (the weights come back from the page cache where it can hold them).
"""
from __future__ import annotations

import ctypes
import os
import sys
import time

import numpy as np

from .compare import compare_module
from .hf_side import to_numpy


class _Clock:
    """Seconds spent on each side (reading weights included). With LLAVA_CKPT_VERIFY_LOG=1 every step is
    also logged to stderr with its time and the process's RSS (how the benchmark's figures were found)."""

    def __init__(self):
        self.seconds = {"transformers": 0.0, "mindspore": 0.0}
        self.log = os.environ.get("LLAVA_CKPT_VERIFY_LOG") == "1"

    def run(self, side: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        _trim_heap()
        took = time.perf_counter() - t
        self.seconds[side] += took
        if self.log:
            import psutil
            what = getattr(fn, "__name__", "step") + "".join(f" {a}" for a in args if isinstance(a, int))
            print(f"[verify] {side:12s} {what:28s} {took:7.2f} s  rss {psutil.Process().memory_info().rss >> 20} MiB",
                  file=sys.stderr, flush=True)
        return out


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS after each step: the weights of one step are freed, but
    glibc keeps fragmented heap pages, and without this the peak crept up ~20 MB per layer (measured)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to trim
            _LIBC = False
            return
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def walk(hf, ms, cfg: dict, input_ids, pixel_values, max_new_tokens: int, eos=(), rtol: float = 1e-3,
         rank_trace: list | None = None, names: list | None = None) -> dict:
    """Prefill logits of both sides, per-module comparisons (also against `rank_trace`, the msrun ranks'
    intermediates in `names` order, if given) and greedy tokens of both sides."""
    from ..model.llava import trace_names
    names = names or trace_names(cfg)
    clock = _Clock()
    modules, rank_modules = [], []

    def check(name, theirs, mine):
        theirs = to_numpy(theirs)
        modules.append(compare_module(name, theirs, mine.asnumpy().astype(np.float32), rtol))
        if rank_trace is not None:
            k = names.index(name)
            rank_modules.append(compare_module(name, theirs, None if k >= len(rank_trace) else
                                               np.asarray(rank_trace[k], dtype=np.float32), rtol))

    # vision tower, projector, merge
    h_emb = clock.run("transformers", hf.vision_embeddings, pixel_values)
    m_emb, m_x = clock.run("mindspore", ms.vision_embeddings, pixel_values)
    check("vision_encoder.embeddings", h_emb, m_emb)
    h_x = clock.run("transformers", hf.ln_pre, h_emb)
    check("vision_encoder.ln_pre", h_x, m_x)
    del h_emb, m_emb
    from ..model.vision import layers_run
    for i in range(layers_run(cfg)):
        h_x = clock.run("transformers", hf.vision_block, i, h_x)
        m_x = clock.run("mindspore", ms.vision_block, i, m_x)
        check(f"vision_encoder.transformer.resblocks.{i}", h_x, m_x)
    h_img = clock.run("transformers", hf.projector, h_x)
    m_img = clock.run("mindspore", ms.adapter, m_x)
    check("adapter", h_img, m_img)
    h_x = clock.run("transformers", hf.merge, input_ids, h_img)
    m_x = clock.run("mindspore", ms.merge, input_ids, m_img)
    check("language_model.model.tok_embeddings", h_x, m_x)
    del h_img, m_img

    # decoder prefill
    s = int(np.asarray(input_ids).shape[1])
    total = s + max_new_tokens
    ctx = clock.run("transformers", hf.begin, h_x, 0)
    cos, sin = ms.rope(np.arange(s))
    keep = ms.Tensor(np.tril(np.ones((s, s), dtype=bool)))
    k_prompt, v_prompt = [], []
    for i in range(cfg["text_config"]["num_hidden_layers"]):
        h_x = clock.run("transformers", hf.decoder_layer, i, h_x, ctx)
        m_x, k, v = clock.run("mindspore", ms.decoder_prefill, i, m_x, cos, sin, keep)
        k_prompt.append(k.asnumpy())
        v_prompt.append(v.asnumpy())
        del k, v
        check(f"language_model.model.layers.{i}", h_x, m_x)
    h_norm = clock.run("transformers", hf.norm, h_x)
    m_norm, m_logits = clock.run("mindspore", ms.norm_and_logits, m_x)
    check("language_model.model.norm_out", h_norm, m_norm)
    h_logits = to_numpy(clock.run("transformers", hf.lm_head, h_norm))[0]
    m_logits = m_logits.asnumpy()[0]
    del h_x, m_x, h_norm, m_norm, ctx

    # greedy decoding, both sides free-running on their own tokens
    hf_tokens, hf_steps = [int(np.argmax(h_logits[-1]))], [h_logits[-1].copy()]
    ms_tokens = [int(np.argmax(m_logits[-1]))]
    from ..model.llama import KVCache
    cache = KVCache(k_prompt, v_prompt, total)
    del k_prompt, v_prompt
    slots = np.arange(total)

    def going(tokens):
        return len(tokens) < max_new_tokens and tokens[-1] not in eos

    while going(hf_tokens) or going(ms_tokens):
        run_hf, run_ms = going(hf_tokens), going(ms_tokens)
        if run_hf:
            h_x = clock.run("transformers", hf.token_embeddings, hf_tokens[-1])
            ctx = clock.run("transformers", hf.begin, h_x, s + len(hf_tokens) - 1)
        if run_ms:
            pos = s + len(ms_tokens) - 1
            m_x = clock.run("mindspore", ms.token_embeddings, ms_tokens[-1])
            cos, sin = ms.rope([pos])
            keep = ms.Tensor(np.append(slots < pos, True)[None, None, None])  # the cache's past, then pos
        for i in range(cfg["text_config"]["num_hidden_layers"]):
            if run_hf:
                h_x = clock.run("transformers", hf.decoder_layer, i, h_x, ctx)
            if run_ms:
                m_x, k, v = clock.run("mindspore", ms.decoder_step, i, m_x, cos, sin, keep, *cache.layer(i))
                cache.write(i, pos, k, v)
        if run_hf:
            step = to_numpy(clock.run("transformers", lambda x: hf.lm_head(hf.norm(x)), h_x))[0, -1]
            hf_tokens.append(int(np.argmax(step)))
            hf_steps.append(step)
        if run_ms:
            _, logits = clock.run("mindspore", ms.norm_and_logits, m_x)
            ms_tokens.append(int(np.argmax(logits.asnumpy()[0, -1])))
    return {"hf_logits": h_logits, "ms_logits": m_logits, "modules": modules,
            "rank_modules": rank_modules if rank_trace is not None else None,
            "tokens_hf": hf_tokens, "hf_step_logits": np.stack(hf_steps), "tokens_ms": ms_tokens,
            "seconds": {k: round(v, 2) for k, v in clock.seconds.items()}}

