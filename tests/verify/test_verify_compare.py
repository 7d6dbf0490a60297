"""The comparison rules on hand-made numbers: tolerances scale with the logits, top-1 and greedy
disagreements pass only at near-ties, a module fails on shape, size or NaN."""
import numpy as np

from llava_ckpt.verify.compare import (TOLERANCES, compare_greedy, compare_logits, compare_module, first_divergence,
                                       known_positions)

TOL = TOLERANCES["float32"]


def test_logits_within_tolerance_and_scaled_by_the_largest_logit():
    hf = np.array([[10.0, 1.0, -3.0], [0.5, 9.0, 2.0]])
    ok = compare_logits(hf, hf + 5e-3, TOL)  # 5e-4 of max |logit| 10
    assert ok["logits_ok"] and ok["cosine_ok"] and ok["top1_ok"] and ok["top1_agreement"] == 1.0
    bad = compare_logits(hf, hf + 2e-2, TOL)
    assert not bad["logits_ok"] and abs(bad["rel_diff"] - 2e-3) < 1e-9


def test_top1_flip_accepted_only_at_a_near_tie():
    hf = np.array([[10.0, 9.999, 0.0]])
    flipped = np.array([[9.999, 10.0, 0.0]])
    assert compare_logits(hf, flipped, TOL)["top1_ok"]  # margin 1e-3 <= 2 * 1e-2
    hf = np.array([[10.0, 8.0, 0.0]])
    assert not compare_logits(hf, np.array([[8.0, 10.0, 0.0]]), TOL)["top1_ok"]


def test_greedy_first_mismatch_and_its_margin():
    steps = np.array([[5.0, 4.99, 0.0], [0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    same = compare_greedy([0, 1, 0], steps, [0, 1, 0], abs_tol=0.01)
    assert same["greedy_match"] and same["greedy_ok"] and same["greedy_equal"] == 3
    tie = compare_greedy([0, 1, 0], steps, [1, 2, 2], abs_tol=0.01)
    assert not tie["greedy_match"] and tie["greedy_ok"] and tie["greedy_first_mismatch"] == 0
    wrong = compare_greedy([0, 1, 0], steps, [0, 2, 2], abs_tol=0.01)
    assert not wrong["greedy_ok"] and wrong["greedy_first_mismatch"] == 1 and wrong["greedy_mismatch_margin"] == 4.0
    short = compare_greedy([0, 1, 0], steps, [0, 1], abs_tol=0.01)
    assert not short["greedy_match"] and short["greedy_first_mismatch"] == 2


def test_ranks_are_held_to_the_steps_transformers_chose_after_the_reference_prefix():
    """transformers' choices follow the reference model's tokens: after the first that differs (step 2 here)
    nothing is known, so the ranks' tokens are compared up to it; when every choice agreed, all of them."""
    steps = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    hf, ms = [0, 1, 2], [0, 1, 1, 0]  # transformers picks 2 after the reference model's [0, 1]; it picked 1
    assert known_positions([0, 1, 2, 7], hf, ms) == [0, 1, 2]
    agree = compare_greedy(hf, steps, known_positions([0, 1, 2, 7], hf, ms), abs_tol=0.01)
    assert agree["greedy_match"] and agree["greedy_ok"]
    like_ms = compare_greedy(hf, steps, known_positions([0, 1, 1, 0], hf, ms), abs_tol=0.01)
    assert not like_ms["greedy_ok"] and like_ms["greedy_first_mismatch"] == 2
    assert known_positions([0, 1, 1, 0, 3], [0, 1, 1, 0], [0, 1, 1, 0]) == [0, 1, 1, 0, 3]  # all agreed: all held


def test_module_checks_and_first_divergence():
    a = np.ones((2, 3), np.float32)
    mods = [compare_module("m0", a, a + 1e-5, 1e-3), compare_module("m1", a, a * 1.1, 1e-3),
            compare_module("m2", a, np.full((2, 3), np.nan, np.float32), 1e-3),
            compare_module("m3", a, np.ones((3, 2), np.float32), 1e-3), compare_module("m4", a, None, 1e-3)]
    assert [m["ok"] for m in mods] == [True, False, False, False, False]
    assert "shape [3, 2]" in mods[3]["note"] and mods[4]["rel_diff"] is None
    assert first_divergence(mods) == "m1" and first_divergence(mods[:1]) is None
