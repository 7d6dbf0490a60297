"""LLaMA decoder with MindFormers names (`language_model.model.*`, `language_model.lm_head`).

Two weight layouts: separate wq/wk/wv and w1/w3, or MindFormers' qkv_concat layout (`w_qkv` rows grouped
per KV head: [q rows of the group's heads; k_g; v_g]; `w_gate_hidden` rows interleaved gate_0, up_0, ...),
which is what its forward reshapes to (.., n_kv, n_rep + 2, head_dim) and (.., F, 2).
The KV cache (KVCache) is host memory, fixed length T (k stored [B, kv, d, T]), handed to the decode step as
zero-copy input tensors: the step reads the cache, attends over it plus the new position, and returns only the
new position's k/v, which the host writes into its slot. Nothing is rewritten per step (a functional cache
update copied the whole cache of every layer each step, costlier than the step's matmuls at batch 4), and no
cache Parameter exists, so parameter names stay exactly the checkpoint's.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from .layers import MS_DTYPES, Linear, RMSNorm, as_dtype, at_least_f32, param, fused_ops, rope_tables, softmax_f32

MASKED = float(np.finfo(np.float32).min)  # what transformers adds for masked positions


def attention_bias(keep) -> np.ndarray:
    """What attention adds to its scores for a bool mask (True where a query may look): 0 there, MASKED
    elsewhere, float32, made on the host once per forward. Made from the bool mask inside every layer it
    cost a Cast, ~0.4 ms per call on MindSpore's CPU whatever the size: 13 ms per 7B decode step."""
    return np.where(np.asarray(keep, dtype=bool), np.float32(0.0), np.float32(MASKED))


def causal_bias(length: int) -> np.ndarray:
    """attention_bias of the causal mask of one prompt of `length` positions: [length, length]."""
    return attention_bias(np.tril(np.ones((length, length), dtype=bool)))


def rope_theta(tc: dict) -> float:
    """transformers 5 writes rope_parameters {rope_theta, rope_type}; older configs write rope_theta."""
    params = tc.get("rope_parameters") or {}
    return float(params.get("rope_theta", tc.get("rope_theta", 10000.0)))


