"""The MindFormers side of an output: `predict_llava.yaml` and the `strategy/` folder its loader looks for.

MindFormers' LLaVA-1.5 predict flow (research/llava's `LlavaVlm`, scripts/examples/llava/run_llava1_5_predict.sh,
up to MindFormers' tree of 2025-06-09) reads a yaml of the same structure as research/llava's
predict_llava1_5_7b.yaml. Its script overrides `load_checkpoint`, the tokenizer's `vocab_file`,
`parallel_config.model_parallel` (the device count) and `auto_trans_ckpt` from its command line; everything else
comes from the yaml, which a user would otherwise edit by hand: the sizes (the yaml's are the 7B's), `qkv_concat`
(MindFormers' `validate_qkv_concat` refuses a mismatch with the weights), `load_ckpt_format` (the yaml's default
is ckpt), the dtypes. convert and shard write it fitted to what they wrote; `check` names a yaml that was edited
to contradict the weights.

MindFormers' safetensors loader (mindformers/utils/load_checkpoint_utils.py), given rank folders and
`auto_trans_ckpt`, merges the source strategy from a folder: `src_strategy_path_or_dir`, else `strategy/` beside
the checkpoint folder (in its parent), with `ms.merge_pipeline_strategys`. A tp output carries `strategy/` holding
the one stage's strategy file, and the yaml names it, so nothing needs a flag.
"""
from __future__ import annotations

import os

from ..errors import fail

PREDICT_YAML = "predict_llava.yaml"
STRATEGY_FOLDER = "strategy"
STAGE_STRATEGY = "ckpt_strategy_rank_0.ckpt"   # the name MindFormers gives rank 0's (stage 0's) strategy file
DEVICES = ("Ascend", "CPU", "GPU")


def strategy_copy() -> str:
    """Where a tp output keeps the strategy file for MindFormers' loader, relative to the output."""
    return f"{STRATEGY_FOLDER}/{STAGE_STRATEGY}"


def _int(value, default: int) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


def _text(cfg: dict) -> dict:
    t = cfg["text_config"]
    heads = int(t["num_attention_heads"])
    kv = t.get("num_key_value_heads") or heads
    out = {
        "type": "LlamaConfig",
        "hidden_size": int(t["hidden_size"]),
        "num_layers": int(t["num_hidden_layers"]),
        "num_heads": heads,
        "vocab_size": int(t["vocab_size"]),
        "intermediate_size": int(t["intermediate_size"]),
        "rms_norm_eps": float(t["rms_norm_eps"]),
        "theta": float(t.get("rope_theta", 10000.0)),
        "bos_token_id": _int(t.get("bos_token_id"), 1),
        "eos_token_id": _int(t.get("eos_token_id"), 2),
        "pad_token_id": _int(cfg.get("pad_token_id"), 0),
        "emb_dropout_prob": 0.0,
        "use_flash_attention": True,
        "use_past_shard": False,
        "offset": 0,
        "checkpoint_name_or_path": "",
    }
    if int(kv) != heads:
        out["n_kv_heads"] = int(kv)
    return out


