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


def read_manifest(folder: str, hint: str = "") -> dict:
    """`folder`'s manifest. `hint`: what to add to the message when there is none (what the user may have
    meant)."""
    path = os.path.join(folder, NAME)
    if not os.path.lexists(path):
        raise fail(f"{folder} has no {NAME}: not an output of llava-ckpt convert" + (f"; {hint}" if hint else ""))
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("tool") != "llava-ckpt":
        raise fail(f"{path} is not a llava-ckpt manifest")
    return manifest


def read_ms_output(folder: str, hint: str = "") -> dict:
    """The manifest of a convert / shard output (MindSpore weights), refusing anything else with what it is:
    a Hugging Face folder that export wrote, or a folder without a manifest. `hint` is added to the message
    (e.g. "did you swap HF_SRC and MS_DIR?")."""
    from .hf_folder import looks_like_hf_folder
    if not os.path.isdir(folder):
        raise fail(f"{folder} is not a folder" if os.path.exists(folder) else f"{folder} does not exist")
    if not os.path.lexists(os.path.join(folder, NAME)) and looks_like_hf_folder(folder):
        raise fail(f"{folder} is a Hugging Face checkpoint folder (no {NAME}), not an output of llava-ckpt convert "
                   "or shard (MindSpore weights)" + (f"; {hint}" if hint else ""))
    manifest = read_manifest(folder, hint)
    command = manifest.get("command")
    if command == "export":
        raise fail(f"{folder} is an output of llava-ckpt export (a Hugging Face folder), not MindSpore weights"
                   + (f"; {hint}" if hint else ""))
    if command not in ("convert", "shard"):
        raise fail(f"{os.path.join(folder, NAME)}: command {command!r} is not convert or shard")
    return manifest


def checked_weight_files(folder: str, manifest: dict) -> list:
    """[(relative path, real path)] of a convert / shard output's weight files, as its manifest records them
    (tp, format), each there, inside the folder, of the size recorded: a truncated or missing rank file is
    named before anything reads it."""
    from .ranks import output_weight_files
    where = os.path.join(folder, NAME)
    tp, fmt = output_layout(manifest, where)
    ranks = output_ranks(manifest, where)
    if len(ranks) != tp:
        raise fail(f"{folder} holds ranks {','.join(map(str, ranks))} of a tp-{tp} output (written by shard "
                   "--ranks, one node's part): gather every node's rank folders into one folder to use it whole")
    files = output_weight_files(folder, tp, fmt)
    sizes = {f.get("path"): f.get("size") for f in manifest.get("files", []) if isinstance(f, dict)}
    for rel, real in files:
        size = os.path.getsize(real)
        if rel in sizes and sizes[rel] != size:
            raise fail(f"{os.path.join(folder, rel)}: {size} bytes, its manifest records {sizes[rel]} (truncated or "
                       "changed; llava-ckpt check names the damage)")
    return files


def output_layout(manifest: dict, where: str) -> tuple:
    """(tp, format) of a convert / shard output, as its manifest records them (top-level `tp` and `format`)."""
    tp, fmt = manifest.get("tp", 1), manifest.get("format")
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise fail(f"{where}: 'tp' is not a positive integer: {tp!r}")
    if fmt not in FORMATS:
        raise fail(f"{where}: 'format' is {fmt!r}, not ckpt or safetensors")
    return tp, fmt


def output_ranks(manifest: dict, where: str) -> list:
    """The rank folders an output holds: all of 0..tp-1, or those `shard --ranks` wrote (manifest `ranks`)."""
    tp, _ = output_layout(manifest, where)
    ranks = manifest.get("ranks", list(range(tp)))
    if (not isinstance(ranks, list) or not ranks or ranks != sorted(set(ranks))
            or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < tp for r in ranks)):
        raise fail(f"{where}: 'ranks' is not a sorted list of distinct ranks below tp {tp}: {ranks!r}")
    return ranks


def identity(manifest: dict) -> dict:
    """What makes two outputs the same run's, as {dotted key: value}: the command, its input (the hub repo and
    revision when it was downloaded, else the path), its options, tp and format, and the mapping table's file.
    An OUT holding an output of the same identity is that run's own, to replace on a rerun; any other is
    replaced only when the user asks (io/output.check_out)."""
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    out = {"command": manifest.get("command")}
    if source.get("repo_id"):
        out.update({"source.repo_id": source.get("repo_id"), "source.revision": source.get("revision")})
    else:
        out["source.path"] = _resolved(source.get("path"))
    if "converted" in source:
        out["source.converted"] = _resolved(source["converted"])
    options = manifest.get("options") if isinstance(manifest.get("options"), dict) else {}
    out.update({f"options.{k}": v for k, v in sorted(options.items()) if k not in ("tp", "format")})
    out.update({k: manifest[k] for k in ("tp", "format", "ranks") if k in manifest})
    if isinstance(manifest.get("mapping"), dict):
        out["mapping.file"] = manifest["mapping"].get("file")
    return out


def _resolved(path):
    """A recorded input path with its links resolved, so the same folder reached through a symlink is the same
    input."""
    return os.path.realpath(path) if isinstance(path, str) else path


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
