"""Small building blocks whose parameter names match MindFormers' (weight [out, in] like torch Linear).

Parameters start as lazy zero initializers: no memory is allocated until `load_weights` puts the checkpoint
tensor in, so a 7B model is never held twice. The big matrices (a Linear's weight, an embedding table: the
cells listing them in KEEPS_STORED) may instead keep the checkpoint's 16-bit dtype, mapped from its file
(load_weights(stored=True)); they are widened to the compute dtype as they are used: inside the small-M
kernel for a decode step's rows, one weight at a time for a prefill's matmul, per looked-up row for an
embedding. Everything else is cast to the compute dtype at load.
Numerics follow transformers' eager code where it matters for a tight comparison: norms and softmax run in
float32 whatever the compute dtype, RMSNorm casts back before multiplying by its weight.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import initializer

from .kernels import SMALL_ROWS, fused_ops, prefill_matmul_op, small_matmul_op

# float64 is for verify's rerun of a diverging module: with the rounding of float32 / float16 kernels out of
# the way, a difference that stays is a difference of the model, not of its kernels' precision.
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "float64": ms.float64}


def param(shape, dtype) -> Parameter:
    """A not-yet-allocated parameter (filled by load_weights)."""
    return Parameter(initializer("zeros", tuple(shape), MS_DTYPES[dtype]), requires_grad=False)


def stored_dtype_params(model) -> set:
    """Names of the parameters that may keep the checkpoint's 16-bit dtype (those a cell's KEEPS_STORED
    lists): every other parameter is small and is cast to the compute dtype."""
    return set(stored_dtype_owners(model))


def stored_dtype_owners(model) -> dict:
    """{name: (cell, attribute)} of stored_dtype_params, for load_weights to put a 16-bit parameter in place of
    the declared one (Parameter.set_dtype on a not-yet-allocated parameter fills and casts a zero tensor first:
    ~60 ms a 7B matrix, 20 s of generate's load)."""
    owners = {}
    for _, cell in model.cells_and_names():
        for attr in getattr(cell, "KEEPS_STORED", ()):
            owners[getattr(cell, attr).name] = (cell, attr)
    return owners


class Linear(nn.Cell):
    """y = x @ weight.T (+ bias); weight [out, in]. A decode step's few rows go to the small_matmul kernel
    where it runs (model/kernels), the rest to MindSpore's MatMul, or to bf16_matmul for a cell built in
    kernels.prefill_matmul("bfloat16"). A 16-bit weight under float32 compute
    (KEEPS_STORED) is widened inside the kernel, or for a MatMul into one temporary that lives for this call."""

    KEEPS_STORED = ("weight",)

    def __init__(self, out_dim, in_dim, bias, dtype):
        super().__init__()
        self.weight = param((out_dim, in_dim), dtype)
        self.bias = param((out_dim,), dtype) if bias else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.small_matmul = small_matmul_op(dtype)
        self.small_rows = SMALL_ROWS
        self.prefill_matmul = prefill_matmul_op(dtype)  # bf16_matmul when built in that mode, else None
        self.prefill_matmul_bias = prefill_matmul_op(dtype, bias=True) if bias else None
        self.prefill_matmul_add = None if bias else prefill_matmul_op(dtype, residual=True)

    def project(self, x2d):
        """x2d [T, in] @ weight.T; T and the dtypes are static in a compiled graph, so the choice is made at
        compile time. One row with a float32 weight: oneDNN's matrix-vector product reads the weight once
        too; with a 16-bit weight only the kernel reads it without widening it first."""
        rows = x2d.shape[0]
        if self.prefill_matmul is not None and rows > self.small_rows[1]:
            return self.prefill_matmul(x2d, self.weight)  # bfloat16 products, float32 sums, any stored weight
        if self.weight.dtype != x2d.dtype:
            if self.small_matmul is not None and rows <= self.small_rows[1]:
                return self.small_matmul(x2d, self.weight)
            return self.matmul(x2d, self.weight.astype(x2d.dtype))
        if self.small_matmul is not None and self.small_rows[0] <= rows <= self.small_rows[1]:
            return self.small_matmul(x2d, self.weight)
        return self.matmul(x2d, self.weight)

    def construct(self, x, residual=None):
        """x @ weight.T (+ bias), plus `residual` (x's shape but the last dim: a decoder layer's stream) when
        given: residual + y, added inside bf16_matmul's last pass where it runs (one add of MindSpore's less)."""
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        many = x2d.shape[0] > self.small_rows[1]
        if self.prefill_matmul_bias is not None and many and residual is None:
            return self.prefill_matmul_bias(x2d, self.weight, self.bias).reshape(shape[:-1] + (-1,))
        if self.prefill_matmul_add is not None and many and residual is not None:
            r2d = residual.reshape(x2d.shape[0], -1)
            return self.prefill_matmul_add(x2d, self.weight, r2d).reshape(shape[:-1] + (-1,))
        y = self.project(x2d)
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(shape[:-1] + (-1,))
        return y if residual is None else residual + y


class RMSNorm(nn.Cell):
    """LLaMA RMSNorm: statistics in float32, result cast back before the weight (as transformers does); one
    fused op where it runs (kernels.fused_ops)."""

    def __init__(self, dim, eps, dtype):
        super().__init__()
        self.weight = param((dim,), dtype)
        self.eps = float(eps)
        self.fused_ops = fused_ops(dtype)
        self.eps_tensor = Tensor(np.array([eps], dtype=np.float32))

    def construct(self, x):
        if self.fused_ops is not None and x.dtype == ms.float32:
            shape = x.shape
            return self.fused_ops.rms_norm(x.reshape(-1, shape[-1]), self.weight, self.eps_tensor).reshape(shape)
        h = as_dtype(x, ms.float32)
        var = (h * h).mean(-1, keep_dims=True)
        h = h * ops.rsqrt(var + self.eps)
        return self.weight * as_dtype(h, x.dtype)


class LayerNorm(nn.Cell):
    """CLIP LayerNorm with MindFormers' gamma/beta names, computed in float32; one fused op where it
    runs (kernels.fused_ops)."""

    def __init__(self, dim, eps, dtype):
        super().__init__()
        self.gamma = param((dim,), dtype)
        self.beta = param((dim,), dtype)
        self.eps = float(eps)
        self.fused_ops = fused_ops(dtype)
        self.eps_tensor = Tensor(np.array([eps], dtype=np.float32))

    def construct(self, x):
        if self.fused_ops is not None and x.dtype == ms.float32:
            shape = x.shape
            return self.fused_ops.layer_norm(x.reshape(-1, shape[-1]), self.gamma, self.beta,
                                         self.eps_tensor).reshape(shape)
        h = at_least_f32(x)
        mean = h.mean(-1, keep_dims=True)
        d = h - mean
        var = (d * d).mean(-1, keep_dims=True)
        h = d * ops.rsqrt(var + self.eps)
        h = h * self.gamma.astype(h.dtype) + self.beta.astype(h.dtype)
        return h.astype(x.dtype)


def at_least_f32(x):
    """x in float32, or as it is when it is wider (float64, where transformers' own modules stay in float64)."""
    return x if x.dtype == ms.float64 else as_dtype(x, ms.float32)


def as_dtype(x, dtype):
    """x in `dtype`, with no Cast when it already is: in a compiled graph every op output (a no-op Cast of
    [B, heads, S, S] scores included) holds its own memory for the graph's life."""
    return x if x.dtype == dtype else x.astype(dtype)


def softmax_f32(scores, out_dtype):
    """Softmax in float32, cast back (transformers' eager attention does the same)."""
    return as_dtype(ops.softmax(as_dtype(scores, ms.float32), -1), out_dtype)


def quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)


def gelu_exact(x):
    """Erf GELU computed in float32 (torch's gelu on fp16 upcasts internally too), or in float64."""
    h = at_least_f32(x)
    return (0.5 * h * (1.0 + ops.erf(h * 0.7071067811865476))).astype(x.dtype)


def rope_tables(head_dim: int, theta: float, length: int):
    """cos/sin [length, head_dim] computed the way transformers' default RoPE does (float32 angles)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return Tensor(np.cos(emb).astype(np.float32)), Tensor(np.sin(emb).astype(np.float32))
