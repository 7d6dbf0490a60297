"""The TP strategy file (llava_ckpt/io/strategy.py) against MindSpore's own tools.

Per-rank slices are written into rank_<r>/ folders (.ckpt via ms.save_checkpoint, .safetensors via the
safetensors package), then ms.transform_checkpoints (to one unsplit rank), ms.merge_sliced_parameter and
ms.load_distributed_checkpoint must give back the full tensors bit for bit. A strategy with wrong split kinds
must not.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from llava_ckpt.errors import CheckpointError
from llava_ckpt.io.strategy import Layout, parse_strategy, read_strategy, strategy_bytes, write_strategy
from llava_ckpt.engine.splits import SPLIT_KINDS, rank_blocks, split_dim, tensor_map
from oracles import rank_slice

# Every split kind the shard command uses, with shapes divisible by 4.
SPEC = [
    ("lm.layers.0.q.weight", "column", (8, 12)),       # 2-D column, not square: a wrong axis changes the shape
    ("lm.layers.0.q.bias", "column", (8,)),            # 1-D column bias
    ("lm.layers.0.o.weight", "row", (12, 8)),          # 2-D row
    ("lm.layers.0.o.bias", "row", (12,)),              # 1-D row bias: replicated
    ("lm.embed.weight", "vocab", (16, 4)),             # vocab-parallel embedding
    ("lm.norm.weight", "replicated", (12,)),           # 1-D replicated
    ("vision.pos.weight", "replicated", (5, 4)),       # 2-D replicated
    ("vision.patch.weight", "replicated", (4, 3, 2, 2)),  # 4-D conv weight, replicated
]
DTYPES = ["fp32", "fp16", "bf16"]


# ---------------------------------------------------------------------------------------------------------------
# pure-Python parts (no MindSpore import)

def test_bad_input_is_refused():
    with pytest.raises(CheckpointError, match="equal parts"):
        strategy_bytes([("w", "column", (6, 4))], 4)
    with pytest.raises(CheckpointError, match="twice"):
        strategy_bytes([("w", "column", 2), ("w", "row", 2)], 2)
    with pytest.raises(CheckpointError, match="'-'"):
        strategy_bytes([("0-w", "column", 2)], 2)
    with pytest.raises(CheckpointError, match="unknown split kind"):
        strategy_bytes([("w", "cols", 2)], 2)
    for tp in (0, -2, 1.5, True):
        with pytest.raises(CheckpointError):
            strategy_bytes([("w", "column", 2)], tp)


def test_write_read_roundtrip_and_atomic(tmp_path):
    path = tmp_path / "strategy.ckpt"
    params = [(n, k, s) for n, k, s in SPEC]
    assert write_strategy(path, params, 4) == str(path)
    assert path.read_bytes() == strategy_bytes(params, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["strategy.ckpt"]  # no temp file left behind
    layouts = read_strategy(path)
    assert list(layouts) == [n for n, _, _ in SPEC]
    for name, kind, shape in SPEC:
        lay = layouts[name]
        assert lay == Layout((1, 4), tuple(tensor_map(kind, len(shape))), (), 0, 0, 0)
        assert rank_blocks(lay.dev_matrix, lay.tensor_map, 4)[0] == split_dim(kind, len(shape))
    # ndim given as an int gives the same bytes as the full shape
    assert strategy_bytes([(n, k, len(s)) for n, k, s in SPEC], 4) == strategy_bytes(params, 4)
    # overwrite in place
    write_strategy(path, params[:1], 2)
    assert list(read_strategy(path)) == [SPEC[0][0]]
    assert read_strategy(path)[SPEC[0][0]].dev_matrix == (1, 2)
    with pytest.raises(CheckpointError, match="empty"):
        (tmp_path / "empty.ckpt").write_bytes(b"")
        read_strategy(tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match="truncated"):
        parse_strategy(strategy_bytes(params, 4)[:-3])


# ---------------------------------------------------------------------------------------------------------------
# against MindSpore

@pytest.fixture(scope="module")
def ms():
    import mindspore
    return mindspore


def _np_dtype(name):
    if name == "bf16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return {"fp32": np.float32, "fp16": np.float16}[name]


def _full_tensors(dtype_name, seed=0):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * 3).astype(_np_dtype(dtype_name)) for n, _, s in SPEC}


def _same_bits(a, b):
    """Same dtype, shape and bytes. MindSpore's asnumpy() bf16 dtype is its own numpy type, not
    ml_dtypes.bfloat16 (both print as 'bfloat16'), so dtypes are compared by name and size."""
    a, b = np.asarray(a), np.asarray(b)
    return (a.dtype.name, a.dtype.itemsize) == (b.dtype.name, b.dtype.itemsize) and a.shape == b.shape and \
        np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def _write_ranks(ms, src, full, tp, fmt):
    """rank_<r>/llava.<fmt> holding rank r's slices."""
    from safetensors.numpy import save_file
    for r in range(tp):
        folder = os.path.join(src, f"rank_{r}")
        os.makedirs(folder)
        parts = {n: np.ascontiguousarray(full[n][rank_slice(s, k, tp, r)]) for n, k, s in SPEC}
        if fmt == "ckpt":
            ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in parts.items()],
                               os.path.join(folder, "llava.ckpt"))
        else:
            save_file(parts, os.path.join(folder, "llava.safetensors"))


