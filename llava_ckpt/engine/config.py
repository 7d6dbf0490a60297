"""The checkpoint's config.json with transformers' class defaults filled in where it is silent.

llava-hf/llava-1.5-7b-hf leaves most text and vision sizes to LlamaConfig / CLIPVisionConfig defaults, so
the mapping engine and the reference model read sizes from here, never from config.json directly.
Importing transformers just for its defaults costs seconds, so they are written out below, by model_type.
Which model types are accepted, and which sizes must be valid, is the mapping table's to say.
"""
from __future__ import annotations

import os

from ..errors import fail

MAX_CONFIG = 16 << 20

LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None means: same as num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "head_dim": None,  # None means: hidden_size // num_attention_heads
}

# MistralConfig's defaults (bakLlava's language model): Llama's layer with grouped-query attention, a sliding
# attention window, and its own sizes
MISTRAL_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "head_dim": None,
}

CLIP_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

LLAVA_DEFAULTS = {
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2,
    "multimodal_projector_bias": True,
    "tie_word_embeddings": False,
}

# LlavaNextConfig's: LLaVA's, and the anyres grid the image is tiled on
LLAVA_NEXT_DEFAULTS = dict(LLAVA_DEFAULTS, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                                [336, 1008]], image_seq_length=576)

# LlavaConfig's (and LlavaNextConfig's) defaults for the sub-configs when config.json names none of their fields.
LLAVA_VISION_OVERRIDES = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 336, "patch_size": 14, "projection_dim": 768,
}


# transformers' config classes, by the model_type a config.json names: what each leaves to its defaults.
DEFAULTS = {"llava": LLAVA_DEFAULTS, "llava_next": LLAVA_NEXT_DEFAULTS, "llama": LLAMA_DEFAULTS, "mistral": MISTRAL_DEFAULTS,
            "clip_vision_model": CLIP_VISION_DEFAULTS}


def normalize_config(raw: dict, where: str = "config.json", table: dict | None = None) -> dict:
    """Return a new dict: the top level, `text_config` and `vision_config` with transformers' defaults applied,
    checked against the mapping table (`table`, else the packaged table that accepts this config): model
    types, and every size the table names a positive integer."""
    from .mapping import check_model, table_for
    if not isinstance(raw, dict):
        raise fail(f"{where} is not a JSON object")
    text_raw = raw.get("text_config") or {}
    vision_raw = raw.get("vision_config") or {}
    if not isinstance(text_raw, dict) or not isinstance(vision_raw, dict):
        raise fail(f"{where}: text_config and vision_config must be objects")
    table = table or table_for(raw, where)
    model = table["model"]
    cfg = dict(DEFAULTS.get(raw.get("model_type"), {}))
    cfg.update({k: v for k, v in raw.items() if k not in ("text_config", "vision_config")})
    # LlavaConfig builds a sub-config of the table's first accepted type when config.json names none
    text_type = text_raw.get("model_type") or (model.get("text_model_types") or [None])[0]
    vision_type = vision_raw.get("model_type") or (model.get("vision_model_types") or [None])[0]
    text = dict(DEFAULTS.get(text_type, {}), model_type=text_type)
    text.update(text_raw)
    if "vocab_size" not in text_raw and "vocab_size" in raw:
        text["vocab_size"] = raw["vocab_size"]
    if text.get("num_key_value_heads") is None:
        text["num_key_value_heads"] = text.get("num_attention_heads")
    vision = dict(DEFAULTS.get(vision_type, {}), model_type=vision_type)
    if cfg.get("model_type") in ("llava", "llava_next") and vision_type == "clip_vision_model":
        vision.update(LLAVA_VISION_OVERRIDES)
    vision.update(vision_raw)
    cfg["text_config"] = text
    cfg["vision_config"] = vision
    for section, d in (("text_config", text), ("vision_config", vision)):
        for key in ("hidden_size", "num_attention_heads"):
            _check_positive(d, section, key, where)  # before any arithmetic on them
    if text.get("head_dim") is None:
        text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    _check_positive(text, "text_config", "head_dim", where)
    _check_feature_layer(cfg, where)
    check_model(table, cfg, where)
    return cfg


def _check_positive(d: dict, section: str, key: str, where: str) -> None:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise fail(f"{where}: {section}.{key} must be a positive integer, got {value!r}")


def _check_feature_layer(cfg: dict, where: str) -> None:
    layer = cfg.get("vision_feature_layer")
    n = cfg["vision_config"].get("num_hidden_layers")
    _check_positive(cfg["vision_config"], "vision_config", "num_hidden_layers", where)
    if not isinstance(layer, int) or isinstance(layer, bool) or not -n <= layer <= n:
        raise fail(f"{where}: vision_feature_layer {layer!r} is not an int within the vision tower's layers")


TITLES = {"llava": "LLaVA", "llava_next": "LLaVA-NeXT"}


def model_title(cfg: dict) -> str:
    """What a normalized config is, for messages: 'LLaVA (llama)', 'LLaVA-NeXT (mistral)'."""
    return f"{TITLES.get(cfg.get('model_type'), cfg.get('model_type'))} ({cfg['text_config'].get('model_type')})"


def context_limit(cfg: dict) -> tuple:
    """(positions, what sets them) a prompt and its new tokens must fit: max_position_embeddings, or a sliding
    attention window when it is smaller (Mistral's): past the window transformers attends to the window only,
    which the reference model does not do, so verify and generate refuse such lengths instead of differing."""
    tc = cfg["text_config"]
    limit, what = int(tc["max_position_embeddings"]), "max_position_embeddings"
    window = tc.get("sliding_window")
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < limit:
        limit, what = window, "sliding_window; the reference model has no sliding attention"
    return limit, what


def image_token_count(cfg: dict) -> int:
    """How many image tokens one image becomes in the prompt: its patches, plus CLS when the 'full' feature
    selection keeps it (576 for llava-1.5's 336-pixel, 14-pixel-patch tower). `cfg` normalized. For LLaVA-NeXT
    this is its base image's count, a floor: the tiles add more, by the image's size (model/anyres.py)."""
    vc = cfg["vision_config"]
    n = (vc["image_size"] // vc["patch_size"]) ** 2
    return n + 1 if cfg["vision_feature_select_strategy"] == "full" else n


def read_config(folder: str) -> dict:
    """`folder/config.json` as written (bounded read, one clear error if missing or not JSON)."""
    from ..io.files import read_json
    return read_json(os.path.join(folder, "config.json"), limit=MAX_CONFIG)


def load_config(folder: str, table: dict | None = None) -> dict:
    """Read and normalize `folder/config.json`; one clear error if it is missing or no table accepts it."""
    path = os.path.join(folder, "config.json")
    if not os.path.lexists(path):
        raise fail(f"no config.json in {folder}")
    return normalize_config(read_config(folder), path, table)
