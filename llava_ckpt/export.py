"""`export`: a MindSpore LLaVA checkpoint back to a Hugging Face folder that transformers loads.

MS_SRC is a `convert` / `shard` output (its manifest says how it was made and which HF file every source tensor
came from), a bare MindSpore checkpoint with LlavaVlm names (a .ckpt / .safetensors file, or a folder holding
one), or a rank folder set with a strategy file as distributed MindSpore training writes it. The way back uses
the way forward's table: the Targets planned for the options the names reveal give each tensor's op, and the
op's row map (ops.row_map) read backwards gives every HF source row; there is no reverse table. Rank pieces are
joined by the split rules of tp.py (replicas compared as they are read). Optimizer state and training counters
are recognised and skipped; any other tensor the table does not know stops the run.

Everything is checked before a byte is written (names, shapes against config.json, rank pieces, free space);
then one streaming pass writes the safetensors files in a staging folder, which is fsynced and swapped in.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .config import MAX_CONFIG, normalize_config
from .errors import fail
from .hf_source import INDEX, SIDE_FILES, inside, side_files
from .io.atomic import discard, publish_dir, staging_dir
from .io.dtypes import BY_NAME, DTYPES, code_for, dtype_name, itemsize, numpy_dtype
from .io.files import read_json, write_atomic
from .io.load import weights_file
from .io.ranks import RankedTensor, rank_dirs, rank_weight_file, ranked_tensor, single
from .io.source import FileReader, read_index
from .io.writers import SafetensorsWriter, write_safetensors_index
from .manifest import NAME as MANIFEST, checked_entries, read_manifest, write_manifest
from .mapping import detect_options, load_table, plan, table_for
from .ops import get as get_op, row_map
from .strategy import read_strategy
from .stream import CHUNK, check_free_space, copy_side_files, hash_files_in_background
from .tp import rank_blocks, split_dim

# What a training checkpoint holds beside the weights: optimizer state (one tensor per parameter, named after
# it) and scalar training fields. Recognised by name, skipped and counted.
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.")
TRAINING_SCALARS = frozenset(("global_step", "learning_rate", "scale_sense", "loss_scale", "epoch_num", "step_num",
                              "current_iterator_step", "last_overflow_iterator_step"))
DEFAULT_SHARD_SIZE = "5GB"
MIN_RUN = 256 << 10  # source rows whose target rows run contiguously for less than this are read as one span


def is_training_state(name: str) -> bool:
    return name.startswith(OPTIMIZER_PREFIXES) or name in TRAINING_SCALARS


def parse_size(size) -> int:
    """'5GB' (10**9, as transformers counts), '500MB', '2GiB' (2**30), '123' (bytes) -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise fail(f"--max-shard-size {size!r} is not a size such as 5GB, 500MB or 2GiB")
        unit = (m.group(2) or "B").upper()
        power = "BKMGT".index(unit[0])
        value = int(float(m.group(1)) * ((1024 if "I" in unit else 1000) ** power))
    if value <= 0:
        raise fail(f"--max-shard-size must be positive, got {size!r}")
    return value


# ---- what MS_SRC is ---------------------------------------------------------------------------------------

@dataclass
class Source:
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


def open_source(ms_src: str) -> Source:
    """Find out what MS_SRC is and index every tensor in it (headers and record indexes only)."""
    if not os.path.lexists(ms_src):
        raise fail(f"{ms_src} does not exist")
    if os.path.isfile(ms_src):
        if not ms_src.endswith((".ckpt", ".safetensors")):
            raise fail(f"{ms_src}: expected a MindSpore .ckpt or .safetensors file, or a folder")
        real = os.path.realpath(ms_src)
        return _one_file(ms_src, None, real, [])
    if not os.path.isdir(ms_src):
        raise fail(f"{ms_src} is neither a file nor a folder")
    if os.path.lexists(os.path.join(ms_src, MANIFEST)):
        return _converted(ms_src)
    dirs = rank_dirs(ms_src)
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


