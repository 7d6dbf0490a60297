import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from llava_ckpt.convert import convert
from llava_ckpt.errors import CheckpointError
from llava_ckpt.io.hf_folder import SIDE_FILES
from llava_ckpt.io import load_tensors

from expected import expected, load_config, mismatches, read_hf, read_with_mindspore

NP = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def _check(src, out, layout="hub", dtype=None, fuse=False, fmt="safetensors"):
    want = expected(read_hf(src, layout), load_config(src), fuse_qkv=fuse)
    path = os.path.join(out, f"llava.{fmt}")
    got = read_with_mindspore(path)
    assert mismatches(got, want, NP[dtype] if dtype else None) == []
    return got, want


@pytest.mark.parametrize("layout", ["hub", "v5", "inmemory"])
@pytest.mark.parametrize("fuse", [False, True])
def test_every_layout_converts_to_expected_tensors(tiny_factory, tmp_path, layout, fuse):
    src = tiny_factory(layout=layout)
    convert(src, str(tmp_path / "out"), fuse_qkv=fuse, progress=False)
    _check(src, str(tmp_path / "out"), layout=layout, fuse=fuse)


# every cast from the float16 source, and keep / to-float32 from the others; both formats each
CASTS = [("float16", d) for d in (None, "float16", "bfloat16", "float32")] + \
        [(s, d) for s in ("bfloat16", "float32") for d in (None, "float32", "float16")]


@pytest.mark.parametrize("src_dtype,dtype", CASTS)
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_dtypes_and_formats(tiny_factory, tmp_path, src_dtype, dtype, fmt):
    src = tiny_factory(dtype=src_dtype)
    fuse = CASTS.index((src_dtype, dtype)) % 2 == 1  # half the casts with the fused layout
    convert(src, str(tmp_path / "out"), dtype=dtype, fmt=fmt, fuse_qkv=fuse, progress=False)
    got, _ = _check(src, str(tmp_path / "out"), dtype=dtype, fuse=fuse, fmt=fmt)
    assert {a.dtype for a in got.values()} == {np.dtype(NP[dtype or src_dtype])}


def test_gqa_grouping_is_per_kv_head(tiny_factory, tmp_path):
    src = tiny_factory(text_overrides={"num_key_value_heads": 2})
    convert(src, str(tmp_path / "out"), fuse_qkv=True, progress=False)
    got, _ = _check(src, str(tmp_path / "out"), fuse=True)
    assert got["language_model.model.layers.0.attention.w_qkv.weight"].shape == (64 + 2 * 2 * 16, 64)


def test_a_wrong_table_entry_is_caught(tiny, tmp_path):
    table = open(os.path.join(os.path.dirname(__file__), "..", "mappings", "llava-1.5.toml")).read()
    swapped = table.replace('mlp.gate_proj.weight"\nms = "language_model.model.layers.{i}.feed_forward.w1.weight"',
                            'mlp.gate_proj.weight"\nms = "language_model.model.layers.{i}.feed_forward.w3.weight"', 1)
    swapped = swapped.replace('mlp.up_proj.weight"\nms = "language_model.model.layers.{i}.feed_forward.w3.weight"',
                              'mlp.up_proj.weight"\nms = "language_model.model.layers.{i}.feed_forward.w1.weight"', 1)
    assert swapped != table
    bad = tmp_path / "bad.toml"
    bad.write_text(swapped)
    convert(tiny, str(tmp_path / "out"), mapping=str(bad), progress=False)
    want = expected(read_hf(tiny), load_config(tiny))
    got = read_with_mindspore(str(tmp_path / "out" / "llava.safetensors"))
    wrong = mismatches(got, want)
    assert wrong and all(".feed_forward.w1." in n or ".feed_forward.w3." in n for n in wrong)


def test_output_matches_ms_save_checkpoint_byte_for_byte(tiny, tmp_path):
    import mindspore as ms
    convert(tiny, str(tmp_path / "out"), dtype="bfloat16", fmt="ckpt", fuse_qkv=True, progress=False)
    ours = tmp_path / "out" / "llava.ckpt"
    tensors = load_tensors(str(ours))
    params = []
    for name in tensors:
        arr = tensors[name]
        t = ms.Tensor(arr.astype(np.float32), dtype=ms.bfloat16) if arr.dtype == ml_dtypes.bfloat16 else ms.Tensor(arr)
        params.append({"name": name, "data": t})
    ms.save_checkpoint(params, str(tmp_path / "ms.ckpt"))
    assert (tmp_path / "ms.ckpt").read_bytes() == ours.read_bytes()


