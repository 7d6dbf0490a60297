"""verify on a tp output runs its ranks under msrun by default: logits, greedy tokens (the parallel decode
step) and every module's output of the ranks are compared with transformers, and a mapping mistake in the
rank files is named under msrun as in the single process."""
import glob
import os
import shutil

import pytest

from llava_ckpt.convert import convert
from llava_ckpt.verify import format_report, verify
from in_place import edit_tensors, swap


def _swap_w1_w3(rank_dir, layer=1):
    (path,) = glob.glob(os.path.join(rank_dir, "*.safetensors"))
    p = f"language_model.model.layers.{layer}.feed_forward."
    edit_tensors(path, lambda t: swap(t, p + "w1.weight", p + "w3.weight"))


@pytest.mark.slow
def test_tp2_runs_ranks_by_default_and_names_the_module(tiny, tmp_path):
    out = str(tmp_path / "tp2")
    convert(tiny, out, fmt="safetensors", tp=2, progress=False)
    r = verify(tiny, out, max_new_tokens=3)
    assert r["passed"], format_report(r)
    par = r["msrun"]
    assert par["world"] == 2 and par["passed"] and par["greedy_match"] and par["first_divergence"] is None
    assert par["tokens"] == r["tokens_hf"] and len(par["modules"]) == len(r["modules"])
    assert r["checks"]["msrun_logits"] and r["checks"]["msrun_greedy"] and r["checks"]["msrun_modules"]

    bad = str(tmp_path / "tp2-bad")
    shutil.copytree(out, bad)
    for rank in (0, 1):
        _swap_w1_w3(os.path.join(bad, f"rank_{rank}"))
    r = verify(tiny, bad, max_new_tokens=2, timeout=200)
    where = "language_model.model.layers.1"
    assert not r["passed"] and r["first_divergence"] == where
    assert not r["msrun"]["passed"] and r["msrun"]["first_divergence"] == where
    assert not r["checks"]["msrun_logits"] and not r["checks"]["msrun_modules"]
    assert f"first divergence under msrun: {where}" in format_report(r)
