"""The MindFormers side of an output (llava_ckpt/io/mindformers.py): predict_llava.yaml fitted to the weights,
the strategy/ folder MindFormers' loader merges, check naming a yaml edited to contradict the weights, and
MindFormers' own config machinery and safetensors loader run on our outputs (tests/mindformers_side.py)."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from llava_ckpt.check import check
from llava_ckpt.convert import convert
from llava_ckpt.errors import CheckpointError
from llava_ckpt.shard import shard


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MINDFORMERS_PYTHON = os.path.join(ROOT, ".venv-mindformers", "bin", "python")


def _outputs(tiny, tmp_path):
    """tp 1 and tp 2, fused and not; the tp-2 ones made both ways (convert --tp, and shard of a tp-1)."""
    made = {}
    for fuse in (True, False):
        one = tmp_path / f"one-{int(fuse)}"
        convert(tiny, str(one), fuse_qkv=fuse, progress=False)
        two = tmp_path / f"two-{int(fuse)}"
        if fuse:
            shard(str(one), str(two), tp=2, progress=False)
        else:
            convert(tiny, str(two), fuse_qkv=fuse, tp=2, progress=False)
        made[(1, fuse)], made[(2, fuse)] = one, two
    return made


def _expected(cfg, out, tp, fuse):
    t, v = cfg["text_config"], cfg["vision_config"]
    return {"load_ckpt_format": "safetensors", "use_parallel": tp > 1, "model_parallel": tp, "qkv_concat": fuse,
            "hidden_size": t["hidden_size"], "num_layers": t["num_hidden_layers"],
            "num_heads": t["num_attention_heads"], "vocab_size": t["vocab_size"],
            "intermediate_size": t["intermediate_size"], "vision_hidden_size": v["hidden_size"],
            "vision_layers": v["num_hidden_layers"], "num_queries": (v["image_size"] // v["patch_size"]) ** 2,
            "param_init_type": "float16", "vocab_file": os.path.join(str(out), "tokenizer.model"),
            "src_strategy_path_or_dir": os.path.join(str(out), "strategy") if tp > 1 else ""}


def _yaml_fields(path):
    y = yaml.safe_load(open(path))
    m = y["model"]["model_config"]
    t, v = m["text_config"]["model_config"], m["vision_config"]["model_config"]
    return {"load_ckpt_format": y["load_ckpt_format"], "use_parallel": y["use_parallel"],
            "model_parallel": y["parallel_config"]["model_parallel"], "qkv_concat": t["qkv_concat"],
            "hidden_size": t["hidden_size"], "num_layers": t["num_layers"], "num_heads": t["num_heads"],
            "vocab_size": t["vocab_size"], "intermediate_size": t["intermediate_size"],
            "vision_hidden_size": v["hidden_size"], "vision_layers": v["num_hidden_layers"],
            "num_queries": v["num_queries"], "param_init_type": m["param_init_type"],
            "vocab_file": y["processor"]["tokenizer"]["vocab_file"],
            "src_strategy_path_or_dir": y["src_strategy_path_or_dir"]}


def test_the_predict_yaml_fits_what_was_written(tiny_factory, tmp_path):
    tiny = tiny_factory()
    from llava_ckpt.engine.config import load_config as normalized
    cfg = normalized(tiny)
    for (tp, fuse), out in _outputs(tiny, tmp_path).items():
        assert _yaml_fields(out / "predict_llava.yaml") == _expected(cfg, out, tp, fuse), (tp, fuse)
        listed = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
        assert "predict_llava.yaml" in listed and check(str(out))["ok"]
        if tp > 1:  # the strategy MindFormers' loader merges from strategy/, the same bytes as strategy.ckpt
            assert (out / "strategy" / "ckpt_strategy_rank_0.ckpt").read_bytes() == (out / "strategy.ckpt").read_bytes()
            assert "strategy/ckpt_strategy_rank_0.ckpt" in listed
            import mindspore as ms
            from llava_ckpt.io.strategy import read_strategy
            ms.merge_pipeline_strategys(str(out / "strategy"), str(tmp_path / f"merged-{int(fuse)}.ckpt"))
            merged = read_strategy(tmp_path / f"merged-{int(fuse)}.ckpt")
            assert {n.split("-", 1)[1]: l.tensor_map for n, l in merged.items()} == \
                   {n: l.tensor_map for n, l in read_strategy(out / "strategy.ckpt").items()}


@pytest.mark.parametrize("edit,words", [
    (lambda y: y["model"]["model_config"]["text_config"]["model_config"].update(qkv_concat=False),
     "text_config.model_config.qkv_concat is False, the weights need True"),
    (lambda y: y["model"]["model_config"]["vision_config"]["model_config"].update(hidden_size=999),
     "vision_config.model_config.hidden_size is 999"),
    (lambda y: y["parallel_config"].update(model_parallel=4), "parallel_config.model_parallel is 4, the weights need 2"),
    (lambda y: y.update(load_ckpt_format="ckpt"), "load_ckpt_format is 'ckpt', the weights need 'safetensors'"),
])
def test_check_names_a_yaml_edited_to_contradict_the_weights(tiny, tmp_path, edit, words):
    convert(tiny, str(tmp_path / "out"), fuse_qkv=True, tp=2, progress=False)
    path = tmp_path / "out" / "predict_llava.yaml"
    y = yaml.safe_load(path.read_text())
    edit(y)
    path.write_text(yaml.safe_dump(y, sort_keys=False))
    got = check(str(tmp_path / "out"))
    assert not got["ok"] and any(words in p for p in got["problems"]), got["problems"]


def test_the_device_is_the_user_s_choice(tiny, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
    run = subprocess.run([exe, "convert", tiny, "out", "--device", "CPU"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load((tmp_path / "out" / "predict_llava.yaml").read_text())["context"]["device_target"] == "CPU"
    with pytest.raises(CheckpointError, match="--device must be one of Ascend, CPU, GPU"):
        convert(tiny, str(tmp_path / "x"), device="TPU", progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_mindformers_own_loader_loads_every_tensor_we_wrote(tiny, tmp_path):
    """MindFormers 1.6.0's config machinery reads each yaml, its qkv-concat check agrees with the weights, and
    its safetensors loader (single file; rank folders merged from strategy/ and unified by its own
    unify_safetensors, standalone) loads every tensor bit for bit."""
    from llava_ckpt.io.checkpoint import open_checkpoint
    from llava_ckpt.engine.config import load_config as normalized
    assert os.path.isfile(MINDFORMERS_PYTHON), "scripts/setup-mindformers makes .venv-mindformers (MindFormers' own loader)"
    outs = _outputs(tiny, tmp_path)
    work = tmp_path / "mindformers-work"
    work.mkdir()
    run = subprocess.run([MINDFORMERS_PYTHON, os.path.join(ROOT, "tests", "mindformers_side.py"), str(work),
                          *map(str, outs.values())], capture_output=True, text=True, cwd=work, timeout=900)
    lines = [l for l in run.stdout.splitlines() if l.startswith("MINDFORMERS-REPORT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    report = json.loads(lines[0].split(" ", 1)[1])
    cfg = normalized(tiny)
    for (tp, fuse), out in outs.items():
        got = report[str(out)]
        assert got["config"] == _expected(cfg, out, tp, fuse), (tp, fuse)
        assert got["files"] == 1  # the single file, or the one file MindFormers unified the two ranks into
        assert got["qkv_concat_in_weights"] == fuse
        assert got["mode"] == ("multi_checkpoint_file_with_rank_id" if tp > 1 else "single_checkpoint_file")
        arrays = open_checkpoint(str(out)).arrays()
        mine = {n: hashlib.sha256(np.ascontiguousarray(arrays[n]).tobytes()).hexdigest() for n in arrays}
        assert got["params"] == mine, (tp, fuse, [n for n in mine if got["params"].get(n) != mine[n]][:5])
