"""The mapping engine: reads a table from mappings/ and plans every target tensor of a conversion.

A table entry is data (see the comment at the top of mappings/llava-1.5.toml). Every op is a row
permutation/concatenation of its sources along dim 0, described by two index arrays (which source, which
row) for each output row; the inverse op (target -> sources, for export back to HF) reads the same arrays
backwards, so forward and inverse can never disagree.
"""
from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass

import numpy as np

from .config import dims as config_dims, layer_sets
from .errors import fail

MAPPINGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mappings")
DEFAULT_TABLE = "llava-1.5"
OPS = ("rename", "concat_rows", "qkv_grouped", "interleave_rows")
SPLITS = ("column", "row", "vocab", "replicated")
OPTIONS = ("fuse_qkv",)


@dataclass(frozen=True)
class Target:
    """One tensor of the output: its name, its sources (canonical hub names) and how it is made."""
    name: str
    sources: tuple        # canonical (hub layout) source names
    op: str
    split: str
    source_shapes: tuple  # expected shape of each source, from config.json
    layer: int | None = None

    @property
    def shape(self) -> tuple:
        return output_shape(self.op, self.source_shapes)


def table_path(name_or_path: str = DEFAULT_TABLE) -> str:
    if os.sep in name_or_path or name_or_path.endswith(".toml"):
        return name_or_path
    return os.path.join(MAPPINGS_DIR, f"{name_or_path}.toml")


