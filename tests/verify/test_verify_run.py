"""`verify` end to end on the tiny fixture: passes on every output flavour, fails (and says where) on
converted checkpoints with one deliberate mapping mistake each, in float32 and float16 compute."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from llava_ckpt.cli import main
from llava_ckpt.engine.config import load_config
from llava_ckpt.convert import convert
from llava_ckpt.errors import CheckpointError
from llava_ckpt.io import load_tensors
from llava_ckpt.model import trace_names
from llava_ckpt.verify import format_report, verify
from llava_ckpt.verify.streamed import module_names
from in_place import edit_tensors

TOKENS = 4  # greedy tokens per run: enough to exercise the KV cache, short enough to keep tests fast


@pytest.mark.parametrize("dtype,fmt,fuse", [
    (None, "ckpt", False),            # source dtype (float16) kept
    ("float32", "safetensors", True),
    ("bfloat16", "ckpt", True),
    ("bfloat16", "safetensors", False),
])
def test_verify_passes(tiny, tmp_path, dtype, fmt, fuse):
    out = str(tmp_path / "ms")
    convert(tiny, out, dtype=dtype, fmt=fmt, fuse_qkv=fuse, progress=False)
    r = verify(tiny, out, max_new_tokens=TOKENS)
    names = [m["name"] for m in r["modules"]]
    assert names == module_names(load_config(tiny)) and all(m["ok"] for m in r["modules"])
    assert names[-1] == "language_model.lm_head" and names[:-1] == trace_names(load_config(tiny))
    assert r["passed"], format_report(r)
    assert r["checks"] == {k: True for k in r["checks"]}
    assert r["tp"] == 1 and r["fused_qkv"] == fuse and r["first_divergence"] is None
    assert r["greedy_match"] and len(r["tokens_hf"]) == TOKENS and r["tokens_ms"] == r["tokens_hf"]
    assert r["max_abs_logit"] > 3  # scaled fixture: a mapping mistake would show
    assert r["rel_diff"] < 1e-4 and r["cosine_min"] > 0.99999 and r["top1_agreement"] == 1.0
    assert r["image_tokens"] == 16 and r["positions"] > 16
    assert r["stored_dtypes"] == [dtype or "float16"]
    assert r["hf_weights_rounded_to"] == ([] if dtype == "float32" else [dtype or "float16"])
    json.dumps(r)  # the CLI prints it with --json


def test_verify_tp2_float16_compute(tiny, tmp_path):
    """Rank files reassembled by their manifest split kinds (--no-msrun); float16 activations within their
    tolerance."""
    out = str(tmp_path / "tp2")
    convert(tiny, out, dtype="bfloat16", fuse_qkv=True, tp=2, progress=False)
    r = verify(tiny, out, max_new_tokens=TOKENS, dtype="float16", msrun=False)
    assert r["passed"], format_report(r)
    assert r["tp"] == 2 and r["replica_mismatch"] == [] and r["msrun"] is None
    assert r["hf_weights_rounded_to"] == ["bfloat16", "float16"]
    assert 1e-6 < r["rel_diff"] < r["thresholds"]["logits_rtol"]


@pytest.fixture(scope="module")
def fp32_dir(tiny_factory, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("verify") / "fp32")
    convert(tiny_factory(), out, dtype="float32", fmt="safetensors", progress=False)
    return out


def _variant(src: str, dst: str, edit) -> str:
    """A copy of a converted folder with `edit(tensors)` applied (a safetensors file is all load_tensors needs)."""
    loaded = load_tensors(src)
    tensors = {k: np.array(loaded[k]) for k in loaded}
    edit(tensors)
    os.makedirs(dst)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(dst, "llava.safetensors"))
    return dst


def swap_w1_w3(t):
    p = "language_model.model.layers.1.feed_forward."
    t[p + "w1.weight"], t[p + "w3.weight"] = t[p + "w3.weight"], t[p + "w1.weight"]


def transpose_wo(t):
    name = "language_model.model.layers.0.attention.wo.weight"
    assert t[name].shape[0] == t[name].shape[1]
    t[name] = t[name].T


def swap_layers(t):
    a, b = "language_model.model.layers.0.", "language_model.model.layers.2."
    for name in [n for n in t if n.startswith(a)]:
        other = b + name[len(a):]
        t[name], t[other] = t[other], t[name]


def swap_vision_q_k(t):
    p = "vision_encoder.transformer.resblocks.1.attn.in_proj."
    for kind in ("weight", "bias"):
        w = t[p + kind]
        h = w.shape[0] // 3
        t[p + kind] = np.concatenate([w[h:2 * h], w[:h], w[2 * h:]])


def plain_qkv_in_w_qkv(t):
    """The fused layout with w_qkv = plain [q; k; v] (not grouped per KV head) in layer 1: MindFormers'
    reshape to (kv_heads, rep + 2, head_dim) then reads the wrong rows."""
    p = "language_model.model.layers."
    for i in {int(n.split(".")[3]) for n in t if n.startswith(p)}:
        a, f = f"{p}{i}.attention.", f"{p}{i}.feed_forward."
        q, k, v = (t.pop(a + w + ".weight") for w in ("wq", "wk", "wv"))
        t[a + "w_qkv.weight"] = np.concatenate([q, k, v]) if i == 1 else _grouped(q, k, v, 4)
        gate, up = t.pop(f + "w1.weight"), t.pop(f + "w3.weight")
        t[f + "w_gate_hidden.weight"] = np.stack([gate, up], axis=1).reshape(-1, gate.shape[1])


def _grouped(q, k, v, groups):
    """MindFormers' qkv_concat layout written out by hand: per KV group g, [q rows of g; k_g; v_g]."""
    rows = [np.split(w, groups) for w in (q, k, v)]
    return np.concatenate([part for g in range(groups) for part in (rows[0][g], rows[1][g], rows[2][g])])


