"""The tensor-parallel strategy file that `shard --tp N` writes beside its rank folders (OUT/strategy.ckpt).

The file is MindSpore's protobuf `ParallelStrategyMap` (mindspore/train/node_strategy_pb2.py, package
`mindspore.straspb`), the same format `set_auto_parallel_context(strategy_ckpt_save_file=...)` writes.
MindSpore's own tools read it: `ms.transform_checkpoints`, `ms.merge_sliced_parameter` (through
`ms.build_searched_strategy`), `ms.load_distributed_checkpoint`, `ms.merge_pipeline_strategys`,
`ms.parallel.rank_list_for_transform`, `mindspore.train.utils.parse_strategy_ckpt`.

Importing MindSpore only to reach its generated protobuf classes costs about 1.2-1.5 s and 500 MB RSS, so
the message is encoded here by hand (plain proto2 wire format, about 60 lines). The bytes are identical to
`ParallelStrategyMap.SerializeToString()` of the same message (tests/test_strategy.py checks that).

Layout of one parameter, as MindSpore reads it (parallel/_parallel_serialization.py `_convert_to_list`):
  dev_matrix        [1, N]: a data-parallel axis of size 1 and the model-parallel axis of size N.
  tensor_map        one entry per tensor dim, indexing dev_matrix from the RIGHT: 0 = the mp axis (size N),
                    -1 = not split. Column/vocab [0, -1, ...], row [-1, 0], replicated [-1, ...].
  param_split_shape one empty entry (MindSpore indexes [0]; empty means "even split").
  indices_offset    one empty entry (what MindSpore's own JSON loader builds).
  field             0 (a positive value means the embedding "field" reshape, not ours).
  opt_weight_shard_step / opt_weight_shard_size  0 / 0: no optimizer (ZeRO) sharding.
Plus one `parallel_strategy_item` per parameter (node_name = parameter name, stage 0, one ParallelStrategy
with the number of pieces along each dim): MindSpore's stage-aware paths (`merge_pipeline_strategys`,
transform by stage) refuse a file without strategy items. `current_stage` = 0 (single pipeline stage).

Rank r's slice of a split tensor is the r-th of N equal contiguous blocks along the split dim.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from ..engine.splits import check_degree, split_dim, tensor_map
from ..errors import CheckpointError, fail
from .files import write_atomic
from .protobuf import bytes_field, fields, int_field, ints_field, read_varint

# ----------------------------------------------------------------------------------------------------------------
# proto2 wire format, just what ParallelStrategyMap needs

def _layout_bytes(tp: int, tmap: Sequence[int]) -> bytes:
    """ParallelLayouts: dev_matrix=1, tensor_map=2, param_split_shape=3, indices_offset=4, field=5,
    opt_weight_shard_step=6, opt_weight_shard_size=7 (the last three are proto2 `required`)."""
    return (bytes_field(1, ints_field(1, (1, tp)))      # DevMatrix{repeated uint32 dim = 1}
            + bytes_field(2, ints_field(1, tmap))       # TensorMap{repeated int32 dim = 1}
            + bytes_field(3, b"")                  # ParamSplitShape{} (even split)
            + bytes_field(4, b"")                  # IndicesOffset{}
            + int_field(5, 0) + int_field(6, 0) + int_field(7, 0))


def _strategy_item_bytes(name: str, tp: int, tmap: Sequence[int]) -> bytes:
    """ParallelStrategyItem{node_name=1, ParallelStrategys{stage=1, repeated ParallelStrategy{dim=1}}=2}."""
    pieces = [tp if m == 0 else 1 for m in tmap]
    strategys = int_field(1, 0) + bytes_field(2, ints_field(1, pieces))
    return bytes_field(1, name.encode("utf-8")) + bytes_field(2, strategys)


def _normalize(params, tp: int) -> list:
    out = []
    seen = set()
    for item in params:
        try:
            name, kind, shape_or_ndim = item
        except (TypeError, ValueError):
            raise fail(f"strategy entry {item!r} is not (name, split_kind, ndim or shape)") from None
        if not isinstance(name, str) or not name:
            raise fail(f"strategy entry {item!r}: parameter name must be a non-empty string")
        if "-" in name:
            # MindSpore reads "<stage>-<name>" as a pipeline-stage prefix and would mangle such a name
            raise fail(f"parameter name {name!r} contains '-', which MindSpore's strategy tools read as a "
                       "pipeline-stage prefix")
        if name in seen:
            raise fail(f"parameter {name!r} appears twice in the strategy")
        seen.add(name)
        if isinstance(shape_or_ndim, bool):
            raise fail(f"parameter {name!r}: bad ndim {shape_or_ndim!r}")
        if isinstance(shape_or_ndim, int):
            ndim = shape_or_ndim
            split_dim(kind, ndim)
        else:
            shape = tuple(int(d) for d in shape_or_ndim)
            ndim = len(shape)
            axis = split_dim(kind, ndim)
            if axis is not None and shape[axis] % tp:
                raise fail(f"parameter {name!r}: dim {axis} of shape {list(shape)} does not split into {tp} "
                           f"equal parts ({kind} split)")
        out.append((name, tensor_map(kind, ndim)))
    return out


def strategy_bytes(params: Iterable[tuple], tp: int) -> bytes:
    """Serialized ParallelStrategyMap for tensor parallelism of degree `tp`.

    params: iterable of (name, split_kind, ndim_or_shape). split_kind is one of engine.splits.SPLIT_KINDS; the third item is the
    number of dims (int) or the full, unsplit shape (sequence of ints; then divisibility by tp is checked).
    Names must be unique and free of '-'. Order is kept in the file.
    """
    check_degree(tp)
    entries = _normalize(params, tp)
    body = [int_field(1, 0)]  # current_stage (required)
    body += [bytes_field(2, _strategy_item_bytes(name, tp, tmap)) for name, tmap in entries]
    body += [bytes_field(3, bytes_field(1, name.encode("utf-8")) + bytes_field(2, _layout_bytes(tp, tmap)))
             for name, tmap in entries]
    return b"".join(body)


def write_strategy(path: "str | os.PathLike", params: Iterable[tuple], tp: int) -> str:
    """Write strategy_bytes(params, tp) to `path` atomically; returns the path as a string."""
    path = os.fspath(path)
    write_atomic(path, strategy_bytes(params, tp))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Reading it back (our own checks; no MindSpore import)

@dataclass(frozen=True)
class Layout:
    """One parameter's layout as a strategy file records it (what each field means: the module docstring)."""
    dev_matrix: tuple
    tensor_map: tuple
    param_split_shape: tuple
    field: int
    opt_weight_shard_step: int
    opt_weight_shard_size: int
    stage: int = 0            # the pipeline stage holding it (from the file's strategy items, or a merged
                              # file's "<stage>-<name>" spelling)


