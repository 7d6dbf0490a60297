"""`shard`: any layout to any layout. Re-cut a MindSpore LLaVA checkpoint into tp-M ranks in one streamed pass.

The source is whatever io/checkpoint.py opens: a convert / shard output of any tp, a bare .ckpt / .safetensors,
or rank folders from distributed MindSpore training (tensor parallel, pipeline stages, optimizer-parallel
slices). A convert / shard output's manifest gives each tensor's split kind; anything else is planned against the
mapping table and its config.json (the one beside it, or --config), exactly as export plans it. Tensors keep the
source's order, so re-cutting a convert output gives the bytes `convert --tp M` gives. Optimizer state and
training counters are skipped and counted. Same streaming core and output transaction as convert: memory holds a
few chunks, never a whole tensor.
"""
from __future__ import annotations

import os

from .engine.forward import PlannedTarget, target_rank_shape, write_checkpoint
from .engine.mapping import Target
from .engine.splits import check_degree, check_divides, distinct_units
from .errors import fail
from .io.dtypes import dtype_name
from .io.manifest import DEFAULT_FORMAT, FORMATS, NAME


def parse_ranks(ranks, tp: int) -> list | None:
    """--ranks "0,1" (or a list of ints) -> sorted rank numbers, each below tp and given once; None for all."""
    if ranks is None:
        return None
    if isinstance(ranks, str):
        parts = [p.strip() for p in ranks.split(",")]
        if not ranks.strip() or not all(p.isdigit() for p in parts):
            raise fail(f"--ranks must be rank numbers separated by commas (e.g. 0,1), got {ranks!r}")
        ranks = [int(p) for p in parts]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks):
        raise fail(f"--ranks must be non-negative rank numbers, got {ranks!r}")
    if len(set(ranks)) != len(ranks):
        raise fail(f"--ranks names a rank twice: {','.join(map(str, ranks))}")
    outside = [r for r in ranks if r >= tp]
    if outside:
        raise fail(f"--ranks {','.join(map(str, ranks))}: rank {outside[0]} does not exist with --tp {tp} "
                   f"(ranks 0..{tp - 1})")
    return sorted(ranks)


def _rename(name: str, split: str, rt) -> PlannedTarget:
    """The target as shard writes it: the source tensor itself, cut by its split kind."""
    target = Target(name, (name,), "rename", split, (tuple(rt.shape),))
    return PlannedTarget(target, (rt,), rt.dtype, (name,), dtype_name(rt.dtype))


def _from_output(source) -> dict:
    """A convert / shard output: its manifest records every tensor's split kind and HF sources."""
    manifest = source.manifest
    if not isinstance(manifest.get("mapping"), dict):
        raise fail(f"{os.path.join(source.path, NAME)}: 'mapping' is not an object")
    planned, entries = [], []
    for name, e in source.entries.items():
        planned.append(_rename(name, e["split"], source.tensors[name]))
        entries.append({k: v for k, v in e.items() if k != "rank_shape"})
    listed = {f.get("path"): f.get("sha256") for f in manifest["files"]}
    from .engine.config import load_config
    if "config.json" not in dict(source.side):
        raise fail(f"{source.path} has no config.json: convert it again with this version of llava-ckpt (convert "
                   "copies the source's config, tokenizer and processor files)")
    return {"planned": planned, "entries": entries, "cfg": load_config(source.path),
            "units": [u for p in planned for u in p.target.tp_units()] + list(manifest.get("tp_sizes", {}).items()),
            "source": dict(manifest.get("source", {}), converted=os.path.abspath(source.path)),
            "mapping": manifest["mapping"],
            "options": {k: v for k, v in manifest.get("options", {}).items() if k not in ("tp", "format", "ranks")},
            "side": source.side, "side_expected": listed}