def _one_file(ms_src: str, folder, real: str, side: list) -> Source:
    infos = read_index(real, other_dtypes=True)
    tensors, skipped = {}, []
    for name, info in infos.items():
        if is_training_state(name):
            skipped.append(name)
        else:
            _float_only(info)
            tensors[name] = single(info)
    return Source("checkpoint", ms_src, folder, tensors, skipped, [(os.path.basename(real), real)], side=side)


def _float_only(info) -> None:
    if info.dtype not in DTYPES:
        raise fail(f"{info.path}: tensor {info.name!r} has dtype {info.dtype}, not a float16, bfloat16 or float32 "
                   "weight (and its name is not one of the training fields that are skipped)")


def _converted(folder: str) -> Source:
    """A convert / shard output: its manifest names every tensor, its split and its HF source files."""
    where = os.path.join(folder, MANIFEST)
    manifest = read_manifest(folder)
    command = manifest.get("command")
    if command == "export":
        raise fail(f"{folder} is an output of llava-ckpt export (a Hugging Face folder), not a MindSpore checkpoint")
    if command not in ("convert", "shard"):
        raise fail(f"{where}: command {command!r} is not convert or shard")
    entries = checked_entries(manifest, where)
    tp = manifest.get("tp", 1)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise fail(f"{where}: 'tp' is not a positive integer: {tp!r}")
    fmt = manifest.get("format")
    if fmt not in ("ckpt", "safetensors"):
        raise fail(f"{where}: 'format' is {fmt!r}, not ckpt or safetensors")
    if tp == 1:
        paths = [weights_file(folder)]
    else:
        dirs = rank_dirs(folder)
        if len(dirs) != tp:
            raise fail(f"{folder}: the manifest says {tp} ranks, there are {len(dirs)} rank folders"
                       + ("" if dirs else " (rank_0 missing)"))
        paths = [rank_weight_file(d, (f"llava.{fmt}",)) for d in dirs]
    root = os.path.realpath(folder)
    inputs = [(os.path.relpath(p, root), p) for p in paths]
    for rel, p in inputs:
        if os.path.commonpath([root, p]) != root:
            raise fail(f"{os.path.join(folder, rel)} resolves outside {folder}")
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
    side = [(n, inside(folder, n, where)) for n in SIDE_FILES if n in recorded]
    gone = [n for n, p in side if not os.path.isfile(p)]
    if gone:
        raise fail(f"{folder}: {', '.join(gone)} listed in its manifest but missing")
    return Source("convert", folder, folder, tensors, [], inputs, expected, {e["name"]: e for e in entries}, side,
                  {n: recorded[n] for n, _ in side}, tp)


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


def _ranks(folder: str, dirs: list) -> Source:
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
    return Source("ranks", folder, folder, tensors, skipped, inputs, side=side_files(folder), tp=len(dirs))


# ---- config and side files ----------------------------------------------------------------------------------

def choose_config(source: Source, config: str | None) -> tuple:
    """(raw config.json, where it came from, side files [(name, real path)], the names whose record to check).
    `--config` (an HF folder, whose side files are copied, or a config.json) overrides what MS_SRC carries."""
    side = dict(source.side)
    from_source = set(side)
    if config:
        if os.path.isdir(config):
            given = side_files(config)
            if "config.json" not in dict(given):
                raise fail(f"--config {config}: no config.json in that folder")
            side.update(given)
            from_source -= set(dict(given))
        elif os.path.lexists(config):
            if not os.path.isfile(config):
                raise fail(f"--config {config} is not a regular file")
            side["config.json"] = os.path.realpath(config)
            from_source.discard("config.json")
        else:
            raise fail(f"--config {config} does not exist")
    if "config.json" not in side:
        raise fail(f"{source.path} carries no config.json: pass --config (a Hugging Face folder or a config.json)")
    where = config if config and os.path.isfile(config) else (
        os.path.join(config, "config.json") if config else os.path.join(source.path, "config.json"))
    raw = read_json(side["config.json"], where, MAX_CONFIG)
    if not isinstance(raw, dict):
        raise fail(f"{where} is not a JSON object")
    return raw, where, list(side.items()), from_source