def _read_varint(buf: bytes, pos: int) -> tuple:
    try:
        return read_varint(buf, pos, len(buf))
    except ValueError:
        raise fail("strategy file is truncated or holds a malformed varint") from None


def _fields(buf: bytes):
    """Yield (field_number, value) of one message; value is an int (varint) or bytes (length-delimited)."""
    try:
        for number, wire, value in fields(buf):
            yield number, (buf[value[0]:value[1]] if wire == 2 else value)
    except ValueError as exc:
        raise fail(f"strategy file is malformed ({exc})") from None


def _repeated_ints(buf: bytes, signed: bool) -> tuple:
    out = []
    for field, value in _fields(buf):
        if field != 1:
            continue
        if isinstance(value, bytes):  # packed encoding, also legal
            pos = 0
            while pos < len(value):
                v, pos = _read_varint(value, pos)
                out.append(v)
        else:
            out.append(value)
    if signed:
        out = [_signed(v) for v in out]
    return tuple(out)


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_strategy(data: bytes) -> dict:
    """Parse ParallelStrategyMap bytes into {param_name: Layout}, in file order."""
    layouts, stage = {}, None
    for field, value in _fields(data):
        if field == 2 and stage is None:  # the first strategy item's stage is the file's (as MindSpore reads it)
            stage = _item_stage(value)
        if field != 3:
            continue
        name, raw = None, None
        for f, v in _fields(value):
            if f == 1:
                name = v.decode("utf-8")
            elif f == 2:
                raw = v
        if name is None or raw is None:
            raise fail("strategy file has a parallel_layout_item without name or layout")
        dev, tmap, split, fld, step, size = [], [], (), 0, 0, 0
        for f, v in _fields(raw):
            if f == 1 and not dev:
                dev = _repeated_ints(v, signed=False)
            elif f == 2 and not tmap:
                tmap = _repeated_ints(v, signed=True)
            elif f == 3 and not split:
                split = _repeated_ints(v, signed=True)
            elif f == 5:
                fld = _signed(v)
            elif f == 6:
                step = _signed(v)
            elif f == 7:
                size = _signed(v)
        layouts[name] = Layout(tuple(dev), tuple(tmap), tuple(split), fld, step, size)
    if stage:
        layouts = {n: replace(l, stage=stage) for n, l in layouts.items()}
    return layouts


