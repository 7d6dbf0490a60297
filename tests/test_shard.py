import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llava_ckpt.convert import convert
from llava_ckpt.errors import CheckpointError
from llava_ckpt.shard import shard

from expected import expected, load_config, mismatches, read_hf, read_with_mindspore

COLUMN = (".attention.wq.", ".attention.wk.", ".attention.wv.", ".attention.w_qkv.", ".feed_forward.w1.",
          ".feed_forward.w3.", ".feed_forward.w_gate_hidden.", "adapter.adapter.")
ROW = (".attention.wo.weight", ".feed_forward.w2.weight", "adapter.adapter_2.weight")
VOCAB = ("tok_embeddings.embedding_weight", "lm_head.weight")


def expected_slice(name, full, rank, tp):
    """Rank `rank`'s piece, by the Megatron rules written out by hand (independent of the tables)."""
    if any(k in name for k in COLUMN) or any(name.endswith(k) for k in VOCAB):
        n = full.shape[0] // tp
        return full[rank * n:(rank + 1) * n]
    if any(name.endswith(k) for k in ROW):
        n = full.shape[1] // tp
        return np.ascontiguousarray(full[:, rank * n:(rank + 1) * n])
    return full


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("fmt,fuse,direct", [("ckpt", False, False), ("ckpt", True, True),
                                              ("safetensors", True, False), ("safetensors", False, True)])
def test_ranks_hold_expected_slices(tiny, tmp_path, tp, fmt, fuse, direct):
    out = tmp_path / "tp"
    if direct:
        convert(tiny, str(out), fmt=fmt, fuse_qkv=fuse, tp=tp, progress=False)
    else:
        convert(tiny, str(tmp_path / "one"), fmt=fmt, fuse_qkv=fuse, progress=False)
        shard(str(tmp_path / "one"), str(out), tp=tp, progress=False)
    want = expected(read_hf(tiny), load_config(tiny), fuse_qkv=fuse)
    ranks = [read_with_mindspore(str(out / f"rank_{r}" / f"llava.{fmt}")) for r in range(tp)]
    for r, got in enumerate(ranks):
        assert mismatches(got, {n: expected_slice(n, a, r, tp) for n, a in want.items()}) == []
    # fused tensors: rank r's w_qkv holds [q_h; k_h; v_h] of its own heads only
    if fuse:
        q = read_hf(tiny)["language_model.model.layers.1.self_attn.q_proj.weight"]
        head_dim = q.shape[0] // 4
        mine = ranks[tp - 1]["language_model.model.layers.1.attention.w_qkv.weight"]
        last_head = q[-head_dim:]
        assert np.array_equal(mine[-3 * head_dim:-2 * head_dim], last_head)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tp"] == tp and (out / "strategy.ckpt").exists()
    assert {f["path"] for f in manifest["files"]} >= {f"rank_{r}/llava.{fmt}" for r in range(tp)}
    # the output stands alone: config, tokenizer and processor files travel (through shard too)
    for name in ("config.json", "tokenizer.model", "preprocessor_config.json", "chat_template.json"):
        assert (out / name).read_bytes() == open(os.path.join(tiny, name), "rb").read()


def test_replicated_tensors_are_byte_identical_across_ranks(tiny, tmp_path):
    from llava_ckpt.io import load_tensors
    convert(tiny, str(tmp_path / "tp"), tp=4, progress=False)
    manifest = json.loads((tmp_path / "tp" / "manifest.json").read_text())
    ranks = [load_tensors(str(tmp_path / "tp" / f"rank_{r}")) for r in range(4)]
    replicated = [t["name"] for t in manifest["tensors"] if t["split_dim"] is None]
    assert "vision_encoder.conv1.weight" in replicated and "adapter.adapter_2.bias" in replicated
    for name in replicated:
        first = ranks[0][name].tobytes()
        assert all(r[name].tobytes() == first for r in ranks[1:]), name


@pytest.mark.parametrize("fmt,fuse", [("ckpt", True), ("safetensors", False)])
def test_mindspore_transform_checkpoints_reassembles_tp1(tiny, tmp_path, fmt, fuse):
    import mindspore as ms
    convert(tiny, str(tmp_path / "one"), fmt=fmt, fuse_qkv=fuse, progress=False)
    shard(str(tmp_path / "one"), str(tmp_path / "tp"), tp=4, progress=False)
    ms.transform_checkpoints(str(tmp_path / "tp"), str(tmp_path / "merged"), "llava",
                             src_strategy_file=str(tmp_path / "tp" / "strategy.ckpt"), dst_strategy_file=None,
                             output_format=fmt)
    merged = read_with_mindspore(str(tmp_path / "merged" / "rank_0" / f"llava0.{fmt}"))
    whole = read_with_mindspore(str(tmp_path / "one" / f"llava.{fmt}"))
    assert mismatches(merged, whole) == []


def test_bad_tp_and_foreign_inputs_are_refused(tiny, tmp_path):
    convert(tiny, str(tmp_path / "one"), progress=False)
    with pytest.raises(CheckpointError, match=r"--tp 3 must divide .*Valid: 1, 2, 4"):
        shard(str(tmp_path / "one"), str(tmp_path / "tp3"), tp=3, progress=False)
    with pytest.raises(CheckpointError, match="is a Hugging Face checkpoint folder, not a MindSpore checkpoint"):
        shard(tiny, str(tmp_path / "x"), tp=2, progress=False)
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    # shard follows the split kinds the manifest records (from the table): an unknown one is refused, named
    manifest["tensors"][3]["split"] = "diagonal"
    (tmp_path / "one" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"tensors\[3\] has an invalid 'split': 'diagonal'"):
        shard(str(tmp_path / "one"), str(tmp_path / "x"), tp=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["one"]
    exe = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
    run = subprocess.run([exe, "convert", tiny, str(tmp_path / "tp3"), "--tp", "3"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: --tp 3") and run.stderr.count("\n") == 1


def test_shard_refuses_a_corrupted_input(tiny, tmp_path):
    convert(tiny, str(tmp_path / "one"), progress=False)
    path = tmp_path / "one" / "llava.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        shard(str(tmp_path / "one"), str(tmp_path / "tp"), tp=2, progress=False)
    assert not (tmp_path / "tp").exists()


def test_shard_refuses_a_changed_side_file(tiny, tmp_path):
    convert(tiny, str(tmp_path / "one"), progress=False)
    with open(tmp_path / "one" / "tokenizer_config.json", "a") as f:
        f.write("\n")
    with pytest.raises(CheckpointError, match="tokenizer_config.json does not match the sha256"):
        shard(str(tmp_path / "one"), str(tmp_path / "tp"), tp=2, progress=False)
    assert not (tmp_path / "tp").exists()
