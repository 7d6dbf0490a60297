import json

import pytest

from llava_ckpt.engine.config import load_config, normalize_config
from llava_ckpt.errors import CheckpointError
from llava_ckpt.fixture import REFERENCE
from llava_ckpt.engine.mapping import load_table, plan, detect_layout, to_canonical


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


TABLE = load_table()["path"]


def edited_table(tmp_path, old: str, new: str, name="edited.toml") -> str:
    """A copy of the packaged table with one edit (a user's own variant)."""
    text = open(TABLE, encoding="utf-8").read()
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return str(path)


def test_table_errors_are_clear(tmp_path):
    bad = edited_table(tmp_path, 'split = "vocab"', 'split = "diagonal"')
    with pytest.raises(CheckpointError, match="language_model.model.tok_embeddings.embedding_weight.*unknown split 'diagonal'"):
        load_table(bad)
    bad = edited_table(tmp_path, 'hf = "language_model.model.norm.weight"', 'hf = "language_model.model.norm.weight"\nflavour = 1')
    with pytest.raises(CheckpointError, match="unknown field.*flavour"):
        load_table(bad)
    bad = edited_table(tmp_path, 'layers = "text"', 'layers = "txt"')
    with pytest.raises(CheckpointError, match="unknown layer set 'txt'"):
        load_table(bad)


def test_an_op_with_a_split_it_does_not_allow_is_refused_naming_the_entry(tmp_path):
    # [q; k; v] cut by rows would hand rank 0 all of q: concat_rows does not allow a column split
    old = 'ms = "vision_encoder.transformer.resblocks.{i}.attn.in_proj.weight"\nop = "concat_rows"\nsplit = "replicated"'
    bad = edited_table(tmp_path, old, old.replace('"replicated"', '"column"'))
    with pytest.raises(CheckpointError, match=r"in_proj\.weight.*op 'concat_rows' cannot be split 'column'"):
        load_table(bad)
    old = 'op = "qkv_grouped"\nsplit = "column"'
    bad = edited_table(tmp_path, old, 'op = "qkv_grouped"\nsplit = "vocab"')
    with pytest.raises(CheckpointError, match=r"w_qkv\.weight.*cannot be split 'vocab'"):
        load_table(bad)


def test_sizes_are_expressions_over_config_keys(tmp_path):
    table = load_table()
    cfg = load_config(REFERENCE)
    sizes = __import__("llava_ckpt.engine.mapping", fromlist=["sizes"]).sizes(table, cfg)
    assert sizes["positions"] == 577 and sizes["v_layers_run"] == 23 and sizes["q_per_kv"] == 1
    raw = json.load(open(f"{REFERENCE}/config.json"))
    raw["text_config"]["num_key_value_heads"] = 5
    with pytest.raises(CheckpointError, match=r"q_per_kv.*32 / 5 is not a whole number"):
        normalize_config(raw)
    raw["text_config"]["num_key_value_heads"] = 8
    assert normalize_config(raw)["text_config"]["num_key_value_heads"] == 8


def test_table_is_chosen_from_config_and_mapping_picks_another(tmp_path):
    raw = json.load(open(f"{REFERENCE}/config.json"))
    raw["text_config"]["model_type"] = "qwen2"  # a text model no packaged table accepts
    with pytest.raises(CheckpointError, match="not a LLaVA config that a mapping table accepts.*'qwen2'"):
        normalize_config(raw)
    variant = load_table(edited_table(tmp_path, 'text_model_types = ["llama"]', 'text_model_types = ["llama", "qwen2"]'))
    # no transformers defaults are known for "qwen2": every size must then be written out
    with pytest.raises(CheckpointError, match="text_config.hidden_size must be a positive integer"):
        normalize_config(raw, table=variant)
    raw["text_config"].update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=32064)
    cfg = normalize_config(raw, table=variant)
    assert cfg["text_config"]["head_dim"] == 64 and len(plan(variant, cfg, {})) > 0
    raw["text_config"] = {"model_type": "mistral"}  # bakLlava's: its own table, MistralConfig's defaults
    cfg = normalize_config(raw)
    assert cfg["text_config"]["num_key_value_heads"] == 8 and cfg["text_config"]["intermediate_size"] == 14336


def test_unused_tensors_say_whether_llavavlm_builds_them(tmp_path):
    """ln_post: built by LlavaVlm (its weights load), never applied; the vision layers past the feature layer:
    not built. A table in the old single-list form is refused with what to write instead."""
    from llava_ckpt.engine.mapping import unused_kind, unused_names
    table = load_table()
    unused = unused_names(table, load_config(REFERENCE))
    assert unused_kind("vision_encoder.ln_post.gamma", unused) == "built"
    assert unused_kind("vision_encoder.transformer.resblocks.23.attn.in_proj.weight", unused) == "not_built"
    assert unused_kind("vision_encoder.transformer.resblocks.22.attn.in_proj.weight", unused) is None
    old = edited_table(tmp_path, '[unused.built]\nnames', '[unused]\nnames')
    with pytest.raises(CheckpointError, match=r"\[unused\] holds \[unused.built\].*\[unused.not_built\]"):
        load_table(old)
