"""export: MindSpore checkpoints back to Hugging Face folders.

Round trips through convert must give every source tensor back bit for bit, in the same files; training
checkpoints (written by MindSpore itself, with optimizer state) must give exactly the inverse of their weights,
which the expected HF tensors here are built independently of the package's table and ops (tests/expected.py
spells the forward mapping out by hand).
"""
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from llava_ckpt.convert import convert
from llava_ckpt.export import export
from llava_ckpt.export.plan import parse_size
from llava_ckpt.errors import CheckpointError

from expected import as_ml_dtypes, expected, load_config, read_hf

NP = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
INDEX = "model.safetensors.index.json"


def read_folder(folder):
    """file name -> {tensor name (as stored) -> array}, for every safetensors file of an HF folder."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="numpy") as f:
                out[name] = {k: as_ml_dtypes(f.get_tensor(k)) for k in f.keys()}
    return out


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.reshape(-1).view(np.uint8),
                                                                        b.reshape(-1).view(np.uint8))


def differing(got: dict, want: dict) -> list:
    """Names (per file) whose presence, dtype, shape or bytes differ."""
    bad = sorted(set(got) ^ set(want))
    for f in set(got) & set(want):
        bad += [f"{f}:{n}" for n in sorted(set(got[f]) ^ set(want[f]))]
        bad += [f"{f}:{n}" for n in set(got[f]) & set(want[f]) if not same_bits(got[f][n], want[f][n])]
    return bad


ROUND_TRIPS = [  # (layout, fuse_qkv, tp, format)
    ("hub", False, 1, "ckpt"),
    ("hub", True, 1, "safetensors"),
    ("v5", False, 1, "safetensors"),
    ("v5", True, 2, "ckpt"),
    ("inmemory", False, 2, "safetensors"),
    ("inmemory", True, 1, "ckpt"),
    ("hub", False, 2, "ckpt"),
    ("hub", True, 4, "ckpt"),
    ("v5", True, 4, "safetensors"),
]


@pytest.mark.parametrize("layout,fuse,tp,fmt", ROUND_TRIPS,
                         ids=[f"{l}-{'fused' if f else 'plain'}-tp{t}-{m}" for l, f, t, m in ROUND_TRIPS])
def test_round_trip_gives_every_source_tensor_back(tiny_factory, tmp_path, layout, fuse, tp, fmt):
    src = tiny_factory(layout=layout)
    convert(src, str(tmp_path / "ms"), fuse_qkv=fuse, tp=tp, fmt=fmt, progress=False)
    result = export(str(tmp_path / "ms"), str(tmp_path / "hf"), progress=False)
    assert differing(read_folder(tmp_path / "hf"), read_folder(src)) == []
    got_index = json.loads((tmp_path / "hf" / INDEX).read_text())
    want_index = json.loads(open(os.path.join(src, INDEX)).read())
    assert got_index == want_index  # same file for every tensor, same total_size
    assert result["tp"] == tp and result["skipped_training_state"] == 0
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.json"):
        assert (tmp_path / "hf" / name).read_bytes() == open(os.path.join(src, name), "rb").read()
    m = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    assert m["command"] == "export" and m["source"]["kind"] == "convert"
    import hashlib
    for f in m["files"]:
        assert f["sha256"] == hashlib.sha256((tmp_path / "hf" / f["path"]).read_bytes()).hexdigest()
    if layout == "hub":  # our fixture writes its files the way export does: the very same bytes
        for name in want_index["weight_map"].values():
            assert (tmp_path / "hf" / name).read_bytes() == open(os.path.join(src, name), "rb").read()


def test_float32_conversion_exported_as_float16_is_the_float16_source(tiny, tmp_path):
    convert(tiny, str(tmp_path / "ms"), dtype="float32", fuse_qkv=True, progress=False)
    r = export(str(tmp_path / "ms"), str(tmp_path / "hf"), dtype="float16", progress=False)
    assert differing(read_folder(tmp_path / "hf"), read_folder(tiny)) == []
    assert r["round_trip"] == "exact"  # float16 -> float32 -> float16 gives every value back
    # without --dtype, the dtype convert recorded for the source comes back too
    export(str(tmp_path / "ms"), str(tmp_path / "hf2"), progress=False)
    assert differing(read_folder(tmp_path / "hf2"), read_folder(tiny)) == []


def test_a_lossy_round_trip_is_reported(tiny, tmp_path):
    """A bfloat16 conversion exported back to the source's float16 cannot be the source's bits: the summary and
    the manifest say so, per chain of casts; exported as bfloat16 it is exact (nothing more is lost)."""
    convert(tiny, str(tmp_path / "ms"), dtype="bfloat16", fmt="ckpt", progress=False)
    r = export(str(tmp_path / "ms"), str(tmp_path / "hf"), progress=False)
    n = len(json.loads((tmp_path / "ms" / "manifest.json").read_text())["tensors"])
    manifest = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    hf_tensors = len(manifest["tensors"])
    assert r["round_trip"] == f"lossy: float16 -> bfloat16 -> float16 ({hf_tensors} tensors)" and hf_tensors >= n
    assert manifest["round_trip"] == {"exact": False, "lossy": {"float16 -> bfloat16 -> float16": hf_tensors}}
    assert differing(read_folder(tmp_path / "hf"), read_folder(tiny)) != []  # really not the source's bits
    r = export(str(tmp_path / "ms"), str(tmp_path / "hf-bf16"), dtype="bfloat16", progress=False)
    assert r["round_trip"] == "lossy: float16 -> bfloat16 -> bfloat16 (%d tensors)" % hf_tensors  # vs the source
    bare = tmp_path / "bare"
    bare.mkdir()
    os.link(tmp_path / "ms" / "llava.ckpt", bare / "llava.ckpt")
    r = export(str(bare), str(tmp_path / "hf-bare"), config=str(tmp_path / "ms" / "config.json"),
               dtype="bfloat16", progress=False)
    assert r["round_trip"] == "exact"  # no record of the source: as stored, nothing is cast


def test_missing_processor_files_are_named(tiny, tmp_path):
    """A bare checkpoint exported with a bare config.json: the weights load, AutoProcessor could not; said on
    stderr (one warning line), in the summary and in the manifest."""
    convert(tiny, str(tmp_path / "ms"), fmt="ckpt", progress=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    os.link(tmp_path / "ms" / "llava.ckpt", bare / "llava.ckpt")
    exe = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
    proc = subprocess.run([exe, "export", str(bare), str(tmp_path / "hf"), "--config", os.path.join(tiny, "config.json"),
                           "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    want = ["tokenizer.json or tokenizer.model", "tokenizer_config.json", "preprocessor_config.json"]
    assert json.loads(proc.stdout)["missing_side_files"] == want
    assert proc.stderr.startswith("warning: ") and proc.stderr.count("\n") == 1 and "AutoProcessor" in proc.stderr
    assert json.loads((tmp_path / "hf" / "manifest.json").read_text())["missing_side_files"] == want
    proc = subprocess.run([exe, "export", str(bare), str(tmp_path / "hf2"), "--config", tiny],
                          capture_output=True, text=True)  # an HF folder as --config: its files come along
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_bfloat16_conversion_exported_as_bfloat16_is_bit_exact(tiny, tmp_path):
    convert(tiny, str(tmp_path / "ms"), dtype="bfloat16", tp=2, progress=False)
    export(str(tmp_path / "ms"), str(tmp_path / "hf"), dtype="bfloat16", progress=False)
    want = {f: {n: a.astype(ml_dtypes.bfloat16) for n, a in t.items()} for f, t in read_folder(tiny).items()}
    assert differing(read_folder(tmp_path / "hf"), want) == []
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["text_config"]["torch_dtype"] == "bfloat16"


def test_max_shard_size_cuts_files_like_transformers(tiny, tmp_path):
    """A bare checkpoint records no HF files: they are cut at --max-shard-size, in the table's order."""
    convert(tiny, str(tmp_path / "ms"), fmt="safetensors", progress=False)
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((tmp_path / "ms" / "llava.safetensors").read_bytes())
    export(str(bare), str(tmp_path / "hf"), config=tiny, max_shard_size="3MB", progress=False)
    index = json.loads((tmp_path / "hf" / INDEX).read_text())
    files = read_folder(tmp_path / "hf")
    assert sorted(files) == sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1 and sorted(files) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    sizes = {f: sum(a.nbytes for a in t.values()) for f, t in files.items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for f, t in files.items():  # over the limit only when one tensor alone is
        assert sizes[f] <= 3_000_000 or len(t) == 1
    flat = {n: a for t in files.values() for n, a in t.items()}
    src = {n: a for t in read_folder(tiny).values() for n, a in t.items()}
    assert sorted(flat) == sorted(src) and all(same_bits(flat[n], src[n]) for n in src)
    with pytest.raises(CheckpointError, match="not a size"):
        export(str(bare), str(tmp_path / "hf3"), config=tiny, max_shard_size="5XB", progress=False)
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2GiB") == 2 << 30 and parse_size(123) == 123


# ---- training checkpoints written by MindSpore ----------------------------------------------------------------

def _fine_tuned(tiny):
    """HF tensors (hub names, float32) changed as a fine-tuning step would leave them, and their MindSpore
    form (built by tests/expected.py's hand-written forward mapping, fused layout)."""
    rng = np.random.default_rng(7)
    hf = {n: a.astype(np.float32) for n, a in read_hf(tiny).items()}
    tuned = {n: (a + rng.standard_normal(a.shape).astype(np.float32) * np.float32(1e-3) * np.abs(a).mean())
             .astype(np.float32) for n, a in hf.items()}
    return tuned, expected(tuned, load_config(tiny), fuse_qkv=True)


def _training_params(ms_tensors, ms):
    """What a training step saves: weights, Adam moments for each, and the scalar training fields."""
    params = []
    for name, a in ms_tensors.items():
        params.append({"name": name, "data": ms.Tensor(a)})
    for name, a in list(ms_tensors.items())[:6]:
        params.append({"name": f"adam_m.{name}", "data": ms.Tensor(np.full(a.shape, 0.5, np.float32))})
        params.append({"name": f"adam_v.{name}", "data": ms.Tensor(np.full(a.shape, 0.25, np.float32))})
    params.append({"name": "global_step", "data": ms.Tensor(np.array([42], np.int32))})
    params.append({"name": "learning_rate", "data": ms.Tensor(np.array(1e-5, np.float32))})
    params.append({"name": "loss_scale", "data": ms.Tensor(np.array(1024.0, np.float32))})
    return params


@pytest.fixture(scope="module")
def training(tiny, tmp_path_factory):
    """A single-file training checkpoint (.ckpt, MindSpore's own writer) and a 2-rank one (rank_0/, rank_1/,
    strategy file), both of the same fine-tuned weights, plus the HF tensors export must give back."""
    import mindspore as ms
    from llava_ckpt.engine.config import normalize_config
    from llava_ckpt.engine.mapping import load_table, plan
    from llava_ckpt.io.strategy import write_strategy
    from oracles import rank_slice
    root = tmp_path_factory.mktemp("training")
    tuned, ms_tensors = _fine_tuned(tiny)
    ms.save_checkpoint(_training_params(ms_tensors, ms), str(root / "train.ckpt"))
    splits = {t.name: t.split for t in plan(load_table(), normalize_config(load_config(tiny)), {"fuse_qkv": True})}
    dist = root / "dist"
    for r in range(2):
        (dist / f"rank_{r}").mkdir(parents=True)
        sliced = {n: np.ascontiguousarray(a[rank_slice(a.shape, splits[n], 2, r)]) for n, a in ms_tensors.items()}
        ms.save_checkpoint(_training_params(sliced, ms), str(dist / f"rank_{r}" / f"llava_rank_{r}-3_10.ckpt"))
    write_strategy(dist / "strategy.ckpt", [(n, splits[n], a.shape) for n, a in ms_tensors.items()], 2)
    return {"root": root, "tuned": tuned, "ms": ms_tensors, "dist": dist}


def _flat(folder):
    return {n: a for t in read_folder(folder).values() for n, a in t.items()}


def test_training_checkpoint_exports_exactly_the_inverse_of_its_weights(tiny, training, tmp_path):
    result = export(str(training["root"] / "train.ckpt"), str(tmp_path / "hf"), config=tiny, progress=False)
    assert result["skipped_training_state"] == 6 * 2 + 3
    got = _flat(tmp_path / "hf")
    want = training["tuned"]
    assert sorted(got) == sorted(want)
    assert [n for n in want if not same_bits(got[n], want[n])] == []
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32"  # what was written, so dtype="auto" loads float32
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


@pytest.mark.parametrize("strategy", ["protobuf", "json"])
def test_distributed_training_checkpoint_merges_to_the_same_tensors(tiny, training, tmp_path, strategy):
    import shutil
    dist = tmp_path / "dist"
    shutil.copytree(training["dist"], dist)
    if strategy == "json":  # MindSpore's JSON form of the same layouts
        from llava_ckpt.io.strategy import read_strategy
        layouts = read_strategy(dist / "strategy.ckpt")
        (dist / "strategy.ckpt").unlink()
        items = {n: {"dev_matrix": list(l.dev_matrix), "tensor_map": list(l.tensor_map), "param_split_shape": [],
                     "indices_offset": [], "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}
                 for n, l in layouts.items()}
        (dist / "src_strategy.json").write_text(json.dumps({"parallel_layout_item": items}))
    result = export(str(dist), str(tmp_path / "hf"), config=tiny, progress=False)
    assert result["source_kind"] == "ranks" and result["tp"] == 2
    assert result["skipped_training_state"] == 6 * 2 + 3  # names, not pieces
    got, want = _flat(tmp_path / "hf"), training["tuned"]
    assert sorted(got) == sorted(want) and [n for n in want if not same_bits(got[n], want[n])] == []


@pytest.mark.slow
def test_transformers_on_the_export_matches_the_reference_model_on_the_training_checkpoint(tiny, training,
                                                                                          tmp_path):
    import torch
    from transformers import LlavaForConditionalGeneration
    from llava_ckpt.engine.config import load_config as load_cfg
    from llava_ckpt.model import Runner, build_and_load
    from llava_ckpt.verify.compare import TOLERANCES, compare_logits
    from llava_ckpt.verify.inputs import build_inputs
    export(str(training["dist"]), str(tmp_path / "hf"), config=tiny, progress=False)
    inputs = build_inputs(tiny, None, None)
    ids, px = inputs["input_ids"], inputs["pixel_values"]
    model, _ = build_and_load(load_cfg(tiny), training["ms"])
    ours = Runner(model, jit=False).forward(ids, px)["logits"][0]  # one forward: compiling costs more
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                       output_loading_info=True)
    hf, info = hf
    assert all(not v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        theirs = hf.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                           pixel_values=torch.from_numpy(px)).logits[0].numpy()
    report = compare_logits(theirs, ours, TOLERANCES["float32"])
    assert report["max_abs_logit"] > 3, "logits this small prove little"
    assert report["logits_ok"] and report["cosine_ok"], report
    assert report["rel_diff"] <= 1e-3 and report["cosine_min"] >= 0.99999


def test_training_state_and_unknown_tensors(tiny, tmp_path):
    """Optimizer state and counters are skipped and counted; any other unknown tensor is an error naming it."""
    from safetensors.numpy import save_file
    from llava_ckpt.io import load_tensors
    convert(tiny, str(tmp_path / "ms"), fmt="safetensors", progress=False)
    weights = load_tensors(str(tmp_path / "ms"))
    arrays = {n: weights[n] for n in weights}
    name = "language_model.model.norm_out.weight"
    extra = {f"moment1.{name}": arrays[name], f"moment2.{name}": arrays[name], f"accu_grads.{name}": arrays[name],
             "epoch_num": np.array([3], np.int32), "step_num": np.array([9], np.int64),
             "scale_sense": np.array(1.0, np.float32), "current_iterator_step": np.array([1], np.int32),
             "last_overflow_iterator_step": np.array([0], np.int32)}
    save_file(dict(arrays, **extra), str(tmp_path / "train.safetensors"))
    result = export(str(tmp_path / "train.safetensors"), str(tmp_path / "hf"), config=tiny, progress=False)
    assert result["skipped_training_state"] == len(extra)
    assert _flat(tmp_path / "hf").keys() == _flat(tiny).keys()
    save_file(dict(arrays, **{"vision_encoder.extra.weight": arrays[name]}), str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="does not know.*vision_encoder.extra.weight"):
        export(str(tmp_path / "bad.safetensors"), str(tmp_path / "hf2"), config=tiny, progress=False)
    assert not (tmp_path / "hf2").exists()


def test_cli_export(tiny, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
    assert subprocess.run([exe, "convert", tiny, str(tmp_path / "ms"), "--fuse-qkv"]).returncode == 0
    ok = subprocess.run([exe, "export", str(tmp_path / "ms"), str(tmp_path / "hf"), "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["files"][:4] == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                "model-00003-of-00003.safetensors", INDEX]
    check = subprocess.run([exe, "check", str(tmp_path / "hf")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_shard_output_round_trips(tiny, tmp_path):
    from llava_ckpt.shard import shard
    convert(tiny, str(tmp_path / "ms"), fuse_qkv=True, progress=False)
    shard(str(tmp_path / "ms"), str(tmp_path / "tp4"), tp=4, progress=False)
    export(str(tmp_path / "tp4"), str(tmp_path / "hf"), progress=False)
    assert differing(read_folder(tmp_path / "hf"), read_folder(tiny)) == []


@pytest.mark.parametrize("op,shapes,groups", [
    ("rename", [(6, 3)], None),
    ("concat_rows", [(4, 3), (4, 3), (2, 3)], None),
    ("concat_rows", [(5,), (5,), (5,)], None),
    ("qkv_grouped", [(8, 2), (4, 2), (4, 2)], 2),
    ("qkv_grouped", [(8, 2), (2, 2), (2, 2)], 1),
    ("interleave_rows", [(5, 2), (5, 2)], None),
])
def test_source_rows_read_the_op_backwards(op, shapes, groups):
    """What export gathers for each source equals the source, and ops.inverse on the whole target."""
    from types import SimpleNamespace
    from llava_ckpt.engine import ops
    from llava_ckpt.engine.inverse import source_rows
    rng = np.random.default_rng(0)
    sources = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    target = ops.forward(op, sources, groups)
    t = SimpleNamespace(op=op, source_shapes=tuple(shapes), groups=groups)
    back = ops.inverse(op, target, shapes, groups)
    for k, s in enumerate(sources):
        rows = source_rows(t, k, {})
        assert np.array_equal(target[rows], s) and np.array_equal(back[k], s)


def test_grouped_query_attention_round_trips(tiny_factory, tmp_path):
    src = tiny_factory(text_overrides={"num_key_value_heads": 2})
    convert(src, str(tmp_path / "ms"), fuse_qkv=True, tp=2, progress=False)
    export(str(tmp_path / "ms"), str(tmp_path / "hf"), progress=False)
    assert differing(read_folder(tmp_path / "hf"), read_folder(src)) == []


def test_the_python_api_names_stay_functions():
    """llava_ckpt.export / convert are functions on every access, not only the first (their modules share the
    names). A fresh interpreter: the tests here import the submodules directly."""
    code = ("import llava_ckpt\n"
            "for name in ('export', 'convert', 'shard', 'export'):\n"
            "    assert callable(getattr(llava_ckpt, name)), name\n"
            "    assert callable(getattr(llava_ckpt, name)), name\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
