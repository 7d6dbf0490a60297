"""The converted weights verify reads, opened by the one opener (io/checkpoint.py): a tp-1 folder, or rank_<r>/
folders joined by the manifest's split kinds. Everything is lazy: one tensor is read when it is asked for."""
from __future__ import annotations

import os

import numpy as np

from ..errors import fail
from ..io.dtypes import DTYPES, dtype_name


def open_converted(ms_dir: str) -> dict:
    """A convert / shard output for verify: {"checkpoint" (io.checkpoint.Checkpoint), "tensors" (lazy name ->
    whole array mapping, rank pieces joined), "tp", "rank_dirs", "layout" (engine.records.split_layout, for the
    ranks' parallel cells)}. tp and the rank folders come from the manifest; a bare folder holding one .ckpt /
    .safetensors (no manifest) is tp 1."""
    from ..io.checkpoint import open_checkpoint
    from ..io.hf_folder import looks_like_hf_folder
    from ..io.manifest import NAME, read_ms_output
    from ..io.ranks import rank_folders
    from .inputs import SWAPPED
    if not os.path.isdir(ms_dir):
        raise fail(f"{ms_dir} is not a folder" if os.path.exists(ms_dir) else f"{ms_dir} does not exist")
    if not os.path.lexists(os.path.join(ms_dir, NAME)):
        if looks_like_hf_folder(ms_dir):
            read_ms_output(ms_dir, SWAPPED)  # names what it is, with the hint
        if rank_folders(ms_dir):
            raise fail(f"{ms_dir} holds rank_<r>/ folders but no {NAME} saying how its tensors are split "
                       f"(`llava-ckpt shard {ms_dir} OUT --tp N` writes one verify takes)")
    checkpoint = open_checkpoint(ms_dir, "converted MindSpore weights", SWAPPED)
    return {"checkpoint": checkpoint, "tensors": checkpoint.arrays(), "tp": checkpoint.tp,
            "rank_dirs": checkpoint.rank_dirs if checkpoint.tp > 1 else [], "layout": checkpoint.layout()}


def stored_dtypes(tensors) -> dict:
    """name -> dtype name, from file headers when the mapping has them (no tensor data is read)."""
    if hasattr(tensors, "dtypes"):
        return tensors.dtypes()
    infos = getattr(tensors, "infos", None)
    if isinstance(infos, dict):
        return {n: dtype_name(i.dtype) if i.dtype in DTYPES else str(i.dtype) for n, i in infos.items()}
    return {n: str(np.asarray(v).dtype) for n, v in tensors.items()}