def _from_training(source, config: str | None, mapping: str | None) -> dict:
    """A checkpoint without a manifest: planned against the mapping table and config.json (export's plan, so the
    names, shapes and fused layout are checked the same way), each tensor cut by the table's split kind."""
    from .engine.config import normalize_config
    from .engine.mapping import detect_options, load_table, table_for, unused_names
    from .engine.records import tensor_entries
    from .export.config import check_agrees, choose_config
    from .export.plan import plan_export
    raw, where, side, from_source = choose_config(source, config)
    table = load_table(mapping) if mapping else table_for(raw, where)
    cfg = normalize_config(raw, where, table)
    if "config.json" not in from_source:
        check_agrees(table, cfg, where, source)
    targets = {o.target.name: o.target for o in plan_export(source, table, cfg, None, where)}
    planned, made = [], []
    for name, rt in source.tensors.items():
        t = targets[name]
        planned.append(_rename(name, t.split, rt))
        made.append(PlannedTarget(t, (rt,), rt.dtype, tuple(t.sources), dtype_name(rt.dtype)))
    return {"planned": planned, "entries": tensor_entries(made, 1, unused_names(table, cfg)), "cfg": cfg,
            "units": [u for t in targets.values() for u in t.tp_units()],
            "source": {"path": os.path.abspath(source.path), "kind": source.kind, "tp": source.tp,
                       "pipeline_stages": source.stages, "skipped_training_state": len(source.skipped),
                       "config": os.path.abspath(where)},
            "mapping": {"name": table["name"], "version": table.get("version"), "sha256": table["sha256"],
                        "file": os.path.basename(table["path"])},
            "options": {"dtype": None, **detect_options(table, source.tensors)},
            "side": side, "side_expected": {}}


def _format_of(source) -> str:
    if source.format:
        return source.format
    first = source.inputs[0][0]
    return "ckpt" if first.endswith(".ckpt") else DEFAULT_FORMAT


def shard(src: str, out: str, tp: int, ranks=None, fmt: str | None = None, config: str | None = None,
          mapping: str | None = None, progress: bool = True, overwrite: bool = False, device: str = "Ascend") -> dict:
    """Write OUT/rank_<r>/llava.<fmt> for r < tp (or OUT/llava.<fmt> for tp 1), OUT/strategy.ckpt and
    OUT/manifest.json from the checkpoint SRC in any layout.

    `ranks`: write only those rank folders (one node of a multi-node job; the same bytes as the full run's).
    `fmt`: ckpt or safetensors (default: the source's). `config` / `mapping`: the config.json (or HF folder) and
    table for a source without a manifest, when it carries none. `overwrite`: replace an OUT that holds another
    llava-ckpt output. `device`: the device_target of the MindFormers predict config written beside them."""
    from .io.checkpoint import open_checkpoint
    from .io.mindformers import check_device, predict_files
    check_degree(tp)
    check_device(device)
    wanted = parse_ranks(ranks, tp)
    if fmt is not None and fmt not in FORMATS:
        raise fail(f"unknown format {fmt!r} (ckpt or safetensors)")
    source = open_checkpoint(src, "a MindSpore checkpoint to shard")
    job = _from_output(source) if source.kind == "convert" else _from_training(source, config, mapping)
    # the split dims, plus the whole units (heads, KV groups, gate/up pairs) the table cuts
    check_divides(job["units"], tp)
    planned = job["planned"]
    entries = [dict(e, rank_shape=list(target_rank_shape(p.target, tp))) if tp > 1 else e
               for e, p in zip(job["entries"], planned)]
    manifest = {
        "command": "shard",
        "source": job["source"],
        "mapping": job["mapping"],
        "options": job["options"],
        "tp_sizes": distinct_units(job["units"]),
        "tensors": entries,
    }
    fmt = fmt or _format_of(source)
    predict = predict_files(job["cfg"], out, fmt, tp, entries, bool(job["options"].get("fuse_qkv")), device,
                           [n for n, _ in job["side"]])
    result = write_checkpoint(out, src, planned, fmt, tp, source.inputs, manifest, progress,
                              expected_hashes=source.expected, inputs_key="converted_files",
                              side_files=job["side"], expected_side=job["side_expected"], overwrite=overwrite,
                              ranks=wanted, extra_files=predict)
    return dict(result, source_kind=source.kind, source_tp=source.tp, skipped_training_state=len(source.skipped))
