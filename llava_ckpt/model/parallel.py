"""Megatron-style tensor parallelism for the reference model: one rank's cells with one rank's shapes.

The model is the ordinary LlavaVlm built from a config whose text sizes (heads, KV heads, intermediate
size, vocab) are divided by the world size, so every parameter has exactly the shape of this rank's slice
in rank_<r>/ and `load_weights` fills it unchanged (same names, same shape checks). Then the cells whose
output must be combined across ranks are swapped for parallel versions with the same parameter names:

- column-parallel (no communication): wq/wk/wv or w_qkv (the rank slice holds whole KV groups
  [q rows of its heads; k_g; v_g]), w1/w3 or w_gate_hidden (whole interleaved gate/up pairs), adapter;
- row-parallel + AllReduce (bias, if any, added once after the reduce): wo, w2, adapter_2;
- vocab-parallel embedding: this rank holds rows [r*V/N, (r+1)*V/N): masked lookup + AllReduce;
- vocab-split lm_head: local logits, AllGather along the vocab;
- vision tower, norms: replicated (plain cells).

The forward itself is the existing code (LlavaVlm.prefill through Runner), unchanged.
"""
from __future__ import annotations

import copy

from mindspore import nn, ops

from ..errors import fail
from .layers import Linear, param


def local_config(cfg: dict, world: int) -> dict:
    """cfg with the text sizes a rank holds (heads, KV heads, intermediate size, vocab divided by world)."""
    tc = cfg["text_config"]
    sizes = {"num_attention_heads": tc["num_attention_heads"], "num_key_value_heads": tc["num_key_value_heads"],
             "intermediate_size": tc["intermediate_size"], "vocab_size": tc["vocab_size"],
             "hidden_size": tc["hidden_size"]}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % world]
    if bad:
        raise fail(f"cannot split across {world} ranks: {', '.join(bad)} not divisible")
    out = copy.deepcopy(cfg)
    lt = out["text_config"]
    lt["head_dim"] = tc["head_dim"]  # stays the full head size
    for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        lt[k] = tc[k] // world
    return out


class RowParallelLinear(Linear):
    """weight [out, in/N] (this rank's input slice); y = AllReduce(x @ w.T) + bias (bias replicated)."""

    def __init__(self, out_dim, in_dim, bias, dtype):
        super().__init__(out_dim, in_dim, bias, dtype)
        self.all_reduce = ops.AllReduce()

    def construct(self, x):
        shape = x.shape
        y = self.all_reduce(self.project(x.reshape(-1, shape[-1])))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(shape[:-1] + (-1,))


class VocabParallelEmbedding(nn.Cell):
    """embedding_weight [V/N, H] = rows [start, start + V/N): ids outside it look up zeros, then AllReduce."""

    def __init__(self, vocab_local, hidden, start, dtype):
        super().__init__()
        self.embedding_weight = param((vocab_local, hidden), dtype)
        self.start, self.size = int(start), int(vocab_local)
        self.all_reduce = ops.AllReduce()

    def construct(self, ids):
        local = ids - self.start
        mine = ops.logical_and(local >= 0, local < self.size)
        rows = ops.gather(self.embedding_weight, ops.where(mine, local, ops.zeros_like(local)), 0)
        rows = rows * mine.expand_dims(-1).astype(rows.dtype)
        return self.all_reduce(rows)


class VocabParallelHead(Linear):
    """lm_head weight [V/N, H]: local logits, then AllGather along the vocab (ranks in order)."""

    def __init__(self, vocab_local, hidden, world, dtype):
        super().__init__(vocab_local, hidden, False, dtype)
        self.world = int(world)
        self.all_gather = ops.AllGather()

    def construct(self, x):
        shape = x.shape
        y = self.project(x.reshape(-1, shape[-1]))  # [T, V/N]
        y = self.all_gather(y.transpose(1, 0))                    # [V, T], rank 0's rows first
        return y.transpose(1, 0).reshape(shape[:-1] + (-1,))


def _swap_row(owner, attr, dtype):
    old = getattr(owner, attr)
    out_dim, in_dim = old.weight.shape
    setattr(owner, attr, RowParallelLinear(out_dim, in_dim, old.bias is not None, dtype))


def parallel_decoder_layer(layer, dtype: str):
    """A DecoderLayer built with local sizes, made a rank's: wo and w2 row-parallel (the rest is column-
    parallel by its local shapes alone)."""
    _swap_row(layer.attention, "wo", dtype)
    _swap_row(layer.feed_forward, "w2", dtype)
    return layer


def parallel_adapter(adapter, cfg: dict, world: int, dtype: str):
    """The projector made a rank's: adapter column-parallel (its bias split with it), adapter_2 row-parallel
    (bias replicated)."""
    h, vh = cfg["text_config"]["hidden_size"], cfg["vision_config"]["hidden_size"]
    bias = bool(cfg.get("multimodal_projector_bias", True))
    adapter.adapter = Linear(h // world, vh, bias, dtype)
    adapter.adapter_2 = RowParallelLinear(h, h // world, bias, dtype)
    return adapter


def build_parallel(cfg: dict, rank: int, world: int, fused: bool, dtype: str = "float32"):
    """This rank's LlavaVlm (local shapes, parallel cells swapped in), parameters still empty."""
    from .llava import LlavaVlm
    if not 0 <= rank < world:
        raise fail(f"rank {rank} is outside a world of {world}")
    lcfg = local_config(cfg, world)
    model = LlavaVlm(lcfg, dtype=dtype, fused=fused)
    tc, lt = cfg["text_config"], lcfg["text_config"]
    h, vl = tc["hidden_size"], lt["vocab_size"]
    lm = model.language_model
    lm.model.tok_embeddings = VocabParallelEmbedding(vl, h, rank * vl, dtype)
    lm.lm_head = VocabParallelHead(vl, h, world, dtype)
    for layer in lm.model.layers:
        parallel_decoder_layer(layer, dtype)
    parallel_adapter(model.adapter, cfg, world, dtype)
    _name_parameters(model)
    return model


def _name_parameters(model) -> None:
    """Cells swapped in after construction keep bare parameter names: give every parameter its full path."""
    for prefix, cell in model.cells_and_names():
        for key, p in cell._params.items():  # pylint: disable=protected-access
            if p is not None:
                p.name = f"{prefix}.{key}" if prefix else key


def load_rank(cfg: dict, tensors, rank: int, world: int, dtype: str = "float32"):
    """Build this rank's model for the layout its tensor names show and fill it from its own file."""
    from .loading import detect_fused, load_weights
    model = build_parallel(cfg, rank, world, detect_fused(tensors.keys()), dtype)
    load_weights(model, tensors)
    return model
