"""What MS_SRC is, and every tensor in it (headers and record indexes only, nothing read yet).

Three kinds: a `convert` / `shard` output (its manifest says how it was made and which HF file every source tensor
came from), a bare MindSpore checkpoint with LlavaVlm names (a .ckpt / .safetensors file, or a folder holding
one), or rank folders with a strategy file as distributed MindSpore training writes them. Optimizer state and
training counters are recognised by name and skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..engine.records import checked_entries
from ..engine.splits import rank_blocks, split_dim
from ..errors import fail
from ..io.dtypes import DTYPES, dtype_name
from ..io.hf_folder import looks_like_hf_folder, side_files
from ..io.manifest import (NAME as MANIFEST, checked_weight_files, output_layout, read_ms_output,
                           recorded_side_files)
from ..io.paths import inside
from ..io.ranks import rank_folders, rank_weight_file, ranked_tensor, single
from ..io.readers import read_index
from ..io.strategy import read_strategy

# What a training checkpoint holds beside the weights: optimizer state (one tensor per parameter, named after
# it) and scalar training fields. Recognised by name, skipped and counted.
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.")
TRAINING_SCALARS = frozenset(("global_step", "learning_rate", "scale_sense", "loss_scale", "epoch_num", "step_num",
                              "current_iterator_step", "last_overflow_iterator_step"))


def is_training_state(name: str) -> bool:
    return name.startswith(OPTIMIZER_PREFIXES) or name in TRAINING_SCALARS


@dataclass
class MsCheckpoint:
    """The MindSpore checkpoint to export, indexed."""
    kind: str                 # "convert" (a convert/shard output), "checkpoint" (one file) or "ranks"
    path: str
    folder: str | None        # the folder HF_OUT must not be inside
    tensors: dict             # name -> RankedTensor, training state left out
    skipped: list             # training-state names
    inputs: list              # [(name in MS_SRC, real path)] of the files read (hashed into the record)
    expected: dict = field(default_factory=dict)        # real path -> sha256 the manifest records
    entries: dict = field(default_factory=dict)         # name -> manifest tensor entry (convert outputs)
    side: list = field(default_factory=list)            # [(name, real path)] config/tokenizer/processor files
    side_expected: dict = field(default_factory=dict)   # name -> sha256 the manifest records
    tp: int = 1
    manifest: dict | None = None                        # a convert / shard output's manifest


def open_checkpoint(ms_src: str) -> MsCheckpoint:
    """Find out what MS_SRC is and index every tensor in it."""
    if not os.path.lexists(ms_src):
        raise fail(f"{ms_src} does not exist")
    if os.path.isfile(ms_src):
        if not ms_src.endswith((".ckpt", ".safetensors")):
            raise fail(f"{ms_src}: expected a MindSpore .ckpt or .safetensors file, or a folder")
        return _one_file(ms_src, None, os.path.realpath(ms_src), [])
    if not os.path.isdir(ms_src):
        raise fail(f"{ms_src} is neither a file nor a folder")
    if os.path.lexists(os.path.join(ms_src, MANIFEST)):
        return _converted(ms_src)
    if looks_like_hf_folder(ms_src):
        raise fail(f"{ms_src} is a Hugging Face checkpoint folder: export takes MindSpore weights back to one "
                   "(`llava-ckpt convert` goes from Hugging Face to MindSpore)")
    dirs = rank_folders(ms_src)
    if dirs:
        return _ranks(ms_src, dirs)
    names = sorted(n for n in os.listdir(ms_src) if n.endswith((".ckpt", ".safetensors")))
    if not names:
        raise fail(f"{ms_src} holds no .ckpt or .safetensors checkpoint, no rank_<r>/ folders and no manifest.json")
    if len(names) > 1:
        raise fail(f"{ms_src} holds {len(names)} checkpoint files ({', '.join(names[:4])}); name the file to export")
    real = inside(ms_src, names[0], os.path.join(ms_src, names[0]))
    if not os.path.isfile(real):
        raise fail(f"{os.path.join(ms_src, names[0])} is not a regular file")
    return _one_file(ms_src, ms_src, real, side_files(ms_src))


def _one_file(ms_src: str, folder, real: str, side: list) -> MsCheckpoint:
    infos = read_index(real, other_dtypes=True)
    tensors, skipped = {}, []
    for name, info in infos.items():
        if is_training_state(name):
            skipped.append(name)
        else:
            _float_only(info)
            tensors[name] = single(info)
    return MsCheckpoint("checkpoint", ms_src, folder, tensors, skipped, [(os.path.basename(real), real)], side=side)


def _float_only(info) -> None:
    if info.dtype not in DTYPES:
        raise fail(f"{info.path}: tensor {info.name!r} has dtype {info.dtype}, not a float16, bfloat16 or float32 "
                   "weight (and its name is not one of the training fields that are skipped)")


def _converted(folder: str) -> MsCheckpoint:
    """A convert / shard output: its manifest names every tensor, its split and its HF source files."""
    where = os.path.join(folder, MANIFEST)
    manifest = read_ms_output(folder, "export takes what convert or shard wrote")
    entries = checked_entries(manifest, where)
    tp, _ = output_layout(manifest, where)
    inputs = checked_weight_files(folder, manifest)
    paths = [p for _, p in inputs]
    indexes = [read_index(p) for p in paths]
    listed = [e["name"] for e in entries]
    for (rel, p), index in zip(inputs, indexes):
        if sorted(index) != sorted(listed):
            extra = sorted(set(index) - set(listed))
            missing = sorted(set(listed) - set(index))
            raise fail(f"{os.path.join(folder, rel)} does not match its manifest (missing: {missing[:4]}, "
                       f"unlisted: {extra[:4]})")
    tensors = {}
    for e in entries:
        dim = split_dim(e["split"], len(e["shape"])) if tp > 1 else None
        blocks = list(range(tp)) if dim is not None else [0] * tp
        rt = ranked_tensor(e["name"], [index[e["name"]] for index in indexes], dim, blocks, tp if dim is not None else 1)
        if list(rt.shape) != list(e["shape"]) or dtype_name(rt.dtype) != e["dtype"]:
            raise fail(f"{rt.pieces[0].path}: tensor {e['name']!r} is {list(rt.shape)} {dtype_name(rt.dtype)}, "
                       f"the manifest says {e['shape']} {e['dtype']}")
        tensors[e["name"]] = rt
    recorded = {f.get("path"): f.get("sha256") for f in manifest["files"]}
    expected = {p: recorded[rel] for rel, p in inputs if isinstance(recorded.get(rel), str)}
    side = recorded_side_files(folder, manifest, where)
    return MsCheckpoint("convert", folder, folder, tensors, [], inputs, expected, {e["name"]: e for e in entries},
                        side, {n: recorded[n] for n, _ in side}, tp, manifest)


def find_strategy(folder: str) -> str:
    """The strategy file of a rank folder set: the one *strategy*.ckpt / *strategy*.json beside rank_<r>/."""
    names = sorted(n for n in os.listdir(folder) if "strategy" in n.lower() and n.endswith((".ckpt", ".json"))
                   and not os.path.isdir(os.path.join(folder, n)))
    if not names:
        raise fail(f"{folder} has rank folders but no strategy file (*strategy*.ckpt or *strategy*.json) saying "
                   "how the tensors are split across them")
    if len(names) > 1:
        raise fail(f"{folder} holds several strategy files ({', '.join(names)}); keep the one this checkpoint used")
    return inside(folder, names[0], os.path.join(folder, names[0]))


def _ranks(folder: str, dirs: list) -> MsCheckpoint:
    """rank_<r>/ folders and a strategy file, as distributed MindSpore training saves them."""
    strategy = find_strategy(folder)
    layouts = read_strategy(strategy)
    paths = [rank_weight_file(d, ()) for d in dirs]
    indexes = [read_index(p, other_dtypes=True) for p in paths]
    root = os.path.realpath(folder)
    rel = [os.path.relpath(p, root) for p in paths]
    names = list(indexes[0])
    for r, index in enumerate(indexes[1:], 1):
        lacking = [n for n in names if n not in index]
        extra = [n for n in index if n not in indexes[0]]
        if lacking or extra:
            what = f"lacks {lacking[0]!r}" if lacking else f"holds {extra[0]!r}, which rank 0 does not"
            raise fail(f"{os.path.join(folder, rel[r])} {what} (every rank holds a piece of every tensor)")
    tensors, skipped = {}, []
    for name in names:
        if is_training_state(name):
            skipped.append(name)
            continue
        pieces = [index[name] for index in indexes]
        for p in pieces:
            _float_only(p)
        layout = layouts.get(name)
        if layout is None:
            raise fail(f"{strategy} has no layout for {name!r}")
        if layout.opt_weight_shard_size > 1:
            raise fail(f"{name}: optimizer-sharded weights (opt_weight_shard_size {layout.opt_weight_shard_size}) "
                       "are not supported; save the checkpoint with optimizer parallelism off")
        dim, blocks, n = rank_blocks(layout.dev_matrix, layout.tensor_map, len(dirs), name)
        tensors[name] = ranked_tensor(name, pieces, dim, blocks, n)
    inputs = [(r, p) for r, p in zip(rel, paths)] + [(os.path.basename(strategy), strategy)]
    return MsCheckpoint("ranks", folder, folder, tensors, skipped, inputs, side=side_files(folder), tp=len(dirs))
