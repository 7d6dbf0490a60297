"""verify --dtype bfloat16, the fast walk: every Linear's product in bfloat16 with float32 sums on both sides (the
reference model's bf16_matmul, transformers' nn.Linear through torch's bfloat16 GEMM), everything else float32.
Each side really computes so; a correct conversion passes within the bfloat16 tolerance; the deliberate mapping
mistakes still fail at their module; the drift rerun names the dtype; without AVX-512 BF16 it is refused at once."""
import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cpu import bf16_lacks, flags
from maps import is_file_page
from llava_ckpt.cli import main
from llava_ckpt.convert import convert
from llava_ckpt.engine.config import load_config
from llava_ckpt.errors import CheckpointError
from llava_ckpt.io import load_tensors
from llava_ckpt.model import kernels
from llava_ckpt.verify import format_report, verify
from llava_ckpt.verify.compare import TOLERANCES
from llava_ckpt.verify.hf_side import HfSide, bf16_linear
from llava_ckpt.verify.ms_side import MsSide
from test_verify_run import _variant, plain_qkv_in_w_qkv, swap_vision_q_k, swap_w1_w3

TOKENS = 4
needs_bf16 = pytest.mark.skipif(bool(bf16_lacks()), reason=bf16_lacks() or "runs")


@pytest.fixture(scope="module")
def fp16_dir(tiny_factory, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bf16") / "ms")
    convert(tiny_factory(), out, fmt="safetensors", progress=False)
    return out


def test_bf16_linear_is_torchs_bfloat16_gemm_widened_then_the_bias():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, generator=gen)
    w = torch.randn(3, 40, generator=gen).to(torch.bfloat16)
    b = torch.randn(3, generator=gen)
    want = torch.nn.functional.linear(x.to(torch.bfloat16), w).to(torch.float32) + b
    with torch.no_grad(), bf16_linear():
        got = torch.nn.functional.linear(x, w, b)
        layer = torch.nn.Linear(40, 3)
        layer.weight.data, layer.bias.data = w, b
        through_module = layer(x)
        wide = torch.nn.functional.linear(x, w.float(), b)  # a float32 weight: the float32 product, untouched
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(through_module, want, rtol=0, atol=0)
    torch.testing.assert_close(wide, torch.nn.functional.linear(x, w.float(), b), rtol=0, atol=0)
    assert not torch.equal(got, wide)  # the bfloat16 product is not the float32 one


@pytest.mark.parametrize("round_to", [["float16"], ["bfloat16"]])
def test_the_transformers_side_holds_linear_weights_in_bfloat16_and_the_rest_in_float32(tiny, round_to):
    """A decoder layer's Linear weights are the stored values rounded through the storage dtype, then to
    bfloat16 (nearest even); its norms stay float32, exactly the stored values (rounded through storage)."""
    cfg = load_config(tiny)
    hf = HfSide(tiny, cfg, round_to, matmul="bfloat16")
    try:
        layer = hf._module(lambda: hf.classes.layer(hf.text, 1), "language_model.model.layers.1.")
        stored = {n: np.asarray(v) for n, v in _hf_tensors(tiny, "language_model.model.layers.1.").items()}
    finally:
        hf.close()
    through = ml_dtypes.bfloat16 if round_to == ["bfloat16"] else np.float16
    q = layer.self_attn.q_proj.weight
    assert q.dtype == torch.bfloat16
    want = stored["self_attn.q_proj.weight"].astype(through).astype(np.float32).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(q.detach().view(torch.int16).numpy(), want.view(np.int16))
    norm = layer.input_layernorm.weight
    assert norm.dtype == torch.float32
    want = stored["input_layernorm.weight"].astype(through).astype(np.float32)
    np.testing.assert_array_equal(norm.detach().numpy(), want)