def test_manifest_records_sources_tensors_and_hashes(tiny, tmp_path):
    import hashlib
    convert(tiny, str(tmp_path / "out"), fuse_qkv=True, progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["tool"] == "llava-ckpt" and m["options"]["fuse_qkv"] is True and m["mapping"]["sha256"]
    for f in m["source"]["files"]:
        assert f["sha256"] == hashlib.sha256(open(os.path.join(tiny, f["name"]), "rb").read()).hexdigest()
    for f in m["files"]:
        assert f["sha256"] == hashlib.sha256((tmp_path / "out" / f["path"]).read_bytes()).hexdigest()
    by_name = {t["name"]: t for t in m["tensors"]}
    qkv = by_name["language_model.model.layers.0.attention.w_qkv.weight"]
    assert qkv["op"] == "qkv_grouped" and qkv["split"] == "column" and len(qkv["sources"]) == 3
    # LlavaVlm builds only the vision layers up to the feature layer, and builds ln_post but never applies it
    layer = by_name["vision_encoder.transformer.resblocks.2.ln_1.gamma"]
    assert layer["unused_by_llavavlm"] is True and layer["built_by_llavavlm"] is False
    ln_post = by_name["vision_encoder.ln_post.gamma"]
    assert ln_post["unused_by_llavavlm"] is True and ln_post["built_by_llavavlm"] is True
    used = by_name["vision_encoder.transformer.resblocks.1.ln_1.gamma"]
    assert "unused_by_llavavlm" not in used and "built_by_llavavlm" not in used


def test_rerun_is_byte_identical(tiny, tmp_path):
    convert(tiny, str(tmp_path / "a"), fuse_qkv=True, progress=False)
    convert(tiny, str(tmp_path / "b"), fuse_qkv=True, progress=False)
    convert(tiny, str(tmp_path / "a"), fuse_qkv=True, progress=False)  # replaces its own previous output
    assert (tmp_path / "a" / "llava.safetensors").read_bytes() == (tmp_path / "b" / "llava.safetensors").read_bytes()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_missing_and_extra_tensors_are_named_before_writing(tiny, tmp_path):
    import shutil
    from safetensors.numpy import save_file
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.model.layers.0.mlp.extra.weight"] = "extra.safetensors"
    save_file({"language_model.model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float16)},
              str(src / "extra.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected tensors: language_model.model.layers.0.mlp.extra"):
        convert(str(src), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["src"]


def test_cli_convert_and_bad_input(tiny, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
    ok = subprocess.run([exe, "convert", tiny, str(tmp_path / "out"), "--format", "safetensors", "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["files"] == ["llava.safetensors"] + [n for n in SIDE_FILES if os.path.exists(os.path.join(tiny, n))] \
        + ["predict_llava.yaml"]
    bad = subprocess.run([exe, "convert", str(tmp_path / "nope"), str(tmp_path / "out2")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_mapping_option_uses_a_copied_and_edited_table(tiny, tmp_path):
    """A user's variant table: same architecture, one target renamed, no Python changed."""
    from llava_ckpt.engine.mapping import load_table
    text = open(load_table()["path"], encoding="utf-8").read()
    edited = text.replace('ms = "language_model.model.norm_out.weight"', 'ms = "language_model.model.final_norm.weight"')
    edited = edited.replace('name = "llava-1.5-hf-to-mindformers"', 'name = "my-variant"')
    assert edited.count("final_norm") == 1
    table = tmp_path / "my-variant.toml"
    table.write_text(edited, encoding="utf-8")
    exe = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
    run = subprocess.run([exe, "convert", tiny, str(tmp_path / "out"), "--mapping", str(table), "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = read_with_mindspore(str(tmp_path / "out" / "llava.safetensors"))
    want = expected(read_hf(tiny), load_config(tiny))
    want["language_model.model.final_norm.weight"] = want.pop("language_model.model.norm_out.weight")
    assert mismatches(got, want) == []
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["mapping"]["name"] == "my-variant" and manifest["mapping"]["file"] == "my-variant.toml"
    # and back through the same edited table: the source's weight files, byte for byte
    back = subprocess.run([exe, "export", str(tmp_path / "out"), str(tmp_path / "hf"), "--mapping", str(table)],
                          capture_output=True, text=True)
    assert back.returncode == 0, back.stderr
    for name in (n for n in os.listdir(tiny) if n.endswith(".safetensors")):
        assert open(os.path.join(tiny, name), "rb").read() == (tmp_path / "hf" / name).read_bytes(), name
    missing = subprocess.run([exe, "convert", tiny, str(tmp_path / "x"), "--mapping", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: mapping table not found")
