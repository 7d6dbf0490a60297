"""Synthetic Hugging Face LLaVA-1.5 checkpoints with the real names, file split, index and tokenizer.

`tiny` is small enough for unit tests and still loads in transformers; `7b` matches the real
llava-hf/llava-1.5-7b-hf index (names, shapes, total_size) exactly; `7b-few-layers` has 7B widths and
2 text layers (about 2 GB) for quick benchmarks. Weights are seeded and scaled so that activations stay
near unit size and logits are far from zero (std-0.02 init gives logits near 0.2, which proves little).
Files are streamed to disk tensor by tensor, so even the 7b preset needs little memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np

from .engine.config import normalize_config
from .errors import fail
from .io.output import staging_dir, publish_dir
from .io.dtypes import code_for, numpy_dtype, itemsize
from .io.writers import SafetensorsWriter
from .engine.mapping import load_table, plan

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "llava-1.5-7b-hf")
COPIED = ["added_tokens.json", "chat_template.json", "generation_config.json", "special_tokens_map.json",
          "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "processor_config.json"]

TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
             "vocab_size": 32064, "model_type": "llama"}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
               "image_size": 56, "patch_size": 14, "projection_dim": 32, "model_type": "clip_vision_model",
               "vocab_size": 32000}
# llava-hf/llava-1.5-13b-hf's text model (vicuna-13b-v1.5); its vision tower and projector input are the
# 7B's (CLIP ViT-L/14-336), the projector maps 1024 -> 5120 -> 5120. Sizes left out take the 7B config's.
TEXT_13B = {"_name_or_path": "lmsys/vicuna-13b-v1.5", "hidden_size": 5120, "intermediate_size": 13824,
            "num_attention_heads": 40, "num_key_value_heads": 40, "num_hidden_layers": 40}
# bakLlava (llava-hf/bakLlava-v1-hf): the same vision tower and projector, a Mistral-7B-v0.1 language model
# (grouped-query attention, 8 KV heads; the sizes of its published config), its vocabulary padded to 32064 for
# the image and pad tokens as the LLaVA conversion pads it. The tokenizer files are llava-1.5's (same
# sentencepiece vocabulary size; a synthetic checkpoint's tokens mean nothing anyway).
MISTRAL_7B = {"_name_or_path": "mistralai/Mistral-7B-v0.1", "architectures": ["MistralForCausalLM"],
              "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 32064}
TINY_MISTRAL = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 32064}
# LLaVA-NeXT (v1.6): LlavaNextForConditionalGeneration, the anyres grid and `image_newline`; llava-v1.6-mistral-7b's
# language model is Mistral-7B-Instruct-v0.2 (rope_theta 1e6, no sliding window), llava-v1.6-vicuna-7b's is
# llava-1.5-7b's (vicuna-7b-v1.5).
NEXT = {"model_type": "llava_next", "architectures": ["LlavaNextForConditionalGeneration"],
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "use_image_newline_parameter": True}
MISTRAL_7B_V02 = dict(MISTRAL_7B, _name_or_path="mistralai/Mistral-7B-Instruct-v0.2", rope_theta=1000000.0,
                      sliding_window=None)
PRESETS = ("tiny", "7b", "7b-few-layers", "13b", "13b-few-layers", "bakllava-tiny", "bakllava-7b",
           "llava-next-mistral-tiny", "llava-next-mistral-7b", "llava-next-vicuna-7b")


def _reference(name: str):
    with open(os.path.join(REFERENCE, name), "rb") as f:
        return json.loads(f.read())


def preset_config(preset: str, text_overrides: dict | None = None) -> dict:
    """config.json contents for a preset (tiny sizes written out; 7b presets are the real config, 13b ones
    its text model widened to llava-1.5-13b-hf's; the few-layers presets keep 2 text layers; the bakllava ones
    have a Mistral language model)."""
    cfg = _reference("config.json")
    if preset == "tiny":
        cfg["text_config"] = dict(TINY_TEXT)
        cfg["vision_config"] = dict(TINY_VISION)
    elif preset == "bakllava-tiny":
        cfg["text_config"] = dict(TINY_MISTRAL)
        cfg["vision_config"] = dict(TINY_VISION)
    elif preset == "bakllava-7b":
        cfg["text_config"] = dict(MISTRAL_7B)
    elif preset == "llava-next-mistral-tiny":
        cfg.update(NEXT)
        cfg["text_config"] = dict(TINY_MISTRAL, rope_theta=1000000.0, sliding_window=None)
        cfg["vision_config"] = dict(TINY_VISION)
        cfg["image_grid_pinpoints"] = [[56, 112], [112, 56], [112, 112]]
    elif preset == "llava-next-mistral-7b":
        cfg.update(NEXT)
        cfg["text_config"] = dict(MISTRAL_7B_V02)
    elif preset == "llava-next-vicuna-7b":
        cfg.update(NEXT)
    elif preset in ("13b", "13b-few-layers"):
        cfg["text_config"] = dict(cfg["text_config"], **TEXT_13B)
    elif preset not in ("7b", "7b-few-layers"):
        raise fail(f"unknown preset {preset!r} (one of {', '.join(PRESETS)})")
    if preset.endswith("-few-layers"):
        cfg["text_config"] = dict(cfg["text_config"], num_hidden_layers=2)
    if text_overrides:
        cfg["text_config"].update(text_overrides)
    return cfg


def hub_tensors(cfg: dict, table: dict | None = None) -> list:
    """(hub name, shape) of every tensor of the HF checkpoint, from the mapping table's sources."""
    seen = {}
    for t in plan(table or load_table(), normalize_config(cfg), {}):
        for name, shape in zip(t.sources, t.source_shapes):
            seen[name] = shape
    return list(seen.items())


