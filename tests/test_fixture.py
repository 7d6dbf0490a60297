import json
import os

import numpy as np

from llava_ckpt.engine.config import normalize_config
from llava_ckpt.fixture import REFERENCE, hub_tensors, preset_config, _file_for


def test_7b_preset_matches_the_real_index_exactly():
    real = json.load(open(os.path.join(REFERENCE, "model.safetensors.index.json")))
    cfg = preset_config("7b")
    tensors = hub_tensors(cfg)
    assert {n for n, _ in tensors} == set(real["weight_map"])
    assert sum(int(np.prod(s)) * 2 for _, s in tensors) == real["metadata"]["total_size"]
    full = normalize_config(cfg)
    assert {n: _file_for(n, full, real["weight_map"]) for n, _ in tensors} == real["weight_map"]
    shapes = dict(tensors)
    assert shapes["language_model.model.embed_tokens.weight"] == (32064, 4096)
    assert shapes["vision_tower.vision_model.embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert shapes["vision_tower.vision_model.embeddings.position_embedding.weight"] == (577, 1024)


def test_tiny_loads_in_transformers_and_gives_large_logits(tiny):
    import torch
    from transformers import LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32)
    from safetensors import safe_open
    with safe_open(os.path.join(tiny, "model-00001-of-00003.safetensors"), "pt") as f:
        emb = f.get_tensor("language_model.model.embed_tokens.weight").float()
    assert torch.equal(model.get_input_embeddings().weight, emb)
    ids = torch.tensor([[1, 319, 1781, 310]])
    logits = model(input_ids=ids).logits
    assert logits.abs().max() > 3.0  # far from the ~0.2 of a std-0.02 init


def test_fixture_is_deterministic(tmp_path):
    from llava_ckpt.fixture import make_fixture
    a = make_fixture(str(tmp_path / "a"), seed=3)
    b = make_fixture(str(tmp_path / "b"), seed=3)
    for name in sorted(os.listdir(a)):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name


def test_13b_presets_have_llava_13b_shapes():
    for preset, layers in (("13b", 40), ("13b-few-layers", 2)):
        cfg = preset_config(preset)
        shapes = dict(hub_tensors(cfg))
        full = normalize_config(cfg)
        tc = full["text_config"]
        assert (tc["hidden_size"], tc["intermediate_size"], tc["num_attention_heads"], tc["num_key_value_heads"],
                tc["num_hidden_layers"], tc["vocab_size"], tc["head_dim"]) == (5120, 13824, 40, 40, layers, 32064, 128)
        assert shapes["language_model.model.embed_tokens.weight"] == (32064, 5120)
        assert shapes["language_model.lm_head.weight"] == (32064, 5120)
        assert shapes["language_model.model.layers.1.self_attn.q_proj.weight"] == (5120, 5120)
        assert shapes["language_model.model.layers.1.mlp.gate_proj.weight"] == (13824, 5120)
        assert shapes["multi_modal_projector.linear_1.weight"] == (5120, 1024)
        assert shapes["multi_modal_projector.linear_2.weight"] == (5120, 5120)
        # the same CLIP ViT-L/14-336 tower as the 7B
        assert shapes["vision_tower.vision_model.embeddings.position_embedding.weight"] == (577, 1024)
        assert f"language_model.model.layers.{layers - 1}.mlp.down_proj.weight" in shapes
        assert f"language_model.model.layers.{layers}.mlp.down_proj.weight" not in shapes
    params = sum(int(np.prod(s)) for _, s in hub_tensors(preset_config("13b")))
    assert 13.3e9 < params < 13.4e9  # llava-1.5-13b: 13.35 B parameters
