"""The expected MindFormers tensors of a HF LLaVA-1.5 state dict, written out by hand.

Deliberately independent of mappings/ and llava_ckpt/mapping.py: the names are spelled out here and the
fused layouts are built with reshapes/stacks, so a wrong table entry or a wrong op shows up as a mismatch.
"""
import glob
import json
import os

import ml_dtypes  # noqa: F401  (lets safetensors hand out bf16 arrays)
import numpy as np
from safetensors import safe_open

LAYOUT_TO_HUB = {
    "hub": [],
    "v5": [("vision_tower.", "vision_tower.vision_model.")],
    "inmemory": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                 ("model.vision_tower.", "vision_tower.vision_model."),
                 ("model.multi_modal_projector.", "multi_modal_projector.")],
}


def read_hf(folder, layout="hub"):
    """All tensors of a HF checkpoint folder, keyed by their hub-layout names."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                hub = name
                for old, new in LAYOUT_TO_HUB[layout]:
                    if name.startswith(old) and not name.startswith(new):
                        hub = new + name[len(old):]
                        break
                out[hub] = as_ml_dtypes(f.get_tensor(name))
    return out


def as_ml_dtypes(a):
    """MindSpore registers a numpy bfloat16 of its own: view any bfloat16 as ml_dtypes' so dtypes compare."""
    return a.view(ml_dtypes.bfloat16) if a.dtype.name == "bfloat16" else a


def expected(hf, config, fuse_qkv=False):
    """MindFormers name -> array, from hub-named HF arrays."""
    text = config["text_config"]
    n_text = text["num_hidden_layers"]
    n_vision = config["vision_config"]["num_hidden_layers"]
    heads = text["num_attention_heads"]
    kv = text.get("num_key_value_heads", heads)
    hd = text["hidden_size"] // heads
    L, V = "language_model.model.", "vision_tower.vision_model."
    e = {
        "language_model.model.tok_embeddings.embedding_weight": hf[L + "embed_tokens.weight"],
        "language_model.model.norm_out.weight": hf[L + "norm.weight"],
        "language_model.lm_head.weight": hf["language_model.lm_head.weight"],
        "vision_encoder.conv1.weight": hf[V + "embeddings.patch_embedding.weight"],
        "vision_encoder.class_embedding": hf[V + "embeddings.class_embedding"],
        "vision_encoder.positional_embedding": hf[V + "embeddings.position_embedding.weight"],
        "vision_encoder.ln_pre.gamma": hf[V + "pre_layrnorm.weight"],
        "vision_encoder.ln_pre.beta": hf[V + "pre_layrnorm.bias"],
        "vision_encoder.ln_post.gamma": hf[V + "post_layernorm.weight"],
        "vision_encoder.ln_post.beta": hf[V + "post_layernorm.bias"],
        "adapter.adapter.weight": hf["multi_modal_projector.linear_1.weight"],
        "adapter.adapter.bias": hf["multi_modal_projector.linear_1.bias"],
        "adapter.adapter_2.weight": hf["multi_modal_projector.linear_2.weight"],
        "adapter.adapter_2.bias": hf["multi_modal_projector.linear_2.bias"],
    }
    for i in range(n_text):
        s, d = f"{L}layers.{i}.", f"language_model.model.layers.{i}."
        q, k, v = (hf[s + f"self_attn.{x}_proj.weight"] for x in "qkv")
        gate, up = hf[s + "mlp.gate_proj.weight"], hf[s + "mlp.up_proj.weight"]
        e[d + "attention_norm.weight"] = hf[s + "input_layernorm.weight"]
        e[d + "ffn_norm.weight"] = hf[s + "post_attention_layernorm.weight"]
        e[d + "attention.wo.weight"] = hf[s + "self_attn.o_proj.weight"]
        e[d + "feed_forward.w2.weight"] = hf[s + "mlp.down_proj.weight"]
        if fuse_qkv:
            H = q.shape[1]
            grouped = np.concatenate([q.reshape(kv, (heads // kv) * hd, H), k.reshape(kv, hd, H),
                                      v.reshape(kv, hd, H)], axis=1)
            e[d + "attention.w_qkv.weight"] = grouped.reshape(-1, H)
            e[d + "feed_forward.w_gate_hidden.weight"] = np.stack([gate, up], axis=1).reshape(-1, H)
        else:
            e[d + "attention.wq.weight"], e[d + "attention.wk.weight"], e[d + "attention.wv.weight"] = q, k, v
            e[d + "feed_forward.w1.weight"], e[d + "feed_forward.w3.weight"] = gate, up
    for i in range(n_vision):
        s, d = f"{V}encoder.layers.{i}.", f"vision_encoder.transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            e[d + f"attn.in_proj.{part}"] = np.concatenate([hf[s + f"self_attn.{x}_proj.{part}"] for x in "qkv"])
            e[d + f"attn.out_proj.{part}"] = hf[s + f"self_attn.out_proj.{part}"]
            e[d + f"mlp.c_fc.{part}"] = hf[s + f"mlp.fc1.{part}"]
            e[d + f"mlp.c_proj.{part}"] = hf[s + f"mlp.fc2.{part}"]
        for n in ("1", "2"):
            e[d + f"ln_{n}.gamma"] = hf[s + f"layer_norm{n}.weight"]
            e[d + f"ln_{n}.beta"] = hf[s + f"layer_norm{n}.bias"]
    return e


def load_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def read_with_mindspore(path):
    """Every tensor of a .ckpt / .safetensors via MindSpore's own load_checkpoint, as numpy (bf16 kept)."""
    import mindspore as ms
    fmt = "safetensors" if path.endswith(".safetensors") else "ckpt"
    params = ms.load_checkpoint(path, format=fmt)
    out = {}
    for name, p in params.items():
        if p.dtype == ms.bfloat16:
            out[name] = as_ml_dtypes(p.astype(ms.float32).asnumpy().astype(ml_dtypes.bfloat16))
        else:
            out[name] = p.asnumpy()
    return out


def mismatches(got, want, dtype=None):
    """Names whose values, shapes or dtypes differ (a cast is applied to `want` first when dtype is set)."""
    bad = sorted(set(got) ^ set(want))
    for name in set(got) & set(want):
        w = want[name] if dtype is None else want[name].astype(dtype)
        g = got[name]
        if g.shape != w.shape or g.dtype != w.dtype or not np.array_equal(g.view(np.uint8), w.view(np.uint8)):
            bad.append(name)
    return sorted(bad)
