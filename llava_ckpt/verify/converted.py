"""The converted weights verify reads: a tp-1 folder, or rank_<r>/ folders reassembled by the manifest's
split kinds (engine/splits.py). Everything is lazy: one tensor is read when it is asked for."""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from ..engine import splits
from ..errors import fail
from ..io.dtypes import DTYPES, dtype_name


class RankTensors(Mapping):
    """Whole tensors from rank pieces (splits.merge by each tensor's split kind). Replicated tensors that differ
    between ranks are recorded in `replica_mismatch` (rank 0's copy is used), so verify can report them
    beside the numerical checks instead of stopping at the first one."""

    def __init__(self, ranks: list, kinds: dict):
        self.ranks, self.kinds = ranks, kinds
        self.replica_mismatch = set()

    def __getitem__(self, name):
        parts = [r[name] for r in self.ranks]
        kind = self.kinds[name]
        if splits.split_dim(kind, parts[0].ndim) is None and not splits.replicas_equal(parts):
            self.replica_mismatch.add(name)
            return parts[0]
        return splits.merge(parts, kind, name)

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


def open_converted(ms_dir: str) -> dict:
    """A convert / shard output for verify: {"tensors" (lazy name -> array mapping, rank pieces merged), "tp",
    "rank_dirs", "layout" (engine.records.split_layout, for the ranks' parallel cells)}. tp and the rank folders
    come from the manifest; a bare folder holding one llava.ckpt / llava.safetensors (no manifest) is tp 1."""
    from ..engine.records import checked_entries, split_layout
    from ..io import load_tensors
    from ..io.hf_folder import looks_like_hf_folder
    from ..io.manifest import NAME, checked_weight_files, output_layout, read_ms_output
    from ..io.ranks import rank_folders
    from .inputs import SWAPPED
    if not os.path.isdir(ms_dir):
        raise fail(f"{ms_dir} is not a folder" if os.path.exists(ms_dir) else f"{ms_dir} does not exist")
    if not os.path.lexists(os.path.join(ms_dir, NAME)) and not looks_like_hf_folder(ms_dir):
        if rank_folders(ms_dir):
            raise fail(f"{ms_dir} holds rank_<r>/ folders but no {NAME} saying how its tensors are split")
        return {"tensors": load_tensors(ms_dir), "tp": 1, "rank_dirs": [], "layout": None}
    where = os.path.join(ms_dir, NAME)
    manifest = read_ms_output(ms_dir, SWAPPED)
    tp, _ = output_layout(manifest, where)
    checked_weight_files(ms_dir, manifest)  # there, inside, and of the recorded sizes (truncation named now)
    dirs = rank_folders(ms_dir, tp)
    layout = split_layout(checked_entries(manifest, where))
    if tp == 1:
        return {"tensors": load_tensors(ms_dir), "tp": 1, "rank_dirs": [], "layout": layout}
    ranks = [load_tensors(d) for d in dirs]
    names = set(ranks[0].keys())
    for d, r in zip(dirs[1:], ranks[1:]):
        if set(r.keys()) != names:
            raise fail(f"{ms_dir}: {os.path.basename(d)} holds different tensor names than rank_0")
    unknown = sorted(names - set(layout))
    if unknown:
        raise fail(f"{where} does not list {', '.join(unknown[:5])}")
    kinds = {name: kind for name, (kind, _) in layout.items()}
    return {"tensors": RankTensors(ranks, kinds), "tp": tp, "rank_dirs": dirs, "layout": layout}


def stored_dtypes(tensors) -> dict:
    """name -> dtype name, from file headers when the mapping has them (no tensor data is read)."""
    if hasattr(tensors, "dtypes"):
        return tensors.dtypes()
    infos = getattr(tensors, "infos", None)
    if isinstance(infos, dict):
        return {n: dtype_name(i.dtype) if i.dtype in DTYPES else str(i.dtype) for n, i in infos.items()}
    return {n: str(np.asarray(v).dtype) for n, v in tensors.items()}