def retyped_config(raw: dict, out_dtype: str | None) -> bytes | None:
    """config.json with its dtype fields (torch_dtype / dtype, top level and text_config) set to the exported
    dtype, so that from_pretrained's dtype="auto" loads what was written; None when they already say it."""
    if out_dtype is None:
        return None
    raw = json.loads(json.dumps(raw))
    changed = False
    for d in (raw, raw.get("text_config") if isinstance(raw.get("text_config"), dict) else None):
        if d is None:
            continue
        for key in ("torch_dtype", "dtype"):
            if key in d and d[key] != out_dtype:
                d[key] = out_dtype
                changed = True
    return (json.dumps(raw, indent=2) + "\n").encode("utf-8") if changed else None


# ---- planning -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutTensor:
    """One HF tensor to write: source `k` of `target`, read back from `tensor` (the MindSpore tensor)."""
    name: str
    shape: tuple
    code: str
    target: object
    k: int
    tensor: RankedTensor
    file: str | None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.code)


def _listing(names, limit=6) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def plan_export(source: Source, table: dict, cfg: dict, dtype: str | None, where: str) -> list:
    """Every HF tensor to write, checked against the table and config.json. Nothing is written here."""
    names = list(source.tensors)
    options = detect_options(table, names)
    targets = plan(table, cfg, options)
    by_name = {t.name: t for t in targets}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise fail(f"{source.path}: tensor(s) that the {table['name']} table does not know and that are not "
                   f"training state: {_listing(unknown)}")
    missing = [t.name for t in targets if t.name not in source.tensors]
    if missing:
        raise fail(f"{source.path}: missing tensors: {_listing(missing)}")
    out_code = code_for(dtype) if dtype else None
    outs = []
    for t in targets:
        rt = source.tensors[t.name]
        if tuple(rt.shape) != tuple(t.shape):
            raise fail(f"{rt.pieces[0].path}: tensor {t.name!r} has shape {list(rt.shape)}, but {where} implies "
                       f"{list(t.shape)}")
        entry = source.entries.get(t.name)
        hf_names, files, code = t.sources, [None] * len(t.sources), out_code or rt.dtype
        if entry is not None:
            recorded_shapes = entry.get("source_shapes", [list(s) for s in t.source_shapes])
            if (entry["op"] != t.op or entry["split"] != t.split or len(entry["sources"]) != len(t.sources)
                    or recorded_shapes != [list(s) for s in t.source_shapes]):
                raise fail(f"{source.path}/{MANIFEST}: {t.name!r} was made by {entry['op']} of "
                           f"{len(entry['sources'])} source(s) {recorded_shapes}, split {entry['split']}; the table "
                           f"says {t.op} of {len(t.sources)} {[list(s) for s in t.source_shapes]}, split {t.split}")
            hf_names = entry["sources"]
            if isinstance(entry.get("source_files"), list) and len(entry["source_files"]) == len(t.sources):
                files = [_plain_file(f, source) for f in entry["source_files"]]
            if not out_code and entry.get("source_dtype") in BY_NAME:
                code = code_for(entry["source_dtype"])
        for k, (name, shape) in enumerate(zip(hf_names, t.source_shapes)):
            outs.append(OutTensor(name, tuple(shape), code, t, k, rt, files[k]))
    seen = set()
    for o in outs:
        if o.name in seen:
            raise fail(f"{source.path}: HF tensor {o.name!r} would be written twice")
        seen.add(o.name)
    return outs


def _plain_file(name, source: Source) -> str:
    if (not isinstance(name, str) or not name.endswith(".safetensors") or "/" in name or "\\" in name
            or name.startswith(".") or name == INDEX):
        raise fail(f"{source.path}/{MANIFEST}: source file {name!r} is not a plain .safetensors file name")
    return name


def assign_files(outs: list, max_bytes: int) -> dict:
    """file name -> its tensors (sorted by name). The source's own files when every tensor records one (a
    convert output), else model-0000k-of-0000n.safetensors cut at `max_bytes` as transformers cuts them."""
    if outs and all(o.file for o in outs):
        groups: dict = {}
        for o in outs:
            groups.setdefault(o.file, []).append(o)
    else:
        shards, cur, size = [], [], 0
        for o in outs:
            if cur and size + o.nbytes > max_bytes:
                shards.append(cur)
                cur, size = [], 0
            cur.append(o)
            size += o.nbytes
        if cur:
            shards.append(cur)
        groups = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}
    return {f: sorted(g, key=lambda o: o.name) for f, g in sorted(groups.items())}