def load_table(name_or_path: str = DEFAULT_TABLE) -> dict:
    """Parse and check a mapping table; adds `sha256` (of the file's bytes) and `path`."""
    path = table_path(name_or_path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise fail(f"mapping table not found: {path}") from None
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise fail(f"{path}: not valid TOML ({exc})") from None
    table["sha256"] = hashlib.sha256(raw).hexdigest()
    table["path"] = path
    for n, entry in enumerate(table.get("tensor", [])):
        where = f"{path}: [[tensor]] #{n + 1} ({entry.get('ms')!r})"
        for key in ("hf", "ms", "split", "shape"):
            if key not in entry:
                raise fail(f"{where} has no {key!r}")
        op = entry.get("op", "rename")
        if op not in OPS:
            raise fail(f"{where}: unknown op {op!r} (one of {', '.join(OPS)})")
        if entry["split"] not in SPLITS:
            raise fail(f"{where}: unknown split {entry['split']!r} (one of {', '.join(SPLITS)})")
        for key in ("when", "unless"):
            if key in entry and entry[key] not in OPTIONS:
                raise fail(f"{where}: unknown option {entry[key]!r} in {key!r}")
        n_src = 1 if isinstance(entry["hf"], str) else len(entry["hf"])
        if (op == "rename") != (n_src == 1):
            raise fail(f"{where}: op {op!r} does not fit {n_src} source(s)")
    return table


def _eval_dim(expr, sizes: dict, where: str) -> int:
    if isinstance(expr, int):
        return expr
    value = 1
    for factor in str(expr).split("*"):
        factor = factor.strip()
        if factor.isdigit():
            value *= int(factor)
        elif factor in sizes:
            value *= sizes[factor]
        else:
            raise fail(f"{where}: unknown size name {factor!r} (known: {', '.join(sorted(sizes))})")
    return value


def plan(table: dict, cfg: dict, options: dict | None = None) -> list:
    """Every Target of the conversion: entries in table order, runs of adjacent entries over the same layer
    set expanded layer by layer. (convert then writes them in the order their sources sit on disk.)"""
    options = options or {}
    sizes = config_dims(cfg)
    sets = layer_sets(cfg)
    active = [e for e in table.get("tensor", [])
              if (("when" not in e or options.get(e["when"])) and ("unless" not in e or not options.get(e["unless"])))]
    targets = []
    i = 0
    while i < len(active):
        layer_set = active[i].get("layers")
        j = i
        while j < len(active) and active[j].get("layers") == layer_set:
            j += 1
        run = active[i:j]
        if layer_set is None:
            targets += [_target(e, None, sizes) for e in run]
        else:
            if layer_set not in sets:
                raise fail(f"{table['path']}: unknown layer set {layer_set!r}")
            for layer in sets[layer_set]:
                targets += [_target(e, layer, sizes) for e in run]
        i = j
    return targets


def _target(entry: dict, layer, sizes: dict) -> Target:
    fill = (lambda s: s.replace("{i}", str(layer))) if layer is not None else (lambda s: s)
    hf = [entry["hf"]] if isinstance(entry["hf"], str) else list(entry["hf"])
    shapes = entry["shape"]
    if not shapes or not isinstance(shapes[0], list):
        shapes = [shapes] * len(hf)
    where = f"mapping entry {entry['ms']!r}"
    source_shapes = tuple(tuple(_eval_dim(d, sizes, where) for d in shape) for shape in shapes)
    return Target(fill(entry["ms"]), tuple(fill(h) for h in hf), entry.get("op", "rename"), entry["split"],
                  source_shapes, layer)


def unused_names(table: dict, cfg: dict) -> list:
    """Target names (or name prefixes ending in '.') that MindFormers' LlavaVlm does not build."""
    unused = table.get("unused", {})
    names = list(unused.get("names", []))
    sets = layer_sets(cfg)
    for set_name, prefix in unused.get("layer_prefix", {}).items():
        names += [prefix.replace("{i}", str(i)) for i in sets.get(set_name, [])]
    return names


# ---- layouts ----------------------------------------------------------------------------------------------

def to_canonical(name: str, layout: dict) -> str:
    """A source name in `layout` spelled in the hub layout (the tables' spelling)."""
    for hub_prefix, prefix in sorted(layout.items(), key=lambda kv: -len(kv[1])):
        if name.startswith(prefix):
            return hub_prefix + name[len(prefix):]
    return name


def detect_layout(table: dict, names, expected) -> str:
    """The layout under which the most source names are ones the plan expects."""
    expected = set(expected)
    best, best_hits = None, -1
    for layout_name, layout in table.get("layouts", {"hub": {}}).items():
        hits = sum(to_canonical(n, layout) in expected for n in names)
        if hits > best_hits:
            best, best_hits = layout_name, hits
    return best


# ---- ops: rows of the output as (source index, source row) -------------------------------------------------

def output_shape(op: str, shapes) -> tuple:
    rest = shapes[0][1:]
    if any(s[1:] != rest for s in shapes):
        raise fail(f"op {op}: sources disagree beyond dim 0: {shapes}")
    rows = sum(s[0] for s in shapes) if shapes[0] else 1
    return (rows,) + tuple(rest) if shapes[0] else ()


def row_map(op: str, shapes, n_groups: int | None = None):
    """(source index, source row) for every output row of `op` applied to sources of `shapes`.

    rename: rows of the one source. concat_rows: [a; b; c]. interleave_rows: a_0, b_0, a_1, b_1, ...
    qkv_grouped: for each of `n_groups` KV groups g, [q rows of group g; k_g; v_g].
    """
    rows = [s[0] if s else 1 for s in shapes]
    if op in ("rename", "concat_rows"):
        src = np.concatenate([np.full(n, k, dtype=np.int64) for k, n in enumerate(rows)])
        row = np.concatenate([np.arange(n, dtype=np.int64) for n in rows])
    elif op == "interleave_rows":
        if len(set(rows)) != 1:
            raise fail(f"interleave_rows needs sources with equal rows, got {rows}")
        n, k = rows[0], len(rows)
        src = np.tile(np.arange(k, dtype=np.int64), n)
        row = np.repeat(np.arange(n, dtype=np.int64), k)
    elif op == "qkv_grouped":
        if n_groups is None or any(r % n_groups for r in rows):
            raise fail(f"qkv_grouped: rows {rows} do not divide into {n_groups} KV groups")
        parts_src, parts_row = [], []
        for g in range(n_groups):
            for k, n in enumerate(rows):
                per = n // n_groups
                parts_src.append(np.full(per, k, dtype=np.int64))
                parts_row.append(np.arange(g * per, (g + 1) * per, dtype=np.int64))
        src, row = np.concatenate(parts_src), np.concatenate(parts_row)
    else:
        raise fail(f"unknown op {op!r}")
    return src, row


def op_groups(target: Target, cfg: dict):
    """The KV group count a grouped op needs (from config.json), else None."""
    return cfg["text_config"]["num_key_value_heads"] if target.op == "qkv_grouped" else None


def apply(op: str, arrays, n_groups=None) -> np.ndarray:
    """Forward op on whole arrays (reference semantics; the streaming path uses row_map directly)."""
    src, row = row_map(op, [a.shape for a in arrays], n_groups)
    out = np.empty((len(src),) + arrays[0].shape[1:], dtype=arrays[0].dtype)
    for k, a in enumerate(arrays):
        out[src == k] = a[row[src == k]]
    return out


def invert(op: str, target: np.ndarray, source_shapes, n_groups=None) -> list:
    """The inverse op: the sources back from a target, by reading the same row map backwards."""
    src, row = row_map(op, source_shapes, n_groups)
    out = []
    for k, shape in enumerate(source_shapes):
        sel = src == k
        part = np.empty(shape, dtype=target.dtype)
        part.reshape((shape[0] if shape else 1, -1))[row[sel]] = target[sel].reshape(int(sel.sum()), -1)
        out.append(part)
    return out
