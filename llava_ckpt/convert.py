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
from .io.atomic import staging_dir, publish_dir, discard
from .io.dtypes import code_for, dtype_name
from .manifest import tensor_entries, write_manifest
from .mapping import load_table, plan, detect_layout, to_canonical, unused_names, op_groups
from .stream import (Job, write_jobs, open_rank_writers, output_bytes, check_free_space, tp_problems,
                     hash_files_in_background)


def _listing(names, limit=8) -> str:
    names = sorted(names)
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
    return jobs, context


def check_tp(jobs, tp: int) -> None:
    if not isinstance(tp, int) or tp < 1:
        raise fail(f"--tp must be a positive integer, got {tp!r}")
    if tp == 1:
        return
    targets = [j.target for j in jobs]
    groups = {j.n_groups for j in jobs if j.n_groups}
    problems = tp_problems(targets, tp)
    problems += [f"KV heads ({g})" for g in groups if g % tp]
    if problems:
        valid = [n for n in range(1, 129) if not tp_problems(targets, n) and all(g % n == 0 for g in groups)]
        raise fail(f"--tp {tp} does not divide {_listing(problems, 4)}; valid values: "
                   f"{', '.join(map(str, valid))}")


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
    check_tp(jobs, tp)
    stage = staging_dir(out, src)
    try:
        check_free_space(stage, output_bytes(jobs, tp))
        hasher = hash_files_in_background([p for _, p in ctx["files"]], known_hashes)
        paths, writers = open_rank_writers(stage, fmt, jobs, tp, layout_dir=tp > 1)
        try:
            write_jobs(jobs, writers, tp, progress, output_bytes(jobs, tp))
            digests = [w.close() for w in writers]
        except BaseException:
            for w in writers:
                w.abort()
            hasher.stop = True
            raise
        if tp > 1:
            from .strategy import write_strategy
            write_strategy(os.path.join(stage, "strategy.ckpt"),
                           [(j.target.name, j.target.split, j.target.shape) for j in jobs], tp)
        hasher.join()
        if hasher.error:
            raise hasher.error
        manifest = {
            "command": "convert",
            "source": dict(provenance, path=os.path.abspath(src), layout=ctx["layout"],
                           files=[{"name": n, "size": os.path.getsize(p), "sha256": hasher.result[p]}
                                  for n, p in ctx["files"]]),
            "mapping": {"name": ctx["table"]["name"], "version": ctx["table"].get("version"),
                        "sha256": ctx["table"]["sha256"], "file": os.path.basename(ctx["table"]["path"])},
            "options": {"dtype": dtype, "format": fmt, "fuse_qkv": fuse_qkv, "tp": tp},
            "tp": tp,
            "format": fmt,
            "tensors": tensor_entries(jobs, tp, unused_names(ctx["table"], ctx["cfg"])),
            "files": [{"path": os.path.relpath(p, stage), "size": os.path.getsize(p), "sha256": d}
                      for p, d in zip(paths, digests)]
            + ([{"path": "strategy.ckpt", "size": os.path.getsize(os.path.join(stage, "strategy.ckpt")),
                 "sha256": _sha256(os.path.join(stage, "strategy.ckpt"))}] if tp > 1 else []),
        }
        write_manifest(stage, manifest)
        publish_dir(stage, out, synced=False)
    except BaseException:
        discard(stage)
        raise
    return {"out": os.path.abspath(out), "format": fmt, "tp": tp, "tensors": len(jobs),
            "bytes": sum(f["size"] for f in manifest["files"]), "files": [f["path"] for f in manifest["files"]]}


def _sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
