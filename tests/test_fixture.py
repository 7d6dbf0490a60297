import json
import os

import numpy as np

from llava_ckpt.config import normalize_config
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