def _vision(cfg: dict) -> dict:
    v = cfg["vision_config"]
    side = int(v["image_size"]) // int(v["patch_size"])
    return {
        "type": "LlavaCLIPConfig",
        "auto_register": "llava_config.LlavaCLIPConfig",
        "hidden_size": int(v["hidden_size"]),
        "intermediate_size": int(v["intermediate_size"]),
        "num_hidden_layers": int(v["num_hidden_layers"]),
        "num_attention_heads": int(v["num_attention_heads"]),
        "use_flash_attention": False,
        "image_size": int(v["image_size"]),
        "patch_size": int(v["patch_size"]),
        "num_queries": side * side,
        "hidden_act": str(v.get("hidden_act", "quick_gelu")),
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "checkpoint_name_or_path": "",
        "vision_feature_layer": int(cfg.get("vision_feature_layer", -2)),
        "vision_feature_select_strategy": str(cfg.get("vision_feature_select_strategy", "default")),
    }


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise fail(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    return device


def predict_config(cfg: dict, out: str, fmt: str, tp: int, dtype: str, fused: bool, device: str = "Ascend",
                   tokenizer: bool = True) -> dict:
    """MindFormers' LLaVA-1.5 predict config for an output at `out` (absolute): `cfg` is its normalized
    config.json (engine.config), `dtype` the stored dtype, `fused` whether q/k/v were fused (qkv_concat)."""
    check_device(device)
    out = os.path.abspath(out)
    text, vision = _text(cfg), _vision(cfg)
    text["qkv_concat"] = bool(fused)
    seq = int(cfg["text_config"].get("max_position_embeddings", 4096))
    weights = out if tp > 1 else os.path.join(out, f"llava.{fmt}")
    model_config = {
        "type": "LlavaConfig",
        "auto_register": "llava_config.LlavaConfig",
        "freeze_vision": True,
        "freeze_llm": True,
        "batch_size": 1,
        "seq_length": seq,
        "compute_dtype": dtype,
        "layernorm_compute_type": "float32",
        "softmax_compute_type": "float32",
        "rotary_dtype": dtype,
        "param_init_type": dtype,
        "scaling_factor": 1.0,
        "ignore_token_id": -100,
        "repetition_penalty": 1,
        "use_past": True,
        "block_size": 16,
        "num_blocks": 512,
        "is_dynamic": True,
        "top_k": 0,
        "top_p": 0.8,
        "max_decode_length": 1024,
        "do_sample": False,
        "qkv_concat": bool(fused),
        "vision_config": {"type": "LlavaCLIPConfig", "auto_register": "llava_config.LlavaCLIPConfig",
                          "arch": {"type": "LlavaVisionEncoder", "auto_register": "llava_model.LlavaVisionEncoder"},
                          "model_config": vision},
        "text_config": {"type": "LlamaConfig", "arch": {"type": "LlamaForCausalLM"}, "model_config": text},
    }
    return {
        "seed": 0,
        "output_dir": "./output",
        "load_checkpoint": weights,
        "load_ckpt_format": fmt,
        "src_strategy_path_or_dir": os.path.join(out, STRATEGY_FOLDER) if tp > 1 else "",
        "auto_trans_ckpt": tp > 1,
        "only_save_strategy": False,
        "resume_training": False,
        "use_parallel": tp > 1,
        "run_mode": "predict",
        "trainer": {"type": "MultiModalToTextGenerationTrainer", "model_name": "llava"},
        "runner_config": {"epochs": 1, "batch_size": 1, "sink_mode": True, "sink_size": 1},
        "parallel_config": {"data_parallel": 1, "model_parallel": tp, "pipeline_stage": 1,
                            "use_seq_parallel": False, "micro_batch_num": 1, "vocab_emb_dp": True,
                            "gradient_aggregation_group": 4},
        "micro_batch_interleave_num": 1,
        "model": {"model_config": model_config,
                  "arch": {"type": "LlavaVlm", "auto_register": "llava_model.LlavaVlm"}},
        "processor": {
            "type": "BaseXModalToTextProcessor",
            "max_length": seq,
            "add_special_tokens": True,
            "model_transform_template": {
                "type": "LlavaContentTransformTemplate",
                "auto_register": "llava_processor.LlavaContentTransformTemplate",
                "context_length": vision["num_queries"],
                "image_size": vision["image_size"],
                "text_instruct_mode": True,
                "output_columns": ["input_ids", "images", "image_context_pos", "no_image_tag"],
                "vstack_columns": ["images", "image_context_pos"]},
            "tokenizer": {"add_bos_token": True, "add_eos_token": False,
                          "vocab_file": os.path.join(out, "tokenizer.model") if tokenizer else "",
                          "type": "LlavaTokenizer", "auto_register": "llava_tokenizer.LlavaTokenizer"}},
        "context": {"mode": 0, "device_target": device, "max_call_depth": 10000, "save_graphs": False,
                    "device_id": 0},
        "parallel": {"parallel_mode": 1, "gradients_mean": False, "enable_alltoall": False, "full_batch": True,
                     "search_mode": "sharding_propagation", "enable_parallel_optimizer": False,
                     "strategy_ckpt_config": {"save_file": "./ckpt_strategy.ckpt", "only_trainable_params": False}},
    }


def predict_files(cfg: dict, out: str, fmt: str, tp: int, entries, fused: bool, device: str = "Ascend",
                  names=()) -> list:
    """[(PREDICT_YAML, its text)] for an output at `out` whose manifest tensor entries are `entries`; `names`: the
    side files it carries (the tokenizer's vocab_file is its tokenizer.model, when it has one). Only LLaVA-1.5 and
    bakLlava (model_type llava) get one: research/llava's predict flow is for LlavaVlm; LLaVA-NeXT's research
    model has a config of its own, not written here."""
    if cfg.get("model_type") != "llava":
        return []
    config = predict_config(cfg, out, fmt, tp, stored_dtype(entries), fused, device, "tokenizer.model" in names)
    return [(PREDICT_YAML, predict_yaml(config))]


def predict_yaml(config: dict) -> str:
    import yaml
    head = ("# MindFormers' LLaVA-1.5 predict config, written by llava-ckpt for the weights beside it: sizes from\n"
            "# config.json, qkv_concat as converted, format, dtypes and tensor parallelism as written. Run it with\n"
            "# MindFormers' scripts/examples/llava/run_llava1_5_predict.sh (llava-ckpt's README has the commands).\n"
            "# Edited by hand, `llava-ckpt check` names what contradicts the weights.\n")
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


# what check compares with what the weights need: the sizes, qkv_concat, format, parameter dtype, parallelism
TEXT = "model.model_config.text_config.model_config."
VISION = "model.model_config.vision_config.model_config."
CHECKED = ("load_ckpt_format", "use_parallel", "parallel_config.model_parallel", "model.model_config.qkv_concat",
           "model.model_config.param_init_type", TEXT + "qkv_concat", TEXT + "hidden_size", TEXT + "num_layers",
           TEXT + "num_heads", TEXT + "n_kv_heads", TEXT + "vocab_size", TEXT + "intermediate_size",
           VISION + "hidden_size", VISION + "intermediate_size", VISION + "num_hidden_layers",
           VISION + "num_attention_heads", VISION + "image_size", VISION + "patch_size", VISION + "num_queries")


def stored_dtype(entries) -> str:
    """The dtype most of an output's tensors are stored in (what MindFormers' param_init_type must say)."""
    counts: dict = {}
    for e in entries:
        counts[e["dtype"]] = counts.get(e["dtype"], 0) + 1
    return max(counts, key=counts.get)


def _at(config, dotted: str):
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def contradictions(path: str, expected: dict) -> list:
    """What the yaml at `path` says that contradicts `expected` (predict_config of the output's weights), one
    line per field, naming the yaml and the field: the sizes, qkv_concat, format, dtypes, tensor parallelism."""
    import yaml
    try:
        with open(path, "rb") as f:
            got = yaml.safe_load(f.read(1 << 20))
    except (OSError, yaml.YAMLError) as exc:
        return [f"{os.path.basename(path)}: not a readable yaml ({str(exc).splitlines()[0]})"]
    if not isinstance(got, dict):
        return [f"{os.path.basename(path)}: not a MindFormers config (no mapping at the top)"]
    problems = []
    for dotted in CHECKED:
        want, have = _at(expected, dotted), _at(got, dotted)
        if have != want:
            problems.append(f"{os.path.basename(path)}: {dotted} is {have!r}, the weights need {want!r}")
    return problems
