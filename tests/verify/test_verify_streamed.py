"""The walk's greedy check: the reference model decodes greedily on its own (its KV-cache step path), then
transformers runs once over the prompt and those tokens, its choice after each of the reference model's
prefixes. These tests hold the reference side to its own greedy decoding (Runner.generate, the whole model
loaded) and show that a difference at a later step is caught, on either side."""
import numpy as np
import pytest

from llava_ckpt.engine.config import load_config
from llava_ckpt.convert import convert
from llava_ckpt.io import load_tensors
from llava_ckpt.model.llava import Runner
from llava_ckpt.model.loading import build_and_load
from llava_ckpt.verify.compare import compare_greedy
from llava_ckpt.verify.hf_side import HfSide
from llava_ckpt.verify.inputs import build_inputs
from llava_ckpt.verify.ms_side import MsSide
from llava_ckpt.verify.streamed import walk

TOKENS = 5


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("streamed") / "ms")
    convert(tiny, out, dtype="float32", progress=False)
    cfg = load_config(tiny)
    inputs = build_inputs(tiny, None, None)
    model, _ = build_and_load(cfg, load_tensors(out))
    own = Runner(model, jit=False).generate(inputs["input_ids"], inputs["pixel_values"], TOKENS)
    return {"out": out, "cfg": cfg, "ids": inputs["input_ids"], "pixels": inputs["pixel_values"],
            "own_tokens": [int(t) for t in own["tokens"]]}


def _walk(tiny, setup, hf):
    tensors = load_tensors(setup["out"])
    try:
        return walk(hf, MsSide(setup["cfg"], tensors), setup["cfg"], setup["ids"], setup["pixels"], TOKENS)
    finally:
        hf.close()
        tensors.close()


def test_reference_tokens_are_its_own_greedy_decoding(tiny, setup):
    got = _walk(tiny, setup, HfSide(tiny, setup["cfg"], []))
    assert len(set(setup["own_tokens"])) > 1  # a sequence, not one token repeated
    assert got["tokens_ms"] == setup["own_tokens"] == got["tokens_hf"]


def _verdict(got):
    return compare_greedy(got["tokens_hf"], got["hf_step_logits"], got["tokens_ms"], abs_tol=1e-2)


def test_a_later_transformers_choice_that_differs_is_caught(tiny, setup):
    """transformers' choice after the reference model's first two tokens is forced elsewhere: the walk reports
    its tokens up to that one and stops there (what it would pick after it follows another prefix)."""
    hf = HfSide(tiny, setup["cfg"], [])
    real = hf.lm_head
    s = setup["ids"].shape[1]

    def lm_head(x):
        logits = real(x)
        natural = int(logits[0, s + 1].argmax())  # its choice after the prompt and the first two tokens
        logits[0, s + 1, (natural + 1) % logits.shape[-1]] += 1e4
        return logits

    hf.lm_head = lm_head
    got = _walk(tiny, setup, hf)
    own = setup["own_tokens"]
    assert got["tokens_ms"] == own
    assert got["tokens_hf"][:2] == own[:2] and got["tokens_hf"][2] != own[2] and len(got["tokens_hf"]) == 3
    verdict = _verdict(got)
    assert verdict["greedy_first_mismatch"] == 2 and not verdict["greedy_ok"] and verdict["greedy_equal"] == 2
    assert all(m["ok"] for m in got["modules"])  # the prompt's modules still agree
    np.testing.assert_array_equal(got["hf_logits"].shape, got["ms_logits"].shape)


def test_a_later_reference_token_that_differs_is_caught(tiny, setup):
    """The reference model's third token is forced elsewhere (a conversion that goes wrong only in the
    decoding step): transformers, given the same first two, picks the real third token, and the walk names
    step 2 as the first that differs."""
    tensors = load_tensors(setup["out"])
    ms = MsSide(setup["cfg"], tensors)
    real, steps = ms.norm_and_logits, []

    def norm_and_logits(x):
        normed, logits = real(x)
        if x.shape[1] == 1:  # a decoding step, not the prompt
            steps.append(1)
            if len(steps) == 2:
                out = logits.asnumpy()
                natural = int(out[0, -1].argmax())
                out[0, -1, (natural + 1) % out.shape[-1]] += 1e4
                logits = ms.Tensor(out)
        return normed, logits

    ms.norm_and_logits = norm_and_logits
    hf = HfSide(tiny, setup["cfg"], [])
    try:
        got = walk(hf, ms, setup["cfg"], setup["ids"], setup["pixels"], TOKENS)
    finally:
        hf.close()
        tensors.close()
    own = setup["own_tokens"]
    assert got["tokens_ms"][:2] == own[:2] and got["tokens_ms"][2] != own[2] and len(got["tokens_ms"]) == TOKENS
    assert got["tokens_hf"] == own[:3]
    verdict = _verdict(got)
    assert verdict["greedy_first_mismatch"] == 2 and not verdict["greedy_ok"] and verdict["greedy_equal"] == 2
