"""`convert`: HF LLaVA-1.5 safetensors -> MindSpore .ckpt / safetensors (optionally N tensor-parallel ranks).

Everything is checked before a byte is written: the config, every header, the table's coverage of the
checkpoint (each source consumed exactly once, every target produced, every shape as config.json says),
tensor-parallel divisibility and free disk space. Then one streaming pass writes all outputs.
"""
from __future__ import annotations

import os

from .engine.config import load_config, read_config
from .engine.forward import PlannedTarget, in_file_order, write_checkpoint
from .engine.mapping import load_table, plan, detect_layout, table_for, to_canonical, unused_names
from .engine.records import tensor_entries
from .engine.splits import check_degree, check_divides, distinct_units
from .errors import fail
from .io.dtypes import code_for, dtype_name
from .io.hf_folder import read_tensors, refuse_ms_output, side_files
from .io.manifest import DEFAULT_FORMAT, FORMATS
from .io.output import check_out


def _listing(names, limit=8, sort=True) -> str:
    names = sorted(names) if sort else list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def choose_table(src: str, mapping: str | None = None) -> dict:
    """`mapping` (a table name or a .toml path) if given, else the packaged table that accepts config.json."""
    refuse_ms_output(src, "convert reads the Hugging Face folder it came from, and `llava-ckpt export "
                          f"{src} HF_OUT` turns it back into one")
    if mapping:
        return load_table(mapping)
    path = os.path.join(src, "config.json")
    if not os.path.lexists(path):
        raise fail(f"no config.json in {src}")
    return table_for(read_config(src), path)


def plan_conversion(src: str, dtype: str | None = None, fuse_qkv: bool = False, mapping: str | None = None):
    """Check the checkpoint in `src` against the table and return (planned targets, context) without writing
    anything."""
    table = choose_table(src, mapping)
    cfg = load_config(src, table)
    targets = plan(table, cfg, {"fuse_qkv": fuse_qkv})
    tensors, files = read_tensors(src)
    expected = [s for t in targets for s in t.sources]
    uses: dict = {}
    for s in expected:
        uses[s] = uses.get(s, 0) + 1
    twice = [s for s, n in uses.items() if n > 1]
    if twice:
        raise fail(f"{table['path']}: sources used by more than one target: {_listing(twice)}")
    layout_name = detect_layout(table, tensors, uses)
    layout = table["layouts"][layout_name]
    by_canonical = {to_canonical(n, layout): info for n, info in tensors.items()}
    missing = [s for s in expected if s not in by_canonical]
    extra = [by_canonical[c].name for c in by_canonical if c not in uses]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors (hub names): {_listing(missing)}")
        if extra:
            parts.append(f"unexpected tensors: {_listing(extra)}")
        raise fail(f"{src} does not match the {table['name']} table ({layout_name} layout): " + "; ".join(parts))
    planned = []
    out_code = code_for(dtype) if dtype else None
    for t in targets:
        infos = tuple(by_canonical[s] for s in t.sources)
        for info, shape in zip(infos, t.source_shapes):
            if tuple(info.shape) != tuple(shape):
                raise fail(f"{info.path}: tensor {info.name!r} has shape {list(info.shape)}, but config.json "
                           f"implies {list(shape)}")
        if len({i.dtype for i in infos}) != 1:
            raise fail(f"{infos[0].path}: tensors fused into {t.name} have different dtypes")
        code = out_code or infos[0].dtype
        planned.append(PlannedTarget(t, infos, code, tuple(i.name for i in infos), dtype_name(code)))
    context = {"cfg": cfg, "table": table, "layout": layout_name, "files": files, "tensors": tensors,
               "side_files": side_files(src)}
    return in_file_order(planned, [p for _, p in files]), context


def tp_units(targets) -> list:
    """Every size a tensor-parallel degree must divide (split dims, whole heads / KV groups / gate-up pairs),
    from the targets' split kinds and ops."""
    return [u for t in targets for u in t.tp_units()]


def convert(src: str, out: str, dtype: str | None = None, fmt: str = DEFAULT_FORMAT, fuse_qkv: bool = False,
            tp: int = 1, revision: str | None = None, progress: bool = True, mapping: str | None = None,
            overwrite: bool = False, device: str = "Ascend") -> dict:
    """Convert the HF checkpoint `src` (folder, or hub repo id) into the folder `out`; returns a summary (its
    `warnings`: a .ckpt too large for MindSpore's own load_checkpoint on this host, io.writers.ckpt_load_warning).

    `fmt`: "safetensors" (default: MindSpore loads it at any size) or "ckpt". `mapping`: a table name or .toml
    path (default: the packaged table that accepts src's config.json). `overwrite`: replace an OUT that holds
    another llava-ckpt output (a folder holding anything else is never replaced; a rerun of the same conversion
    replaces its own output without asking). `device`: the device_target of the MindFormers predict config
    written beside the weights (OUT/predict_llava.yaml, io/mindformers.py)."""
    from .io.mindformers import check_device, predict_files
    if fmt not in FORMATS:
        raise fail(f"unknown format {fmt!r} (ckpt or safetensors)")
    check_degree(tp)
    check_device(device)
    provenance = {}
    known_hashes = {}
    if not os.path.isdir(src):
        from .hub import is_repo_id, download
        if not is_repo_id(src):
            raise fail(f"{src} is neither a checkpoint folder nor a hub repo id")
        # what OUT holds is checked before the download, as far as it can be known now
        check_out(out, None, {"command": "convert", "source.repo_id": src}, overwrite)
        got = download(src, revision=revision, progress=progress)
        provenance = {k: got[k] for k in ("repo_id", "revision", "commit_sha") if k in got}
        known_hashes = {os.path.realpath(os.path.join(got["path"], f["path"])): f["sha256"]
                        for f in got.get("files", []) if f.get("sha256")}
        src = got["path"]
    planned, ctx = plan_conversion(src, dtype, fuse_qkv, mapping)
    units = tp_units([p.target for p in planned])
    check_divides(units, tp)
    table = ctx["table"]
    manifest = {
        "command": "convert",
        "source": dict(provenance, path=os.path.abspath(src), layout=ctx["layout"]),
        "mapping": {"name": table["name"], "version": table.get("version"),
                    "sha256": table["sha256"], "file": os.path.basename(table["path"])},
        "options": {"dtype": dtype, "fuse_qkv": fuse_qkv},
        "tp_sizes": distinct_units(units),
        "tensors": tensor_entries(planned, tp, unused_names(table, ctx["cfg"]), {p: n for n, p in ctx["files"]}),
    }
    predict = predict_files(ctx["cfg"], out, fmt, tp, manifest["tensors"], fuse_qkv, device,
                           [n for n, _ in ctx["side_files"]])
    return write_checkpoint(out, src, planned, fmt, tp, ctx["files"], manifest, progress, known_hashes,
                            side_files=ctx["side_files"], overwrite=overwrite, extra_files=predict)
