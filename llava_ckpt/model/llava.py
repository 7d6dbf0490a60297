"""The LLaVA-1.5 cell (`vision_encoder`, `adapter`, `language_model`) and its compiled entry points."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

from ..errors import fail
from .layers import Linear, gelu_exact, NP_DTYPES
from .llama import LanguageModel
from .vision import VisionEncoder, layers_run, patch_count


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

    def embed(self, ids, pixels):
        """Token embeddings with the projected image features written, in order, at the image tokens."""
        feats, vision_states = self.vision_encoder(pixels)
        image = self.adapter(feats)
        is_image = ids == self.image_token
        text = self.language_model.model.tok_embeddings(ops.where(is_image, ops.zeros_like(ids), ids))
        flat = image.reshape(-1, image.shape[-1])
        index = ops.cumsum(is_image.astype(ms.int32).reshape(-1), 0) - 1
        index = ops.clamp(index, 0, flat.shape[0] - 1)
        placed = ops.gather(flat, index, 0).reshape(text.shape)
        x = ops.where(is_image.expand_dims(-1), placed, text)
        return x, vision_states, image

    def prefill(self, ids, pixels, positions, keep, trace):
        x, vision_states, image = self.embed(ids, pixels)
        logits, k, v, states = self.language_model.prefill(x, positions, keep)
        if trace:
            return logits, k, v, vision_states + (image, x) + states
        return logits, k, v


def check_supported(cfg: dict) -> None:
    """The reference model implements LLaVA-1.5 exactly; refuse configs it would silently get wrong."""
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
    if problems:
        raise fail("the reference model does not support: " + ", ".join(problems))


class _Prefill(nn.Cell):
    """Compilable wrapper; auto_prefix=False keeps the model's parameter names unchanged."""

    def __init__(self, model, trace):
        super().__init__(auto_prefix=False)
        self.model, self.trace = model, trace

    def construct(self, ids, pixels, positions, keep):
        return self.model.prefill(ids, pixels, positions, keep, self.trace)


class _Step(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, ids, positions, keep, slot, k_cache, v_cache):
        return self.model.language_model.step(ids, positions, keep, slot, k_cache, v_cache)


class Runner:
    """Forward and greedy generation on a loaded model, compiled (graph mode) unless jit=False.

    Build it after load_weights: a compiled graph keeps the parameter data it was compiled with.
    """

    def __init__(self, model: LlavaVlm, jit: bool = True):
        self.model = model
        wrap = ms.jit if jit else (lambda cell: cell)
        self._prefill = {trace: wrap(_Prefill(model, trace)) for trace in (False, True)}
        self._step = wrap(_Step(model))

    def _check(self, input_ids, pixel_values, total):
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise fail(f"input_ids must be [batch, seq], got shape {ids.shape}")
        vc = self.model.cfg["vision_config"]
        want_px = (ids.shape[0], vc["num_channels"], vc["image_size"], vc["image_size"])
        if tuple(np.shape(pixel_values)) != want_px:
            raise fail(f"pixel_values shape {tuple(np.shape(pixel_values))}, the vision tower needs {want_px}")
        want = ids.shape[0] * patch_count(self.model.cfg)
        got = int((ids == self.model.image_token).sum())
        if got != want:
            raise fail(f"prompt has {got} image tokens, the vision tower gives {want} features")
        if total > self.model.language_model.max_positions:
            raise fail(f"sequence length {total} exceeds max_position_embeddings "
                       f"{self.model.language_model.max_positions}")
        return ids.astype(np.int32)

    def forward(self, input_ids, pixel_values, trace: bool = False) -> dict:
        """Logits for every position (numpy float32), per-layer k/v tuples, and with trace the intermediates:
        vision embeddings, ln_pre, each resblock, adapter, merged embeddings, each decoder layer, norm_out."""
        ids = self._check(input_ids, pixel_values, np.asarray(input_ids).shape[1])
        s = ids.shape[1]
        keep = np.tril(np.ones((s, s), dtype=bool))
        out = self._prefill[trace](Tensor(ids), Tensor(np.asarray(pixel_values, dtype=np.float32)),
                                   Tensor(np.arange(s, dtype=np.int32)), Tensor(keep))
        result = {"logits": out[0].asnumpy(), "k": out[1], "v": out[2]}
        if trace:
            result["trace"] = [t.asnumpy() for t in out[3]]
        return result

    def generate(self, input_ids, pixel_values, max_new_tokens: int, eos=(), first: dict | None = None) -> dict:
        """Greedy decoding with the KV cache; stops after an eos token like transformers' generate.

        `first`: this prompt's forward() result, if already computed (saves one prefill)."""
        ids = self._check(input_ids, pixel_values, np.asarray(input_ids).shape[1] + max_new_tokens)
        if ids.shape[0] != 1:
            raise fail("generate takes one prompt at a time")
        if max_new_tokens < 1:
            raise fail("max_new_tokens must be at least 1")
        first = first or self.forward(ids, pixel_values)
        s, total = ids.shape[1], ids.shape[1] + max_new_tokens
        logits = [first["logits"][0, -1]]
        tokens = [int(np.argmax(logits[-1]))]
        def pad(t):  # [B, kv, S, d] -> [B, kv, total, d]
            return ops.concat((t, ops.zeros(t.shape[:2] + (total - s,) + t.shape[3:], t.dtype)), 2)

        # mutable: a plain tuple of tensors is a compile-time constant (one recompile per step)
        k, v = ms.mutable(tuple(pad(t) for t in first["k"])), ms.mutable(tuple(pad(t) for t in first["v"]))
        slots = np.arange(total)
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            pos = s + len(tokens) - 1
            out = self._step(Tensor(np.array([[tokens[-1]]], dtype=np.int32)), Tensor(np.array([pos], np.int32)),
                             Tensor((slots <= pos)[None]), Tensor((slots == pos).reshape(1, 1, total, 1)), k, v)
            logits.append(out[0].asnumpy()[0, -1])
            k, v = ms.mutable(tuple(out[1])), ms.mutable(tuple(out[2]))
            tokens.append(int(np.argmax(logits[-1])))
        return {"tokens": tokens, "logits": np.stack(logits), "prompt_logits": first["logits"]}


def trace_names(cfg: dict) -> list:
    """Module names for Runner.forward(trace=True)'s intermediates, in execution order."""
    names = ["vision_encoder.embeddings", "vision_encoder.ln_pre"]
    names += [f"vision_encoder.transformer.resblocks.{i}" for i in range(layers_run(cfg))]
    names += ["adapter", "language_model.model.tok_embeddings"]
    names += [f"language_model.model.layers.{i}" for i in range(cfg["text_config"]["num_hidden_layers"])]
    return names + ["language_model.model.norm_out"]
