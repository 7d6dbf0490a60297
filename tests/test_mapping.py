import numpy as np
import pytest

from llava_ckpt.config import load_config, normalize_config
from llava_ckpt.errors import CheckpointError
from llava_ckpt.fixture import REFERENCE
from llava_ckpt.mapping import apply, invert, load_table, plan, detect_layout, to_canonical


def test_ops_have_exact_inverses():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((8, 3)), rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    for op, arrays, groups in [("rename", [q], None), ("concat_rows", [q, k, v], None),
                               ("qkv_grouped", [q, k, v], 2), ("interleave_rows", [k, v], None)]:
        fused = apply(op, arrays, groups)
        back = invert(op, fused, [a.shape for a in arrays], groups)
        assert all(np.array_equal(a, b) for a, b in zip(arrays, back)), op


def test_row_layouts_by_hand():
    q = np.arange(8)[:, None] + 100  # 2 KV groups of 2 heads x 2 rows
    k = np.arange(4)[:, None] + 200
    v = np.arange(4)[:, None] + 300
    grouped = apply("qkv_grouped", [q, k, v], 2)[:, 0]
    assert grouped.tolist() == [100, 101, 102, 103, 200, 201, 300, 301, 104, 105, 106, 107, 202, 203, 302, 303]
    inter = apply("interleave_rows", [k, v])[:, 0]
    assert inter.tolist() == [200, 300, 201, 301, 202, 302, 203, 303]
    assert apply("concat_rows", [k, v])[:, 0].tolist() == [200, 201, 202, 203, 300, 301, 302, 303]


def test_real_config_plan_covers_the_real_index():
    import json
    cfg = load_config(REFERENCE)
    table = load_table()
    index = json.load(open(f"{REFERENCE}/model.safetensors.index.json"))["weight_map"]
    for fuse, count in ((False, 686 - 24 * 4), (True, 686 - 24 * 4 - 32 * 3)):
        targets = plan(table, cfg, {"fuse_qkv": fuse})
        sources = [s for t in targets for s in t.sources]
        assert sorted(sources) == sorted(index) and len(targets) == count
    assert detect_layout(table, index, index) == "hub"


def test_layouts_spell_the_same_tensors():
    table = load_table()
    for layout, name in [("v5", "vision_tower.encoder.layers.3.mlp.fc1.weight"),
                         ("inmemory", "model.vision_tower.encoder.layers.3.mlp.fc1.weight")]:
        assert to_canonical(name, table["layouts"][layout]) == "vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight"
    assert to_canonical("lm_head.weight", table["layouts"]["inmemory"]) == "language_model.lm_head.weight"


def test_config_defaults_and_refusals():
    cfg = load_config(REFERENCE)
    assert cfg["text_config"]["hidden_size"] == 4096 and cfg["text_config"]["num_key_value_heads"] == 32
    assert cfg["vision_config"]["num_hidden_layers"] == 24 and cfg["text_config"]["vocab_size"] == 32064
    with pytest.raises(CheckpointError, match="not a LLaVA config"):
        normalize_config({"model_type": "llama"})


def test_table_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[tensor]]\nhf = "a"\nms = "b"\nsplit = "diagonal"\nshape = [1]\n')
    with pytest.raises(CheckpointError, match="unknown split 'diagonal'"):
        load_table(str(bad))