def _load_rank(ms, path):
    """{name: Parameter named `name`} of one rank file (safetensors loads come back unnamed)."""
    if path.endswith(".safetensors"):
        raw = ms.load_checkpoint(path, format="safetensors")
    else:
        raw = ms.load_checkpoint(path)
    return {n: ms.Parameter(p.data if hasattr(p, "data") else p, name=n) for n, p in raw.items()}


def _read_any(ms, path):
    """{name: numpy} of a file MindSpore wrote (bf16 stays ml_dtypes.bfloat16)."""
    if path.endswith(".safetensors"):
        import ml_dtypes  # noqa: F401  (lets safetensors' numpy backend read bf16)
        from safetensors.numpy import load_file
        return load_file(path)
    return {n: p.asnumpy() for n, p in ms.load_checkpoint(path).items()}


def _transform_to_full(ms, src, dst, strategy, fmt):
    out_fmt = "safetensors" if fmt == "safetensors" else "ckpt"
    ms.transform_checkpoints(src, dst, "full", src_strategy_file=strategy, dst_strategy_file=None,
                             output_format=out_fmt)
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(dst) for f in fs)
    assert files == [os.path.join(dst, "rank_0", f"full0.{out_fmt}")]
    return _read_any(ms, files[0])


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("tp", [2, 4])
def test_mindspore_reassembles_exactly(ms, tmp_path, tp, fmt, dtype_name):
    full = _full_tensors(dtype_name, seed=tp)
    src = str(tmp_path / "shards")
    _write_ranks(ms, src, full, tp, fmt)
    strategy = write_strategy(os.path.join(src, "strategy.ckpt"), [(n, k, s) for n, k, s in SPEC], tp)

    # 1. transform_checkpoints: tp ranks -> one unsplit rank
    got = _transform_to_full(ms, src, str(tmp_path / "full"), strategy, fmt)
    assert set(got) == set(full)
    for name in full:
        assert _same_bits(got[name], full[name]), name

    # 2. merge_sliced_parameter with build_searched_strategy
    layouts = ms.build_searched_strategy(strategy)
    ranks = [_load_rank(ms, os.path.join(src, f"rank_{r}", f"llava.{fmt}")) for r in range(tp)]
    for name in full:
        merged = ms.merge_sliced_parameter([rk[name] for rk in ranks], layouts)
        assert merged.name == name
        want = full[name]
        if dtype_name == "bf16":  # merge_sliced_parameter returns bf16 slices merged as float32 (exact)
            want = want.astype(np.float32)
        assert _same_bits(merged.asnumpy(), want), name

    # 3. load_distributed_checkpoint into an unsplit network (ckpt input; its safetensors path wants a
    #    pre-unified folder instead of rank files)
    if fmt == "ckpt":
        from mindspore import nn

        class Net(nn.Cell):
            def __init__(self):
                super().__init__()
                for i, (n, _, s) in enumerate(SPEC):
                    setattr(self, f"p{i}", ms.Parameter(ms.Tensor(np.zeros(s, full[n].dtype)), name=n))

        net = Net()
        files = [os.path.join(src, f"rank_{r}", "llava.ckpt") for r in range(tp)]
        ms.load_distributed_checkpoint(net, checkpoint_filenames=files, predict_strategy=None,
                                       train_strategy_filename=strategy)
        params = {p.name: p.asnumpy() for p in net.get_parameters()}
        for name in full:
            assert _same_bits(params[name], full[name]), name


