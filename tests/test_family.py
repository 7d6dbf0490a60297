"""The LLaVA family beyond llava-1.5: bakLlava (LlavaForConditionalGeneration with a Mistral-7B language model,
grouped-query attention) through every command on the bakllava-tiny preset: convert (its own table, fused and
not), shard (tp must divide the KV heads), export bit-exact, verify layer by layer against transformers' own
Mistral classes, generate token for token what transformers' generate gives, the MindFormers predict config;
a table that is not the checkpoint's is a named error. LLaVA-NeXT (llava-next-mistral-tiny): every command too,
verify walking the anyres packing as its own module, generate batching images of other sizes, and tp 2 as
real ranks under msrun (the same tiny Mistral as bakllava-tiny: one msrun test covers both members)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from llava_ckpt.convert import convert
from llava_ckpt.errors import CheckpointError
from llava_ckpt.export import export
from llava_ckpt.fixture import make_fixture
from llava_ckpt.generate import generate
from llava_ckpt.shard import shard
from llava_ckpt.verify import verify

from expected import expected, load_config, mismatches, read_hf, read_with_mindspore
from test_shard import expected_slice

N = 5
NEXT = "LlavaNextForConditionalGeneration"


@pytest.fixture(scope="module")
def bakllava(tmp_path_factory):
    return make_fixture(str(tmp_path_factory.mktemp("bakllava") / "hf"), preset="bakllava-tiny")


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "p.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (80, 60, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_the_preset_is_a_mistral_llava_with_grouped_query_attention(bakllava):
    cfg = load_config(bakllava)
    assert cfg["model_type"] == "llava" and cfg["text_config"]["model_type"] == "mistral"
    t = cfg["text_config"]
    assert t["num_key_value_heads"] < t["num_attention_heads"] and t["sliding_window"] == 4096
    from transformers import LlavaConfig
    assert type(LlavaConfig.from_pretrained(bakllava).text_config).__name__ == "MistralConfig"


@pytest.mark.parametrize("fuse", [False, True])
def test_convert_shard_and_export_are_exact(bakllava, tmp_path, fuse):
    one = tmp_path / "one"
    result = convert(bakllava, str(one), fuse_qkv=fuse, progress=False)
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["mapping"]["file"] == "bakllava.toml" and result["tensors"] > 0
    want = expected(read_hf(bakllava), load_config(bakllava), fuse_qkv=fuse)  # GQA rows grouped per KV head
    assert mismatches(read_with_mindspore(str(one / "llava.safetensors")), want) == []
    shard(str(one), str(tmp_path / "tp2"), tp=2, progress=False)
    for r in range(2):
        got = read_with_mindspore(str(tmp_path / "tp2" / f"rank_{r}" / "llava.safetensors"))
        assert mismatches(got, {n: expected_slice(n, a, r, 2) for n, a in want.items()}) == []
    with pytest.raises(CheckpointError, match=r"--tp 4 must divide .* 2 \((KV )?groups of .*(wk|w_qkv).weight\)"):
        shard(str(one), str(tmp_path / "tp4"), tp=4, progress=False)  # 2 KV heads: a rank holds whole groups
    export(str(tmp_path / "tp2"), str(tmp_path / "back"), progress=False)
    back, hf = read_hf(str(tmp_path / "back")), read_hf(bakllava)
    assert sorted(back) == sorted(hf) and [n for n in hf if back[n].tobytes() != hf[n].tobytes()] == []
    mf = yaml.safe_load((one / "predict_llava.yaml").read_text())["model"]["model_config"]["text_config"]
    assert mf["model_config"]["n_kv_heads"] == load_config(bakllava)["text_config"]["num_key_value_heads"]


def test_a_table_that_is_not_the_checkpoint_s_is_named(bakllava, tiny, tmp_path):
    with pytest.raises(CheckpointError, match="text_config.model_type is 'mistral'; the table llava-1.5.toml "
                                              "accepts 'llama'"):
        convert(bakllava, str(tmp_path / "a"), mapping="llava-1.5", progress=False)
    with pytest.raises(CheckpointError, match="text_config.model_type is 'llama'; the table bakllava.toml "
                                              "accepts 'mistral'"):
        convert(tiny, str(tmp_path / "b"), mapping="bakllava", progress=False)
    assert os.listdir(tmp_path) == []


def test_verify_walks_transformers_own_mistral_layers(bakllava, tmp_path):
    out = tmp_path / "ms"
    convert(bakllava, str(out), fuse_qkv=True, tp=2, progress=False)
    r = verify(bakllava, str(out), max_new_tokens=N, msrun=False)
    assert r["passed"] and r["weights"]["differ"] == [] and r["greedy_equal"] == len(r["tokens_hf"]) == N
    names = [m["name"] for m in r["modules"]]
    assert "language_model.model.layers.2" in names and all(m["ok"] for m in r["modules"])
    from llava_ckpt.verify.hf_side import text_classes
    assert text_classes("mistral").layer.__name__ == "MistralDecoderLayer"


def _transformers_tokens(hf, picture, prompt, model_class="LlavaForConditionalGeneration"):
    """transformers' own generate (greedy, float32) on one request: `model_class` is the checkpoint's."""
    import transformers
    from transformers import AutoProcessor
    model = getattr(transformers, model_class).from_pretrained(hf, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(hf)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    with Image.open(picture) as im:
        batch = processor(images=im.convert("RGB"), text=text, return_tensors="pt")
    with torch.no_grad():
        seq = model.generate(**batch, max_new_tokens=N, do_sample=False)
    return seq[0, batch["input_ids"].shape[1]:].tolist()


def test_generate_gives_transformers_tokens(bakllava, picture, tmp_path):
    out = tmp_path / "ms"
    convert(bakllava, str(out), progress=False)
    requests = [{"image": picture, "prompt": "What is this?"}, {"image": picture, "prompt": "Describe it in detail."}]
    got = generate(str(out), requests, max_new_tokens=N, batch_size=2)
    assert [o["token_ids"] for o in got["outputs"]] == [_transformers_tokens(bakllava, picture, r["prompt"])
                                                         for r in requests]


def test_past_the_sliding_window_is_refused_before_any_model(tmp_path, picture):
    """The reference model attends to every earlier position; Mistral past its window does not: refused, named."""
    hf = make_fixture(str(tmp_path / "hf"), preset="bakllava-tiny", text_overrides={"sliding_window": 24})
    out = tmp_path / "ms"
    convert(hf, str(out), progress=False)
    exe = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
    for cmd in (["generate", str(out), "--image", picture, "--prompt", "What is this?"],
                ["verify", hf, str(out), "--image", picture, "--prompt", "What is this?"]):
        run = subprocess.run([exe, *cmd], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
        assert "context of 24 positions (sliding_window; the reference model has no sliding attention)" in run.stderr


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    return make_fixture(str(tmp_path_factory.mktemp("next") / "hf"), preset="llava-next-mistral-tiny")


@pytest.mark.parametrize("fuse", [False, True])
def test_llava_next_converts_shards_exports_and_is_weight_proven(llava_next, tmp_path, fuse):
    """LLaVA-NeXT (v1.6, Mistral): its own table (llava-1.5's tensors and image_newline), every table-driven
    command exact; no MindFormers predict config (research/llava's is for LlavaVlm)."""
    from transformers import LlavaNextForConditionalGeneration
    model = LlavaNextForConditionalGeneration.from_pretrained(llava_next)  # transformers takes the fixture
    assert tuple(model.model.image_newline.shape) == (load_config(llava_next)["text_config"]["hidden_size"],)
    del model
    one = tmp_path / "one"
    convert(llava_next, str(one), fuse_qkv=fuse, progress=False)
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["mapping"]["file"] == "llava-next.toml" and not (one / "predict_llava.yaml").exists()
    hf = read_hf(llava_next)
    want = dict(expected(hf, load_config(llava_next), fuse_qkv=fuse), image_newline=hf["image_newline"])
    assert mismatches(read_with_mindspore(str(one / "llava.safetensors")), want) == []
    shard(str(one), str(tmp_path / "tp2"), tp=2, progress=False)
    for r in range(2):
        got = read_with_mindspore(str(tmp_path / "tp2" / f"rank_{r}" / "llava.safetensors"))
        assert mismatches(got, {n: expected_slice(n, a, r, 2) for n, a in want.items()}) == []
    proof = verify(llava_next, str(tmp_path / "tp2"), weights_only=True)
    assert proof["passed"] and proof["weights"]["differ"] == []
    export(str(tmp_path / "tp2"), str(tmp_path / "back"), progress=False)
    back = read_hf(str(tmp_path / "back"))
    assert sorted(back) == sorted(hf) and [n for n in hf if back[n].tobytes() != hf[n].tobytes()] == []


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """An image wider than it is tall: another grid (1 x 2 tiles) and padding cropped off the top and bottom."""
    path = tmp_path_factory.mktemp("img") / "wide.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (30, 97, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("text", ["mistral", "llama"])
def test_llava_next_verify_walks_the_anyres_packing_as_its_own_module(llava_next, picture, tmp_path, text):
    """verify on LLaVA-NeXT: the vision tower over every patch of the image, the packing compared with
    transformers' own pack_image_features, then the language model (Mistral as v1.6-mistral, Llama as
    v1.6-vicuna); all within tolerance."""
    if text == "llama":
        llava_next = make_fixture(str(tmp_path / "vicuna"), preset="llava-next-mistral-tiny",
                                  text_overrides={"model_type": "llama", "num_key_value_heads": 4})
    convert(llava_next, str(tmp_path / "ms"), progress=False)
    assert load_config(str(tmp_path / "ms"))["text_config"]["model_type"] == text
    result = verify(llava_next, str(tmp_path / "ms"), image=picture, max_new_tokens=N)
    assert result["passed"] and result["kind"] is None, result["checks"]
    names = [m["name"] for m in result["modules"]]
    assert names.index("adapter") + 1 == names.index("image_packing") == names.index(
        "language_model.model.tok_embeddings") - 1
    packing = next(m for m in result["modules"] if m["name"] == "image_packing")
    assert packing["rel_diff"] <= result["thresholds"]["module_rtol"]
    from llava_ckpt.model.anyres import token_count
    with Image.open(picture) as im:
        assert result["image_tokens"] == token_count(load_config(llava_next), (im.height, im.width))


def test_a_wrong_packing_is_named_as_the_packing(llava_next, picture, tmp_path, monkeypatch):
    """The packing can fail on its own: rows laid out column-major on our side (the same features, the same
    count, another order) make image_packing the first module over the tolerance, with exact weights."""
    convert(llava_next, str(tmp_path / "ms"), progress=False)
    from llava_ckpt.model import anyres
    real = anyres.image_index

    def transposed(cfg, images, image_sizes=None):
        index = real(cfg, images, image_sizes)
        return np.concatenate([index[:16], np.sort(index[16:])])  # base kept; tiles' rows, cols and newlines reordered

    monkeypatch.setattr(anyres, "image_index", transposed)
    result = verify(llava_next, str(tmp_path / "ms"), image=picture, max_new_tokens=2)
    assert not result["passed"] and result["kind"] == "numeric drift" and result["checks"]["weights"]
    assert result["first_divergence"] == "image_packing"


def test_llava_next_generate_batches_images_of_other_sizes_as_transformers_does(llava_next, picture, wide,
                                                                                 tmp_path):
    """Two images with other grids and token counts in one batch (patches padded, prompts left-padded): each
    answer is transformers' LlavaNextForConditionalGeneration.generate on its request alone."""
    convert(llava_next, str(tmp_path / "ms"), progress=False)
    requests = [{"image": picture, "prompt": "What is this?"}, {"image": wide, "prompt": "Describe it in detail."}]
    got = generate(str(tmp_path / "ms"), requests, max_new_tokens=N, batch_size=2)
    assert got["batches"] == 1
    want = [_transformers_tokens(llava_next, r["image"], r["prompt"], NEXT) for r in requests]
    assert [o["token_ids"] for o in got["outputs"]] == want
    assert got["outputs"][0]["prompt_text"].startswith("[INST] <image>\n")  # its own chat template


@pytest.mark.slow
def test_llava_next_tp2_ranks_under_msrun_verify_and_generate(llava_next, wide, tmp_path):
    """tp 2 as real ranks: verify's ranks walk the packing too, generate's ranks answer as transformers does.
    Each rank holds one of the two KV heads of the tiny Mistral (bakLlava's language model too): the parallel
    cells and the cache split by KV heads."""
    out = tmp_path / "tp2"
    convert(llava_next, str(out), fuse_qkv=True, tp=2, progress=False)
    result = verify(llava_next, str(out), image=wide, max_new_tokens=N)
    assert result["passed"] and result["msrun"]["passed"], result["checks"]
    assert "image_packing" in [m["name"] for m in result["msrun"]["modules"]]
    got = generate(str(out), [{"image": wide, "prompt": "What is this?"}], max_new_tokens=N)
    want = _transformers_tokens(llava_next, wide, "What is this?", NEXT)
    assert got["tp"] == 2 and got["outputs"][0]["token_ids"] == want


def test_a_llava_next_output_is_not_verified_against_a_llava_source(llava_next, tmp_path):
    """The folders of two family members: named by their model types, not compared."""
    make_fixture(str(tmp_path / "hf15"), preset="tiny")
    convert(llava_next, str(tmp_path / "ms"), progress=False)
    exe = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
    run = subprocess.run([exe, "verify", "hf15", "ms"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    assert "ms holds a conversion of a 'llava_next' ('mistral') checkpoint, hf15 is LLaVA (llama)" in run.stderr
    os.mkdir(tmp_path / "bare")  # a bare checkpoint (no manifest, no config): its tensors are checked instead
    os.link(tmp_path / "ms" / "llava.safetensors", tmp_path / "bare" / "llava.safetensors")
    run = subprocess.run([exe, "verify", "hf15", "bare"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "does not match the LLaVA (llama) model: unexpected 1: image_newline" in run.stderr
