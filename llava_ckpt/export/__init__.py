"""`export`: a MindSpore LLaVA checkpoint back to a Hugging Face folder that transformers loads.

  checkpoint.py  what MS_SRC is (a convert / shard output, one checkpoint file, or rank folders + a strategy
                 file from distributed training) and every tensor in it
  config.py      which config.json and side files the HF folder gets, retyped to the dtype written
  plan.py        every HF tensor to write, from the table's Targets (no reverse table), and the files they go into
The streaming itself is engine/inverse.py (each op's row map read backwards), the folder is written through the
one output transaction (io/output.py). Everything is checked before a byte is written.
"""
from __future__ import annotations

import os

__all__ = ["export", "DEFAULT_SHARD_SIZE"]

DEFAULT_SHARD_SIZE = "5GB"  # transformers' own default for save_pretrained (the CLI reads it here: a light import)


def export(ms_src: str, hf_out: str, config: str | None = None, dtype: str | None = None,
           max_shard_size=DEFAULT_SHARD_SIZE, progress: bool = True, mapping: str | None = None,
           overwrite: bool = False) -> dict:
    """Export the MindSpore checkpoint `ms_src` into the Hugging Face folder `hf_out`; returns a summary.

    `config`: an HF folder (its config, tokenizer and processor files are copied) or a config.json, used when
    given, else the files MS_SRC carries. `dtype`: cast every tensor (default: the HF source's dtype recorded by
    convert, else the stored dtype). `max_shard_size`: where files are cut when MS_SRC does not record its HF
    files ('5GB', '500MB', '2GiB' or bytes). `mapping`: the table (name or .toml path) MS_SRC was made with,
    when it is not the packaged one that accepts config.json (`convert --mapping`). `overwrite`: replace an
    HF_OUT that holds another llava-ckpt output (a folder that holds anything else is never replaced)."""
    from ..engine.config import normalize_config
    from ..engine.inverse import write_files
    from ..engine.mapping import detect_options, load_table, table_for
    from ..engine.ops import get as get_op
    from ..errors import fail
    from ..io.dtypes import BY_NAME, dtype_name
    from ..io.files import write_atomic
    from ..io.hf_folder import INDEX
    from ..io.output import staged_output
    from ..io.writers import write_safetensors_index
    from ..io.checkpoint import open_checkpoint
    from .config import check_agrees, choose_config, retyped_config
    from .plan import assign_files, parse_size, plan_export, round_trip
    if dtype is not None and dtype not in BY_NAME:
        raise fail(f"unsupported dtype {dtype!r} (use float16, bfloat16 or float32)")
    max_bytes = parse_size(max_shard_size)
    source = open_checkpoint(ms_src)
    raw, where, side, from_source = choose_config(source, config)
    table = load_table(mapping) if mapping else table_for(raw, where)
    cfg = normalize_config(raw, where, table)
    if "config.json" not in from_source:  # --config gave it: it must describe the model MS_SRC holds
        check_agrees(table, cfg, where, source)
    outs = plan_export(source, table, cfg, dtype, where)
    lossless = round_trip(outs)
    missing_side = missing_processor_files([n for n, _ in side])
    groups = assign_files(outs, max_bytes)
    out_dtypes = {o.code for o in outs}
    new_config = retyped_config(raw, dtype_name(out_dtypes.pop()) if len(out_dtypes) == 1 else None)
    total = sum(o.nbytes for o in outs)
    where_out = os.path.abspath(hf_out)  # now: when HF_OUT is the current folder, the swap removes the process's
    manifest = {
        "command": "export",
        "source": {"path": os.path.abspath(ms_src), "kind": source.kind, "tp": source.tp,
                   "files": None,  # the inputs with their sha256, filled in by the transaction
                   "config": os.path.abspath(where),
                   "skipped_training_state": len(source.skipped)},
        "mapping": {"name": table["name"], "version": table.get("version"), "sha256": table["sha256"],
                    "file": os.path.basename(table["path"])},
        "options": {"dtype": dtype, "max_shard_size": str(max_shard_size), "config": config,
                    **{k: v for k, v in detect_options(table, source.tensors).items()}},
        "round_trip": lossless,
        "missing_side_files": missing_side,
        "tensors": [{"name": o.name, "file": f, "shape": list(o.shape), "dtype": dtype_name(o.code),
                     "from": o.target.name, "op": get_op(o.target.op).inverse_name, "source_index": o.k}
                    for f, g in groups.items() for o in g],
    }
    with staged_output(hf_out, source.folder, total, manifest, source.inputs, expected_hashes=source.expected,
                       overwrite=overwrite) as staged:
        staged.files += write_files(staged.stage, groups, total, progress)
        weight_map = {o.name: f for f, g in groups.items() for o in g}
        staged.add(INDEX, write_safetensors_index(os.path.join(staged.stage, INDEX), weight_map, total))
        copied = [(n, p) for n, p in side if not (n == "config.json" and new_config is not None)]
        staged.copy_side_files(copied, {n: s for n, s in source.side_expected.items() if n in from_source})
        if new_config is not None:
            staged.add("config.json", write_atomic(os.path.join(staged.stage, "config.json"), new_config))
    files = staged.files
    return {"out": where_out, "source_kind": source.kind, "tp": source.tp, "tensors": len(outs),
            "skipped_training_state": len(source.skipped), "bytes": sum(f["size"] for f in files),
            "round_trip": "exact" if lossless["exact"] else "lossy: " + ", ".join(
                f"{chain} ({n} tensors)" for chain, n in lossless["lossy"].items()),
            "missing_side_files": missing_side, "files": [f["path"] for f in files],
            "warnings": [f"{hf_out} has no {', '.join(missing_side)}: transformers loads its weights, but "
                         "AutoProcessor (prompts, images) needs them; pass --config HF_FOLDER to copy them from "
                         "the Hugging Face folder"] if missing_side else []}


# What AutoProcessor needs beside config.json: a tokenizer (either file), its config, the image processor's.
PROCESSOR_FILES = (("tokenizer.json", "tokenizer.model"), ("tokenizer_config.json",), ("preprocessor_config.json",))


def missing_processor_files(names) -> list:
    """The files an HF folder holding `names` lacks for transformers' AutoProcessor (the weights load without
    them; prompts cannot be built)."""
    return [" or ".join(group) for group in PROCESSOR_FILES if not any(n in names for n in group)]
