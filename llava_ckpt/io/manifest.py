"""manifest.json, the record every output carries: what was written, from what, how, and the sha256 of every
file. Read and written here only; `output_layout` is the one reader of an output's tp and format."""
from __future__ import annotations

import json
import os

from .. import __version__
from ..errors import fail
from .files import read_json, write_atomic
from .paths import inside

NAME = "manifest.json"
FORMATS = ("ckpt", "safetensors")
DEFAULT_FORMAT = "safetensors"  # MindSpore's load_checkpoint takes it at any size (io.writers.ckpt_load_warning)


def write_manifest(folder: str, manifest: dict) -> str:
    manifest = dict(manifest, tool="llava-ckpt", version=__version__)
    return write_atomic(os.path.join(folder, NAME), json.dumps(manifest, indent=1) + "\n")


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, NAME)
    if not os.path.lexists(path):
        raise fail(f"{folder} has no {NAME}: not an output of llava-ckpt convert")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("tool") != "llava-ckpt":
        raise fail(f"{path} is not a llava-ckpt manifest")
    return manifest


def output_layout(manifest: dict, where: str) -> tuple:
    """(tp, format) of a convert / shard output, as its manifest records them (top-level `tp` and `format`)."""
    tp, fmt = manifest.get("tp", 1), manifest.get("format")
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise fail(f"{where}: 'tp' is not a positive integer: {tp!r}")
    if fmt not in FORMATS:
        raise fail(f"{where}: 'format' is {fmt!r}, not ckpt or safetensors")
    return tp, fmt


def recorded_side_files(folder: str, manifest: dict, where: str) -> list:
    """[(name, real path)] of the config / tokenizer / processor files an output's manifest lists (each must be
    there, inside the folder)."""
    from .hf_folder import SIDE_FILES
    listed = {f.get("path") for f in manifest.get("files", []) if isinstance(f, dict)}
    side = [(n, inside(folder, n, where)) for n in SIDE_FILES if n in listed]
    missing = [n for n, p in side if not os.path.isfile(p)]
    if missing:
        raise fail(f"{folder}: {', '.join(missing)} listed in its manifest but missing")
    return side