def head_columns(heads: int, kv_heads: int, head_dim: int, fused: bool) -> np.ndarray:
    """Each head's first column in the projection it comes from (q heads, then k, then v), for the fused
    heads split (kernels.FusedOps.split_heads): in w_qkv's output (fused, the qkv_concat grouping above) or in
    wq's, wk's and wv's own."""
    rep = heads // kv_heads
    if fused:
        q = [((h // rep) * (rep + 2) + h % rep) * head_dim for h in range(heads)]
        k = [(g * (rep + 2) + rep) * head_dim for g in range(kv_heads)]
        v = [(g * (rep + 2) + rep + 1) * head_dim for g in range(kv_heads)]
    else:
        q = [h * head_dim for h in range(heads)]
        k = v = [g * head_dim for g in range(kv_heads)]
    return np.array(q + k + v, dtype=np.int64)


def seen_bias(bias):
    """An attention bias as the fused attention takes it: [Bb, S, T] (Bb 1 or B), or None when its shape is
    not one of [S, T], [Bb, 1, S, T] (then MindSpore's ops attend)."""
    if bias.ndim == 2:
        return bias.reshape((1,) + bias.shape)
    if bias.ndim == 4 and bias.shape[1] == 1:
        return bias.reshape(bias.shape[0], bias.shape[2], bias.shape[3])
    return None


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
        self.fused_ops = fused_ops(dtype)  # fused heads split and attention (kernels.fused_ops), or None
        if self.fused_ops is not None:
            self.split = self.fused_ops.split_heads(self.heads, self.kv_heads, self.head_dim, rope=True)
            self.columns = ms.Tensor(head_columns(self.heads, self.kv_heads, self.head_dim, fused))
            self.scale_tensor = ms.Tensor(np.array([self.scale], dtype=np.float32))

    def qkv(self, x, cos, sin):
        """q [B, heads, S, d], k and v [B, kv_heads, S, d], RoPE applied to q and k.

        cos/sin: [S, d] (one position list for the batch) or [B, S, d] (per-row positions: left padding)."""
        b, s, _ = x.shape
        d = self.head_dim
        if self.fused_ops is not None and x.dtype == ms.float32:
            if cos.ndim == 2:
                cos, sin = cos.reshape((1,) + cos.shape), sin.reshape((1,) + sin.shape)
            if self.fused:
                y = self.w_qkv(x)
                return self.split(y, y, y, self.columns, cos, sin)
            return self.split(self.wq(x), self.wk(x), self.wv(x), self.columns, cos, sin)
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
        cos, sin = as_dtype(cos, x.dtype), as_dtype(sin, x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def grouped(self, q):
        """[B, heads, S, d] -> [B, kv_heads, rep * S, d]: each KV head's queries as rows of one matmul, so
        k and v are never repeated per query head (a free reshape: head h = group * rep + r)."""
        b, _, s, d = q.shape
        return q.reshape(b, self.kv_heads, self.rep * s, d)

    def scores(self, q, k):
        """float32 q.k * scale: [B, kv, rep * S, d] x [B, kv, T, d] -> [B, kv, rep * S, T]."""
        return as_dtype(self.bmm_t(q, k) * self.scale, ms.float32)

    @staticmethod
    def masked_probs(scores, bias, dtype):
        """softmax(scores + bias) in float32, cast to dtype; bias (attention_bias) is MASKED where a query may
        not look, as transformers adds its mask, at the mask's own broadcast size ([B, 1, S, T]), so the full
        [B, heads, S, T] tensors are only the scores, their masked sum and the probabilities."""
        return softmax_f32(scores + bias, dtype)

    def output(self, out, b, s, residual=None):
        """[B, kv, rep * S, d] attention output -> wo([B, S, heads * d]) (+ residual: Linear's)."""
        d = self.head_dim
        out = out.reshape(b, self.heads, s, d).transpose(0, 2, 1, 3).reshape(b, s, self.heads * d)
        return self.wo(out, residual)

    def attend(self, q, k, v, bias, residual=None):
        """bias: attention_bias of a mask broadcastable to [B, heads, S, T]; residual: added to the output (the
        layer's stream, as DecoderLayer passes it)."""
        b, _, s, _ = q.shape
        seen = seen_bias(bias) if self.fused_ops is not None else None
        if seen is not None and q.dtype == ms.float32:
            return self.wo(self.fused_ops.attention(q, k, v, seen, self.scale_tensor), residual)
        scores = self.scores(self.grouped(q), k).reshape(b, self.heads, s, -1)
        probs = self.masked_probs(scores, bias, q.dtype).reshape(b, self.kv_heads, self.rep * s, -1)
        return self.output(self.bmm(probs, v), b, s, residual)

    def attend_cached(self, q, k, v, k_cache, v_cache, bias, residual=None):
        """Attention of the new positions (q, k, v: [B, *, 1, d]) over the cache's T slots and themselves,
        without writing the cache. k_cache [B, kv, d, T] (KVCache's layout), v_cache [B, kv, T, d]; bias:
        attention_bias of [B, 1, 1, T + 1], the cache slots a row may see, then the new position (always seen).
        One softmax over both parts, so it equals attention over the written cache. fused_ops' AttentionCached
        where it runs (float32): it reads the cache in place and skips the slots no row sees."""
        b, _, s, _ = q.shape
        t = k_cache.shape[3]
        seen = seen_bias(bias) if self.fused_ops is not None else None
        if seen is not None and q.dtype == ms.float32 and k_cache.dtype == ms.float32:
            return self.wo(self.fused_ops.attention_cached(q, k, v, k_cache, v_cache, seen, self.scale_tensor),
                           residual)
        qg = self.grouped(q)
        cached = as_dtype(self.bmm(qg, k_cache) * self.scale, ms.float32)
        scores = ops.concat((cached, self.scores(qg, k)), -1).reshape(b, self.heads, s, t + s)
        probs = self.masked_probs(scores, bias, q.dtype).reshape(b, self.kv_heads, self.rep * s, t + s)
        out = self.bmm(probs[..., :t], v_cache) + self.bmm(probs[..., t:], v)
        return self.output(out, b, s, residual)


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
        self.fused_ops = fused_ops(dtype)  # fused SiLU(gate) * up (kernels.fused_ops), or None

    def construct(self, x, residual=None):
        """w2(SiLU(gate) * up) (+ residual: Linear's)."""
        if self.fused_ops is not None and x.dtype == ms.float32:
            shape = x.shape
            if self.fused:
                act = self.fused_ops.silu_mul_pairs(self.w_gate_hidden(x).reshape(-1, 2 * self.ffn))
            else:
                act = self.fused_ops.silu_mul(self.w1(x).reshape(-1, self.ffn), self.w3(x).reshape(-1, self.ffn))
            return self.w2(act.reshape(shape[:-1] + (self.ffn,)), residual)
        if self.fused:
            y = self.w_gate_hidden(x)
            y = y.reshape(y.shape[:-1] + (self.ffn, 2))
            gate, up = y[..., 0], y[..., 1]
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(gate * ops.sigmoid(gate) * up, residual)


class DecoderLayer(nn.Cell):
    def __init__(self, tc: dict, fused: bool, dtype):
        super().__init__()
        eps = tc["rms_norm_eps"]
        self.attention_norm = RMSNorm(tc["hidden_size"], eps, dtype)
        self.attention = Attention(tc, fused, dtype)
        self.ffn_norm = RMSNorm(tc["hidden_size"], eps, dtype)
        self.feed_forward = FeedForward(tc, fused, dtype)

    def prefill(self, x, cos, sin, bias):
        q, k, v = self.attention.qkv(self.attention_norm(x), cos, sin)
        x = self.attention.attend(q, k, v, bias, residual=x)
        return self.feed_forward(self.ffn_norm(x), residual=x), k, v

    def step(self, x, cos, sin, bias, k_cache, v_cache):
        """One new position per row, attending over the cache (not written here: see KVCache). Returns the
        layer output and the new position's k and v ([B, kv, 1, d]) for the caller to store."""
        q, k, v = self.attention.qkv(self.attention_norm(x), cos, sin)
        x = self.attention.attend_cached(q, k, v, k_cache, v_cache, bias, residual=x)
        return self.feed_forward(self.ffn_norm(x), residual=x), k, v


class Embedding(nn.Cell):
    """Token embedding; a 16-bit table (KEEPS_STORED) gives its looked-up rows in the compute dtype."""

    KEEPS_STORED = ("embedding_weight",)

    def __init__(self, vocab, hidden, dtype):
        super().__init__()
        self.embedding_weight = param((vocab, hidden), dtype)
        self.compute_dtype = MS_DTYPES[dtype]

    def construct(self, ids):
        return as_dtype(ops.gather(self.embedding_weight, ids, 0), self.compute_dtype)


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
        return at_least_f32(self.lm_head(self.model.norm_out(x)))

    def prefill(self, x, positions, bias, last_only=False):
        """x: input embeddings [B, S, H]; positions [S] or [B, S] (per row); bias: attention_bias of a mask
        broadcastable to [B, heads, S, S]. Returns logits, per-layer k and v tuples ([B, kv, S, d] each), layer
        outputs.
        Tuples, not one stacked tensor: slicing a stacked cache per layer cost ~40 ms a layer on CPU, more
        than the layer's matmuls at decode time. last_only: logits of the last position only ([B, 1, V]),
        all generation needs (the full-vocab head over every prompt position costs as much as a layer)."""
        cos, sin = ops.gather(self.cos, positions, 0), ops.gather(self.sin, positions, 0)
        ks, vs, states = (), (), ()
        for layer in self.model.layers:
            x, k, v = layer.prefill(x, cos, sin, bias)
            ks, vs, states = ks + (k,), vs + (v,), states + (x,)
        logits = self.logits(x[:, -1:]) if last_only else self.logits(x)
        return logits, ks, vs, states + (self.model.norm_out(x),)

    def prefill_into(self, x, positions, bias, cache: "KVCache", on_layer=None):
        """prefill run eagerly (PyNative), each layer's k and v written into `cache` as the layer ends and
        nothing else kept, so a prompt's intermediates exist for one layer at a time; on_layer() after each.
        Returns the last position's logits [B, 1, V]."""
        cos, sin = ops.gather(self.cos, positions, 0), ops.gather(self.sin, positions, 0)
        for i, layer in enumerate(self.model.layers):
            x, k, v = layer.prefill(x, cos, sin, bias)
            cache.put(i, k, v)
            del k, v
            if on_layer is not None:
                on_layer()
        return self.logits(x[:, -1:])

    def step(self, ids, positions, bias, k_caches, v_caches):
        """One decode step: logits [B, 1, V] and the new position's k and v of every layer, stacked
        ([layers, B, kv, 1, d] each: one host transfer for all layers)."""
        cos, sin = ops.gather(self.cos, positions, 0), ops.gather(self.sin, positions, 0)
        x = self.model.tok_embeddings(ids)
        ks, vs = (), ()
        i = 0
        for layer in self.model.layers:
            x, k, v = layer.step(x, cos, sin, bias, k_caches[i], v_caches[i])
            ks, vs = ks + (k,), vs + (v,)
            i = i + 1
        return self.logits(x), ops.stack(ks), ops.stack(vs)


def _on_host(t) -> np.ndarray:
    """A MindSpore tensor's (or an array's) values as a numpy array."""
    return t.asnumpy() if hasattr(t, "asnumpy") else np.asarray(t)


class KVCache:
    """Per-layer caches in host (numpy) memory: k as [B, kv, d, T] (each slot a column, so the scores are a
    plain q @ k: MindSpore's CPU BatchMatMul took 3x as long with transpose_b over [B, kv, T, d]) and v as
    [B, kv, T, d]; handed to the step as input tensors that share that memory (Tensor.from_numpy: no copy),
    and written one slot at a time in place.

    MindSpore 2.10 graph mode on CPU offered no in-place write of a graph input, and a Parameter cache is
    written by ScatterNdUpdate, which copies the whole tensor (~17 ms per 44 MB cache, measured), so the
    slot write is done here, on the host, where it costs B * kv * d numbers per layer. This is a CPU design:
    on Ascend or GPU the host cache would be copied to the device every step."""

    def __init__(self, ks, vs, total: int):
        """ks, vs: per-layer prefill k and v ([B, kv, S, d] tensors or arrays); slots S..total-1 start at 0."""
        self.k, self.v = [], []
        for k, v in zip(ks, vs):
            k, v = _on_host(k), _on_host(v)
            b, kv, _, d = k.shape
            self.k.append(np.zeros((b, kv, d, total), dtype=k.dtype))
            self.v.append(np.zeros((b, kv, total, d), dtype=v.dtype))
            self.put(len(self.k) - 1, k, v)

    @classmethod
    def empty(cls, layers: int, shape: tuple, dtype, memory: np.ndarray | None = None) -> "KVCache":
        """A zero cache of `layers` layers for k and v of `shape` [B, kv, T, d], for a prefill to fill layer by
        layer (put): the prompt's k and v then exist once, not once as prefill outputs and again here.
        `memory`: a flat buffer of `dtype` (reserve_memory's) to carve it from, zeroed here, when it is large
        enough; else fresh arrays."""
        b, kv, t, d = shape
        cache = cls((), (), 0)
        n = b * kv * t * d
        if memory is not None and memory.dtype == np.dtype(dtype) and memory.size >= 2 * layers * n:
            parts = memory[:2 * layers * n].reshape(2, layers, n)
            parts[...] = 0
            cache.k = [parts[0, i].reshape(b, kv, d, t) for i in range(layers)]
            cache.v = [parts[1, i].reshape(b, kv, t, d) for i in range(layers)]
            return cache
        cache.k = [np.zeros((b, kv, d, t), dtype=dtype) for _ in range(layers)]
        cache.v = [np.zeros((b, kv, t, d), dtype=dtype) for _ in range(layers)]
        return cache

    @staticmethod
    def reserve_memory(layers: int, shape: tuple, dtype) -> np.ndarray:
        """A flat buffer for empty(memory=) caches up to `shape`, its pages touched now. Fresh pages cost a 7B
        prefill ~1.9 s of its ~25 s on this 24 GiB host (the prompt's k and v into 1.3 GB not touched before,
        while the page cache held both checkpoints: 31 ms a layer's k against 3 ms into touched memory); a
        generate reserves its largest batch's before the first prefill, and every batch reuses it."""
        b, kv, t, d = shape
        memory = np.empty(2 * layers * b * kv * t * d, dtype=dtype)
        memory.fill(0)
        return memory

    def put(self, i: int, k, v) -> None:
        """Layer i's prompt k and v ([B, kv, S, d]) into slots 0..S-1."""
        k, v = _on_host(k), _on_host(v)
        self.k[i][:, :, :, :k.shape[2]] = k.transpose(0, 1, 3, 2)
        self.v[i][:, :, :v.shape[2]] = v

    def tensors(self) -> tuple:
        """(k, v) tuples of tensors viewing the cache memory, for the compiled step (mutable: a plain tuple
        would be a compile-time constant)."""
        view = ms.Tensor.from_numpy
        return ms.mutable(tuple(view(a) for a in self.k)), ms.mutable(tuple(view(a) for a in self.v))

    def layer(self, i: int) -> tuple:
        """Layer i's (k [B, kv, d, T], v [B, kv, T, d]) as tensors viewing the cache."""
        return ms.Tensor.from_numpy(self.k[i]), ms.Tensor.from_numpy(self.v[i])

    def write(self, i: int, slot: int, k, v) -> None:
        """Layer i's new position ([B, kv, 1, d]) into `slot`."""
        self.k[i][:, :, :, slot] = _on_host(k)[:, :, 0]
        self.v[i][:, :, slot] = _on_host(v)[:, :, 0]

    def write_all(self, slot: int, ks, vs) -> None:
        """Every layer's new position (the step's stacked [layers, B, kv, 1, d] outputs) into `slot`."""
        ks, vs = ks.asnumpy(), vs.asnumpy()
        for i in range(len(self.k)):
            self.write(i, slot, ks[i], vs[i])
