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
from training import tensors_and_kinds, training_source

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


# ---- any layout to any layout ------------------------------------------------------------------------------------

def _same_files(a, b, names):
    return [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]


def _same_tensor_bytes(a, b, tp, fmt):
    """Names whose bytes, shape or dtype differ between two outputs' rank files, and the strategies' differences
    (tensor order aside)."""
    from llava_ckpt.io.readers import FileReader, read_index
    from llava_ckpt.io.strategy import read_strategy
    differ = []
    with FileReader() as reader:
        for rel in _weight_files(tp, fmt)[:tp]:
            x, y = read_index(str(a / rel)), read_index(str(b / rel))
            differ += [f"{rel}: {n}" for n in sorted(set(x) | set(y)) if n not in x or n not in y
                       or (x[n].shape, x[n].dtype) != (y[n].shape, y[n].dtype)
                       or bytes(reader.read_bytes(x[n], 0, x[n].nbytes)) != bytes(reader.read_bytes(y[n], 0, y[n].nbytes))]
    if tp > 1 and read_strategy(a / "strategy.ckpt") != read_strategy(b / "strategy.ckpt"):
        differ.append("strategy.ckpt")
    return differ


def _weight_files(tp, fmt):
    return [f"rank_{r}/llava.{fmt}" for r in range(tp)] + ["strategy.ckpt"] if tp > 1 else [f"llava.{fmt}"]


@pytest.mark.parametrize("src_tp,dst_tp,fmt,fuse", [(2, 4, "ckpt", True), (4, 2, "safetensors", False),
                                                    (4, 1, "ckpt", False), (2, 2, "safetensors", True)])
def test_a_tp_n_output_reshards_to_the_bytes_convert_gives(tiny, tmp_path, src_tp, dst_tp, fmt, fuse):
    convert(tiny, str(tmp_path / "src"), fmt=fmt, fuse_qkv=fuse, tp=src_tp, progress=False)
    convert(tiny, str(tmp_path / "direct"), fmt=fmt, fuse_qkv=fuse, tp=dst_tp, progress=False)
    result = shard(str(tmp_path / "src"), str(tmp_path / "re"), tp=dst_tp, progress=False)
    assert result["source_kind"] == "convert" and result["source_tp"] == src_tp and result["tp"] == dst_tp
    assert _same_files(tmp_path / "re", tmp_path / "direct", _weight_files(dst_tp, fmt)) == []
    made = json.loads((tmp_path / "re" / "manifest.json").read_text())
    direct = json.loads((tmp_path / "direct" / "manifest.json").read_text())
    assert made["tensors"] == direct["tensors"] and made["tp"] == dst_tp
    # and what it made is a complete output every command takes: check, then export back to the HF tensors
    from llava_ckpt.check import check
    assert check(str(tmp_path / "re"))["ok"]


# (dp, mp, pipeline stages, optimizer-parallel size, strategy files, format, compare with MindSpore's transform).
# MindSpore 2.10's transform_checkpoints scrambles tensors it has to join along dim 1 when the format is
# safetensors (measured: its rank 0 piece of a row-split weight is the two source pieces stacked on dim 0 and
# reshaped), so that comparison is made where it joins along dim 0 only.
TRAINING_LAYOUTS = [(1, 4, 1, 0, "files", "ckpt", True), (2, 2, 2, 2, "folder", "ckpt", True),
                    (1, 2, 2, 0, "merged", "safetensors", True), (4, 1, 1, 4, "folder", "safetensors", True),
                    (1, 4, 2, 0, "folder", "safetensors", False)]


@pytest.mark.parametrize("dp,mp,stages,opt,strategy,fmt,with_ms", TRAINING_LAYOUTS,
                         ids=[f"dp{l[0]}-mp{l[1]}-pp{l[2]}-opt{l[3]}-{l[4]}-{l[5]}" for l in TRAINING_LAYOUTS])
