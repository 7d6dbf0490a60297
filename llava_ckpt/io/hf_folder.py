"""A Hugging Face checkpoint folder, read safely: which files hold which tensors, all headers validated.

Only safetensors are read. Pickle formats (.bin/.pt/.pth/.pkl) are refused, never opened. Every file
named by the index must resolve inside the folder (no `..`, no absolute paths, no symlink escapes).
"""
from __future__ import annotations

import json
import os

from ..errors import fail
from .paths import inside
from .readers import read_safetensors_header

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_INDEX = 64 * 1024 * 1024  # the 7B index is 70 KB
# What a checkpoint folder holds beside its weights, and what an output must carry to stand alone: generate
# needs the tokenizer, processor and chat template; export needs config.json back.
SIDE_FILES = (
    "config.json", "generation_config.json",
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
)
MAX_SIDE_FILE = 64 * 1024 * 1024  # tokenizer.json of LLaMA is about 2 MB


def _inside(folder: str, name: str, what: str) -> str:
    """paths.inside, also allowing the hub cache's blob store when `folder` is a snapshot."""
    return inside(folder, name, what, blob_store(folder))


def blob_store(folder: str) -> tuple:
    """The repo's blob store when `folder` is a hub-cache snapshot (models--org--name/snapshots/<commit>/file ->
    ../../blobs/<hash>): files of the snapshot may lead there. Empty otherwise."""
    parent = os.path.dirname(os.path.abspath(folder))
    if os.path.basename(parent) == "snapshots":
        return (os.path.join(parent, "..", "blobs"),)
    return ()


def refuse_ms_output(folder: str, hint: str = "") -> None:
    """Refuse a llava-ckpt convert / shard output (MindSpore weights) where a Hugging Face folder is wanted,
    saying what it is (its .ckpt is not a pickle) and `hint`, what the user may have meant."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read(MAX_INDEX))
    except (OSError, ValueError):
        return
    if isinstance(manifest, dict) and manifest.get("tool") == "llava-ckpt" and \
            manifest.get("command") in ("convert", "shard"):
        raise fail(f"{folder} is a llava-ckpt {manifest['command']} output (MindSpore weights), not a Hugging Face "
                   "checkpoint" + (f"; {hint}" if hint else ""))


def weight_files(folder: str, hint: str = "") -> list:
    """The safetensors files of the checkpoint (from the index if there is one), as real paths. `hint`: see
    refuse_ms_output."""
    if not os.path.isdir(folder):
        raise fail(f"{folder} is not a folder" if os.path.exists(folder) else f"{folder} does not exist")
    refuse_ms_output(folder, hint)
    index_path = os.path.join(folder, INDEX)
    if os.path.lexists(index_path):
        _regular_file(_inside(folder, INDEX, index_path), index_path)
        try:
            with open(index_path, "rb") as f:
                raw = f.read(MAX_INDEX + 1)
            if len(raw) > MAX_INDEX:
                raise fail(f"{index_path}: larger than {MAX_INDEX >> 20} MiB, not a safetensors index")
            index = json.loads(raw.decode("utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise fail(f"{index_path}: not a valid safetensors index (needs a weight_map object)") from None
        files = sorted(set(weight_map.values()), key=str)
        paths = [_inside(folder, name, index_path) for name in files]
        for name, path in zip(files, paths):
            if name.endswith(PICKLE_SUFFIXES):
                raise fail(f"{index_path} names {name}, a pickle file: refused, never unpickled "
                           "(only safetensors weights are read)")
            if not os.path.lexists(path):
                raise fail(f"{index_path} names {name}, which is missing from {folder}")
            _regular_file(path, f"{index_path} names {name}, which")
        return list(zip(files, paths)), weight_map
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        pickles = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES) and not n.endswith(".ckpt"))
        ckpts = sorted(n for n in os.listdir(folder) if n.endswith(".ckpt"))
        if pickles:
            raise fail(f"{folder} holds only pickle weights ({', '.join(pickles + ckpts)}); they are refused, never "
                       "unpickled: convert them to safetensors first")
        if ckpts:
            raise fail(f"{folder} holds no safetensors weights, only {', '.join(ckpts)} (a MindSpore or PyTorch "
                       "Lightning checkpoint, never loaded here): a Hugging Face checkpoint is safetensors")
        raise fail(f"no safetensors weights in {folder}")
    files = [(n, _inside(folder, n, folder)) for n in names]
    for name, path in files:
        _regular_file(path, os.path.join(folder, name))
    return files, None


def looks_like_hf_folder(folder: str) -> bool:
    """A Hugging Face checkpoint folder, by its file names (for messages only): a config.json beside
    transformers' weight files (model.safetensors, model-0000k-of-0000n.safetensors) or their index."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return "config.json" in names and (INDEX in names or any(n.startswith("model") and n.endswith(".safetensors")
                                                               for n in names))


def _regular_file(path: str, what: str) -> None:
    """Refuse FIFOs, devices and folders before opening them (a FIFO would block forever)."""
    if not os.path.isfile(path):
        raise fail(f"{what} is not a regular file")


def read_tensors(folder: str, hint: str = "") -> tuple:
    """(name -> TensorInfo, [(file name, real path)]) for every tensor of the checkpoint in `folder`. `hint`: see
    refuse_ms_output."""
    files, weight_map = weight_files(folder, hint)
    tensors = {}
    where = {}
    for name, path in files:
        for tname, info in read_safetensors_header(path).items():
            if tname in tensors:
                raise fail(f"tensor {tname!r} is in two files: {os.path.join(folder, where[tname])} and "
                           f"{os.path.join(folder, name)}")
            tensors[tname] = info
            where[tname] = name
    if weight_map is not None:
        index_path = os.path.join(folder, INDEX)
        for tname, fname in weight_map.items():
            if tname not in tensors:
                raise fail(f"{index_path} lists {tname!r} in {fname}, but no file holds it")
            if where[tname] != fname:
                raise fail(f"{index_path} lists {tname!r} in {fname}, but it is in {where[tname]}")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise fail(f"{os.path.join(folder, where[extra[0]])} holds {extra[0]!r}, which {index_path} does not list")
    return tensors, files


def side_files(folder: str) -> list:
    """[(name, real path)] of the SIDE_FILES present in `folder`: regular files inside it, of sane size."""
    out = []
    for name in SIDE_FILES:
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            continue
        real = _inside(folder, name, path)
        _regular_file(real, path)
        if os.path.getsize(real) > MAX_SIDE_FILE:
            raise fail(f"{path} is larger than {MAX_SIDE_FILE >> 20} MiB: not a {name}")
        out.append((name, real))
    return out
