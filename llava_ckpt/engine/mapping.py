"""The mapping engine: reads a table (mappings/*.toml, shipped inside the package as llava_ckpt/mappings) and
plans every target tensor of a conversion.

A table is data: which config.json it is for ([model]), the size names its shapes use ([sizes]), its layer
sets, options and unused tensors, the source layouts it accepts, and one [[tensor]] entry per target (see the
comment at the top of mappings/llava-1.5.toml). The ops an entry names are the typed kinds of engine/ops.py;
the split kinds are engine/splits.py's. Nothing about a particular model is written in Python here.
"""
from __future__ import annotations

import ast
import hashlib
import operator
import os
import tomllib
from dataclasses import dataclass
from importlib import resources

from . import ops
from ..errors import fail
from .splits import SPLIT_KINDS, split_dim

DEFAULT_TABLE = "llava-1.5"


@dataclass(frozen=True)
class Target:
    """One tensor of the output: its name, its sources (canonical hub names) and how it is made."""
    name: str
    sources: tuple        # canonical (hub layout) source names
    op: str
    split: str
    source_shapes: tuple  # expected shape of each source, from config.json
    layer: int | None = None
    groups: int | None = None   # the op's group count (qkv_grouped: KV heads), or the entry's `groups`

    @property
    def shape(self) -> tuple:
        return ops.get(self.op).output_shape(self.source_shapes)

    def tp_units(self) -> list:
        """(what, size) pairs a tensor-parallel degree must divide to cut this target into whole pieces."""
        dim = split_dim(self.split, len(self.shape))
        if dim is None:
            return []
        units = [(f"dim {dim} of {self.name}", self.shape[dim])]
        units += [(f"{what} of {self.name}", n) for what, n in
                  ops.get(self.op).tp_units(self.source_shapes, self.groups, self.split)]
        if self.groups and self.op != "qkv_grouped":
            units.append((f"groups of {self.name}", self.groups))
        return units

    def layout(self) -> dict | None:
        return ops.get(self.op).layout(self.source_shapes, self.groups)


# ---- finding and reading tables ---------------------------------------------------------------------------

def tables_dir():
    """The packaged tables (the repo's top-level mappings/ folder, installed as llava_ckpt/mappings)."""
    return resources.files("llava_ckpt").joinpath("mappings")


def available_tables() -> list:
    return sorted(p.name[:-5] for p in tables_dir().iterdir() if p.name.endswith(".toml"))


def table_path(name_or_path: str = DEFAULT_TABLE) -> str:
    if os.sep in name_or_path or name_or_path.endswith(".toml"):
        return name_or_path
    return str(tables_dir().joinpath(f"{name_or_path}.toml"))


ENTRY_KEYS = {"hf", "ms", "op", "split", "shape", "layers", "when", "unless", "groups"}