def _file_for(name: str, cfg: dict, real_map: dict) -> str:
    """The real checkpoint's file for this name, with layer indices scaled to the real depth.
    `cfg` is a normalized config (llava_ckpt.engine.config.normalize_config)."""
    text_layers = cfg["text_config"]["num_hidden_layers"]
    vision_layers = cfg["vision_config"]["num_hidden_layers"]

    def scale(m):
        n = text_layers if m.group(1).startswith("language") else vision_layers
        real = 32 if m.group(1).startswith("language") else 24
        i = int(m.group(2))
        return f"{m.group(1)}layers.{(i * (real - 1)) // max(n - 1, 1)}."
    real_name = re.sub(r"^(language_model\.model\.|vision_tower\.vision_model\.encoder\.)layers\.(\d+)\.", scale,
                       name)
    # a tensor llava-1.5 has not (LLaVA-NeXT's image_newline) goes with the projector
    return real_map.get(real_name, real_map["multi_modal_projector.linear_1.weight"])


def _init(name: str, shape: tuple, seed: int, dtype: np.dtype, rows_per_chunk: int):
    """Yield the tensor's values in row chunks: seeded by (seed, name), scaled to keep activations O(1)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if name.endswith("lm_head.weight"):
        scale, offset = 3.0 / np.sqrt(fan_in), 0.0
    elif "embed_tokens" in name or "class_embedding" in name:
        scale, offset = 1.0, 0.0
    elif "position_embedding" in name:
        scale, offset = 0.5, 0.0
    elif len(shape) == 1 and ("norm" in name or "layrnorm" in name):
        scale, offset = 0.1, 1.0
    elif len(shape) == 1:
        scale, offset = 0.1, 0.0
    else:
        scale, offset = 1.0 / np.sqrt(fan_in), 0.0
    rows = shape[0]
    for start in range(0, rows, rows_per_chunk):
        n = min(rows_per_chunk, rows - start)
        block = rng.standard_normal((n,) + tuple(shape[1:]), dtype=np.float32)
        block *= np.float32(scale)
        if offset:
            block += np.float32(offset)
        yield block.astype(dtype)


def make_fixture(out: str, preset: str = "tiny", dtype: str = "float16", layout: str = "hub", seed: int = 0,
                 text_overrides: dict | None = None) -> str:
    """Write a synthetic checkpoint folder to `out` (created atomically) and return its path."""
    from .engine.mapping import table_for
    cfg = preset_config(preset, text_overrides)
    table = table_for(cfg)
    layouts = table["layouts"]
    if layout not in layouts:
        raise fail(f"unknown layout {layout!r} (one of {', '.join(layouts)})")
    code = code_for(dtype)
    cfg["torch_dtype"] = dtype
    cfg["text_config"]["torch_dtype"] = dtype
    full = normalize_config(cfg)
    tensors = hub_tensors(cfg, table)
    real_map = _reference("model.safetensors.index.json")["weight_map"]
    by_file: dict = {}
    for name, shape in tensors:
        by_file.setdefault(_file_for(name, full, real_map), []).append((name, shape))

    def rename(name):  # hub spelling -> the layout's spelling, by the table's prefixes
        for hub_prefix, prefix in layouts[layout].items():
            if name.startswith(hub_prefix):
                return prefix + name[len(hub_prefix):]
        return name

    stage = staging_dir(out)
    try:
        weight_map = {}
        total = 0
        for fname in sorted(by_file):
            entries = sorted(by_file[fname])
            specs = [(rename(n), s, code) for n, s in entries]
            writer = SafetensorsWriter(os.path.join(stage, fname), specs, {"format": "pt"})
            for (name, shape), (new_name, _, _) in zip(entries, specs):
                nbytes = int(np.prod(shape)) * itemsize(code)
                row = max(1, nbytes // max(shape[0], 1))
                writer.begin(new_name, shape, code, nbytes)
                for block in _init(name, shape, seed, numpy_dtype(code), max(1, (16 << 20) // row)):
                    writer.write(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
                writer.end()
                weight_map[new_name] = fname
                total += nbytes
            writer.close()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(os.path.join(stage, "model.safetensors.index.json"), index)
        _write_json(os.path.join(stage, "config.json"), cfg)
        for name in COPIED:
            shutil.copyfile(os.path.join(REFERENCE, name), os.path.join(stage, name))
        for name, content in processor_files(full).items():
            _write_json(os.path.join(stage, name), content)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    publish_dir(stage, out)
    return out


# LLaVA-NeXT-Mistral's conversation format ([INST] ... [/INST]), as llava-hf/llava-v1.6-mistral-7b-hf's chat
# template renders one user turn of an image and a question
NEXT_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ ' ' + content['text'] + '</s>' }}{% endfor %}{% endif %}{% endfor %}")


def processor_files(cfg: dict) -> dict:
    """preprocessor_config.json, processor_config.json (and for LLaVA-NeXT-Mistral chat_template.json) sized to
    the vision tower of normalized `cfg`: llava-1.5's CLIP processor, or for LLaVA-NeXT its anyres processor
    (LlavaNextImageProcessor tiling on the config's image_grid_pinpoints, LlavaNextProcessor expanding each
    <image> to the packed feature count)."""
    size = cfg["vision_config"]["image_size"]
    pre = _reference("preprocessor_config.json")
    pre["crop_size"] = {"height": size, "width": size}
    pre["size"] = {"shortest_edge": size}
    proc = _reference("processor_config.json")
    proc["patch_size"] = cfg["vision_config"]["patch_size"]
    files = {"preprocessor_config.json": pre, "processor_config.json": proc}
    if cfg.get("model_type") == "llava_next":
        pre.update(image_processor_type="LlavaNextImageProcessor", processor_class="LlavaNextProcessor",
                   image_grid_pinpoints=cfg["image_grid_pinpoints"], do_pad=True, aspect_ratio_setting="anyres")
        proc["processor_class"] = "LlavaNextProcessor"
        if cfg["text_config"].get("model_type") == "mistral":
            files["chat_template.json"] = {"chat_template": NEXT_MISTRAL_TEMPLATE}
    return files


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
