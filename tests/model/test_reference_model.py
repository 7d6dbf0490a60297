"""The reference MindSpore LLaVA against transformers, on tiny models with scaled weights."""
import re

import ml_dtypes
import numpy as np
import pytest
import torch

from llava_ckpt.errors import CheckpointError
from llava_ckpt.model import LlavaVlm, Runner, build_and_load, load_weights

from llava_tiny import hf_model, ms_config, pixels, prompt_ids, to_ms


def brief_names(cfg, fused):
    """The converted names, written out from the MindFormers LlavaVlm naming (not from the model code)."""
    names = ["language_model.model.tok_embeddings.embedding_weight", "language_model.model.norm_out.weight",
             "language_model.lm_head.weight", "vision_encoder.conv1.weight", "vision_encoder.class_embedding",
             "vision_encoder.positional_embedding", "vision_encoder.ln_pre.gamma", "vision_encoder.ln_pre.beta",
             "adapter.adapter.weight", "adapter.adapter.bias", "adapter.adapter_2.weight", "adapter.adapter_2.bias"]
    for i in range(cfg["text_config"]["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        attn = ["w_qkv", "wo"] if fused else ["wq", "wk", "wv", "wo"]
        ffn = ["w_gate_hidden", "w2"] if fused else ["w1", "w2", "w3"]
        names += [f"{p}attention.{n}.weight" for n in attn] + [f"{p}feed_forward.{n}.weight" for n in ffn]
        names += [p + "attention_norm.weight", p + "ffn_norm.weight"]
    used = cfg["vision_config"]["num_hidden_layers"] + cfg["vision_feature_layer"] + 1
    for i in range(used):
        p = f"vision_encoder.transformer.resblocks.{i}."
        for sub in ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            names += [f"{p}{sub}.weight", f"{p}{sub}.bias"]
        names += [f"{p}{ln}.{g}" for ln in ("ln_1", "ln_2") for g in ("gamma", "beta")]
    return set(names)


@pytest.fixture(scope="module")
def gqa():
    """Tiny LLaVA with grouped-query attention (4 query heads, 2 KV heads) and its transformers logits."""
    hf = hf_model(seed=1, num_key_value_heads=2)
    ids, px = prompt_ids(seed=1), pixels(seed=1)
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(px)).logits.numpy()
    return hf, ids, px, logits


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_gqa_logits_match_transformers(gqa, fused):
    hf, ids, px, want = gqa
    cfg = ms_config(hf)
    weights = to_ms(hf, fused=fused)
    model, _ = build_and_load(cfg, weights)
    got_names = {p.name for p in model.get_parameters()}
    assert got_names == brief_names(cfg, fused)
    got = Runner(model).forward(ids, px)["logits"]
    scale = np.abs(want).max()
    assert scale > 3, "weights are not scaled: logits this small prove little"
    assert np.abs(got - want).max() <= 1e-5 * scale
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_kv_cache_decoding_equals_full_recompute_and_transformers(gqa):
    hf, ids, px, _ = gqa
    model, _ = build_and_load(ms_config(hf), to_ms(hf))
    n = 6
    cached = Runner(model).generate(ids, px, n)
    # full recompute: the whole sequence again for every new token (not compiled: one graph per length)
    eager = Runner(model, jit=False)
    seq, tokens, steps = ids, [], []
    for _ in range(n):
        logits = eager.forward(seq, px)["logits"][0, -1]
        steps.append(logits)
        tokens.append(int(logits.argmax()))
        seq = np.concatenate([seq, [[tokens[-1]]]], axis=1)
    assert cached["tokens"] == tokens
    assert np.abs(cached["logits"] - np.stack(steps)).max() <= 1e-5 * np.abs(steps).max()
    with torch.no_grad():
        out = hf.generate(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(px), max_new_tokens=n,
                          do_sample=False, eos_token_id=None)
    assert out[0, ids.shape[1]:].tolist() == tokens


def test_float16_compute_and_low_precision_storage(gqa):
    """bf16 / fp16 stored tensors load by a per-tensor cast; float16 compute stays close to float32."""
    hf, ids, px, want = gqa
    cfg = ms_config(hf)
    weights = {k: v.astype(ml_dtypes.bfloat16 if "language" in k else np.float16) for k, v in to_ms(hf).items()}
    model, stored = build_and_load(cfg, weights, dtype="float16")
    name = "language_model.model.layers.1.attention.wk.weight"
    assert stored[name] == "bfloat16"
    param = {p.name: p for p in model.get_parameters()}[name]
    assert param.asnumpy().dtype == np.float16
    np.testing.assert_array_equal(param.asnumpy(), weights[name].astype(np.float16))
    got = Runner(model).forward(ids, px)["logits"]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 0.05 * scale  # fp16 activations, bf16-rounded weights
    assert np.abs(got - want).max() > 1e-6 * scale  # it really computed in lower precision


def test_bad_names_and_shapes_raise_one_line_errors(gqa):
    hf = gqa[0]
    cfg = ms_config(hf)
    weights = to_ms(hf)
    broken = dict(weights)
    del broken["language_model.model.layers.1.feed_forward.w3.weight"]
    broken["language_model.model.layers.9.attention.wq.weight"] = weights["language_model.lm_head.weight"][:4]
    with pytest.raises(CheckpointError) as err:
        build_and_load(cfg, broken)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.search(r"missing 1: language_model\.model\.layers\.1\.feed_forward\.w3\.weight", msg)
    assert re.search(r"unexpected 1: language_model\.model\.layers\.9\.attention\.wq\.weight", msg)

    wrong = dict(weights, **{"adapter.adapter.bias": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"adapter\.adapter\.bias: checkpoint shape \(3,\)"):
        build_and_load(cfg, wrong)

    with pytest.raises(CheckpointError, match="pixel_values shape"):
        Runner(build_and_load(cfg, weights)[0], jit=False).forward(prompt_ids(), pixels()[:, :, :28])

    model = LlavaVlm(cfg, fused=False)
    with pytest.raises(CheckpointError, match="fused --fuse-qkv layout"):
        load_weights(model, to_ms(hf, fused=True))


def test_unused_vision_layer_and_ln_post_are_optional(gqa):
    hf = gqa[0]
    cfg = ms_config(hf)
    weights = to_ms(hf)
    assert "vision_encoder.transformer.resblocks.2.attn.in_proj.weight" in weights  # present, ignored
    slim = {k: v for k, v in weights.items() if "resblocks.2." not in k and "ln_post" not in k}
    a = Runner(build_and_load(cfg, weights)[0], jit=False).forward(prompt_ids(), pixels())["logits"]
    b = Runner(build_and_load(cfg, slim)[0], jit=False).forward(prompt_ids(), pixels())["logits"]
    np.testing.assert_array_equal(a, b)


def test_attention_bias_adds_nothing_where_kept_and_masks_the_rest():
    from llava_ckpt.model.llama import MASKED, attention_bias
    keep = np.tril(np.ones((3, 3), dtype=bool))[None, None]
    bias = attention_bias(keep)
    assert bias.dtype == np.float32 and bias.shape == keep.shape
    assert (bias[keep] == 0).all() and (bias[~keep] == np.float32(MASKED)).all()
    scores = np.random.default_rng(0).standard_normal(keep.shape).astype(np.float32)
    masked = np.exp(scores + bias - (scores + bias).max(-1, keepdims=True))
    assert (masked[~keep] == 0).all()  # a masked position gets no weight after the softmax