def load_table(name_or_path: str = DEFAULT_TABLE) -> dict:
    """Parse and check a mapping table; adds `sha256` (of the file's bytes) and `path`. Every entry is checked
    against its op's declaration (source count, allowed split kinds, groups) and named when it does not fit."""
    path = table_path(name_or_path)
    try:
        with open(path, "rb") as f:
            raw = f.read(16 << 20)
    except FileNotFoundError:
        raise fail(f"mapping table not found: {path}") from None
    except OSError as exc:
        raise fail(f"cannot read mapping table {path}: {exc.strerror or exc}") from None
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise fail(f"{path}: not valid TOML ({exc})") from None
    table["sha256"] = hashlib.sha256(raw).hexdigest()
    table["path"] = path
    for section in ("model", "sizes", "layer_sets"):
        if not isinstance(table.get(section), dict):
            raise fail(f"{path}: no [{section}] section")
    if not isinstance(table["model"].get("model_type"), str):
        raise fail(f"{path}: [model] needs model_type")
    options = table.get("options", {})
    sizes = table["sizes"]
    for n, entry in enumerate(table.get("tensor", [])):
        where = f"{path}: [[tensor]] #{n + 1} ({entry.get('ms')!r})"
        for key in ("hf", "ms", "split", "shape"):
            if key not in entry:
                raise fail(f"{where} has no {key!r}")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise fail(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        op = entry.get("op", "rename")
        if op not in ops.OPS:
            raise fail(f"{where}: unknown op {op!r} (one of {', '.join(ops.OPS)})")
        if entry["split"] not in SPLIT_KINDS:
            raise fail(f"{where}: unknown split {entry['split']!r} (one of {', '.join(SPLIT_KINDS)})")
        n_src = 1 if isinstance(entry["hf"], str) else len(entry["hf"])
        problem = ops.get(op).check(n_src, entry["split"], entry.get("groups"))
        if problem:
            raise fail(f"{where}: {problem}")
        if "groups" in entry and entry["groups"] not in sizes:
            raise fail(f"{where}: groups {entry['groups']!r} is not a size name of [sizes]")
        for key in ("when", "unless"):
            if key in entry and entry[key] not in options:
                raise fail(f"{where}: unknown option {entry[key]!r} in {key!r} (options: {', '.join(options)})")
        layer_set = entry.get("layers")
        if layer_set is not None and layer_set not in table["layer_sets"]:
            raise fail(f"{where}: unknown layer set {layer_set!r} (sets: {', '.join(table['layer_sets'])})")
    _check_unused(table, path)
    return table


def table_for(raw_cfg: dict, where: str = "config.json") -> dict:
    """The packaged table whose [model] accepts this config.json (model_type and the text model's type)."""
    model_type = raw_cfg.get("model_type")
    text = raw_cfg.get("text_config")
    text_type = text.get("model_type") if isinstance(text, dict) else None
    accepted = []
    for name in available_tables():
        table = load_table(name)
        model = table["model"]
        types = model.get("text_model_types", [])
        accepted.append(f"{name} ({model['model_type']} + {'/'.join(types) or 'any'})")
        if model["model_type"] == model_type and (not types or (text_type or types[0]) in types):
            return table
    raise fail(f"{where} is not a LLaVA config that a mapping table accepts (model_type={model_type!r}, text "
               f"model {text_type!r}; tables: {', '.join(accepted)}); --mapping FILE picks another table")


def check_model(table: dict, cfg: dict, where: str) -> None:
    """A table chosen by --mapping must still be for this config; its sizes must all be positive integers."""
    model = table["model"]
    if cfg.get("model_type") != model["model_type"]:
        raise fail(f"{where}: model_type {cfg.get('model_type')!r}, the table {table['path']} is for "
                   f"{model['model_type']!r}")
    for section, key in (("text_config", "text_model_types"), ("vision_config", "vision_model_types")):
        types = model.get(key)
        got = cfg.get(section, {}).get("model_type")
        if types and got is not None and got not in types:
            raise fail(f"{where}: {section}.model_type is {got!r}; the table {os.path.basename(table['path'])} "
                       f"accepts {', '.join(map(repr, types))}")
    sizes(table, cfg, where)
    layer_sets(table, cfg, where)


# ---- size names and layer sets: integer expressions over config keys ----------------------------------------

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod, ast.Pow: operator.pow}


def _evaluate(expr, cfg: dict, known: dict, what: str, where: str) -> int:
    """An integer expression of [sizes] / [layer_sets]: ints, size names, config keys (`text_config.x`),
    + - * // % ** and `/`, which must divide exactly (a check: 'heads / kv_heads' fails on 32 / 5)."""
    if isinstance(expr, int) and not isinstance(expr, bool):
        return expr
    if not isinstance(expr, str):
        raise fail(f"{where}: {what} = {expr!r} is not an integer expression")
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        raise fail(f"{where}: {what} = {expr!r} is not an integer expression") from None

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            key = ast.unparse(node)
            if key in known:
                return known[key]
            v = cfg
            for part in key.split("."):
                if not isinstance(v, dict) or part not in v:
                    raise fail(f"{where}: {what} needs {key}, which the config does not have")
                v = v[part]
            if not isinstance(v, int) or isinstance(v, bool):
                raise fail(f"{where}: {key} must be an integer, got {v!r}")
            return v
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            a, b = value(node.left), value(node.right)
            if b == 0 or a % b:
                raise fail(f"{where}: {what} = {expr}: {a} / {b} is not a whole number")
            return a // b
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and b == 0:
                raise fail(f"{where}: {what} = {expr} divides by zero")
            return _BINOPS[type(node.op)](a, b)
        raise fail(f"{where}: {what} = {expr!r}: only integers, names and + - * / // % ** are allowed")
    return value(tree)


def sizes(table: dict, cfg: dict, where: str = "config.json") -> dict:
    """The table's size names evaluated on a (defaults-applied) config; each must be a positive integer."""
    out: dict = {}
    for name, expr in table["sizes"].items():
        v = _evaluate(expr, cfg, out, f"size {name}", where)
        if v <= 0:
            raise fail(f"{where}: size {name} ({expr}) must be a positive integer, got {v}")
        out[name] = v
    return out


def layer_sets(table: dict, cfg: dict, where: str = "config.json") -> dict:
    """name -> list of layer indices. A set is an end (layers 0..end-1) or [first, end]."""
    known = sizes(table, cfg, where)
    out = {}
    for name, spec in table["layer_sets"].items():
        first, end = (0, spec) if not isinstance(spec, list) else spec
        a = _evaluate(first, cfg, known, f"layer set {name}", where)
        b = _evaluate(end, cfg, known, f"layer set {name}", where)
        out[name] = list(range(a, b))
    return out


# ---- planning ---------------------------------------------------------------------------------------------

def active(entry: dict, options: dict) -> bool:
    return (("when" not in entry or bool(options.get(entry["when"])))
            and ("unless" not in entry or not options.get(entry["unless"])))


