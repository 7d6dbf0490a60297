"""The layer-streamed walk: both models run module by module on the same image and prompt, each module's
weights read just before it runs (into the arena, weights.py) and dropped right after, so memory holds one
module's weights at a time (plus the activations and the reference model's KV cache), whatever the depth.

Order: the reference model first: every module of the prompt's forward (each output kept, float32, one
activation per module), then its own greedy decoding with its KV cache (DecoderLayer.step, the path generate
and the msrun ranks run), walking its layers again for every new token. Then transformers, once: the same
modules over the prompt followed by the reference model's tokens, in one forward with no KV cache. Every
module's output over the prompt is compared with the reference model's (the first one over the tolerance
names where a conversion breaks), and transformers' greedy choice at each decoding step is the argmax of its
logits after that step's prefix: with a causal model that is the token its own greedy decoding would pick
after the same prefix, so if every one equals the reference model's token, transformers' greedy decoding
gives the reference model's tokens (and where one differs, that is its first differing token; nothing after
it is known, it would follow another prefix). transformers' choices come from its full forward, not its
KV-cache step: the same sums in another order, which the greedy check's near-tie margin covers. Why this
order: a decoding step walks every layer's weights again; the reference model's steps compute from maps of
its 16-bit weights with small_matmul, transformers' cast each layer again and run torch's matrix-vector
products: the seven steps of a 7B verify's 8 tokens took 8.4-10.0 s on the reference side, 14.2 s on
transformers' (measured on the same host), and transformers' one forward over the prompt and the 7 tokens
costs what its prompt alone did.
The converted checkpoint (14 GB) is what the page cache holds while the steps run; transformers' is read once.
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

    def run(self, side: str, fn, *args, trim_above: int | None = None):
        """fn(*args), timed; the heap trimmed after it past `trim_above` free bytes (TRIM_FREE unless given)."""
        t = time.perf_counter()
        out = fn(*args)
        _trim_heap(TRIM_FREE if trim_above is None else trim_above)
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
# a decoding step's end always trims: each step left ~22 MB of freed heap that the next one did not reuse (the
# memory test's width-1024 fixture: anonymous 442 -> 552 MiB over 6 layer steps, so the peak grew with depth;
# trimmed after every step, 434 MiB flat). Cost at 7B widths (7b-few-layers, 30 steps): 0.92-1.30 s of steps
# -> 0.95-1.56 s, alternating runs.
DECODE_TRIM_FREE = 0


def _trim_heap(free_above: int) -> None:
    """Hand the heap's free pages back to the OS after a step, when more than `free_above` lie free in it: the
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
        if not hasattr(_LIBC, "mallinfo2") or _LIBC.mallinfo2().fordblks > free_above:
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
    transformers' output of every module over the prompt ("hf_outputs"): the inputs a rerun of one module needs.
    image_sizes: LLaVA-NeXT's, as its processor gives them."""
    from ..model.llava import trace_names
    names = names or trace_names(cfg)
    clock = _Clock()
    s = int(np.asarray(input_ids).shape[1])

    # ---- the reference model: the prompt, module by module (outputs kept), then its own greedy decoding
    mine = {}

    def keep(name, out):
        mine[name] = out.asnumpy().astype(np.float32, copy=False)  # asnumpy's copy is the one kept

    logits, cache = reference_forward(ms, cfg, input_ids, pixel_values, clock, keep, cache_positions=s +
                                      max(max_new_tokens, 1), image_sizes=image_sizes)
    keep(HEAD, logits)
    del logits
    m_logits = mine[HEAD][0]
    ms_tokens = greedy_decode(ms, clock, m_logits[-1], cache, s, max_new_tokens, eos)
    del cache  # the reference model's KV cache: not needed any more

    # ---- transformers: the prompt and the reference model's tokens in one pass, compared module by module
    theirs, modules, rank_modules = {}, [], []

    def check(name, out):
        if out.ndim == 3 and name.startswith("language_model."):
            out = out[:, :s]  # the prompt's positions; the rest are the generated tokens'
        theirs[name] = out
        modules.append(compare_module(name, out, mine.pop(name), rtol))
        if rank_trace is not None:
            if name == HEAD:  # the ranks' logits come back on their own, not in the trace
                rank = None if rank_logits is None else np.asarray(rank_logits, dtype=np.float32)[None]
            else:
                k = names.index(name)
                rank = None if k >= len(rank_trace) else np.asarray(rank_trace[k], dtype=np.float32)
            rank_modules.append(compare_module(name, out, rank, rtol))

    h_logits = transformers_forward(hf, cfg, input_ids, pixel_values, clock, check, ms_tokens[:-1],
                                    image_sizes=image_sizes)
    check(HEAD, h_logits)
    h_logits = h_logits[0]
    hf_tokens, hf_steps = [], []
    for j, token in enumerate(ms_tokens):  # transformers' choice after the same prefix
        hf_steps.append(h_logits[s - 1 + j].copy())
        hf_tokens.append(int(np.argmax(hf_steps[-1])))
        if hf_tokens[-1] != token:
            break
    return {"hf_logits": h_logits[:s], "ms_logits": m_logits,
            "modules": modules, "hf_outputs": theirs,
            "rank_modules": rank_modules if rank_trace is not None else None,
            "tokens_hf": hf_tokens, "hf_step_logits": np.stack(hf_steps), "tokens_ms": ms_tokens,
            "seconds": {k: round(v, 2) for k, v in clock.seconds.items()}}