def test_hand_written_fused_layout_passes(tiny, fp32_dir, tmp_path):
    """The positive twin of the wrong-fused-layout control: the same hand-made fusion, grouped in every
    layer, passes (so the control fails for the layout alone)."""
    def grouped_everywhere(t):
        plain_qkv_in_w_qkv(t)
        a = "language_model.model.layers.1.attention."
        q, k, v = np.split(t[a + "w_qkv.weight"], 3)
        t[a + "w_qkv.weight"] = _grouped(q, k, v, 4)
    good = _variant(fp32_dir, str(tmp_path / "good"), grouped_everywhere)
    r = verify(tiny, good, max_new_tokens=2)
    assert r["passed"] and r["fused_qkv"], format_report(r)


@pytest.mark.parametrize("edit,where,dtype", [
    (swap_w1_w3, "language_model.model.layers.1", "float32"),
    (transpose_wo, "language_model.model.layers.0", "float32"),
    (swap_layers, "language_model.model.layers.0", "float32"),
    (swap_vision_q_k, "vision_encoder.transformer.resblocks.1", "float32"),
    (plain_qkv_in_w_qkv, "language_model.model.layers.1", "float32"),
    (swap_w1_w3, "language_model.model.layers.1", "float16"),
    (swap_vision_q_k, "vision_encoder.transformer.resblocks.1", "float16"),
    (plain_qkv_in_w_qkv, "language_model.model.layers.1", "float16"),
], ids=["w1-w3-swapped", "wo-transposed", "layers-swapped", "vision-q-k-swapped", "plain-qkv-fused",
        "fp16-w1-w3-swapped", "fp16-vision-q-k-swapped", "fp16-plain-qkv-fused"])
def test_verify_fails_and_names_the_module(tiny, fp32_dir, tmp_path, edit, where, dtype):
    bad = _variant(fp32_dir, str(tmp_path / "bad"), edit)
    r = verify(tiny, bad, max_new_tokens=TOKENS, dtype=dtype)
    assert not r["passed"]
    assert not r["checks"]["logits"]
    assert r["first_divergence"] == where
    before = [m for m in r["modules"][:[m["name"] for m in r["modules"]].index(where)]]
    assert before and all(m["ok"] for m in before)
    assert f"first divergence: {where}" in format_report(r)


def test_cli_exit_codes(tiny, fp32_dir, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", tiny, fp32_dir, "--max-new-tokens", "2"])
    assert ok.exit_code == 0, ok.output
    assert "verify: PASSED" in ok.output

    bad = _variant(fp32_dir, str(tmp_path / "bad"), swap_w1_w3)
    failed = runner.invoke(main, ["verify", tiny, bad, "--max-new-tokens", "2", "--json"])
    assert failed.exit_code == 1, failed.output
    result = json.loads(failed.stdout)
    assert result["passed"] is False and result["first_divergence"] == "language_model.model.layers.1"

    missing = _variant(fp32_dir, str(tmp_path / "missing"),
                       lambda t: t.pop("language_model.model.layers.2.attention.wv.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1: language_model\.model\.layers\.2\.attention\.wv"):
        verify(tiny, missing, max_new_tokens=1)
    err = runner.invoke(main, ["verify", tiny, missing])
    assert err.exit_code == 2
    err = runner.invoke(main, ["verify", tiny, fp32_dir, "--timeout", "0"])
    assert err.exit_code == 2 and "error: timeout must be a positive number" in err.output


def test_cli_no_msrun_keeps_the_reassembled_check(tiny, tmp_path):
    out = str(tmp_path / "tp2")
    convert(tiny, out, dtype="float32", fmt="safetensors", tp=2, progress=False)
    ok = CliRunner().invoke(main, ["verify", tiny, out, "--no-msrun", "--max-new-tokens", "2", "--json"])
    assert ok.exit_code == 0, ok.output
    result = json.loads(ok.stdout)
    assert result["tp"] == 2 and result["msrun"] is None and "msrun_logits" not in result["checks"]


def test_verify_flags_ranks_that_disagree_on_a_replicated_tensor(tiny, tmp_path):
    out = str(tmp_path / "tp2")
    convert(tiny, out, dtype="float32", fmt="safetensors", tp=2, progress=False)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    name = next(e["name"] for e in manifest["tensors"] if e["split"] == "replicated" and "attention_norm" in e["name"])
    rank1 = os.path.join(out, "rank_1", "llava.safetensors")
    edit_tensors(rank1, lambda t: t.update({name: t[name] * 2}))
    r = verify(tiny, out, max_new_tokens=1, msrun=False)
    assert r["replica_mismatch"] == [name]
    assert r["checks"]["logits"] and not r["passed"]


def test_verify_refuses_pickle_only_sources(tmp_path, tiny):
    """verify loads HF_SRC with transformers: a pickle must be refused before torch could ever read it."""
    import pickle
    import shutil
    convert(tiny, str(tmp_path / "ms"), progress=False)
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    for f in src.glob("*.safetensors"):
        f.unlink()
    (src / "model.safetensors.index.json").unlink()
    marker = tmp_path / "unpickled"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(CheckpointError, match="pickle weights"):
        verify(str(src), str(tmp_path / "ms"))
    assert not marker.exists()


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("layout", ["v5", "inmemory"])
def test_verify_reads_the_source_in_its_own_layout(tiny_factory, tmp_path, layout):
    """transformers' modules get their weights by the source's own names (the table's [layouts])."""
    src = tiny_factory(layout=layout)
    out = str(tmp_path / "ms")
    convert(src, out, progress=False)
    r = verify(src, out, max_new_tokens=2)
    assert r["passed"], format_report(r)
