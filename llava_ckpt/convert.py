"""`convert`: HF LLaVA-1.5 safetensors -> MindSpore .ckpt / safetensors (optionally N tensor-parallel ranks).

Everything is checked before a byte is written: the config, every header, the table's coverage of the
checkpoint (each source consumed exactly once, every target produced, every shape as config.json says),
tensor-parallel divisibility and free disk space. Then one streaming pass writes all outputs.
"""
from __future__ import annotations

import os

from .config import load_config
from .errors import fail
from .hf_source import read_tensors
from .io.dtypes import code_for, dtype_name
from .manifest import tensor_entries
from .mapping import load_table, plan, detect_layout, to_canonical, unused_names, op_groups
from .stream import Job, in_file_order, tp_problems, write_output


def _listing(names, limit=8, sort=True) -> str:
    names = sorted(names) if sort else list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def plan_conversion(src: str, dtype: str | None = None, fuse_qkv: bool = False, table_name: str = "llava-1.5"):
    """Check the checkpoint in `src` against the table and return (jobs, context) without writing anything."""
    cfg = load_config(src)
    table = load_table(table_name)
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
    jobs = []
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
        jobs.append(Job(t, infos, code, op_groups(t, cfg), tuple(i.name for i in infos), dtype_name(code)))
    context = {"cfg": cfg, "table": table, "layout": layout_name, "files": files, "tensors": tensors}
    return in_file_order(jobs, [p for _, p in files]), context


def tp_sizes(cfg: dict) -> dict:
    """The sizes a tensor-parallel degree must divide (recorded in the manifest for `shard`)."""
    text = cfg["text_config"]
    return {"text heads": text["num_attention_heads"], "KV heads": text["num_key_value_heads"],
            "vocab": text["vocab_size"], "intermediate size": text["intermediate_size"],
            "hidden size": text["hidden_size"]}


def check_tp(jobs, tp: int, sizes: dict) -> None:
    """Exit early, naming the constraint and the valid degrees, when `tp` cannot cut every tensor evenly."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise fail(f"--tp must be a positive integer, got {tp!r}")
    if tp == 1:
        return
    targets = [j.target for j in jobs]

    def fails(n):
        return [f"{k} ({v})" for k, v in sizes.items() if v % n] + tp_problems(targets, n)
    problems = fails(tp)
    if problems:
        valid = [n for n in range(1, 129) if not fails(n)]
        need = ", ".join(f"{k} ({v})" for k, v in sizes.items())
        raise fail(f"--tp {tp} must divide the {need}; it does not divide {_listing(problems, 3, sort=False)}. "
                   f"Valid: {', '.join(map(str, valid))}")


def convert(src: str, out: str, dtype: str | None = None, fmt: str = "ckpt", fuse_qkv: bool = False, tp: int = 1,
            revision: str | None = None, progress: bool = True, table: str = "llava-1.5") -> dict:
    """Convert the HF checkpoint `src` (folder, or hub repo id) into the folder `out`; returns a summary."""
    if fmt not in ("ckpt", "safetensors"):
        raise fail(f"unknown format {fmt!r} (ckpt or safetensors)")
    provenance = {}
    known_hashes = {}
    if not os.path.isdir(src):
        from .hub import is_repo_id, download
        if not is_repo_id(src):
            raise fail(f"{src} is neither a checkpoint folder nor a hub repo id")
        got = download(src, revision=revision, progress=progress)
        provenance = {k: got[k] for k in ("repo_id", "revision", "commit_sha") if k in got}
        known_hashes = {os.path.realpath(os.path.join(got["path"], f["path"])): f["sha256"]
                        for f in got.get("files", []) if f.get("sha256")}
        src = got["path"]
    jobs, ctx = plan_conversion(src, dtype, fuse_qkv, table)
    sizes = tp_sizes(ctx["cfg"])
    check_tp(jobs, tp, sizes)
    manifest = {
        "command": "convert",
        "source": dict(provenance, path=os.path.abspath(src), layout=ctx["layout"]),
        "mapping": {"name": ctx["table"]["name"], "version": ctx["table"].get("version"),
                    "sha256": ctx["table"]["sha256"], "file": os.path.basename(ctx["table"]["path"])},
        "options": {"dtype": dtype, "format": fmt, "fuse_qkv": fuse_qkv, "tp": tp},
        "tp_sizes": sizes,
        "tensors": tensor_entries(jobs, tp, unused_names(ctx["table"], ctx["cfg"])),
    }
    return write_output(out, src, jobs, fmt, tp, ctx["files"], manifest, progress, known_hashes)
