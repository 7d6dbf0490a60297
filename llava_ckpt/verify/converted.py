"""The converted weights verify reads: a tp-1 folder, or rank_<r>/ folders reassembled by the manifest's
split kinds (llava_ckpt.tp). Everything is lazy: one tensor is read when it is asked for."""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from .. import tp as tpr
from ..errors import fail

_CODES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


class RankTensors(Mapping):
    """Whole tensors from rank pieces (tp.merge by each tensor's split kind). Replicated tensors that differ
    between ranks are recorded in `replica_mismatch` (rank 0's copy is used), so verify can report them
    beside the numerical checks instead of stopping at the first one."""

    def __init__(self, ranks: list, kinds: dict):
        self.ranks, self.kinds = ranks, kinds
        self.replica_mismatch = set()

    def __getitem__(self, name):
        parts = [r[name] for r in self.ranks]
        kind = self.kinds[name]
        if tpr.split_dim(kind, parts[0].ndim) is None and not tpr.replicas_equal(parts):
            self.replica_mismatch.add(name)
            return parts[0]
        return tpr.merge(parts, kind, name)

    def __iter__(self):
        return iter(self.ranks[0])

    def __len__(self):
        return len(self.ranks[0])

    def dtypes(self) -> dict:
        return stored_dtypes(self.ranks[0])

    def close(self):
        for r in self.ranks:
            if hasattr(r, "close"):
                r.close()


def open_converted(ms_dir: str):
    """(lazy name -> array mapping, tp degree) for a convert/shard output folder."""
    from ..io import load_tensors
    from ..io.ranks import rank_dirs
    if not os.path.isdir(ms_dir):
        raise fail(f"{ms_dir} is not a folder")
    dirs = rank_dirs(ms_dir)
    if not dirs:
        return load_tensors(ms_dir), 1
    from ..manifest import read_manifest
    manifest = read_manifest(ms_dir)
    kinds = {}
    for entry in manifest.get("tensors", []):
        if not isinstance(entry, dict) or entry.get("split") not in tpr.SPLIT_KINDS:
            name = entry.get("name") if isinstance(entry, dict) else entry
            raise fail(f"{ms_dir}/manifest.json: no split kind for {name!r}")
        kinds[entry["name"]] = entry["split"]
    ranks = [load_tensors(d) for d in dirs]
    names = set(ranks[0].keys())
    for d, r in zip(dirs[1:], ranks[1:]):
        if set(r.keys()) != names:
            raise fail(f"{ms_dir}: {os.path.basename(d)} holds different tensor names than rank_0")
    unknown = sorted(names - set(kinds))
    if unknown:
        raise fail(f"{ms_dir}/manifest.json does not list {', '.join(unknown[:5])}")
    return RankTensors(ranks, kinds), len(ranks)


def stored_dtypes(tensors) -> dict:
    """name -> dtype name, from file headers when the mapping has them (no tensor data is read)."""
    if hasattr(tensors, "dtypes"):
        return tensors.dtypes()
    infos = getattr(tensors, "infos", None)
    if isinstance(infos, dict):
        return {n: _CODES.get(i.dtype, str(i.dtype)) for n, i in infos.items()}
    return {n: str(np.asarray(v).dtype) for n, v in tensors.items()}