def _hf_tensors(src: str, prefix: str) -> dict:
    """The source's tensors under `prefix` (hub spelling after 'model.language_model.' or 'language_model.model.'),
    read with safetensors itself."""
    import glob
    from safetensors.numpy import load_file
    out = {}
    for path in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        for name, value in load_file(path).items():
            for p in (prefix, prefix.replace("language_model.model.", "model.language_model."),
                      prefix.replace("language_model.model.", "language_model.")):
                if name.startswith(p):
                    out[name[len(p):]] = value
    assert out, f"no tensor under {prefix}"
    return out


@needs_bf16
def test_the_reference_side_computes_from_the_files_own_16_bit_matrices(tiny, fp16_dir):
    """In the bfloat16 walk a Linear's float16 weight is a map of the converted file (no cast into the arena:
    bf16_matmul packs it as it is), and in the float32 walk's decode steps (small_matmul widens it in registers);
    norms are cast to float32; released, nothing of the file stays held."""
    from llava_ckpt.model.layers import Linear
    cfg = load_config(tiny)
    tensors = load_tensors(fp16_dir)
    try:
        side = MsSide(cfg, tensors, matmul="bfloat16")
        side._begin()
        layer = side._load(side._decoder_cell(0), "language_model.model.layers.0.")
        linears = [c for _, c in layer.cells_and_names() if isinstance(c, Linear)]
        assert len(linears) == 7
        for c in linears:
            assert str(c.weight.dtype) == "Float16"
            assert is_file_page(c.weight.data_ptr(), os.path.join(fp16_dir, "llava.safetensors"))
        assert str(layer.attention_norm.weight.dtype) == "Float32"
        side._release(layer)
        assert all(p.shape == (1,) for p in layer.get_parameters())
        plain = MsSide(cfg, tensors)
        plain._begin()
        layer = plain._load(plain._decoder_cell(0), "language_model.model.layers.0.")
        assert all(str(p.dtype) == "Float32" for p in layer.get_parameters())  # the float32 prefill casts them all
        plain._release(layer)
        plain._begin()
        layer = plain._load(plain._decoder_cell(0), "language_model.model.layers.0.", step=True)  # its decode steps
        assert all(str(c.weight.dtype) == "Float16" for _, c in layer.cells_and_names() if isinstance(c, Linear))
        plain._release(layer)
    finally:
        tensors.close()


@needs_bf16
def test_the_reference_side_builds_its_linears_on_bf16_matmul(tiny, fp16_dir):
    cfg = load_config(tiny)
    tensors = load_tensors(fp16_dir)
    try:
        fast = MsSide(cfg, tensors, matmul="bfloat16")._decoder_cell(0)
        plain = MsSide(cfg, tensors)._decoder_cell(0)
    finally:
        tensors.close()
    from llava_ckpt.model.layers import Linear
    assert all(c.prefill_matmul is not None for _, c in fast.cells_and_names() if isinstance(c, Linear))
    assert all(c.prefill_matmul is None for _, c in plain.cells_and_names() if isinstance(c, Linear))


@needs_bf16
@pytest.mark.parametrize("dtype,fuse", [(None, False), ("bfloat16", True)])
def test_a_correct_conversion_passes_in_bfloat16(tiny, tmp_path, dtype, fuse):
    out = str(tmp_path / "ms")
    convert(tiny, out, dtype=dtype, fuse_qkv=fuse, fmt="safetensors", progress=False)
    r = verify(tiny, out, max_new_tokens=TOKENS, dtype="bfloat16")
    assert r["passed"], format_report(r)
    assert r["compute_dtype"] == "bfloat16" and r["thresholds"] == TOLERANCES["bfloat16"]
    assert "bf16_matmul kernel" in r["matmul"] and "torch's bfloat16 GEMM" in r["matmul"]
    assert r["greedy_match"] and len(r["tokens_hf"]) == TOKENS
    # bfloat16's rounding shows (a float32 walk of the same output is below 1e-6) and stays inside the tolerance
    assert 1e-4 < r["rel_diff"] < TOLERANCES["bfloat16"]["logits_rtol"]
    record = json.load(open(os.path.join(out, "verification.json")))
    assert record["compute_dtype"] == "bfloat16" and record["verdict"] == "passed"