def test_bytes_match_mindspore_protobuf(ms, tmp_path):
    """Our hand encoder = ParallelStrategyMap.SerializeToString(); MindSpore's other readers accept it."""
    from mindspore.train.node_strategy_pb2 import ParallelStrategyMap
    tp = 4
    want = ParallelStrategyMap()
    want.current_stage = 0
    for name, kind, shape in SPEC:
        item = want.parallel_strategy_item.add()
        item.node_name = name
        item.parallel_strategys.stage = 0
        item.parallel_strategys.parallel_strategy.add().dim.extend(
            [tp if m == 0 else 1 for m in tensor_map(kind, len(shape))])
    for name, kind, shape in SPEC:
        item = want.parallel_layout_item.add()
        item.param_name = name
        lay = item.parallel_layouts
        lay.dev_matrix.add().dim.extend([1, tp])
        lay.tensor_map.add().dim.extend(tensor_map(kind, len(shape)))
        lay.param_split_shape.add()
        lay.indices_offset.add()
        lay.field = 0
        lay.opt_weight_shard_step = 0
        lay.opt_weight_shard_size = 0
    ours = strategy_bytes([(n, k, s) for n, k, s in SPEC], tp)
    assert ours == want.SerializeToString()
    parsed = ParallelStrategyMap()
    parsed.ParseFromString(ours)
    assert parsed.IsInitialized()  # every proto2 `required` field is set

    path = write_strategy(tmp_path / "strategy.ckpt", [(n, k, s) for n, k, s in SPEC], tp)
    from mindspore.train._utils import parse_strategy_ckpt
    assert parse_strategy_ckpt(path) == {n: [[1, tp], tensor_map(k, len(s)), 0, 0] for n, k, s in SPEC}
    assert sorted(ms.parallel.rank_list_for_transform(0, path, None)) == list(range(tp))
    # the stage-merge tool needs parallel_strategy_item; it prefixes names with the stage
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "stage0.ckpt").write_bytes(ours)
    ms.merge_pipeline_strategys(str(tmp_path / "stages"), str(tmp_path / "merged.ckpt"))
    assert sorted(ms.build_searched_strategy(str(tmp_path / "merged.ckpt"))) == sorted(f"0-{n}" for n, _, _ in SPEC)
    # our reader reads MindSpore-serialized bytes too (packed or not)
    assert read_strategy(path) == parse_strategy(want.SerializeToString())


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_wrong_strategy_gives_wrong_result(ms, tmp_path, fmt):
    """The checks above can fail: with wrong split kinds MindSpore glues the slices along the wrong dim (or
    keeps only rank 0's slice) and the comparison sees it."""
    tp = 2
    full = _full_tensors("fp32", seed=7)
    src = str(tmp_path / "shards")
    _write_ranks(ms, src, full, tp, fmt)
    swap = {"column": "row", "row": "column", "vocab": "replicated", "replicated": "replicated"}
    wrong = [(n, swap[k] if len(s) == 2 else ("replicated" if k == "column" else k), len(s)) for n, k, s in SPEC]
    strategy = write_strategy(os.path.join(src, "strategy.ckpt"), wrong, tp)
    split_names = [n for n, k, s in SPEC if split_dim(k, len(s)) is not None]
    assert len(split_names) == 4

    got = _transform_to_full(ms, src, str(tmp_path / "full"), strategy, fmt)
    layouts = ms.build_searched_strategy(strategy)
    ranks = [_load_rank(ms, os.path.join(src, f"rank_{r}", f"llava.{fmt}")) for r in range(tp)]
    for name in full:
        merged = ms.merge_sliced_parameter([rk[name] for rk in ranks], layouts).asnumpy()
        if name in split_names:
            assert not _same_bits(got[name], full[name]), name
            assert not _same_bits(merged, full[name]), name
        else:  # the unsplit tensors still come back right
            assert _same_bits(got[name], full[name]), name
            assert _same_bits(merged, full[name]), name


def test_every_kind_is_covered():
    assert {k for _, k, _ in SPEC} == set(SPLIT_KINDS)


def test_json_strategy_reads_like_the_protobuf(tmp_path):
    """MindSpore's JSON form of a strategy gives the same layouts as the protobuf; bad JSON is one clear error."""
    import json
    write_strategy(tmp_path / "s.ckpt", SPEC, 4)
    layouts = read_strategy(tmp_path / "s.ckpt")
    items = {n: {"dev_matrix": list(l.dev_matrix), "tensor_map": list(l.tensor_map), "param_split_shape": [],
                 "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0} for n, l in layouts.items()}
    (tmp_path / "s.json").write_text(json.dumps({"parallel_layout_item": items}))
    assert read_strategy(tmp_path / "s.json") == layouts
    (tmp_path / "bad.json").write_text(json.dumps({"parallel_layout_item": {"w": {"dev_matrix": "1,4"}}}))
    with pytest.raises(CheckpointError, match="'w' has an invalid dev_matrix"):
        read_strategy(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(CheckpointError, match="no parallel_layout_item"):
        read_strategy(tmp_path / "other.json")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_strategy(tmp_path / "none.ckpt")
