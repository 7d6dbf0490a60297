"""The one opener of a MindSpore checkpoint, whatever its layout: `open_checkpoint(path)` says what PATH is and
indexes every tensor in it (headers and record indexes only; nothing is read until asked for). shard, export,
verify, generate and check all start here.

Three kinds:
  convert     a convert / shard output: its manifest records tp, format, every tensor's split kind and the HF
              tensors and files it came from
  checkpoint  one bare .ckpt / .safetensors file with LlavaVlm names (or a folder holding one)
  ranks       rank_<r>/ folders as distributed MindSpore training saves them, with the strategy file(s) saying
              how each tensor is laid out: tensor parallel, pipeline stages (one strategy file per stage, or
              one merged by ms.merge_pipeline_strategys) and optimizer-parallel slices
Every tensor becomes an io.ranks.RankedTensor (rank pieces and the box of the whole tensor each holds); the
boxes are checked to tile the tensor, and replicas are compared as they are read. Optimizer state and training
counters are recognised by name, skipped and counted; ranks saved at different training steps are refused.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..engine.records import checked_entries, split_layout
from ..engine.splits import rank_boxes, split_dim
from ..errors import fail
from .dtypes import DTYPES, dtype_name
from .hf_folder import looks_like_hf_folder, side_files
from .mindformers import STRATEGY_FOLDER
from .manifest import (NAME as MANIFEST, checked_weight_files, output_layout, read_ms_output,
                       recorded_side_files)
from .paths import inside
from .ranks import boxed_tensor, rank_folders, rank_weight_file, ranked_tensor, single
from .readers import FileReader, read_index
from .strategy import read_stage_layouts

# What a training checkpoint holds beside the weights: optimizer state (one tensor per parameter, named after
# it) and scalar training fields. Recognised by name, skipped and counted.
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.")
TRAINING_SCALARS = frozenset(("global_step", "learning_rate", "scale_sense", "loss_scale", "epoch_num", "step_num",
                              "current_iterator_step", "last_overflow_iterator_step"))
# the fields that say which training step a rank saved: every rank of one checkpoint must agree on them
STEP_FIELDS = ("global_step", "epoch_num", "step_num")
# MindSpore's checkpoint file names end in -<epoch>_<step> (llava_rank_0-3_10.ckpt)
STEP_SUFFIX = re.compile(r"-([0-9]+)_([0-9]+)\.(?:ckpt|safetensors)$")


def is_training_state(name: str) -> bool:
    return name.startswith(OPTIMIZER_PREFIXES) or name in TRAINING_SCALARS


@dataclass
class Checkpoint:
    """A MindSpore checkpoint, indexed: what it is, its tensors (lazy), and the files they come from."""
    kind: str                 # "convert" (a convert/shard output), "checkpoint" (one file) or "ranks"
    path: str
    folder: str | None        # the folder an output must not be inside
    tensors: dict             # name -> RankedTensor, training state left out, in the source's order
    skipped: list             # training-state names
    inputs: list              # [(name in PATH, real path)] of the files read (hashed into the record)
    expected: dict = field(default_factory=dict)        # real path -> sha256 the manifest records
    entries: dict = field(default_factory=dict)         # name -> manifest tensor entry (convert outputs)
    side: list = field(default_factory=list)            # [(name, real path)] config/tokenizer/processor files
    side_expected: dict = field(default_factory=dict)   # name -> sha256 the manifest records
    tp: int = 1               # ranks (rank folders) the weights are spread over
    manifest: dict | None = None                        # a convert / shard output's manifest
    format: str | None = None                           # a convert / shard output's format
    rank_dirs: list = field(default_factory=list)       # the rank folders, in rank order
    stages: int = 1                                     # pipeline stages (training rank folders)

    def layout(self) -> dict | None:
        """name -> [split kind, whole shape] (engine.records.split_layout) of a convert / shard output."""
        return split_layout(self.entries.values()) if self.entries else None

    def dtypes(self) -> dict:
        """name -> stored dtype name, from the headers."""
        return {n: dtype_name(t.dtype) for n, t in self.tensors.items()}

    def arrays(self) -> "CheckpointArrays":
        """A lazy name -> whole numpy array mapping over the tensors (rank pieces joined as they are read)."""
        return CheckpointArrays(self)


class CheckpointArrays(Mapping):
    """name -> the whole tensor as a numpy array, read on access (one tensor in memory at a time). Replicas
    that differ between ranks are recorded in `replica_mismatch` (the first holder's copy is used), so verify
    can report them beside its numerical checks instead of stopping at the first one."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.replica_mismatch: set = set()
        self._reader = FileReader()
        whole = all(t.ranks == 1 for t in checkpoint.tensors.values())
        # one file holds each tensor whole: readers may map it or read straight into their own buffers
        self.infos = {n: t.pieces[0] for n, t in checkpoint.tensors.items()} if whole else None

    def __getitem__(self, name):
        t = self.checkpoint.tensors[name]
        if t.ranks == 1:
            return self._reader.read(t.pieces[0])
        rows = t.shape[0] if t.shape else 1
        data = t.read_rows(self._reader, 0, rows, self.replica_mismatch)
        return data.reshape(t.shape)

    def mapped(self, name) -> np.ndarray | None:
        """A copy-on-write file map of the tensor, no bytes read (None where it is not held whole by one file)."""
        t = self.checkpoint.tensors[name]
        return self._reader.mapped(t.pieces[0]) if t.ranks == 1 else None

    def dtypes(self) -> dict:
        return self.checkpoint.dtypes()

    def __iter__(self):
        return iter(self.checkpoint.tensors)

    def __len__(self):
        return len(self.checkpoint.tensors)

    def close(self):
        self._reader.close()


def open_checkpoint(path: str, what: str = "a MindSpore checkpoint", hint: str = "expected what convert or shard "
                    "wrote") -> Checkpoint:
    """Find out what PATH is and index every tensor in it. `what`: how messages name what was expected; `hint`:
    what a message about a manifest that is not a convert / shard output's adds (what the caller takes)."""
    if not os.path.lexists(path):
        raise fail(f"{path} does not exist")
    if os.path.isfile(path):
        if not path.endswith((".ckpt", ".safetensors")):
            raise fail(f"{path}: expected a MindSpore .ckpt or .safetensors file, or a folder")
        return _one_file(path, None, os.path.realpath(path), [])
    if not os.path.isdir(path):
        raise fail(f"{path} is neither a file nor a folder")
    if os.path.lexists(os.path.join(path, MANIFEST)):
        return _converted(path, hint)
    if looks_like_hf_folder(path):
        raise fail(f"{path} is a Hugging Face checkpoint folder, not {what} (`llava-ckpt convert` goes from "
                   "Hugging Face to MindSpore)")
    dirs = rank_folders(path)
    if dirs:
        return _ranks(path, dirs)
    names = sorted(n for n in os.listdir(path) if n.endswith((".ckpt", ".safetensors")))
    if not names:
        raise fail(f"{path} holds no .ckpt or .safetensors checkpoint, no rank_<r>/ folders and no manifest.json")
    if len(names) > 1:
        raise fail(f"{path} holds {len(names)} checkpoint files ({', '.join(names[:4])}); name the file to use")
    real = inside(path, names[0], os.path.join(path, names[0]))
    if not os.path.isfile(real):
        raise fail(f"{os.path.join(path, names[0])} is not a regular file")
    return _one_file(path, path, real, side_files(path))


def _one_file(path: str, folder, real: str, side: list) -> Checkpoint:
    infos = read_index(real, other_dtypes=True)
    tensors, skipped = {}, []
    for name, info in infos.items():
        if is_training_state(name):
            skipped.append(name)
        else:
            _float_only(info)
            tensors[name] = single(info)
    return Checkpoint("checkpoint", path, folder, tensors, skipped, [(os.path.basename(real), real)], side=side)


def _float_only(info) -> None:
    if info.dtype not in DTYPES:
        raise fail(f"{info.path}: tensor {info.name!r} has dtype {info.dtype}, not a float16, bfloat16 or float32 "
                   "weight (and its name is not one of the training fields that are skipped)")


def _converted(folder: str, hint: str) -> Checkpoint:
    """A convert / shard output: its manifest names every tensor, its split and its HF source files."""
    where = os.path.join(folder, MANIFEST)
    manifest = read_ms_output(folder, hint)
    entries = checked_entries(manifest, where)
    tp, fmt = output_layout(manifest, where)
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
    return Checkpoint("convert", folder, folder, tensors, [], inputs, expected, {e["name"]: e for e in entries},
                      side, {n: recorded[n] for n, _ in side}, tp, manifest, fmt,
                      rank_folders(folder, tp))


def find_strategies(folder: str) -> list:
    """The strategy files of a rank folder set: *strategy*.ckpt / *strategy*.json beside rank_<r>/, and the
    files of a strategy/ folder (one per pipeline stage, as MindFormers keeps them). Each must resolve inside
    `folder`."""
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if "strategy" in name.lower() and name.endswith((".ckpt", ".json")) and not os.path.isdir(path):
            found.append(inside(folder, name, path))
    sub = os.path.join(folder, STRATEGY_FOLDER)
    if os.path.isdir(sub):
        inside(folder, STRATEGY_FOLDER, sub)
        for name in sorted(os.listdir(sub)):
            if name.endswith((".ckpt", ".json")):
                found.append(inside(folder, f"{STRATEGY_FOLDER}/{name}", os.path.join(sub, name)))
    if not found:
        raise fail(f"{folder} has rank folders but no strategy file (*strategy*.ckpt or *strategy*.json, or a "
                   f"{STRATEGY_FOLDER}/ folder) saying how the tensors are split across them")
    return found


def _check_steps(rel: list, indexes: list) -> None:
    """Every rank saved at the same training step: the epoch_step its file name carries, and the step fields
    it holds. A rank from another step would be joined into a tensor that never existed."""
    names = [STEP_SUFFIX.search(os.path.basename(r)) for r in rel]
    if all(names):
        steps = [m.groups() for m in names]
        for r, s in enumerate(steps[1:], 1):
            if s != steps[0]:
                raise fail(f"ranks of different training steps: {rel[0]} is epoch {steps[0][0]} step "
                           f"{steps[0][1]}, {rel[r]} epoch {s[0]} step {s[1]}")
    with FileReader() as reader:
        for key in STEP_FIELDS:
            values = [(r, _raw(reader, index[key])) for r, index in enumerate(indexes) if key in index]
            for r, value in values[1:]:
                if value != values[0][1]:
                    a, b = values[0][0], r
                    raise fail(f"ranks of different training steps: {key} is "
                               f"{_scalar(reader, indexes[a][key])} in {rel[a]}, {_scalar(reader, indexes[b][key])} "
                               f"in {rel[b]}")


def _raw(reader, info) -> bytes:
    if info.nbytes > 1024:
        raise fail(f"{info.path}: training field {info.name!r} is {info.nbytes} bytes, not a scalar")
    return bytes(reader.read_bytes(info, 0, info.nbytes))


# numpy spellings of the training fields' dtypes, for messages only
_SCALAR_TYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                 "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


def _scalar(reader, info) -> str:
    raw = _raw(reader, info)
    kind = _SCALAR_TYPES.get(info.dtype)
    if kind is None:
        return raw.hex()
    a = np.frombuffer(raw, dtype=kind)
    return str(a[0].item()) if a.size == 1 else str(a.tolist())


def _ranks(folder: str, dirs: list) -> Checkpoint:
    """rank_<r>/ folders and strategy file(s), as distributed MindSpore training saves them."""
    strategies = find_strategies(folder)
    layouts = read_stage_layouts(strategies)
    paths = [rank_weight_file(d, ()) for d in dirs]
    root = os.path.realpath(folder)
    rel = [os.path.relpath(p, root) for p in paths]
    indexes = [read_index(p, other_dtypes=True) for p in paths]
    n = len(dirs)
    stages = sorted({s for per in layouts.values() for s in per})
    if stages != list(range(len(stages))):
        missing = sorted(set(range(max(stages) + 1)) - set(stages))
        raise fail(f"mismatched strategies: {folder}'s strategy files hold pipeline stages {stages}, stage "
                   f"{missing[0]} has none (pass every stage's strategy file)")
    n_stages = len(stages)
    if n % n_stages:
        raise fail(f"{folder}: {n} rank folders cannot hold {n_stages} pipeline stages of equal size")
    per = n // n_stages
    devices = {int(np.prod(l.dev_matrix)) for stage in layouts.values() for l in stage.values()}
    if devices != {per}:
        raise fail(f"mismatched strategies: {folder}'s strategy files lay tensors out over "
                   f"{' or '.join(map(str, sorted(devices)))} devices a stage in {n_stages} pipeline stage(s), "
                   f"there are {n} ranks ({per} a stage)")
    _check_steps(rel, indexes)
    order: dict = {}
    for index in indexes:
        for name in index:
            order.setdefault(name, None)
    tensors, skipped = {}, []
    for name in order:
        if is_training_state(name):
            skipped.append(name)
            continue
        holders = [r for r, index in enumerate(indexes) if name in index]
        per_stage = layouts.get(name)
        if per_stage is None:
            raise fail(f"{name}: held by {rel[holders[0]]}, but no strategy file ({', '.join(os.path.basename(s) for s in strategies)}) "
                       "has a layout for it")
        pieces, boxes, labels, whole = [], [], [], None
        for stage, layout in sorted(per_stage.items()):
            if layout.field > 0 or any(layout.param_split_shape):
                raise fail(f"{name}: its layout has an uneven split or an embedding field (param_split_shape "
                           f"{list(layout.param_split_shape)}, field {layout.field}), which is not supported")
            ranks = list(range(stage * per, (stage + 1) * per))
            lacking = [r for r in ranks if name not in indexes[r]]
            if lacking:
                where = (f"every rank of pipeline stage {stage} holds a piece of it" if n_stages > 1
                         else "every rank holds a piece of every tensor")
                raise fail(f"{os.path.join(folder, rel[lacking[0]])} lacks {name!r} (rank {lacking[0]}; {where})")
            first = indexes[ranks[0]][name]
            shape, stage_boxes = rank_boxes(layout.dev_matrix, layout.tensor_map, first.shape, per,
                                            layout.opt_weight_shard_size, name)
            if whole is not None and shape != whole:
                raise fail(f"mismatched strategies: {name} is {list(whole)} on one pipeline stage and "
                           f"{list(shape)} on stage {stage}")
            whole = shape
            for r, box in zip(ranks, stage_boxes):
                _float_only(indexes[r][name])
                pieces.append(indexes[r][name])
                boxes.append(box)
                labels.append(f"rank {r} ({rel[r]})")
        strays = [r for r in holders if r // per not in per_stage]
        if strays:
            raise fail(f"{name}: {rel[strays[0]]} holds it, but the strategy puts it on pipeline stage(s) "
                       f"{sorted(per_stage)} only (rank {strays[0]} is on stage {strays[0] // per})")
        tensors[name] = boxed_tensor(name, pieces, boxes, labels)
    inputs = list(zip(rel, paths)) + [(os.path.relpath(s, root), s) for s in strategies]
    return Checkpoint("ranks", folder, folder, tensors, skipped, inputs, side=side_files(folder), tp=n,
                      rank_dirs=dirs, stages=n_stages)
