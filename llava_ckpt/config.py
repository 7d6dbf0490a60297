"""The checkpoint's config.json with transformers' class defaults filled in where it is silent.

llava-hf/llava-1.5-7b-hf leaves most text and vision sizes to LlamaConfig / CLIPVisionConfig defaults, so
the mapping engine and the reference model read sizes from here, never from config.json directly.
Importing transformers just for its defaults costs seconds, so they are written out below.
"""
from __future__ import annotations

import json
import os

from .errors import fail

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

# LlavaConfig's defaults for the sub-configs when config.json names none of their fields.
LLAVA_VISION_OVERRIDES = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 336, "patch_size": 14, "projection_dim": 768,
}


def normalize_config(raw: dict, where: str = "config.json") -> dict:
    """Return a new dict: LLaVA top level, `text_config` and `vision_config` with every default applied."""
    if not isinstance(raw, dict):
        raise fail(f"{where} is not a JSON object")
    model_type = raw.get("model_type")
    if model_type != "llava":
        raise fail(f"{where} is not a LLaVA config (model_type={model_type!r}, expected 'llava')")
    cfg = dict(LLAVA_DEFAULTS)
    cfg.update({k: v for k, v in raw.items() if k not in ("text_config", "vision_config")})
    text_raw = raw.get("text_config") or {}
    vision_raw = raw.get("vision_config") or {}
    if not isinstance(text_raw, dict) or not isinstance(vision_raw, dict):
        raise fail(f"{where}: text_config and vision_config must be objects")
    text_type = text_raw.get("model_type", "llama")
    if text_type != "llama":
        raise fail(f"{where}: text_config.model_type is {text_type!r}; only LLaMA-based LLaVA-1.5 is supported")
    text = dict(LLAMA_DEFAULTS)
    text.update(text_raw)
    if "vocab_size" not in text_raw and "vocab_size" in raw:
        text["vocab_size"] = raw["vocab_size"]
    if text["num_key_value_heads"] is None:
        text["num_key_value_heads"] = text["num_attention_heads"]
    vision = dict(CLIP_VISION_DEFAULTS)
    vision.update(LLAVA_VISION_OVERRIDES)
    vision.update(vision_raw)
    cfg["text_config"] = text
    cfg["vision_config"] = vision
    _check_sizes(cfg, where)  # before any arithmetic on the sizes
    if text["head_dim"] is None:
        text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    _check_positive(text, "text_config", "head_dim", where)
    return cfg


def _check_positive(d: dict, section: str, key: str, where: str) -> None:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise fail(f"{where}: {section}.{key} must be a positive integer, got {value!r}")


def _check_sizes(cfg: dict, where: str) -> None:
    text, vision = cfg["text_config"], cfg["vision_config"]
    ints = [("text_config", text, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                 "num_hidden_layers", "num_attention_heads",
                                                 "num_key_value_heads")]
    ints += [("vision_config", vision, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads", "image_size", "patch_size",
                                                      "num_channels")]
    for section, d, key in ints:
        _check_positive(d, section, key, where)
    if text["head_dim"] is not None:
        _check_positive(text, "text_config", "head_dim", where)
    if text["num_attention_heads"] % text["num_key_value_heads"]:
        raise fail(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
    if vision["hidden_size"] % vision["num_attention_heads"]:
        raise fail(f"{where}: vision hidden_size must be a multiple of its num_attention_heads")
    layer = cfg["vision_feature_layer"]
    if not isinstance(layer, int) or not -vision["num_hidden_layers"] <= layer <= vision["num_hidden_layers"]:
        raise fail(f"{where}: vision_feature_layer {layer!r} is not an int within the vision tower's layers")


def load_config(folder: str) -> dict:
    """Read and normalize `folder/config.json`; one clear error if it is missing or not LLaVA."""
    path = os.path.join(folder, "config.json")
    if not os.path.lexists(path):
        raise fail(f"no config.json in {folder}")
    if not os.path.isfile(path):
        raise fail(f"{path} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG + 1)
    if len(data) > MAX_CONFIG:
        raise fail(f"{path} is larger than {MAX_CONFIG >> 20} MiB: not a config")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"{path} is not valid JSON ({exc})") from None
    return normalize_config(raw, path)


def dims(cfg: dict) -> dict:
    """The named sizes that mapping tables use in their `shape` fields."""
    text, vision = cfg["text_config"], cfg["vision_config"]
    n_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return {
        "vocab": text["vocab_size"],
        "hidden": text["hidden_size"],
        "ffn": text["intermediate_size"],
        "heads": text["num_attention_heads"],
        "kv_heads": text["num_key_value_heads"],
        "head_dim": text["head_dim"],
        "v_hidden": vision["hidden_size"],
        "v_ffn": vision["intermediate_size"],
        "v_heads": vision["num_attention_heads"],
        "channels": vision["num_channels"],
        "patch": vision["patch_size"],
        "positions": n_patches + 1,
    }


def layer_sets(cfg: dict) -> dict:
    """Layer index ranges a table entry can repeat over (`layers = "text"` etc.)."""
    n_vision = cfg["vision_config"]["num_hidden_layers"]
    feature = cfg["vision_feature_layer"]
    used = feature + n_vision + 1 if feature < 0 else feature  # hidden_states index -> layers run
    return {
        "text": list(range(cfg["text_config"]["num_hidden_layers"])),
        "vision": list(range(n_vision)),
        "vision_unused": list(range(used, n_vision)),
    }