def test_a_training_checkpoint_reshards_to_the_bytes_convert_gives(tiny, tmp_path, dp, mp, stages, opt, strategy,
                                                                   fmt, with_ms):
    train = training_source(tiny, tmp_path, fmt, dp=dp, mp=mp, stages=stages, opt=opt, strategy=strategy)
    convert(tiny, str(tmp_path / "direct"), fmt=fmt, tp=2, progress=False)
    result = shard(str(train), str(tmp_path / "re"), tp=2, progress=False)
    assert result["source_kind"] == "ranks" and result["source_tp"] == dp * mp * stages
    assert result["skipped_training_state"] == stages * 3 * 2 + 1  # adam_m/adam_v of 3 weights a stage; global_step
    made = json.loads((tmp_path / "re" / "manifest.json").read_text())
    direct = json.loads((tmp_path / "direct" / "manifest.json").read_text())
    keep = ("name", "shape", "dtype", "sources", "op", "split", "split_dim", "layout", "groups", "rank_shape")
    by_name = {e["name"]: {k: e[k] for k in keep if k in e} for e in direct["tensors"]}
    assert [{k: e[k] for k in keep if k in e} for e in made["tensors"]] == [by_name[e["name"]] for e in made["tensors"]]
    assert sorted(by_name) == sorted(e["name"] for e in made["tensors"])
    if fmt == "ckpt":  # MindSpore saved the ranks' .ckpt in convert's order: shard keeps it, so the files are equal
        assert _same_files(tmp_path / "re", tmp_path / "direct", _weight_files(2, fmt)) == []
    else:  # its safetensors writer sorts by name, and shard keeps the source's order: the same tensors, bytes
        assert _same_tensor_bytes(tmp_path / "re", tmp_path / "direct", 2, fmt) == []
    if with_ms:
        import mindspore as ms
        if strategy != "merged":  # MindSpore's transform takes one strategy file: its own merge of the stages'
            from training import _merge
            files = sorted(str(p) for p in train.rglob("*strategy*.ckpt"))
            _merge(ms, files, str(tmp_path / "merged.ckpt"))
            src_strategy = str(tmp_path / "merged.ckpt")
        else:
            src_strategy = str(train / "merged_strategy.ckpt")
        ms.transform_checkpoints(str(train), str(tmp_path / "ms"), "llava", src_strategy_file=src_strategy,
                                 dst_strategy_file=str(tmp_path / "re" / "strategy.ckpt"), output_format=fmt)
        for r in range(2):
            theirs = read_with_mindspore(str(tmp_path / "ms" / f"rank_{r}" / f"llava{r}.{fmt}"))
            ours = read_with_mindspore(str(tmp_path / "re" / f"rank_{r}" / f"llava.{fmt}"))
            assert mismatches({n: theirs[n] for n in ours}, ours) == []


def test_one_node_s_ranks_are_the_full_run_s_bytes(tiny, tmp_path):
    """From a working folder, relative paths, the source reached through a symlink, into a folder that holds
    this run's earlier output: `--ranks 1,3` writes rank_1 and rank_3 with the bytes of the full run."""
    convert(tiny, str(tmp_path / "src"), tp=2, progress=False)
    os.symlink("src", tmp_path / "link")
    exe = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")

    def cli(*args):
        return subprocess.run([exe, *args], capture_output=True, text=True, cwd=tmp_path)
    assert cli("shard", "link", "full", "--tp", "4").returncode == 0
    assert cli("shard", "link", "node", "--tp", "4", "--ranks", "3,1").returncode == 0
    assert sorted(n for n in os.listdir(tmp_path / "node") if n.startswith("rank_")) == ["rank_1", "rank_3"]
    wanted = ["rank_1/llava.safetensors", "rank_3/llava.safetensors", "strategy.ckpt"]
    assert _same_files(tmp_path / "node", tmp_path / "full", wanted) == []
    assert json.loads((tmp_path / "node" / "manifest.json").read_text())["ranks"] == [1, 3]
    rerun = cli("shard", "link", "node", "--tp", "4", "--ranks", "1,3")  # its own output: replaced, same bytes
    assert rerun.returncode == 0 and _same_files(tmp_path / "node", tmp_path / "full", wanted) == []
    checked = cli("check", "node")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    whole = cli("export", "node", "back")
    assert whole.returncode == 2 and "holds ranks 1,3 of a tp-4 output" in whole.stderr
    for bad, words in [("1,4", "rank 4 does not exist with --tp 4"), ("1,1", "names a rank twice"),
                       ("a", "rank numbers separated by commas")]:
        run = cli("shard", "link", "x", "--tp", "4", "--ranks", bad)
        assert run.returncode == 2 and run.stderr.startswith("error: ") and words in run.stderr, run.stderr
    assert not (tmp_path / "x").exists()


def test_a_bare_checkpoint_folder_shards_like_its_output(tiny, tmp_path):
    """A convert output whose manifest is gone is a bare checkpoint with LlavaVlm names and its config.json:
    planned against the table, it gives the same rank files."""
    convert(tiny, str(tmp_path / "one"), progress=False)
    convert(tiny, str(tmp_path / "direct"), tp=2, progress=False)
    (tmp_path / "one" / "manifest.json").unlink()
    result = shard(str(tmp_path / "one"), str(tmp_path / "re"), tp=2, progress=False)
    assert result["source_kind"] == "checkpoint"
    assert _same_files(tmp_path / "re", tmp_path / "direct", _weight_files(2, "safetensors")) == []