@needs_bf16
@pytest.mark.parametrize("edit,where", [
    (swap_w1_w3, "language_model.model.layers.1"),
    (swap_vision_q_k, "vision_encoder.transformer.resblocks.1"),
    (plain_qkv_in_w_qkv, "language_model.model.layers.1"),
], ids=["w1-w3-swapped", "vision-q-k-swapped", "plain-qkv-fused"])
def test_mapping_mistakes_still_fail_at_their_module_in_bfloat16(tiny, tmp_path, edit, where):
    """The same deliberate mistakes as in float32 (a float32 output edited, so the weight proof cannot see them
    and the walk alone must): the first module over the bfloat16 tolerance is the one they are in."""
    fp32 = str(tmp_path / "fp32")
    convert(tiny, fp32, dtype="float32", fmt="safetensors", progress=False)
    bad = _variant(fp32, str(tmp_path / "bad"), edit)
    r = verify(tiny, bad, max_new_tokens=TOKENS, dtype="bfloat16")
    assert not r["passed"] and not r["checks"]["logits"]
    assert r["first_divergence"] == where, format_report(r)
    k = [m["name"] for m in r["modules"]].index(where)
    assert all(m["ok"] for m in r["modules"][:k])
    assert r["modules"][k]["rel_diff"] > 2 * TOLERANCES["bfloat16"]["module_rtol"]  # not a near miss


@needs_bf16
def test_a_model_difference_in_bfloat16_is_named_so(tiny, fp16_dir, monkeypatch):
    """The vision MLP with SiLU instead of CLIP's QuickGELU: numeric drift (every weight exact), rerun in bfloat16
    and in float64, and the difference stays: a model difference, under the bfloat16 compute dtype. (Exact GELU
    for QuickGELU, which the float32 walk names, is within the bfloat16 tolerance: compare.TOLERANCES.)"""
    import llava_ckpt.model.vision as vision
    from mindspore import ops
    silu = lambda x: x * ops.sigmoid(x)  # noqa: E731
    monkeypatch.setattr(vision, "quick_gelu", silu)  # MindSpore's ops: the float64 rerun
    fused = kernels.fused_ops("float32")  # the fused ops the walk's float32 cells share
    assert fused is not None
    monkeypatch.setattr(fused, "quick_gelu", silu)
    r = verify(tiny, fp16_dir, max_new_tokens=2, dtype="bfloat16")
    assert not r["passed"] and r["kind"] == "numeric drift", format_report(r)
    d = r["drift"]
    assert d["compute_dtype"] == "bfloat16" and d["module"] == "vision_encoder.transformer.resblocks.0"
    assert d["verdict"] == "model difference", d
    assert d["rel_diff_float64"] > 0.5 * d["rel_diff_same_input"] > TOLERANCES["bfloat16"]["module_rtol"] / 2


def test_without_avx512_bf16_it_is_refused_before_anything_runs(tiny, fp16_dir, tmp_path, monkeypatch):
    """One error line, exit 2, nothing written: the kernel cannot run, and a bfloat16 walk without it would
    compare float32 products with transformers' bfloat16 ones."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # A CPU with AVX-512 but not its BF16 extension (the flags added where this one lacks AVX-512 altogether).
    others = ["avx512f", "avx512bw", "avx512vl"]
    monkeypatch.setattr(kernels, "cpu_flags", lambda: [f for f in flags() if f not in others + ["avx512_bf16"]] + others)
    kernels._built.clear()
    before = sorted(os.listdir(fp16_dir))
    try:
        with pytest.raises(CheckpointError, match="needs the bf16_matmul kernel, which cannot run here: this CPU "
                                                  "lacks avx512_bf16; use --dtype float32"):
            verify(tiny, fp16_dir, max_new_tokens=1, dtype="bfloat16")
        r = CliRunner().invoke(main, ["verify", tiny, fp16_dir, "--dtype", "bfloat16"])
    finally:
        kernels._built.clear()
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: verify --dtype bfloat16 needs"), r.output
    assert sorted(os.listdir(fp16_dir)) == before  # no verification.json
