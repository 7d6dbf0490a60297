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
           max_shard_size=DEFAULT_SHARD_SIZE, progress: bool = True, mapping: str | None = None) -> dict:
    """Export the MindSpore checkpoint `ms_src` into the Hugging Face folder `hf_out`; returns a summary.

    `config`: an HF folder (its config, tokenizer and processor files are copied) or a config.json, used when
    given, else the files MS_SRC carries. `dtype`: cast every tensor (default: the HF source's dtype recorded by
    convert, else the stored dtype). `max_shard_size`: where files are cut when MS_SRC does not record its HF
    files ('5GB', '500MB', '2GiB' or bytes). `mapping`: the table (name or .toml path) MS_SRC was made with,
    when it is not the packaged one that accepts config.json (`convert --mapping`)."""
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
    from .checkpoint import open_checkpoint
    from .config import choose_config, retyped_config
    from .plan import assign_files, parse_size, plan_export
    if dtype is not None and dtype not in BY_NAME:
        raise fail(f"unsupported dtype {dtype!r} (use float16, bfloat16 or float32)")
    max_bytes = parse_size(max_shard_size)
    source = open_checkpoint(ms_src)
    raw, where, side, from_source = choose_config(source, config)
    table = load_table(mapping) if mapping else table_for(raw, where)
    cfg = normalize_config(raw, where, table)
    outs = plan_export(source, table, cfg, dtype, where)
    groups = assign_files(outs, max_bytes)
    out_dtypes = {o.code for o in outs}
    new_config = retyped_config(raw, dtype_name(out_dtypes.pop()) if len(out_dtypes) == 1 else None)
    total = sum(o.nbytes for o in outs)
    with staged_output(hf_out, source.folder, total, source.inputs, expected_hashes=source.expected) as staged:
        staged.files += write_files(staged.stage, groups, total, progress)
        weight_map = {o.name: f for f, g in groups.items() for o in g}
        staged.add(INDEX, write_safetensors_index(os.path.join(staged.stage, INDEX), weight_map, total))
        copied = [(n, p) for n, p in side if not (n == "config.json" and new_config is not None)]
        staged.copy_side_files(copied, {n: s for n, s in source.side_expected.items() if n in from_source})
        if new_config is not None:
            staged.add("config.json", write_atomic(os.path.join(staged.stage, "config.json"), new_config))
        staged.manifest = {
            "command": "export",
            "source": {"path": os.path.abspath(ms_src), "kind": source.kind, "tp": source.tp,
                       "files": None,  # the inputs with their sha256, filled in by the transaction
                       "config": os.path.abspath(where),
                       "skipped_training_state": len(source.skipped)},
            "mapping": {"name": table["name"], "version": table.get("version"), "sha256": table["sha256"],
                        "file": os.path.basename(table["path"])},
            "options": {"dtype": dtype, "max_shard_size": str(max_shard_size), "config": config,
                        **{k: v for k, v in detect_options(table, source.tensors).items()}},
            "tensors": [{"name": o.name, "file": f, "shape": list(o.shape), "dtype": dtype_name(o.code),
                         "from": o.target.name, "op": get_op(o.target.op).inverse_name, "source_index": o.k}
                        for f, g in groups.items() for o in g],
        }
    files = staged.files
    return {"out": os.path.abspath(hf_out), "source_kind": source.kind, "tp": source.tp, "tensors": len(outs),
            "skipped_training_state": len(source.skipped), "bytes": sum(f["size"] for f in files),
            "files": [f["path"] for f in files]}