def _damage_missing_rank(train, tmp):
    import shutil
    shutil.rmtree(train / "rank_1")
    return ["rank_1 missing"]


def _damage_last_rank_gone(train, tmp):
    import shutil
    shutil.rmtree(train / "rank_3")
    return ["3 rank folders cannot hold 2 pipeline stages"]


def _damage_other_step_in_name(train, tmp):
    f = train / "rank_2" / "llava_rank_2-3_10.ckpt"
    f.rename(train / "rank_2" / "llava_rank_2-3_11.ckpt")
    return ["ranks of different training steps", "rank_2/llava_rank_2-3_11.ckpt", "step 11"]


def _damage_other_global_step(train, tmp):
    """rank_2's file from a later step, renamed to this step's name: its global_step gives it away."""
    from training import write_training_checkpoint
    later = tmp / "later"
    write_training_checkpoint(str(later), *tensors_and_kinds(tmp / "one"), mp=2, stages=2, step=(3, 11))
    (later / "rank_2" / "llava_rank_2-3_11.ckpt").replace(train / "rank_2" / "llava_rank_2-3_10.ckpt")
    return ["ranks of different training steps", "global_step is 10 in rank_0", "11 in rank_2"]


def _damage_stage_strategy_missing(train, tmp):
    (train / "strategy" / "ckpt_strategy_rank_2.ckpt").unlink()
    return ["mismatched strategies", "2 devices a stage in 1 pipeline stage", "there are 4 ranks"]


def _damage_conflicting_strategy(train, tmp):
    from llava_ckpt.io.strategy import write_strategy
    tensors, kinds = tensors_and_kinds(tmp / "one")
    first_stage = list(tensors)[:len(tensors) // 2]
    write_strategy(train / "other_strategy.ckpt", [(n, "replicated", tensors[n].shape) for n in first_stage], 2)
    return ["mismatched strategies", f"{first_stage[0]!r} (stage 0) is laid out differently"]


def _damage_piece_of_wrong_shape(train, tmp):
    """rank_1 holds a whole tensor where its layout gives it half."""
    import mindspore as ms
    tensors, kinds = tensors_and_kinds(tmp / "one")
    name = next(n for n in list(tensors)[:len(tensors) // 2] if kinds[n] == "column")
    path = train / "rank_1" / "llava_rank_1-3_10.ckpt"
    params = {n: p.asnumpy() for n, p in ms.load_checkpoint(str(path)).items()}
    params[name] = tensors[name]
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in params.items()], str(path))
    return [name, "rank 1 (rank_1/llava_rank_1-3_10.ckpt) holds [128, 64]"]


TRAINING_DAMAGE = [_damage_missing_rank, _damage_last_rank_gone, _damage_other_step_in_name, _damage_other_global_step,
                   _damage_stage_strategy_missing, _damage_conflicting_strategy, _damage_piece_of_wrong_shape]


@pytest.mark.parametrize("damage", TRAINING_DAMAGE, ids=[d.__name__[8:] for d in TRAINING_DAMAGE])
def test_a_bad_training_checkpoint_is_named_and_nothing_is_written(tiny, tmp_path, damage):
    train = training_source(tiny, tmp_path, "ckpt", mp=2, stages=2, strategy="folder")
    words = damage(train, tmp_path)
    exe = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
    run = subprocess.run([exe, "shard", "train", "out", "--tp", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    for w in words:
        assert w in run.stderr, (w, run.stderr)
    assert not (tmp_path / "out").exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


def test_a_resharded_training_checkpoint_is_a_complete_output(tiny, tmp_path):
    """What shard writes from training ranks carries a manifest the other commands read: verify's weight proof
    holds it to the HF source bit for bit, and export gives the HF tensors back."""
    from llava_ckpt.export import export
    from llava_ckpt.verify import verify
    from expected import read_hf
    train = training_source(tiny, tmp_path, "ckpt", dp=2, mp=2, stages=2, opt=2, strategy="folder")
    shard(str(train), str(tmp_path / "re"), tp=2, progress=False)
    proof = verify(tiny, str(tmp_path / "re"), weights_only=True, progress=False)
    assert proof["passed"] and proof["weights"]["differ"] == [], proof["weights"]
    export(str(tmp_path / "re"), str(tmp_path / "hf"), progress=False)
    back, want = read_hf(str(tmp_path / "hf")), read_hf(tiny)
    assert sorted(back) == sorted(want)
    assert [n for n in want if back[n].tobytes() != want[n].tobytes()] == []
