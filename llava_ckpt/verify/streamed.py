"""The layer-streamed walk: both models run module by module on the same image and prompt, each module's
weights read just before it runs (into the arena, weights.py) and dropped right after, so memory holds one
module's weights at a time (plus the activations and transformers' KV cache), whatever the depth.

Order: transformers first, all of it: every module of the prompt's forward, then greedy decoding with its
own KV cache (DynamicCache), walking the layers again for every new token; each module's output is kept
(float32, one activation per module). Then the reference model, once: the same modules over the prompt
followed by transformers' greedy tokens, in one prefill. Every module's output over the prompt is compared
with transformers' (the first one over the tolerance names where a conversion breaks), and the reference
model's greedy choice at each decoding step is the argmax of its logits after that step's prefix: with a
causal model that is exactly the token its own greedy decoding would pick after the same prefix, so if
every one equals transformers' token, its greedy decoding gives transformers' tokens (and where one
differs, that is its first differing token; nothing after it is generated, it would follow another
prefix). This is why the reference side reads its checkpoint once instead of once per token: on the 7B
both checkpoints (28 GB in float16) do not fit the page cache together, transformers' alone does.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
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
            since = time.time() - psutil.Process().create_time()
            print(f"[verify] {side:12s} {what:28s} {took:7.2f} s  rss {psutil.Process().memory_info().rss >> 20} MiB"
                  f"  at {since:6.1f} s", file=sys.stderr, flush=True)
        return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


TRIM_FREE = 256 << 20  # free heap bytes above which a step's end hands them back


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS after a step, when more than TRIM_FREE lie free in it: the
    weights of one step are freed, but glibc keeps fragmented heap pages, and without any trimming the peak crept
    up ~20 MB per layer (measured). Trimming after every step cost more than the step's matmuls on the
    reference side (the next step faults the pages back in: 1.75 s against 1.24 s for a 7B decoder layer,
    measured), so it waits until there is that much to give back."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to trim
            _LIBC = False
            return
        if hasattr(_LIBC, "mallinfo2"):
            _LIBC.mallinfo2.restype = _MallInfo2
    if _LIBC:
        if not hasattr(_LIBC, "mallinfo2") or _LIBC.mallinfo2().fordblks > TRIM_FREE:
            _LIBC.malloc_trim(0)


_LIBC = None


@contextlib.contextmanager
def _gc_frozen():
    """The objects alive when a walk starts (torch's, transformers', MindSpore's: hundreds of thousands) kept out
    of the collections the walk's steps set off: each step builds cells and modules, and every full collection
    scanned all of them (3% of a 7B reference walk's samples in gc_collect_main, measured with perf). A decorator
    of the walks too."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


HEAD = "language_model.lm_head"  # the last module of the report: the prompt's logits


def module_names(cfg: dict) -> list:
    """Every module the walk compares, in execution order: the model's traced intermediates (vision embeddings,
    ln_pre, each vision block, the projector, the merge, each decoder layer, the final norm), then lm_head."""
    from ..model.llava import trace_names
    return trace_names(cfg) + [HEAD]


@_gc_frozen()
def walk(hf, ms, cfg: dict, input_ids, pixel_values, max_new_tokens: int, eos=(), rtol: float = 1e-3,
         rank_trace: list | None = None, names: list | None = None, rank_logits=None, image_sizes=None) -> dict:
    """Prefill logits of both sides, per-module comparisons (also against `rank_trace`, the msrun ranks'
    intermediates in `names` order, and `rank_logits`, if given) and greedy tokens of both sides. Also returns
    transformers' output of every module ("hf_outputs"): the inputs a rerun of one module needs.
    image_sizes: LLaVA-NeXT's, as its processor gives them."""
    from ..model.llava import trace_names
    from ..model.vision import layers_run
    names = names or trace_names(cfg)
    clock = _Clock()
    n_layers = cfg["text_config"]["num_hidden_layers"]
    s = int(np.asarray(input_ids).shape[1])

    # ---- transformers: the prompt, module by module (outputs kept), then greedy decoding
    theirs = {}

    def keep(name, out):
        theirs[name] = to_numpy(out)
        return out

    h_x = keep("vision_encoder.embeddings", clock.run("transformers", hf.vision_embeddings, pixel_values, image_sizes))
    h_x = keep("vision_encoder.ln_pre", clock.run("transformers", hf.ln_pre, h_x))
    for i in range(layers_run(cfg)):
        h_x = keep(f"vision_encoder.transformer.resblocks.{i}", clock.run("transformers", hf.vision_block, i, h_x))
    h_x = keep("adapter", clock.run("transformers", hf.projector, h_x))
    if hf.anyres:
        h_x = keep("image_packing", clock.run("transformers", hf.pack, h_x, image_sizes))
    h_x = keep("language_model.model.tok_embeddings", clock.run("transformers", hf.merge, input_ids, h_x))
    ctx = clock.run("transformers", hf.begin, h_x, 0)
    for i in range(n_layers):
        h_x = keep(f"language_model.model.layers.{i}", clock.run("transformers", hf.decoder_layer, i, h_x, ctx))
    h_x = keep("language_model.model.norm_out", clock.run("transformers", hf.norm, h_x))
    h_logits = keep(HEAD, clock.run("transformers", hf.lm_head, h_x))
    h_logits = theirs[HEAD][0]
    hf_tokens, hf_steps = [int(np.argmax(h_logits[-1]))], [h_logits[-1].copy()]
    while len(hf_tokens) < max_new_tokens and hf_tokens[-1] not in eos:
        h_x = clock.run("transformers", hf.token_embeddings, hf_tokens[-1])
        ctx = clock.run("transformers", hf.begin, h_x, s + len(hf_tokens) - 1)
        for i in range(n_layers):
            h_x = clock.run("transformers", hf.decoder_layer, i, h_x, ctx)
        step = to_numpy(clock.run("transformers", lambda x: hf.lm_head(hf.norm(x)), h_x))[0, -1]
        hf_tokens.append(int(np.argmax(step)))
        hf_steps.append(step)
    del h_x, ctx
    hf.cache = None  # transformers' KV cache: not needed any more
    hf.reader.release_maps()  # nor its checkpoint's page tables, while the reference model's pages come in

    # ---- the reference model: the prompt and transformers' tokens in one pass, compared module by module
    modules, rank_modules = [], []

    def check(name, mine):
        mine = mine.asnumpy().astype(np.float32)
        if mine.ndim == 3 and name.startswith("language_model."):
            mine = mine[:, :s]  # the prompt's positions; the rest are the generated tokens'
        modules.append(compare_module(name, theirs[name], mine, rtol))
        if rank_trace is not None:
            if name == HEAD:  # the ranks' logits come back on their own, not in the trace
                rank = None if rank_logits is None else np.asarray(rank_logits, dtype=np.float32)[None]
            else:
                k = names.index(name)
                rank = None if k >= len(rank_trace) else np.asarray(rank_trace[k], dtype=np.float32)
            rank_modules.append(compare_module(name, theirs[name], rank, rtol))

    m_logits, _, _ = reference_forward(ms, cfg, input_ids, pixel_values, clock, check, hf_tokens[:-1],
                                       image_sizes=image_sizes)
    check(HEAD, m_logits)
    m_logits = m_logits.asnumpy()[0]
    ms_tokens = []
    for j, token in enumerate(hf_tokens):  # the reference model's choice after the same prefix
        ms_tokens.append(int(np.argmax(m_logits[s - 1 + j])))
        if ms_tokens[-1] != token:
            break
    return {"hf_logits": h_logits, "ms_logits": m_logits[:s], "modules": modules, "hf_outputs": theirs,
            "rank_modules": rank_modules if rank_trace is not None else None,
            "tokens_hf": hf_tokens, "hf_step_logits": np.stack(hf_steps), "tokens_ms": ms_tokens,
            "seconds": {k: round(v, 2) for k, v in clock.seconds.items()}}


def reference_forward(ms, cfg: dict, input_ids, pixel_values, clock, on_module, extra_tokens=(),
                      keep_kv: bool = False, image_sizes=None):
    """The reference model over the prompt, then `extra_tokens` after it, module by module (`ms` a MsSide):
    on_module(name, output) for each module of model.trace_names(cfg), in order. Returns (float32 logits
    [1, S + len(extra_tokens), V], per-layer k and v lists if keep_kv)."""
    from ..model.llama import causal_bias
    from ..model.vision import layers_run
    emb, x = clock.run("mindspore", ms.vision_embeddings, pixel_values, image_sizes)
    on_module("vision_encoder.embeddings", emb)
    on_module("vision_encoder.ln_pre", x)
    del emb
    for i in range(layers_run(cfg)):
        x = clock.run("mindspore", ms.vision_block, i, x)
        on_module(f"vision_encoder.transformer.resblocks.{i}", x)
    x = clock.run("mindspore", ms.adapter, x)
    on_module("adapter", x)
    if ms.anyres:
        x = clock.run("mindspore", ms.pack, x, image_sizes)
        on_module("image_packing", x)
    x = clock.run("mindspore", ms.merge, input_ids, x)
    if len(extra_tokens):
        x = ms.ops.concat((x, clock.run("mindspore", ms.token_embeddings, list(extra_tokens))), 1)
    on_module("language_model.model.tok_embeddings", x)
    total = int(x.shape[1])
    cos, sin = ms.rope(np.arange(total))
    causal = ms.Tensor(causal_bias(total))
    ks, vs = [], []
    for i in range(cfg["text_config"]["num_hidden_layers"]):
        x, k, v = clock.run("mindspore", ms.decoder_prefill, i, x, cos, sin, causal)
        if keep_kv:
            ks.append(k)
            vs.append(v)
        del k, v
        on_module(f"language_model.model.layers.{i}", x)
    normed, logits = clock.run("mindspore", ms.norm_and_logits, x)
    on_module("language_model.model.norm_out", normed)
    return logits, ks, vs


@_gc_frozen()
def rank_walk(ms, cfg: dict, input_ids, pixel_values, max_new_tokens: int, eos=(), trace: bool = True,
              image_sizes=None) -> dict:
    """One tensor-parallel rank's part of verify under msrun, streamed like the walk (`ms` a MsSide for
    this rank): the prompt's logits and, with `trace`, every module's output (only the rank whose result is
    kept needs them), then free-running greedy decoding with the parallel KV-cache step (DecoderLayer.step,
    the cache split by heads), walking the layers per token. Every rank runs it in step with the others
    (their collectives pair up); rank 0's result is the one kept."""
    clock = _Clock()
    outputs = []

    def record(name, out):
        if trace:
            outputs.append(out.asnumpy().astype(np.float32))

    logits, ks, vs = reference_forward(ms, cfg, input_ids, pixel_values, clock, record, keep_kv=max_new_tokens > 0,
                                       image_sizes=image_sizes)
    logits = logits.asnumpy()
    tokens = []
    if max_new_tokens > 0:
        from ..model.llama import KVCache, attention_bias
        s = int(np.asarray(input_ids).shape[1])
        total = s + max_new_tokens
        cache = KVCache(ks, vs, total)
        del ks, vs
        slots = np.arange(total)
        tokens.append(int(np.argmax(logits[0, -1])))
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            pos = s + len(tokens) - 1
            x = clock.run("mindspore", ms.token_embeddings, [tokens[-1]])
            cos, sin = ms.rope([pos])
            # the cache's past, then pos itself
            bias = ms.Tensor(attention_bias(np.append(slots < pos, True)[None, None, None]))
            for i in range(len(cache.k)):
                x, k, v = clock.run("mindspore", ms.decoder_step, i, x, cos, sin, bias, *cache.layer(i))
                cache.write(i, pos, k, v)
            tokens.append(int(np.argmax(clock.run("mindspore", ms.norm_and_logits, x)[1].asnumpy()[0, -1])))
    return {"logits": logits, "trace": outputs, "tokens": tokens}