def _item_stage(item: bytes) -> int:
    """ParallelStrategyItem{node_name=1, ParallelStrategys{stage=1, ...}=2} -> its stage."""
    for f, v in _fields(item):
        if f == 2 and isinstance(v, bytes):
            for g, w in _fields(v):
                if g == 1 and isinstance(w, int):
                    return w
    return 0


MAX_STRATEGY = 256 << 20  # the 7B strategy file is about 60 KB


def read_strategy(path: "str | os.PathLike") -> dict:
    """Read a strategy file into {param_name: Layout}: the protobuf written by write_strategy or by MindSpore
    (`strategy_ckpt_save_file`), or MindSpore's JSON form (a `.json` file with `parallel_layout_item`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise fail(f"strategy file {path} is not a regular file" if os.path.exists(path)
                   else f"strategy file {path} does not exist")
    if path.endswith(".json"):
        from .files import read_json
        return parse_json_strategy(read_json(path, f"strategy file {path}", MAX_STRATEGY), path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STRATEGY + 1)
    except OSError as e:
        raise fail(f"cannot read strategy file {path}: {e.strerror or e}") from None
    if not data:
        raise fail(f"strategy file {path} is empty")
    if len(data) > MAX_STRATEGY:
        raise fail(f"strategy file {path} is larger than {MAX_STRATEGY >> 20} MiB: not a strategy file")
    try:
        return parse_strategy(data)
    except CheckpointError as exc:
        raise fail(f"{path}: {exc}") from None


def parse_json_strategy(obj, where: str = "strategy file") -> dict:
    """MindSpore's JSON strategy ({"parallel_layout_item": {name: {"dev_matrix": [...], "tensor_map": [...],
    ...}}}) into {param_name: Layout}, every field checked."""
    items = obj.get("parallel_layout_item") if isinstance(obj, dict) else None
    if not isinstance(items, dict):
        raise fail(f"{where}: no parallel_layout_item object: not a MindSpore strategy file")

    def ints(v, key, name):
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise fail(f"{where}: {name!r} has an invalid {key} {v!r}")
        return tuple(v)

    stage = 0
    strategy_items = obj.get("parallel_strategy_item")
    if isinstance(strategy_items, dict) and strategy_items:
        first = next(iter(strategy_items.values()))
        stage = first.get("stage", 0) if isinstance(first, dict) else 0
        if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
            raise fail(f"{where}: parallel_strategy_item has an invalid stage {stage!r}")
    layouts = {}
    for name, item in items.items():
        if not isinstance(item, dict):
            raise fail(f"{where}: layout of {name!r} is not an object")
        scalars = []
        for key in ("field", "opt_weight_shard_step", "opt_weight_shard_size"):
            v = item.get(key, 0)
            if not isinstance(v, int) or isinstance(v, bool):
                raise fail(f"{where}: {name!r} has an invalid {key} {v!r}")
            scalars.append(v)
        layouts[name] = Layout(ints(item.get("dev_matrix"), "dev_matrix", name),
                               ints(item.get("tensor_map"), "tensor_map", name),
                               ints(item.get("param_split_shape", []), "param_split_shape", name), *scalars,
                               stage)
    return layouts


def read_stage_layouts(paths) -> dict:
    """{parameter: {stage: Layout}} from one or more strategy files: one per pipeline stage as training saves
    them (each file's stage from its strategy items), or one merged by `ms.merge_pipeline_strategys` (whose names
    read "<stage>-<name>"). Files that give the same parameter of the same stage two different layouts are
    refused, naming the parameter and both files."""
    out: dict = {}
    origin: dict = {}
    for path in paths:
        for key, layout in read_strategy(path).items():
            name, stage = key, layout.stage
            head, sep, rest = key.partition("-")
            if sep and head.isdigit() and str(int(head)) == head:
                name, stage = rest, int(head)
                layout = replace(layout, stage=stage)
            there = out.setdefault(name, {}).get(stage)
            if there is not None and there != layout:
                raise fail(f"mismatched strategies: {name!r} (stage {stage}) is laid out differently in "
                           f"{origin[name, stage]} and {path}")
            out[name][stage] = layout
            origin.setdefault((name, stage), path)
    return out
