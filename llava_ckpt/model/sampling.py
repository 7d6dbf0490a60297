"""Choosing the next token from [B, V] logits: greedy, or sampling with temperature and top-p (nucleus).

Sampling happens on the host in float64 numpy from a seeded generator, so a seed gives the same tokens on
every run, in one process or on every tensor-parallel rank (all ranks see the same gathered logits and draw
the same numbers). The order is transformers': divide by the temperature, keep the smallest set of most
likely tokens whose probabilities reach top_p (at least one), renormalize, draw.
"""
from __future__ import annotations

import numpy as np

from ..errors import fail


def greedy(logits: np.ndarray) -> np.ndarray:
    """[B, V] -> [B]: the highest logit (the first one on a tie, as torch.argmax)."""
    return np.argmax(logits, axis=-1)


def check_sampling(temperature: float, top_p: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and np.isfinite(temperature)):
        raise fail(f"temperature must be a positive number, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise fail(f"top_p must be in (0, 1], got {top_p!r}")


def nucleus_probs(logits: np.ndarray, temperature: float = 1.0, top_p: float = 1.0) -> np.ndarray:
    """[B, V] logits -> [B, V] probabilities after temperature and top-p filtering."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the more likely tokens
        drop_sorted = before >= top_p  # the most likely token always has before == 0: kept
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def sampler(temperature: float = 1.0, top_p: float = 1.0, seed=None):
    """A `choose` function for Runner.generate_batch: draws one token per row from the filtered
    distribution. `seed`: an int or a sequence of ints (np.random.default_rng's seed)."""
    check_sampling(temperature, top_p)
    rng = np.random.default_rng(seed)

    def choose(logits: np.ndarray) -> np.ndarray:
        p = nucleus_probs(logits, temperature, top_p)
        u = 1.0 - rng.random(p.shape[0])  # in (0, 1]: a zero-probability token is never drawn
        cdf = np.cumsum(p, axis=-1)
        picks = (cdf < u[:, None] * cdf[:, -1:]).sum(axis=-1)
        return np.minimum(picks, p.shape[-1] - 1)
    return choose


def chooser(do_sample: bool, temperature: float = 1.0, top_p: float = 1.0, seed=None):
    """greedy unless do_sample."""
    return sampler(temperature, top_p, seed) if do_sample else greedy
