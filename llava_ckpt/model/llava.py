"""The LLaVA cell (`vision_encoder`, `adapter`, LLaVA-NeXT's `image_newline`, `language_model`) and its compiled
entry points: LLaVA-1.5, bakLlava and LLaVA-NeXT (its anyres packing: model/anyres.py)."""
from __future__ import annotations

import time

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

from ..errors import fail
from .layers import Linear, gelu_exact, param, NP_DTYPES
from .llama import KVCache, LanguageModel, attention_bias, causal_bias
from .sampling import greedy
from ..engine.config import context_limit
from .anyres import check_features, is_anyres, tower_inputs
from .vision import VisionEncoder, layers_run


class Adapter(nn.Cell):
    """The projector: linear_1 -> exact (erf) GELU -> linear_2."""

    def __init__(self, cfg: dict, dtype):
        super().__init__()
        vh, h = cfg["vision_config"]["hidden_size"], cfg["text_config"]["hidden_size"]
        bias = bool(cfg.get("multimodal_projector_bias", True))
        self.adapter = Linear(h, vh, bias, dtype)
        self.adapter_2 = Linear(h, h, bias, dtype)

    def construct(self, x):
        return self.adapter_2(gelu_exact(self.adapter(x)))


class LlavaVlm(nn.Cell):
    def __init__(self, cfg: dict, dtype: str = "float32", fused: bool = False):
        super().__init__()
        check_supported(cfg)
        if dtype not in NP_DTYPES:
            raise fail(f"compute dtype must be one of {', '.join(NP_DTYPES)}, got {dtype!r}")
        self.cfg, self.dtype, self.fused = cfg, dtype, fused
        self.vision_encoder = VisionEncoder(cfg, dtype)
        self.adapter = Adapter(cfg, dtype)
        self.language_model = LanguageModel(cfg["text_config"], fused, dtype)
        self.image_token = int(cfg["image_token_index"])
        self.anyres = is_anyres(cfg)
        if self.anyres:  # LLaVA-NeXT: the vector written after each row of packed image features
            self.image_newline = param((cfg["text_config"]["hidden_size"],), dtype)

    def embed(self, ids, pixels, index):
        """(token embeddings with the image features written, in order, at the image tokens; the vision
        tower's states; the projected features; the packed ones). `index`: anyres.tower_inputs' packing."""
        feats, vision_states = self.vision_encoder(pixels)
        image = self.adapter(feats)
        packed = self.pack(image, index)
        return self.place(ids, packed), vision_states, image, packed

    def pack(self, image, index):
        """The projected features [N, T, H] flattened, LLaVA-NeXT's newline appended, gathered by `index`: for
        LLaVA-1.5 every feature in order, for LLaVA-NeXT its anyres packing (model/anyres.py)."""
        flat = image.reshape(-1, image.shape[-1])
        if self.anyres:
            flat = ops.concat((flat, self.image_newline.reshape(1, -1).astype(flat.dtype)), 0)
        return ops.gather(flat, index, 0)

    def place(self, ids, packed):
        """Token embeddings with the image features `packed` ([K, H], or LLaVA-1.5's adapter output [N, T, H]:
        the same rows in order) written, in order, at the image tokens."""
        packed = packed.reshape(-1, packed.shape[-1])
        is_image = ids == self.image_token
        text = self.language_model.model.tok_embeddings(ops.where(is_image, ops.zeros_like(ids), ids))
        index = ops.cumsum(is_image.astype(ms.int32).reshape(-1), 0) - 1
        index = ops.clamp(index, 0, packed.shape[0] - 1)
        placed = ops.gather(packed, index, 0).reshape(text.shape)
        return ops.where(is_image.expand_dims(-1), placed, text)

    def prefill(self, ids, pixels, index, positions, bias, trace, last_only=False):
        x, vision_states, image, packed = self.embed(ids, pixels, index)
        logits, k, v, states = self.language_model.prefill(x, positions, bias, last_only)
        if trace:
            return logits, k, v, vision_states + (image,) + ((packed,) if self.anyres else ()) + (x,) + states
        return logits, k, v