def transformers_forward(hf, cfg: dict, input_ids, pixel_values, clock, on_module, extra_tokens=(),
                         image_sizes=None):
    """transformers over the prompt, then `extra_tokens` after it, module by module (`hf` an HfSide), with no
    KV cache (nothing decodes after it): on_module(name, output as a float32 array) for each module of
    model.trace_names(cfg), in order. Returns the float32 logits [1, S + len(extra_tokens), V] as an array."""
    from ..model.vision import layers_run

    def run(name, fn, *args):
        out = clock.run("transformers", fn, *args)
        on_module(name, to_numpy(out))
        return out

    x = run("vision_encoder.embeddings", hf.vision_embeddings, pixel_values, image_sizes)
    x = run("vision_encoder.ln_pre", hf.ln_pre, x)
    for i in range(layers_run(cfg)):
        x = run(f"vision_encoder.transformer.resblocks.{i}", hf.vision_block, i, x)
    x = run("adapter", hf.projector, x)
    if hf.anyres:
        x = run("image_packing", hf.pack, x, image_sizes)
    x = clock.run("transformers", hf.merge, input_ids, x)
    if len(extra_tokens):
        rows = [clock.run("transformers", hf.token_embeddings, t) for t in extra_tokens]
        x = hf.torch.cat([x] + rows, dim=1)
    on_module("language_model.model.tok_embeddings", to_numpy(x))
    ctx = clock.run("transformers", hf.begin, x)
    for i in range(cfg["text_config"]["num_hidden_layers"]):
        x = run(f"language_model.model.layers.{i}", hf.decoder_layer, i, x, ctx)
    return to_numpy(clock.run("transformers", hf.lm_head, run("language_model.model.norm_out", hf.norm, x)))


def reference_forward(ms, cfg: dict, input_ids, pixel_values, clock, on_module, cache_positions: int = 0,
                      image_sizes=None):
    """The reference model over the prompt, module by module (`ms` a MsSide): on_module(name, output) for each
    module of model.trace_names(cfg), in order. Returns (float32 logits [1, S, V], the KV cache of
    `cache_positions` slots with the prompt's k and v in its first S, or None when cache_positions is 0), the
    cache filled layer by layer, so the prompt's k and v exist once."""
    from ..model.llama import KVCache, causal_bias
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
    on_module("language_model.model.tok_embeddings", x)
    total = int(x.shape[1])
    cos, sin = ms.rope(np.arange(total))
    causal = ms.Tensor(causal_bias(total))
    layers, cache = cfg["text_config"]["num_hidden_layers"], None
    for i in range(layers):
        x, k, v = clock.run("mindspore", ms.decoder_prefill, i, x, cos, sin, causal)
        if cache_positions:
            if cache is None:
                b, kv, _, d = k.shape
                cache = KVCache.empty(layers, (b, kv, cache_positions, d), k.asnumpy().dtype)
            cache.put(i, k, v)
        del k, v
        on_module(f"language_model.model.layers.{i}", x)
    normed, logits = clock.run("mindspore", ms.norm_and_logits, x)
    on_module("language_model.model.norm_out", normed)
    return logits, cache


def greedy_decode(ms, clock, last, cache, s: int, max_new_tokens: int, eos=()) -> list:
    """The reference model's own greedy decoding after its prefill of an S-position prompt (`last`: the logits
    of its last position, `cache` reference_forward's): the KV-cache step path (DecoderLayer.step), walking
    the layers once per new token. At least one token; at most max_new_tokens, or up to an eos."""
    from ..model.llama import attention_bias
    tokens = [int(np.argmax(last))]
    if cache is None:
        return tokens
    total = int(cache.v[0].shape[2])
    slots = np.arange(total)
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        pos = s + len(tokens) - 1
        x = clock.run("mindspore", ms.token_embeddings, [tokens[-1]])
        cos, sin = ms.rope([pos])
        # the cache's past, then pos itself
        bias = ms.Tensor(attention_bias(np.append(slots < pos, True)[None, None, None]))
        for i in range(len(cache.k)):
            x, k, v = clock.run("mindspore", ms.decoder_step, i, x, cos, sin, bias, *cache.layer(i),
                                trim_above=DECODE_TRIM_FREE)
            cache.write(i, pos, k, v)
        tokens.append(int(np.argmax(clock.run("mindspore", ms.norm_and_logits, x)[1].asnumpy()[0, -1])))
    return tokens


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
            outputs.append(out.asnumpy().astype(np.float32, copy=False))

    s = int(np.asarray(input_ids).shape[1])
    logits, cache = reference_forward(ms, cfg, input_ids, pixel_values, clock, record,
                                      cache_positions=s + max_new_tokens if max_new_tokens > 0 else 0,
                                      image_sizes=image_sizes)
    logits = logits.asnumpy()
    tokens = greedy_decode(ms, clock, logits[0, -1], cache, s, max_new_tokens, eos) if max_new_tokens > 0 else []
    return {"logits": logits, "trace": outputs, "tokens": tokens}
