"""The walk's greedy check runs the reference model once over the prompt and transformers' greedy tokens:
its choice after each of transformers' prefixes. These tests hold it to the reference model's own greedy
decoding (Runner.generate: the KV-cache step path) and show it catches a difference at a later step."""
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


def test_a_later_step_that_differs_is_caught(tiny, setup):
    """transformers' third token is forced elsewhere: the reference model, given the same first two, picks
    its own third token (the one its own decoding gives) and the walk stops there."""
    hf = HfSide(tiny, setup["cfg"], [])
    real, decode_steps = hf.lm_head, []

    def lm_head(x):
        logits = real(x)
        if x.shape[1] == 1:  # a decoding step, not the prompt
            decode_steps.append(1)
            if len(decode_steps) == 2:
                natural = int(logits[0, -1].argmax())
                logits[0, -1, (natural + 1) % logits.shape[-1]] += 1e4
        return logits

    hf.lm_head = lm_head
    got = _walk(tiny, setup, hf)
    own = setup["own_tokens"]
    assert got["tokens_hf"][:2] == own[:2] and got["tokens_hf"][2] != own[2]
    assert got["tokens_ms"] == own[:3]
    verdict = compare_greedy(got["tokens_hf"], got["hf_step_logits"], got["tokens_ms"], abs_tol=1e-2)
    assert verdict["greedy_first_mismatch"] == 2 and not verdict["greedy_ok"] and verdict["greedy_equal"] == 2
    assert all(m["ok"] for m in got["modules"])  # the prompt's modules still agree
    np.testing.assert_array_equal(got["hf_logits"].shape, got["ms_logits"].shape)