def check_supported(cfg: dict) -> None:
    """The reference model implements the LLaVA family's exact computation; refuse configs it would silently get
    wrong."""
    tc, vc = cfg["text_config"], cfg["vision_config"]
    problems = []
    if tc.get("hidden_act", "silu") != "silu":
        problems.append(f"text hidden_act {tc.get('hidden_act')!r}")
    rope = tc.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or tc.get("rope_scaling"):
        problems.append("RoPE scaling")
    if vc.get("hidden_act", "quick_gelu") != "quick_gelu":
        problems.append(f"vision hidden_act {vc.get('hidden_act')!r}")
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        problems.append(f"projector_hidden_act {cfg.get('projector_hidden_act')!r}")
    if cfg.get("vision_feature_select_strategy") not in ("default", "full"):
        problems.append(f"vision_feature_select_strategy {cfg.get('vision_feature_select_strategy')!r}")
    check_features(cfg)
    if problems:
        raise fail("the reference model does not support: " + ", ".join(problems))


class _Prefill(nn.Cell):
    """Compilable wrapper; auto_prefix=False keeps the model's parameter names unchanged."""

    def __init__(self, model, trace, last_only=False):
        super().__init__(auto_prefix=False)
        self.model, self.trace, self.last_only = model, trace, last_only

    def construct(self, ids, pixels, index, positions, bias):
        return self.model.prefill(ids, pixels, index, positions, bias, self.trace, self.last_only)


class _Step(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, ids, positions, bias, k_cache, v_cache):
        return self.model.language_model.step(ids, positions, bias, k_cache, v_cache)


