"""manifest.json: what was converted, from what, how, and the sha256 of every file written."""
from __future__ import annotations

import json
import os

from . import __version__
from .errors import fail
from .stream import rank_shape, split_dim

NAME = "manifest.json"


def tensor_entries(jobs, tp: int, unused) -> list:
    prefixes = tuple(u for u in unused if u.endswith("."))
    exact = set(u for u in unused if not u.endswith("."))
    entries = []
    for j in jobs:
        t = j.target
        entry = {"name": t.name, "shape": list(t.shape), "dtype": j.out_dtype_name, "sources": list(j.source_names),
                 "op": t.op, "split": t.split, "split_dim": split_dim(t)}
        if t.op == "qkv_grouped":
            entry["layout"] = {"kind": "qkv_grouped", "kv_groups": j.n_groups,
                               "rows_per_group": [s[0] // j.n_groups for s in t.source_shapes]}
        elif t.op in ("interleave_rows", "concat_rows"):
            entry["layout"] = {"kind": t.op, "source_rows": [s[0] for s in t.source_shapes]}
        if tp > 1:
            entry["rank_shape"] = list(rank_shape(t, tp))
        if t.name in exact or t.name.startswith(prefixes):
            entry["unused_by_llavavlm"] = True
        entries.append(entry)
    return entries


def write_manifest(folder: str, manifest: dict) -> None:
    manifest = dict(manifest, tool="llava-ckpt", version=__version__)
    path = os.path.join(folder, NAME)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, NAME)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise fail(f"{folder} has no {NAME}: not an output of llava-ckpt convert") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise fail(f"{path} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("tool") != "llava-ckpt":
        raise fail(f"{path} is not a llava-ckpt manifest")
    return manifest