# ---- streaming -----------------------------------------------------------------------------------------------

def source_rows(target, k: int, maps: dict) -> np.ndarray:
    """For each row of the target's source k, the target row that holds it: the op's row map read backwards."""
    key = (target.op, target.source_shapes, target.groups)
    if key not in maps:
        maps[key] = row_map(target.op, target.source_shapes, target.groups)
    src, row = maps[key]
    sel = np.flatnonzero(src == k)
    inv = np.empty(len(sel), dtype=np.int64)
    inv[row[sel]] = sel
    return inv


def _chunks(inv: np.ndarray, step: int, rt: RankedTensor):
    """(first, end) source-row chunks of at most `step` rows: along runs of contiguous target rows when the runs
    are long, and never across a rank block, so most chunks are one contiguous read from one file."""
    n = len(inv)
    starts = np.flatnonzero(np.diff(inv) != 1) + 1
    runs = list(zip([0, *starts.tolist()], [*starts.tolist(), n]))
    row_bytes = itemsize(rt.dtype) * int(np.prod(rt.shape[1:], dtype=np.int64))
    if len(runs) > 1 and n * row_bytes / len(runs) < MIN_RUN:
        runs = [(0, n)]
    per = rt.shape[0] // rt.n_blocks if rt.dim == 0 and rt.n_blocks > 1 else None
    for a, b in runs:
        c = a
        while c < b:
            end = min(c + step, b)
            if per and inv[end - 1] - inv[c] == end - 1 - c:
                end = min(end, c + int((inv[c] // per + 1) * per - inv[c]))
            yield c, end
            c = end


def write_tensor(o: OutTensor, writer, reader: FileReader, maps: dict, bar) -> None:
    """Stream one HF tensor into `writer`, chunk by chunk."""
    rt = o.tensor
    inv = source_rows(o.target, o.k, maps)
    in_np, out_np = numpy_dtype(rt.dtype), numpy_dtype(o.code)
    trailing = int(np.prod(rt.shape[1:], dtype=np.int64)) if rt.shape else 1
    step = max(1, CHUNK // max(1, trailing * max(in_np.itemsize, out_np.itemsize)))
    writer.begin(o.name, o.shape, o.code, o.nbytes)
    for c, end in _chunks(inv, step, rt):
        lo, hi = int(inv[c]), int(inv[end - 1]) + 1
        contiguous = hi - lo == end - c
        held = rt.sole_holder(lo, hi) if contiguous and in_np == out_np else None
        if held:  # the bytes as they are in one file: pread straight into the writer's blocks
            info, first = held
            start, n = first * info.row_bytes, (end - c) * info.row_bytes
            writer.fill(n, lambda view, off: reader.read_bytes(info, start + off, start + off + len(view), view))
            bar.update(n)
            continue
        rows = inv[c:end]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        block = rt.read_rows(reader, lo, hi)
        data = block if contiguous else block[rows - lo]
        if data.dtype != out_np:
            data = data.astype(out_np)
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        writer.write(flat)
        bar.update(flat.nbytes)
    writer.end()


# ---- the command ---------------------------------------------------------------------------------------------

def export(ms_src: str, hf_out: str, config: str | None = None, dtype: str | None = None,
           max_shard_size="5GB", progress: bool = True, mapping: str | None = None) -> dict:
    """Export the MindSpore checkpoint `ms_src` into the Hugging Face folder `hf_out`; returns a summary.

    `config`: an HF folder (its config, tokenizer and processor files are copied) or a config.json, used when
    given, else the files MS_SRC carries. `dtype`: cast every tensor (default: the HF source's dtype recorded by
    convert, else the stored dtype). `max_shard_size`: where files are cut when MS_SRC does not record its HF
    files ('5GB', '500MB', '2GiB' or bytes). `mapping`: the table (name or .toml path) MS_SRC was made with,
    when it is not the packaged one that accepts config.json (`convert --mapping`)."""
    if dtype is not None and dtype not in BY_NAME:
        raise fail(f"unsupported dtype {dtype!r} (use float16, bfloat16 or float32)")
    max_bytes = parse_size(max_shard_size)
    source = open_source(ms_src)
    raw, where, side, from_source = choose_config(source, config)
    table = load_table(mapping) if mapping else table_for(raw, where)
    cfg = normalize_config(raw, where, table)
    outs = plan_export(source, table, cfg, dtype, where)
    groups = assign_files(outs, max_bytes)
    out_dtypes = {o.code for o in outs}
    new_config = retyped_config(raw, dtype_name(out_dtypes.pop()) if len(out_dtypes) == 1 else None)
    total = sum(o.nbytes for o in outs)
    stage = staging_dir(hf_out, source.folder)
    try:
        check_free_space(stage, total)
        hasher = hash_files_in_background([p for _, p in source.inputs])
        files = _write_files(stage, groups, total, progress)
        weight_map = {o.name: f for f, g in groups.items() for o in g}
        sha = write_safetensors_index(os.path.join(stage, INDEX), weight_map, total)
        files.append({"path": INDEX, "size": os.path.getsize(os.path.join(stage, INDEX)), "sha256": sha})
        copied = [(n, p) for n, p in side if not (n == "config.json" and new_config is not None)]
        files += copy_side_files(stage, copied, {n: s for n, s in source.side_expected.items() if n in from_source})
        if new_config is not None:
            sha = write_atomic(os.path.join(stage, "config.json"), new_config)
            files.append({"path": "config.json", "size": len(new_config), "sha256": sha})
        hasher.join()
        if hasher.error:
            raise hasher.error
        for path, want in source.expected.items():
            if hasher.result.get(path) != want:
                raise fail(f"{path} does not match the sha256 its manifest records: corrupted? "
                           "(llava-ckpt check names the damage)")
        manifest = {
            "command": "export",
            "source": {"path": os.path.abspath(ms_src), "kind": source.kind, "tp": source.tp,
                       "files": [{"name": n, "size": os.path.getsize(p), "sha256": hasher.result[p]}
                                 for n, p in source.inputs],
                       "config": os.path.abspath(where),
                       "skipped_training_state": len(source.skipped)},
            "mapping": {"name": table["name"], "version": table.get("version"), "sha256": table["sha256"],
                        "file": os.path.basename(table["path"])},
            "options": {"dtype": dtype, "max_shard_size": str(max_shard_size), "config": config,
                        **{k: v for k, v in detect_options(table, source.tensors).items()}},
            "tensors": [{"name": o.name, "file": f, "shape": list(o.shape), "dtype": dtype_name(o.code),
                         "from": o.target.name, "op": get_op(o.target.op).inverse_name, "source_index": o.k}
                        for f, g in groups.items() for o in g],
            "files": files,
        }
        write_manifest(stage, manifest)
        publish_dir(stage, hf_out, synced=True)
    except OSError as exc:
        discard(stage)
        name = exc.filename
        if isinstance(name, str) and name.startswith(stage + os.sep):
            name = os.path.join(hf_out, os.path.relpath(name, stage))
        raise fail(f"{exc.strerror or exc} while writing {name or hf_out}") from None
    except BaseException:
        discard(stage)
        raise
    return {"out": os.path.abspath(hf_out), "source_kind": source.kind, "tp": source.tp, "tensors": len(outs),
            "skipped_training_state": len(source.skipped), "bytes": sum(f["size"] for f in files),
            "files": [f["path"] for f in files]}


def _write_files(stage: str, groups: dict, total: int, progress: bool) -> list:
    """Write every safetensors file of `groups`, one after the other; their manifest `files` entries."""
    reader = FileReader()
    maps: dict = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
               file=sys.stderr, desc="exporting", leave=False)
    files = []
    try:
        for fname, outs in groups.items():
            path = os.path.join(stage, fname)
            writer = SafetensorsWriter(path, [(o.name, o.shape, o.code) for o in outs], {"format": "pt"})
            try:
                for o in outs:
                    write_tensor(o, writer, reader, maps, bar)
                digest = writer.close()
            except BaseException:
                writer.abort()
                raise
            files.append({"path": fname, "size": os.path.getsize(path), "sha256": digest})
    finally:
        bar.close()
        reader.close()
    return files