class Runner:
    """Forward and generation on a loaded model, compiled (graph mode) unless jit=False.

    Build it after load_weights: a compiled graph keeps the parameter data it was compiled with.
    jit=False (generate's way): every op runs eagerly and frees its output when no longer referenced, so a
    prompt's prefill holds one layer's intermediates at a time and writes its k/v straight into the host
    cache; and 16-bit weights kept as stored (load_weights(stored=True)) are never widened all at once.
    """

    def __init__(self, model: LlavaVlm, jit: bool = True):
        self.model, self.jit = model, jit
        wrap = ms.jit if jit else (lambda cell: cell)
        self._prefill = {trace: wrap(_Prefill(model, trace)) for trace in (False, True)}
        self._prefill_last = wrap(_Prefill(model, False, last_only=True))
        self._step = wrap(_Step(model))
        self._cache_memory = None  # reserve_cache's buffer, once asked for

    def _check(self, input_ids, pixel_values, total, image_sizes=None):
        """(ids int32, the tower's pixels, the packing index) once the prompt's image tokens, the images and the
        context agree."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise fail(f"input_ids must be [batch, seq], got shape {ids.shape}")
        pixels, index, tokens = tower_inputs(self.model.cfg, pixel_values, image_sizes)
        if len(tokens) != ids.shape[0]:
            raise fail(f"{len(tokens)} images for {ids.shape[0]} prompts: each prompt takes one image")
        got = (ids == self.model.image_token).sum(axis=1)
        for row, (have, want) in enumerate(zip(got, tokens)):
            if have != want:
                raise fail(f"prompt {row} holds {int(have)} image tokens, its image gives {want} features")
        limit, what = context_limit(self.model.cfg)
        if total > limit:
            raise fail(f"sequence length {total} exceeds the model's context of {limit} positions ({what})")
        return ids.astype(np.int32), Tensor(pixels), Tensor(index)

    def forward(self, input_ids, pixel_values, trace: bool = False, image_sizes=None) -> dict:
        """Logits for every position (numpy float32), per-layer k/v tuples, and with trace the intermediates:
        vision embeddings, ln_pre, each resblock, adapter, (LLaVA-NeXT: the packing,) merged embeddings, each
        decoder layer, norm_out. image_sizes: LLaVA-NeXT's, as its processor gives them."""
        ids, pixels, index = self._check(input_ids, pixel_values, np.asarray(input_ids).shape[1], image_sizes)
        s = ids.shape[1]
        out = self._prefill[trace](Tensor(ids), pixels, index,
                                   Tensor(np.arange(s, dtype=np.int32)), Tensor(causal_bias(s)))
        result = {"logits": out[0].asnumpy(), "k": out[1], "v": out[2]}
        if trace:
            result["trace"] = [t.asnumpy() for t in out[3]]
        return result

    def generate(self, input_ids, pixel_values, max_new_tokens: int, eos=(), first: dict | None = None,
                 image_sizes=None) -> dict:
        """Greedy decoding of one prompt with the KV cache; stops after an eos token like transformers' generate.

        `first`: this prompt's forward() result, if already computed (saves one prefill)."""
        ids, _, _ = self._check(input_ids, pixel_values, np.asarray(input_ids).shape[1] + max_new_tokens, image_sizes)
        if ids.shape[0] != 1:
            raise fail("generate takes one prompt at a time (generate_batch takes several)")
        if max_new_tokens < 1:
            raise fail("max_new_tokens must be at least 1")
        first = first or self.forward(ids, pixel_values, image_sizes=image_sizes)
        mask = np.ones(ids.shape, dtype=bool)
        cache = KVCache(first["k"], first["v"], ids.shape[1] + max_new_tokens)
        out = self._decode(first["logits"][:, -1], cache, mask, max_new_tokens, eos, greedy, keep_logits=True)
        return {"tokens": out["tokens"][0], "logits": np.stack(out["logits"])[:, 0],
                "prompt_logits": first["logits"]}

    def generate_batch(self, input_ids, attention_mask, pixel_values, max_new_tokens: int, eos=(),
                       choose=greedy, pad_id: int = 0, on_step=None, image_sizes=None) -> dict:
        """Several prompts in one forward pass, as transformers' generate does for LLaVA.

        input_ids [B, S] LEFT-padded (padding at the start of a row, so every row's last prompt token is in
        the last column and every new token goes to the same cache slot); attention_mask [B, S], 1 for real
        tokens. Each row gets its own positions (counting its real tokens only), so a padded row computes
        what it would alone. `choose`: [B, V] logits -> [B] token ids (greedy, or model.sampling's sampler).
        Rows that produced an eos token stop (they are fed pad_id while the others go on). on_step(n, active):
        called after each decode step (and, when not compiled, with n = 0 after each prefill layer).
        Returns {"tokens": list per row (new tokens, eos included), "finish": "stop"|"length" per row,
        "prefill_s", "decode_s", "decode_tokens"}.
        """
        mask = np.asarray(attention_mask).astype(bool)
        ids, pixels, index = self._check(input_ids, pixel_values, np.asarray(input_ids).shape[1] + max_new_tokens,
                                         image_sizes)
        if mask.shape != ids.shape:
            raise fail(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        if not mask[:, -1].all() or (np.diff(mask.astype(np.int8), axis=1) < 0).any():
            raise fail("input_ids must be left-padded: each row's padding before its tokens")
        if max_new_tokens < 1:
            raise fail("max_new_tokens must be at least 1")
        b, s = ids.shape
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        bias = Tensor(attention_bias(np.tril(np.ones((s, s), dtype=bool))[None, None] & mask[:, None, None, :]))
        t0 = time.perf_counter()
        if self.jit:
            out = self._prefill_last(Tensor(ids), pixels, index, Tensor(positions), bias)
            last = out[0].asnumpy()[:, -1]
            cache = KVCache(out[1], out[2], s + max_new_tokens)
            del out
        else:
            cache = self._empty_cache(b, s + max_new_tokens)
            x, _, _, _ = self.model.embed(Tensor(ids), pixels, index)
            last = self.model.language_model.prefill_into(x, Tensor(positions), bias, cache,
                                                          on_layer=None if on_step is None else lambda: on_step(0, b))
            last = last.asnumpy()[:, -1]
            del x
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dec = self._decode(last, cache, mask, max_new_tokens, eos, choose, pad_id, on_step=on_step)
        return {"tokens": dec["tokens"], "finish": dec["finish"], "prefill_s": prefill_s,
                "decode_s": time.perf_counter() - t0, "decode_tokens": dec["decode_tokens"]}

    def _cache_shape(self, batch: int, total: int) -> tuple:
        """(layers, [B, kv, T, d]) of a KV cache for `batch` rows of `total` positions."""
        attention = self.model.language_model.model.layers[0].attention
        return len(self.model.language_model.model.layers), (batch, attention.kv_heads, total, attention.head_dim)

    def reserve_cache(self, batch: int, total: int) -> None:
        """Touch the memory of the largest KV cache to come now (KVCache.reserve_memory), for every later
        generate_batch of at most `batch` rows and `total` positions to take it instead of fresh pages."""
        self._cache_memory = KVCache.reserve_memory(*self._cache_shape(batch, total), NP_DTYPES[self.model.dtype])

    def _empty_cache(self, batch: int, total: int) -> KVCache:
        return KVCache.empty(*self._cache_shape(batch, total), NP_DTYPES[self.model.dtype],
                             memory=self._cache_memory)

    def _decode(self, last, cache, mask, max_new_tokens, eos, choose, pad_id=0, keep_logits=False,
                on_step=None) -> dict:
        """The KV-cache loop shared by generate and generate_batch. last: [B, V] logits of the last prompt
        position; cache: the prompt's k/v in slots 0..S-1 of S + max_new_tokens; mask: [B, S] bool (left
        padding)."""
        b, s = mask.shape
        total = s + max_new_tokens
        lengths = mask.sum(axis=1).astype(np.int32)
        # visible[:, j] for j < total: cache slot j holds a position this row may see; visible[:, total]: the
        # position being fed (attended directly, written to its slot after the step)
        visible = np.zeros((b, total + 1), dtype=bool)
        visible[:, :s] = mask
        visible[:, total] = True
        eos_ids = np.array(sorted({int(e) for e in eos}), dtype=np.int64)
        done = np.zeros(b, dtype=bool)
        tokens, logits, decoded = [], [last] if keep_logits else None, 0
        chosen = np.asarray(choose(last)).astype(np.int64)
        while True:
            chosen = np.where(done, pad_id, chosen)
            tokens.append(chosen)
            done = done | np.isin(chosen, eos_ids)
            n = len(tokens)
            if on_step is not None:
                on_step(n, int((~done).sum()))
            if n >= max_new_tokens or done.all():
                break
            slot = s + n - 1
            decoded += int((~done).sum())
            k, v = cache.tensors()
            bias = Tensor(attention_bias(visible[:, None, None, :]))
            out = self._step(Tensor(chosen.reshape(b, 1).astype(np.int32)), Tensor((lengths + n - 1).reshape(b, 1)),
                             bias, k, v)
            last = out[0].asnumpy()[:, -1]
            cache.write_all(slot, out[1], out[2])
            visible[:, slot] = True
            if keep_logits:
                logits.append(last)
            chosen = np.asarray(choose(last)).astype(np.int64)
        grid = np.stack(tokens, axis=1)  # [B, n]
        rows, finish = [], []
        for row in grid:
            stop = np.flatnonzero(np.isin(row, eos_ids))
            rows.append(row[:stop[0] + 1].tolist() if stop.size else row.tolist())
            finish.append("stop" if stop.size else "length")
        return {"tokens": rows, "finish": finish, "logits": logits, "decode_tokens": decoded}


def trace_names(cfg: dict) -> list:
    """Module names for Runner.forward(trace=True)'s intermediates, in execution order."""
    names = ["vision_encoder.embeddings", "vision_encoder.ln_pre"]
    names += [f"vision_encoder.transformer.resblocks.{i}" for i in range(layers_run(cfg))]
    names += ["adapter"] + (["image_packing"] if is_anyres(cfg) else []) + ["language_model.model.tok_embeddings"]
    names += [f"language_model.model.layers.{i}" for i in range(cfg["text_config"]["num_hidden_layers"])]
    return names + ["language_model.model.norm_out"]
