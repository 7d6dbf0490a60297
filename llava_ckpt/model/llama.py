"""LLaMA decoder with MindFormers names (`language_model.model.*`, `language_model.lm_head`).

Two weight layouts: separate wq/wk/wv and w1/w3, or MindFormers' qkv_concat layout (`w_qkv` rows grouped
per KV head: [q rows of the group's heads; k_g; v_g]; `w_gate_hidden` rows interleaved gate_0, up_0, ...),
which is what its forward reshapes to (.., n_kv, n_rep + 2, head_dim) and (.., F, 2).
The KV cache is functional (passed in and returned, fixed length T) so one compiled graph serves every
decode step; no cache Parameter exists, so parameter names stay exactly the checkpoint's.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from .layers import Linear, RMSNorm, param, rope_tables, softmax_f32

MASKED = float(np.finfo(np.float32).min)  # what transformers adds for masked positions


def rope_theta(tc: dict) -> float:
    """transformers 5 writes rope_parameters {rope_theta, rope_type}; older configs write rope_theta."""
    params = tc.get("rope_parameters") or {}
    return float(params.get("rope_theta", tc.get("rope_theta", 10000.0)))


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), -1)


class Attention(nn.Cell):
    def __init__(self, tc: dict, fused: bool, dtype):
        super().__init__()
        h = tc["hidden_size"]
        self.heads, self.kv_heads, self.head_dim = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
        self.rep = self.heads // self.kv_heads
        self.scale = self.head_dim ** -0.5
        self.fused = fused
        bias = bool(tc.get("attention_bias"))
        if fused:
            self.w_qkv = Linear((self.heads + 2 * self.kv_heads) * self.head_dim, h, bias, dtype)
        else:
            self.wq = Linear(self.heads * self.head_dim, h, bias, dtype)
            self.wk = Linear(self.kv_heads * self.head_dim, h, bias, dtype)
            self.wv = Linear(self.kv_heads * self.head_dim, h, bias, dtype)
        self.wo = Linear(h, self.heads * self.head_dim, bias, dtype)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)

    def qkv(self, x, cos, sin):
        """q [B, heads, S, d], k and v [B, kv_heads, S, d], RoPE applied to q and k.

        cos/sin: [S, d] (one position list for the batch) or [B, S, d] (per-row positions: left padding)."""
        b, s, _ = x.shape
        d = self.head_dim
        if self.fused:
            y = self.w_qkv(x).reshape(b, s, self.kv_heads, self.rep + 2, d)
            q = y[:, :, :, :self.rep].reshape(b, s, self.heads, d)
            k, v = y[:, :, :, self.rep], y[:, :, :, self.rep + 1]
        else:
            q = self.wq(x).reshape(b, s, self.heads, d)
            k = self.wk(x).reshape(b, s, self.kv_heads, d)
            v = self.wv(x).reshape(b, s, self.kv_heads, d)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if cos.ndim == 3:  # per-row positions: [B, S, d] -> [B, 1, S, d], one table row per head
            cos, sin = cos.expand_dims(1), sin.expand_dims(1)
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def repeat(self, t):
        if self.rep == 1:
            return t
        b, g, n, d = t.shape
        return ops.broadcast_to(t.reshape(b, g, 1, n, d), (b, g, self.rep, n, d)).reshape(b, g * self.rep, n, d)

    def attend(self, q, k, v, keep):
        """keep: bool, broadcastable to [B, heads, S, T]; True where a query may look."""
        b, _, s, _ = q.shape
        scores = (self.bmm_t(q, self.repeat(k)) * self.scale).astype(ms.float32)
        scores = ops.where(keep, scores, ops.full_like(scores, MASKED))
        probs = softmax_f32(scores, q.dtype)
        out = self.bmm(probs, self.repeat(v)).transpose(0, 2, 1, 3).reshape(b, s, self.heads * self.head_dim)
        return self.wo(out)


class FeedForward(nn.Cell):
    def __init__(self, tc: dict, fused: bool, dtype):
        super().__init__()
        h, f = tc["hidden_size"], tc["intermediate_size"]
        bias = bool(tc.get("mlp_bias"))
        self.fused, self.ffn = fused, f
        if fused:
            self.w_gate_hidden = Linear(2 * f, h, bias, dtype)
        else:
            self.w1 = Linear(f, h, bias, dtype)
            self.w3 = Linear(f, h, bias, dtype)
        self.w2 = Linear(h, f, bias, dtype)

    def construct(self, x):
        if self.fused:
            y = self.w_gate_hidden(x)
            y = y.reshape(y.shape[:-1] + (self.ffn, 2))
            gate, up = y[..., 0], y[..., 1]
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(gate * ops.sigmoid(gate) * up)


class DecoderLayer(nn.Cell):
    def __init__(self, tc: dict, fused: bool, dtype):
        super().__init__()
        eps = tc["rms_norm_eps"]
        self.attention_norm = RMSNorm(tc["hidden_size"], eps, dtype)
        self.attention = Attention(tc, fused, dtype)
        self.ffn_norm = RMSNorm(tc["hidden_size"], eps, dtype)
        self.feed_forward = FeedForward(tc, fused, dtype)

    def prefill(self, x, cos, sin, keep):
        q, k, v = self.attention.qkv(self.attention_norm(x), cos, sin)
        x = x + self.attention.attend(q, k, v, keep)
        return x + self.feed_forward(self.ffn_norm(x)), k, v

    def step(self, x, cos, sin, keep, slot, k_cache, v_cache):
        """One new position per row: write its k/v at `slot` (bool [1, 1, T, 1], the same cache slot for every
        row: rows are left-padded to one length) of the fixed-length cache."""
        q, k, v = self.attention.qkv(self.attention_norm(x), cos, sin)
        k_cache = ops.where(slot, ops.broadcast_to(k, k_cache.shape), k_cache)
        v_cache = ops.where(slot, ops.broadcast_to(v, v_cache.shape), v_cache)
        x = x + self.attention.attend(q, k_cache, v_cache, keep)
        return x + self.feed_forward(self.ffn_norm(x)), k_cache, v_cache


class Embedding(nn.Cell):
    def __init__(self, vocab, hidden, dtype):
        super().__init__()
        self.embedding_weight = param((vocab, hidden), dtype)

    def construct(self, ids):
        return ops.gather(self.embedding_weight, ids, 0)


class LlamaModel(nn.Cell):
    def __init__(self, tc: dict, fused: bool, dtype):
        super().__init__()
        self.tok_embeddings = Embedding(tc["vocab_size"], tc["hidden_size"], dtype)
        self.layers = nn.CellList([DecoderLayer(tc, fused, dtype) for _ in range(tc["num_hidden_layers"])])
        self.norm_out = RMSNorm(tc["hidden_size"], tc["rms_norm_eps"], dtype)


class LanguageModel(nn.Cell):
    """`language_model`: decoder + untied lm_head. RoPE tables are constants, not parameters."""

    def __init__(self, tc: dict, fused: bool, dtype):
        super().__init__()
        self.model = LlamaModel(tc, fused, dtype)
        self.lm_head = Linear(tc["vocab_size"], tc["hidden_size"], False, dtype)
        self.max_positions = int(tc["max_position_embeddings"])
        self.cos, self.sin = rope_tables(tc["head_dim"], rope_theta(tc), self.max_positions)

    def logits(self, x):
        return self.lm_head(self.model.norm_out(x)).astype(ms.float32)

    def prefill(self, x, positions, keep, last_only=False):
        """x: input embeddings [B, S, H]; positions [S] or [B, S] (per row); keep: bool broadcastable to
        [B, heads, S, S]. Returns logits, per-layer k and v tuples ([B, kv, S, d] each), layer outputs.
        Tuples, not one stacked tensor: slicing a stacked cache per layer cost ~40 ms a layer on CPU, more
        than the layer's matmuls at decode time. last_only: logits of the last position only ([B, 1, V]),
        all generation needs (the full-vocab head over every prompt position costs as much as a layer)."""
        cos, sin = ops.gather(self.cos, positions, 0), ops.gather(self.sin, positions, 0)
        ks, vs, states = (), (), ()
        for layer in self.model.layers:
            x, k, v = layer.prefill(x, cos, sin, keep)
            ks, vs, states = ks + (k,), vs + (v,), states + (x,)
        logits = self.logits(x[:, -1:]) if last_only else self.logits(x)
        return logits, ks, vs, states + (self.model.norm_out(x),)

    def step(self, ids, positions, keep, slot, k_caches, v_caches):
        cos, sin = ops.gather(self.cos, positions, 0), ops.gather(self.sin, positions, 0)
        x = self.model.tok_embeddings(ids)
        ks, vs = (), ()
        i = 0
        for layer in self.model.layers:
            x, k, v = layer.step(x, cos, sin, keep, slot, k_caches[i], v_caches[i])
            ks, vs = ks + (k,), vs + (v,)
            i = i + 1
        return self.logits(x), ks, vs

