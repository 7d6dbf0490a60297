"""Tiny transformers LLaVA models with scaled weights, and an independent HF -> converted-name renamer.

The renamer is written from the MindFormers names in the brief, not from the project's mapping tables, so
the model tests do not share a mistake with the converter.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=32064, max_position_embeddings=256, rms_norm_eps=1e-5)
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, image_size=56, patch_size=14, projection_dim=32)
IMAGE_TOKEN = 32000
N_IMAGE = (56 // 14) ** 2


def hf_config(**text) -> LlavaConfig:
    return LlavaConfig(text_config=dict(TEXT, **text), vision_config=dict(VISION), image_token_index=IMAGE_TOKEN,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def scale_weights(model, seed: int = 0) -> None:
    """Unit-size activations and logits of a few units (std-0.02 init gives logits near 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if "embed_tokens" in name or "class_embedding" in name:
                std = 1.0
            elif "position_embedding" in name:
                std = 0.5
            elif "lm_head" in name:
                std = 4.0 / math.sqrt(shape[1])
            elif p.ndim >= 2:
                std = 1.0 / math.sqrt(int(np.prod(shape[1:])))
            else:
                std = 0.1
            value = torch.randn(shape, generator=g) * std
            if p.ndim == 1 and ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                value = value + 1.0
            p.copy_(value)


def hf_model(seed: int = 0, **text):
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config(**text)).eval()
    scale_weights(model, seed)
    return model


def _np(t):
    return t.detach().to(torch.float32).numpy().copy()


def to_ms(model, fused: bool = False) -> dict:
    """The model's weights under the converted (MindFormers LlavaVlm) names, as float32 numpy arrays."""
    sd = {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in model.state_dict().items()}
    tc, vc = model.config.text_config, model.config.vision_config
    out = {}
    lm, vt = "model.language_model.", "model.vision_tower."
    out["language_model.model.tok_embeddings.embedding_weight"] = _np(sd[lm + "embed_tokens.weight"])
    out["language_model.model.norm_out.weight"] = _np(sd[lm + "norm.weight"])
    out["language_model.lm_head.weight"] = _np(sd["lm_head.weight"])
    heads, kv = tc.num_attention_heads, tc.num_key_value_heads
    d = tc.hidden_size // heads
    for i in range(tc.num_hidden_layers):
        src, dst = f"{lm}layers.{i}.", f"language_model.model.layers.{i}."
        q, k, v = (_np(sd[f"{src}self_attn.{n}_proj.weight"]) for n in "qkv")
        gate, up = _np(sd[src + "mlp.gate_proj.weight"]), _np(sd[src + "mlp.up_proj.weight"])
        if fused:
            rep = heads // kv
            rows = []
            for g in range(kv):
                rows += [q[g * rep * d:(g + 1) * rep * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
            out[dst + "attention.w_qkv.weight"] = np.concatenate(rows)
            out[dst + "feed_forward.w_gate_hidden.weight"] = np.stack([gate, up], 1).reshape(-1, gate.shape[1])
        else:
            out[dst + "attention.wq.weight"], out[dst + "attention.wk.weight"] = q, k
            out[dst + "attention.wv.weight"] = v
            out[dst + "feed_forward.w1.weight"], out[dst + "feed_forward.w3.weight"] = gate, up
        out[dst + "attention.wo.weight"] = _np(sd[src + "self_attn.o_proj.weight"])
        out[dst + "feed_forward.w2.weight"] = _np(sd[src + "mlp.down_proj.weight"])
        out[dst + "attention_norm.weight"] = _np(sd[src + "input_layernorm.weight"])
        out[dst + "ffn_norm.weight"] = _np(sd[src + "post_attention_layernorm.weight"])
    ve = "vision_encoder."
    out[ve + "conv1.weight"] = _np(sd[vt + "embeddings.patch_embedding.weight"])
    out[ve + "class_embedding"] = _np(sd[vt + "embeddings.class_embedding"])
    out[ve + "positional_embedding"] = _np(sd[vt + "embeddings.position_embedding.weight"])
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        out[f"{ve}{ours}.gamma"] = _np(sd[f"{vt}{theirs}.weight"])
        out[f"{ve}{ours}.beta"] = _np(sd[f"{vt}{theirs}.bias"])
    for i in range(vc.num_hidden_layers):
        src, dst = f"{vt}encoder.layers.{i}.", f"{ve}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj.{kind}"] = np.concatenate(
                [_np(sd[f"{src}self_attn.{n}_proj.{kind}"]) for n in "qkv"])
            out[f"{dst}attn.out_proj.{kind}"] = _np(sd[f"{src}self_attn.out_proj.{kind}"])
            out[f"{dst}mlp.c_fc.{kind}"] = _np(sd[f"{src}mlp.fc1.{kind}"])
            out[f"{dst}mlp.c_proj.{kind}"] = _np(sd[f"{src}mlp.fc2.{kind}"])
            theirs = {"weight": "weight", "bias": "bias"}[kind]
            ours = {"weight": "gamma", "bias": "beta"}[kind]
            out[f"{dst}ln_1.{ours}"] = _np(sd[f"{src}layer_norm1.{theirs}"])
            out[f"{dst}ln_2.{ours}"] = _np(sd[f"{src}layer_norm2.{theirs}"])
    pj = "model.multi_modal_projector."
    for ours, theirs in (("adapter", "linear_1"), ("adapter_2", "linear_2")):
        for kind in ("weight", "bias"):
            out[f"adapter.{ours}.{kind}"] = _np(sd[f"{pj}{theirs}.{kind}"])
    return out


def prompt_ids(n_text_before: int = 5, n_text_after: int = 7, seed: int = 0) -> np.ndarray:
    """[1, S] ids: BOS, some text, the image tokens, more text (what the processor would produce)."""
    rng = np.random.default_rng(seed)
    before = rng.integers(3, 32000, n_text_before)
    after = rng.integers(3, 32000, n_text_after)
    return np.concatenate([[1], before, [IMAGE_TOKEN] * N_IMAGE, after])[None].astype(np.int64)


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 56, 56)).astype(np.float32)


def ms_config(model) -> dict:
    """The normalized config dict the reference model reads (as load_config would give for the saved dir)."""
    from llava_ckpt.engine.config import normalize_config
    return normalize_config(model.config.to_dict())
