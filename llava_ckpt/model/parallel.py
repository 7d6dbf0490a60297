"""Megatron-style tensor parallelism for the reference model: one rank's cells with one rank's shapes.

Which cells are parallel, and how, is not written here: it is the split kind of each cell's weight, as the
mapping table declares it (and an output's manifest records it), read through engine/splits.py:

- column: a Linear holding its block of output rows (its bias cut with it), no communication (wq/wk/wv or
  w_qkv, w1/w3 or w_gate_hidden, the projector's first layer in the LLaVA-1.5 table);
- row: a Linear holding its block of input columns; its output is AllReduced and its bias, whole on every rank,
  added once after the reduce (wo, w2, the projector's second layer);
- vocab: the embedding (rows [r*V/N, (r+1)*V/N): masked lookup + AllReduce) or lm_head (local logits,
  AllGather along the vocabulary);
- replicated: the plain cell (vision tower, norms).

`parallelize` swaps each Linear / Embedding of a cell by its weight's kind for the parallel cell with the same
parameter names and the rank's shape (splits.rank_shape of the whole shape), so `load_weights` fills it from the
rank file unchanged. The model is the ordinary LlavaVlm built from a config whose head counts, intermediate size
and vocabulary are this rank's (`local_config`, for the attention's reshapes); its forward is unchanged.
"""
from __future__ import annotations

import copy

from mindspore import nn, ops

from ..engine.splits import rank_shape, split_dim
from ..errors import fail
from .layers import MS_DTYPES, Linear, as_dtype, param
from .llama import Embedding


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

    def construct(self, x, residual=None):
        shape = x.shape
        y = self.all_reduce(self.project(x.reshape(-1, shape[-1])))
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(shape[:-1] + (-1,))
        return y if residual is None else residual + y  # after the reduce: once, not once per rank


class VocabParallelEmbedding(nn.Cell):
    """embedding_weight [V/N, H] = rows [start, start + V/N): ids outside it look up zeros, then AllReduce."""

    KEEPS_STORED = ("embedding_weight",)

    def __init__(self, vocab_local, hidden, start, dtype):
        super().__init__()
        self.embedding_weight = param((vocab_local, hidden), dtype)
        self.compute_dtype = MS_DTYPES[dtype]
        self.start, self.size = int(start), int(vocab_local)
        self.all_reduce = ops.AllReduce()

    def construct(self, ids):
        local = ids - self.start
        mine = ops.logical_and(local >= 0, local < self.size)
        rows = ops.gather(self.embedding_weight, ops.where(mine, local, ops.zeros_like(local)), 0)
        rows = as_dtype(rows, self.compute_dtype)
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


PARALLEL_CELLS = (RowParallelLinear, VocabParallelEmbedding, VocabParallelHead)


def rank_cell(cell, name: str, layout: dict, rank: int, world: int, dtype: str):
    """The parallel version of `cell` (a Linear or Embedding whose weight is `name`), or `cell` itself when its
    weight is replicated."""
    if name not in layout:
        raise fail(f"{name}: the checkpoint's split layout does not list it")
    kind, shape = layout[name]
    local = rank_shape(shape, kind, world)
    bias = getattr(cell, "bias", None) is not None
    if bias:  # cut with the weight's output rows, or whole where the outputs are (row: added after the reduce)
        bias_name = name[:-len("weight")] + "bias"
        bias_kind = layout.get(bias_name, (None,))[0]
        if bias_kind is None or (split_dim(bias_kind, 1) == 0) != (split_dim(kind, 2) == 0):
            raise fail(f"{bias_name}: split {bias_kind!r} beside a {kind!r} weight; the reference model's parallel "
                       "cells cut a bias with its weight's output rows or hold it whole")
    if kind == "replicated":
        return cell
    if isinstance(cell, Embedding) and kind == "vocab":
        return VocabParallelEmbedding(local[0], local[1], rank * local[0], dtype)
    if isinstance(cell, Linear) and kind == "column":
        return Linear(local[0], local[1], bias, dtype)
    if isinstance(cell, Linear) and kind == "row":
        return RowParallelLinear(local[0], local[1], bias, dtype)
    if isinstance(cell, Linear) and kind == "vocab" and not bias:
        return VocabParallelHead(local[0], local[1], world, dtype)
    raise fail(f"{name}: the reference model has no tensor-parallel form of a {type(cell).__name__} split {kind!r}")


