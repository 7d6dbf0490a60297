"""The one opener (llava_ckpt/io/checkpoint.py): every layout opened into the same lazy tensors."""
import json
import os

import numpy as np
import pytest

from llava_ckpt.convert import convert
from llava_ckpt.errors import CheckpointError
from llava_ckpt.io.checkpoint import open_checkpoint
from llava_ckpt.io.readers import FileReader

from training import tensors_and_kinds, training_source


@pytest.mark.parametrize("layout", [dict(dp=2, mp=2, stages=2, opt=2, strategy="folder"),
                                    dict(dp=1, mp=2, stages=2, strategy="merged"),
                                    dict(dp=2, mp=1, stages=1, opt=2, strategy="files")])
def test_a_training_checkpoint_opens_to_its_whole_tensors(tiny, tmp_path, layout):
    train = training_source(tiny, tmp_path, **layout)
    want, _ = tensors_and_kinds(tmp_path / "one")
    got = open_checkpoint(str(train))
    ranks = layout["dp"] * layout["mp"] * layout["stages"]
    assert (got.kind, got.tp, got.stages, len(got.rank_dirs)) == ("ranks", ranks, layout["stages"], ranks)
    assert list(got.tensors) == list(want)  # the source's order, stage by stage
    assert "global_step" in got.skipped and all(n.startswith(("adam_", "global")) for n in got.skipped)
    arrays = got.arrays()
    try:
        assert [n for n in want if not np.array_equal(arrays[n], want[n])] == []
    finally:
        arrays.close()


def test_every_output_layout_opens_to_the_same_tensors(tiny, tmp_path):
    convert(tiny, str(tmp_path / "one"), progress=False)
    convert(tiny, str(tmp_path / "four"), tp=4, fmt="ckpt", progress=False)
    one, four = open_checkpoint(str(tmp_path / "one")), open_checkpoint(str(tmp_path / "four"))
    assert (one.kind, one.tp, one.format, four.tp, four.format) == ("convert", 1, "safetensors", 4, "ckpt")
    assert one.layout() == four.layout() and one.dtypes() == four.dtypes()
    a, b = one.arrays(), four.arrays()
    assert a.infos is not None and b.infos is None  # one file holds each tensor whole: mappable
    assert [n for n in a if not np.array_equal(a[n], b[n])] == []
    bare = open_checkpoint(str(tmp_path / "one" / "llava.safetensors"))
    assert bare.kind == "checkpoint" and sorted(bare.tensors) == sorted(one.tensors)


def test_replicas_that_differ_are_an_error_or_recorded(tiny, tmp_path):
    """Strict reads (shard, export) name the tensor and the ranks; verify's lenient mapping records it."""
    import mindspore as ms
    train = training_source(tiny, tmp_path, mp=2, strategy="files", optimizer=False)
    path = train / "rank_1" / "llava_rank_1-3_10.ckpt"
    params = {n: p.asnumpy() for n, p in ms.load_checkpoint(str(path)).items()}
    name = "vision_encoder.conv1.weight"
    params[name] = params[name] + np.float16(1)
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in params.items()], str(path))
    got = open_checkpoint(str(train))
    t = got.tensors[name]
    with FileReader() as reader, pytest.raises(CheckpointError, match=f"{name}: replicated tensor differs between "
                                                                      "rank 0 and rank 1"):
        t.read_rows(reader, 0, t.shape[0])
    arrays = got.arrays()
    arrays[name]
    assert arrays.replica_mismatch == {name}


def test_a_json_stage_strategy_and_a_strategy_outside_the_folder(tiny, tmp_path):
    from llava_ckpt.io.strategy import read_strategy
    train = training_source(tiny, tmp_path, mp=2, stages=2, strategy="files")
    for stage, f in enumerate(sorted(train.glob("stage*_strategy.ckpt"))):
        items = {n: {"dev_matrix": list(l.dev_matrix), "tensor_map": list(l.tensor_map), "param_split_shape": [],
                     "indices_offset": [], "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}
                 for n, l in read_strategy(f).items()}
        strategy_items = {n: {"stage": stage, "parallel_strategy": []} for n in items}
        (train / f"stage{stage}_strategy.json").write_text(json.dumps(
            {"parallel_strategy_item": strategy_items, "parallel_layout_item": items}))
        f.unlink()
    want, _ = tensors_and_kinds(tmp_path / "one")
    got = open_checkpoint(str(train))
    assert got.stages == 2 and sorted(got.tensors) == sorted(want)
    outside = tmp_path / "elsewhere.ckpt"
    os.rename(train / "stage1_strategy.json", outside)
    os.symlink(outside, train / "stage1_strategy.json")
    with pytest.raises(CheckpointError, match="outside"):
        open_checkpoint(str(train))
