"""The weight proof (verify/proof.py, `verify --weights-only`): every converted tensor, on every rank, back
through its op's inverse and compared bit for bit with its source cast to its stored dtype. It passes on every
layout convert and shard write, and names a one-ulp change anywhere, including tensors no prompt exercises."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from llava_ckpt.cli import main
from llava_ckpt.convert import convert
from llava_ckpt.io.dtypes import itemsize
from llava_ckpt.io.readers import read_index
from llava_ckpt.shard import shard
from llava_ckpt.verify import format_report, verify
from llava_ckpt.verify.inputs import build_inputs

TEXT = "language_model.model."


@pytest.mark.parametrize("source,dtype,fmt,fuse,tp", [
    ("float16", None, "ckpt", False, 1),
    ("float16", "bfloat16", "safetensors", True, 2),
    ("float16", "float32", "ckpt", True, 4),
    ("float32", "bfloat16", "ckpt", False, 2),     # narrowing casts: rounding must be convert's
    ("float32", "float16", "safetensors", True, 1),
    ("bfloat16", "float16", "safetensors", False, 1),
], ids=["f16-ckpt", "bf16-fused-tp2", "f32-fused-tp4", "f32-to-bf16-tp2", "f32-to-f16-fused", "bf16-to-f16"])
def test_the_proof_passes_on_every_layout(tiny_factory, tmp_path, source, dtype, fmt, fuse, tp):
    src = tiny_factory(dtype=source)
    out = str(tmp_path / "ms")
    convert(src, out, dtype=dtype, fmt=fmt, fuse_qkv=fuse, tp=tp, progress=False)
    r = verify(src, out, weights_only=True)
    w = r["weights"]
    assert r["passed"] and r["kind"] is None and w["differ"] == [], format_report(r)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert w["tensors"] == len(manifest["tensors"])
    replicated = sum(e["split_dim"] is None for e in manifest["tensors"])
    sources = sum(len(e["sources"]) for e in manifest["tensors"])
    replicated_sources = sum(len(e["sources"]) for e in manifest["tensors"] if e["split_dim"] is None)
    assert w["pieces"] == sources + (tp - 1) * replicated_sources  # every replica proven on its own rank
    assert replicated > 0
    written = sum(f["size"] for f in manifest["files"] if f["path"].endswith(("llava." + fmt)))
    assert 0.9 * written < w["bytes"] <= written  # every tensor byte of every rank file was compared
    assert w["casts"] == ([] if dtype in (None, source) else [f"{source} -> {dtype}"])


def test_the_proof_passes_on_a_shard_output(tiny, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    convert(tiny, one, fuse_qkv=True, progress=False)
    shard(one, two, tp=2, progress=False)
    r = verify(tiny, two, weights_only=True)
    assert r["passed"] and r["tp"] == 2 and r["fused_qkv"], format_report(r)


def flip(path: str, name: str, flat: int) -> None:
    """Flip the lowest bit of element `flat` of tensor `name` in a weights file, in place (one ulp)."""
    info = read_index(path)[name]
    offset = flat * itemsize(info.dtype)
    for start, length in info.pieces:
        if offset < length:
            break
        offset -= length
    with open(path, "r+b") as f:
        f.seek(start + offset)
        byte = f.read(1)[0]
        f.seek(start + offset)
        f.write(bytes([byte ^ 1]))


@pytest.fixture(scope="module")
def tp2(tiny_factory, tmp_path_factory):
    """A tp-2 fused bfloat16 output and a token id the default prompt does not use."""
    src = tiny_factory()
    out = str(tmp_path_factory.mktemp("proof") / "tp2")
    convert(src, out, dtype="bfloat16", fmt="safetensors", fuse_qkv=True, tp=2, progress=False)
    ids = set(build_inputs(src, None, None)["input_ids"].ravel().tolist())
    unused = max(set(range(32064)) - ids)
    return src, out, unused


# (tensor, rank file, element (row, col) in the rank file, rank the report names, index in the whole tensor,
#  HF source (hub spelling) and its index)
CASES = {
    "embedding-row-not-in-the-prompt": (TEXT + "tok_embeddings.embedding_weight", 1, None, 1, None,
                                        TEXT + "embed_tokens.weight", None),
    "lm-head-row": ("language_model.lm_head.weight", 0, (5, 7), 0, [5, 7], "language_model.lm_head.weight", [5, 7]),
    "unused-vision-layer-replica-on-rank-1": ("vision_encoder.transformer.resblocks.2.mlp.c_fc.weight", 1, (3, 1), 1,
                                              [3, 1], "vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight",
                                              [3, 1]),
    "ln-post": ("vision_encoder.ln_post.gamma", 0, (4,), 0, [4], "vision_tower.vision_model.post_layernorm.weight",
                [4]),
    # w_gate_hidden interleaves gate and up rows: rank 1's row 1 is the whole tensor's row 129 = up_proj row 64
    "fused-gate-up-row": (TEXT + "layers.2.feed_forward.w_gate_hidden.weight", 1, (1, 2), 1, [129, 2],
                          TEXT + "layers.2.mlp.up_proj.weight", [64, 2]),
    # w_qkv groups rows per KV head (4 heads of 16 rows): rank 0's row 16 is k_proj's row 0
    "fused-qkv-k-row": (TEXT + "layers.0.attention.w_qkv.weight", 0, (16, 0), 0, [16, 0],
                        TEXT + "layers.0.self_attn.k_proj.weight", [0, 0]),
    "row-split-column-on-rank-1": (TEXT + "layers.1.attention.wo.weight", 1, (2, 3), 1, [2, 35],
                                   TEXT + "layers.1.self_attn.o_proj.weight", [2, 35]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_ulp_anywhere_is_named(tp2, case):
    src, out, unused = tp2
    name, rank_file, element, rank, index, source, source_index = CASES[case]
    if element is None:  # the embedding row of a token the prompt never uses: rank 1 holds rows 16032..
        element, index, source_index = (unused - 16032, 9), [unused, 9], [unused, 9]
    path = os.path.join(out, f"rank_{rank_file}", "llava.safetensors")
    shape = read_index(path)[name].shape
    flat = int(np.ravel_multi_index(element, shape))
    flip(path, name, flat)
    try:
        r = verify(src, out, weights_only=True)
    finally:
        flip(path, name, flat)
    assert not r["passed"] and r["kind"] == "conversion error"
    (d,) = r["weights"]["differ"]
    assert (d["name"], d["rank"], d["elements"], d["index"], d["source"], d["source_index"]) == \
        (name, rank, 1, index, source, source_index)
    assert 0 < d["max_abs_diff"] < 0.1  # one bfloat16 ulp
    assert name in format_report(r)
    assert verify(src, out, weights_only=True)["passed"]  # restored: the control


def test_cli_weights_only_exit_codes_and_json(tp2):
    src, out, _ = tp2
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", src, out, "--weights-only"])
    assert ok.exit_code == 0, ok.output
    assert "verify --weights-only: PASSED" in ok.output and "bit for bit equal to their source" in ok.output
    path = os.path.join(out, "rank_1", "llava.safetensors")
    name = "vision_encoder.ln_post.beta"
    flip(path, name, 0)
    try:
        bad = runner.invoke(main, ["verify", src, out, "--weights-only", "--json"])
    finally:
        flip(path, name, 0)
    assert bad.exit_code == 1, bad.output
    result = json.loads(bad.stdout)
    assert result["kind"] == "conversion error"
    assert [(d["name"], d["rank"]) for d in result["weights"]["differ"]] == [(name, 1)]


def test_a_cast_by_truncation_is_caught(tiny_factory, tmp_path, monkeypatch):
    """A converter that truncates float32 to bfloat16 (drops the low 16 bits) instead of rounding: the tensors
    look right (shapes, names, dtype, values within one ulp), the proof names them."""
    import llava_ckpt.engine.forward as forward
    import ml_dtypes
    src = tiny_factory(dtype="float32")
    real = forward.cast

    def truncate(values, code):
        if code != "BF16" or values.dtype != np.float32:
            return real(values, code)
        return (np.ascontiguousarray(values).view(np.uint32) >> 16).astype(np.uint16).view(ml_dtypes.bfloat16)

    out = str(tmp_path / "truncated")
    monkeypatch.setattr(forward, "cast", truncate)
    convert(src, out, dtype="bfloat16", progress=False)
    monkeypatch.setattr(forward, "cast", real)
    r = verify(src, out, weights_only=True)
    assert not r["passed"] and r["kind"] == "conversion error"
    differ = r["weights"]["differ"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert len({d["name"] for d in differ}) > len(manifest["tensors"]) // 2  # (norm weights of 1.0 round alike)
    assert all(d["elements"] < d["of"] for d in differ)  # about half the elements: those that round up
    rounded = str(tmp_path / "rounded")
    convert(src, rounded, dtype="bfloat16", progress=False)
    assert verify(src, rounded, weights_only=True)["passed"]


def test_full_verify_fails_on_a_tensor_the_prompt_never_uses(tp2):
    """Damage that no output shows (an embedding row of a token not in the prompt): every numeric check
    passes, verify fails on the proof and says it is a conversion error."""
    src, out, unused = tp2
    path = os.path.join(out, "rank_1", "llava.safetensors")
    name = TEXT + "tok_embeddings.embedding_weight"
    flat = int(np.ravel_multi_index((unused - 16032, 0), read_index(path)[name].shape))
    flip(path, name, flat)
    try:
        r = verify(src, out, max_new_tokens=2, msrun=False)
    finally:
        flip(path, name, flat)
    assert not r["passed"] and r["kind"] == "conversion error"
    assert {k for k, ok in r["checks"].items() if not ok} == {"weights"}
    assert "verdict  : conversion error" in format_report(r)