def parallelize(cell, prefix: str, layout: dict, rank: int, world: int, dtype: str):
    """Swap, in place, every Linear and Embedding under `cell` (whose parameter names start with `prefix`) for
    rank `rank`'s cell by its weight's split kind. `layout`: parameter name -> (split kind, whole shape).
    Any other parameter under `cell` that the layout splits is refused (it has no parallel form here)."""
    if not 0 <= rank < world:
        raise fail(f"rank {rank} is outside a world of {world}")
    swapped = set()
    for path, child in list(cell.cells_and_names()):
        if isinstance(child, PARALLEL_CELLS) or not isinstance(child, (Linear, Embedding)) or not path:
            continue
        weight = prefix + path + (".weight" if isinstance(child, Linear) else ".embedding_weight")
        new = rank_cell(child, weight, layout, rank, world, dtype)
        swapped.update((weight, weight[:-len("weight")] + "bias"))
        if new is not child:
            parent_path, _, attr = path.rpartition(".")
            parent = cell if not parent_path else dict(cell.cells_and_names())[parent_path]
            setattr(parent, attr, new)
    for path, _ in cell.parameters_and_names():
        name = prefix + path
        if name not in swapped and layout.get(name, ("replicated",))[0] != "replicated":
            raise fail(f"{name}: split {layout[name][0]!r}, but the reference model has no tensor-parallel form "
                       "for that cell")
    return cell


def build_parallel(cfg: dict, rank: int, world: int, fused: bool, layout: dict, dtype: str = "float32"):
    """This rank's LlavaVlm (local shapes, parallel cells swapped in by `layout`), parameters still empty."""
    from .llava import LlavaVlm
    model = LlavaVlm(local_config(cfg, world), dtype=dtype, fused=fused)
    parallelize(model, "", layout, rank, world, dtype)
    _name_parameters(model)
    return model


def _name_parameters(model) -> None:
    """Cells swapped in after construction keep bare parameter names: give every parameter its full path."""
    for prefix, cell in model.cells_and_names():
        for key, p in cell._params.items():  # pylint: disable=protected-access
            if p is not None:
                p.name = f"{prefix}.{key}" if prefix else key


def load_rank(cfg: dict, tensors, rank: int, world: int, layout: dict, dtype: str = "float32",
              stored: bool = False):
    """Build this rank's model for the layout its tensor names show and fill it from its own file
    (`stored`: see loading.load_weights)."""
    from .loading import detect_fused, load_weights
    model = build_parallel(cfg, rank, world, detect_fused(tensors.keys()), layout, dtype)
    load_weights(model, tensors, stored)
    return model


def rank_runner(ctx, generating: bool = False):
    """The whole model of an msrun rank (runtime/rank.py's `ctx`: its rank folder, `context` holding the config
    and the split layout), loaded once per process and kept in ctx.cache, compiled unless ctx.jit is False.
    generating: generate's layout (16-bit weights mapped from the rank file, eager: see llava.Runner)."""
    key = "generator" if generating else "runner"
    if key not in ctx.cache:
        from ..io import load_tensors
        from .kernels import prefill_matmul
        from .llava import Runner
        tensors = load_tensors(ctx.rank_dir)
        try:
            with prefill_matmul(ctx.context.get("prefill_matmul", "float32")):
                model = load_rank(ctx.context["cfg"], tensors, ctx.rank, ctx.world, ctx.context["layout"], ctx.dtype,
                                  stored=generating)
        finally:
            tensors.close()
        ctx.cache[key] = Runner(model, jit=ctx.jit and not generating)
    return ctx.cache[key]