def plan(table: dict, cfg: dict, options: dict | None = None) -> list:
    """Every Target of the conversion: entries in table order, runs of adjacent entries over the same layer
    set expanded layer by layer. (convert then writes them in the order their sources sit on disk.)"""
    options = options or {}
    unknown = set(k for k, v in options.items() if v) - set(table.get("options", {}))
    if unknown:
        raise fail(f"{table['path']}: no option {', '.join(sorted(unknown))}")
    known = sizes(table, cfg)
    sets = layer_sets(table, cfg)
    entries = [e for e in table.get("tensor", []) if active(e, options)]
    targets = []
    i = 0
    while i < len(entries):
        layer_set = entries[i].get("layers")
        j = i
        while j < len(entries) and entries[j].get("layers") == layer_set:
            j += 1
        run = entries[i:j]
        if layer_set is None:
            targets += [_target(e, None, known) for e in run]
        else:
            for layer in sets[layer_set]:
                targets += [_target(e, layer, known) for e in run]
        i = j
    return targets


def _target(entry: dict, layer, known: dict) -> Target:
    fill = (lambda s: s.replace("{i}", str(layer))) if layer is not None else (lambda s: s)
    hf = [entry["hf"]] if isinstance(entry["hf"], str) else list(entry["hf"])
    shapes = entry["shape"]
    if not shapes or not isinstance(shapes[0], list):
        shapes = [shapes] * len(hf)
    where = f"mapping entry {entry['ms']!r}"
    source_shapes = tuple(tuple(_evaluate(d, {}, known, "shape", where) for d in shape) for shape in shapes)
    groups = known[entry["groups"]] if "groups" in entry else None
    target = Target(fill(entry["ms"]), tuple(fill(h) for h in hf), entry.get("op", "rename"), entry["split"],
                    source_shapes, layer, groups)
    target.shape  # noqa: B018 - sources that cannot be joined fail here, naming the op
    return target


UNUSED_KINDS = ("built", "not_built")  # LlavaVlm builds the parameter but never applies it / has no parameter


def _check_unused(table: dict, path: str) -> None:
    unused = table.get("unused", {})
    if not isinstance(unused, dict) or set(unused) - set(UNUSED_KINDS):
        raise fail(f"{path}: [unused] holds [unused.built] (LlavaVlm builds the parameters, its forward never "
                   "applies them) and [unused.not_built] (LlavaVlm has no parameter for them), each with `names` "
                   f"and/or `layer_prefix`; found {', '.join(sorted(unused)) if isinstance(unused, dict) else unused}")
    for kind, spec in unused.items():
        if not isinstance(spec, dict) or set(spec) - {"names", "layer_prefix"}:
            raise fail(f"{path}: [unused.{kind}] takes `names` and `layer_prefix` only")
        if not isinstance(spec.get("names", []), list) or not isinstance(spec.get("layer_prefix", {}), dict):
            raise fail(f"{path}: [unused.{kind}]: `names` is a list of target names, `layer_prefix` a table of "
                       "layer set -> name prefix")
        unknown = set(spec.get("layer_prefix", {})) - set(table["layer_sets"])
        if unknown:
            raise fail(f"{path}: [unused.{kind}] names unknown layer set(s) {', '.join(sorted(unknown))}")


def unused_names(table: dict, cfg: dict) -> dict:
    """Target names (or name prefixes ending in '.') that MindFormers' LlavaVlm never uses -> how: "built" (it
    builds the parameter and loads it, its forward never applies it) or "not_built" (it has no parameter)."""
    sets = layer_sets(table, cfg)
    out = {}
    for kind, spec in table.get("unused", {}).items():
        for name in spec.get("names", []):
            out[name] = kind
        for set_name, prefix in spec.get("layer_prefix", {}).items():
            out.update({prefix.replace("{i}", str(i)): kind for i in sets.get(set_name, [])})
    return out


def unused_kind(name: str, unused: dict) -> str | None:
    """"built" / "not_built" when `name` is one of the table's unused tensors (unused_names), else None."""
    if name in unused:
        return unused[name]
    return next((kind for u, kind in unused.items() if u.endswith(".") and name.startswith(u)), None)


def is_unused(name: str, unused) -> bool:
    return name in unused or any(u.endswith(".") and name.startswith(u) for u in unused)


def detect_options(table: dict, names) -> dict:
    """Which options a converted checkpoint was made with, from its tensor names: an option is on when the
    targets only it produces are there (`when = "fuse_qkv"` entries: w_qkv, w_gate_hidden)."""
    names = list(names)
    found = {}
    for option in table.get("options", {}):
        patterns = [e["ms"] for e in table.get("tensor", []) if e.get("when") == option]
        found[option] = any(_matches(p, n) for p in patterns for n in names)
    return found


def _matches(pattern: str, name: str) -> bool:
    if "{i}" not in pattern:
        return pattern == name
    head, tail = pattern.split("{i}", 1)
    middle = name[len(head):len(name) - len(tail)] if name.startswith(head) and name.endswith(tail) else ""
    return middle.isdigit()


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
