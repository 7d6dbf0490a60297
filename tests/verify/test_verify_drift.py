"""A mismatch says what kind it is. With every weight exact (the proof passes), the module that diverged runs
again on transformers' input in the compute dtype and in float64: a forced loss of kernel precision shrinks
away in float64, a real difference in what the module computes stays. The module report covers lm_head."""
import os

import pytest

from llava_ckpt.convert import convert
from llava_ckpt.engine.config import load_config
from llava_ckpt.io import load_tensors
from llava_ckpt.verify import format_report, verify
from llava_ckpt.verify.drift import SHRINK, rerun
from llava_ckpt.verify.hf_side import HfSide
from llava_ckpt.verify.inputs import build_inputs
from llava_ckpt.verify.ms_side import MsSide
from llava_ckpt.verify.streamed import HEAD, module_names, walk
from llava_ckpt.verify.weights import Arena

TOKENS = 2


@pytest.fixture(scope="module")
def fp16_dir(tiny_factory, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("drift") / "ms")
    convert(tiny_factory(), out, fmt="safetensors", progress=False)
    return out


def test_a_forced_loss_of_kernel_precision_shrinks_in_float64(tiny, fp16_dir, monkeypatch):
    """Every float32 Linear of the reference model keeps only bfloat16's 8 bits (a kernel that computes in
    lower precision than asked): the outputs drift past the tolerance; in float64 (where the lossy kernel does
    not apply) the same module agrees."""
    import mindspore as ms
    import llava_ckpt.model.layers as layers
    real = layers.Linear.construct

    def lossy(self, x, residual=None):  # the product rounded, then the residual added (Linear's order)
        y = real(self, x)
        y = y.astype(ms.bfloat16).astype(ms.float32) if y.dtype == ms.float32 else y
        return y if residual is None else residual + y

    monkeypatch.setattr(layers.Linear, "construct", lossy)
    r = verify(tiny, fp16_dir, max_new_tokens=TOKENS)
    assert not r["passed"] and r["checks"]["weights"] and r["kind"] == "numeric drift", format_report(r)
    d = r["drift"]
    assert d["module"] == r["first_divergence"] == "vision_encoder.transformer.resblocks.0"
    assert d["verdict"] == "kernel precision"
    assert d["rel_diff_same_input"] > r["thresholds"]["module_rtol"]
    assert d["rel_diff_float64"] * SHRINK <= d["rel_diff_same_input"]
    assert "rerun    : vision_encoder.transformer.resblocks.0 on transformers' input: kernel precision" in \
        format_report(r)


def test_a_real_model_difference_stays_in_float64(tiny, fp16_dir, monkeypatch):
    """The vision MLP with exact GELU instead of CLIP's QuickGELU (a model difference, like MindFormers'
    tanh GELU in its projector): as large in float64 as in float32."""
    import llava_ckpt.model.layers as layers
    import llava_ckpt.model.vision as vision
    monkeypatch.setattr(vision, "quick_gelu", layers.gelu_exact)  # MindSpore's ops: the float64 rerun
    fused = layers.fused_ops("float32")  # the fused ops the float32 walk's cells share (None without the kernel)
    if fused is not None:
        monkeypatch.setattr(fused, "quick_gelu", layers.gelu_exact)
    r = verify(tiny, fp16_dir, max_new_tokens=TOKENS)
    assert not r["passed"] and r["kind"] == "numeric drift", format_report(r)
    d = r["drift"]
    assert d["module"] == "vision_encoder.transformer.resblocks.0" and d["verdict"] == "model difference"
    assert d["rel_diff_float64"] > 0.5 * d["rel_diff_same_input"] > r["thresholds"]["module_rtol"] / 2


def test_every_module_reruns_on_transformers_input(tiny, fp16_dir):
    """The rerun of each module (each has its own inputs: pixels, embeddings, image features and ids, a decoder
    layer's positions and mask, ...) agrees on a correct conversion, in float32 and much closer in float64."""
    cfg = load_config(tiny)
    inputs = build_inputs(tiny, None, None)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    tensors = load_tensors(fp16_dir)
    arena = Arena()
    hf, ms = HfSide(tiny, cfg, ["float16"], arena), MsSide(cfg, tensors, arena=arena)
    hf64, ms64 = HfSide(tiny, cfg, [], arena, compute="float64"), MsSide(cfg, tensors, dtype="float64", arena=arena)
    try:
        got = walk(hf, ms, cfg, ids, pixels, 1)
        rows = {name: rerun(name, (hf, ms), (hf64, ms64), cfg, got["hf_outputs"], ids, pixels, None, "float32", 1e-3)
                for name in module_names(cfg)}
    finally:
        for side in (hf, ms, hf64, ms64):
            side.close()
        tensors.close()
    assert list(rows) == [m["name"] for m in got["modules"]]
    for name, row in rows.items():
        assert row["rel_diff_same_input"] < 1e-5, (name, row)
        assert row["rel_diff_float64"] < 1e-6, (name, row)
        assert row["verdict"] == "kernel precision"
    walked = {m["name"]: m["rel_diff"] for m in got["modules"]}
    assert rows["vision_encoder.embeddings"]["rel_diff_same_input"] == pytest.approx(walked["vision_encoder.embeddings"])


def test_a_damaged_lm_head_is_named_by_the_module_report(tiny, tmp_path):
    """lm_head is the report's last module: a wrong lm_head fails verify and the first divergence names it
    (the proof names it too)."""
    import json
    from in_place import edit_tensors
    out = str(tmp_path / "ms")
    convert(tiny, out, dtype="float32", fmt="safetensors", progress=False)
    name = "language_model.lm_head.weight"
    # every vocabulary row in the other order, in place (the file's size stays the manifest's)
    edit_tensors(os.path.join(out, "llava.safetensors"), lambda t: t.update({name: t[name][::-1].copy()}))
    r = verify(tiny, out, max_new_tokens=TOKENS)
    assert not r["passed"] and r["kind"] == "conversion error"
    assert r["first_divergence"] == HEAD and r["modules"][-1]["name"] == HEAD
    assert all(m["ok"] for m in r["modules"][:-1])
    assert [d["name"] for d in r["weights"]["differ"]] == [name]
    assert f"first divergence: {HEAD}" in format_report(r)
    json.dumps(r)
