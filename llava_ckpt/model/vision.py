"""CLIP vision tower with MindFormers LlavaVlm names (`vision_encoder.*`).

Only the layers that feed `vision_feature_layer` are built (MindFormers does the same); the last layer and
ln_post are in checkpoints but never used by LLaVA, so the loader accepts and ignores them.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from .layers import Linear, LayerNorm, param, fused_ops, quick_gelu, softmax_f32


def layers_run(cfg: dict) -> int:
    """How many resblocks produce hidden_states[vision_feature_layer] (hidden_states[0] = ln_pre output)."""
    n = cfg["vision_config"]["num_hidden_layers"]
    f = cfg["vision_feature_layer"]
    return n + f + 1 if f < 0 else f


class VisionAttention(nn.Cell):
    def __init__(self, vc: dict, dtype):
        super().__init__()
        h = vc["hidden_size"]
        self.heads = vc["num_attention_heads"]
        self.head_dim = h // self.heads
        self.scale = self.head_dim ** -0.5
        self.in_proj = Linear(3 * h, h, True, dtype)  # rows [q; k; v]
        self.out_proj = Linear(h, h, True, dtype)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.fused_ops = fused_ops(dtype)  # fused heads split and attention (kernels.fused_ops), or None
        if self.fused_ops is not None:
            d, heads = self.head_dim, self.heads
            self.split = self.fused_ops.split_heads(heads, heads, d, rope=False)
            columns = [i * d for i in range(heads)]  # in_proj's rows [q; k; v]: q heads, then k, then v
            self.columns = ms.Tensor(np.array(columns + [h + c for c in columns] + [2 * h + c for c in columns],
                                              dtype=np.int64))
            self.scale_tensor = ms.Tensor(np.array([self.scale], dtype=np.float32))

    def construct(self, x):
        b, n, h = x.shape
        if self.fused_ops is not None and x.dtype == ms.float32:
            y = self.in_proj(x)
            q, k, v = self.split(y, y, y, self.columns)
            no_mask = ops.zeros((1, n, n), ms.float32)
            return self.out_proj(self.fused_ops.attention(q, k, v, no_mask, self.scale_tensor))
        qkv = self.in_proj(x).reshape(b, n, 3, self.heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probs = softmax_f32(self.bmm_t(q, k) * self.scale, x.dtype)
        out = self.bmm(probs, v).transpose(0, 2, 1, 3).reshape(b, n, h)
        return self.out_proj(out)


class VisionMLP(nn.Cell):
    def __init__(self, vc: dict, dtype):
        super().__init__()
        self.c_fc = Linear(vc["intermediate_size"], vc["hidden_size"], True, dtype)
        self.c_proj = Linear(vc["hidden_size"], vc["intermediate_size"], True, dtype)
        self.fused_ops = fused_ops(dtype)  # fused QuickGELU (kernels.fused_ops), or None

    def construct(self, x):
        y = self.c_fc(x)
        if self.fused_ops is not None and y.dtype == ms.float32:
            return self.c_proj(self.fused_ops.quick_gelu(y.reshape(-1)).reshape(y.shape))
        return self.c_proj(quick_gelu(y))


class ResBlock(nn.Cell):
    def __init__(self, vc: dict, dtype):
        super().__init__()
        eps = vc["layer_norm_eps"]
        self.ln_1 = LayerNorm(vc["hidden_size"], eps, dtype)
        self.attn = VisionAttention(vc, dtype)
        self.ln_2 = LayerNorm(vc["hidden_size"], eps, dtype)
        self.mlp = VisionMLP(vc, dtype)

    def construct(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Cell):
    def __init__(self, vc: dict, n_layers: int, dtype):
        super().__init__()
        self.resblocks = nn.CellList([ResBlock(vc, dtype) for _ in range(n_layers)])


class PatchConv(nn.Cell):
    """Holds conv1.weight [H, C, p, p]; applied as a matmul over non-overlapping patches (same result)."""

    def __init__(self, h, c, p, dtype):
        super().__init__()
        self.weight = param((h, c, p, p), dtype)


class VisionEncoder(nn.Cell):
    """Patch embedding (conv without bias, done as a matmul over patches) + CLS + positions, ln_pre, blocks."""

    def __init__(self, cfg: dict, dtype):
        super().__init__()
        vc = cfg["vision_config"]
        h, p, c = vc["hidden_size"], vc["patch_size"], vc["num_channels"]
        self.patch, self.grid = p, vc["image_size"] // p
        self.conv1 = PatchConv(h, c, p, dtype)
        self.class_embedding = param((h,), dtype)
        self.positional_embedding = param((self.grid * self.grid + 1, h), dtype)
        self.ln_pre = LayerNorm(h, vc["layer_norm_eps"], dtype)
        self.transformer = Transformer(vc, layers_run(cfg), dtype)
        self.keep_cls = cfg["vision_feature_select_strategy"] == "full"
        self.matmul = ops.MatMul(transpose_b=True)

    def embed(self, pixels):
        b, c = pixels.shape[0], pixels.shape[1]
        g, p = self.grid, self.patch
        x = pixels.astype(self.class_embedding.dtype)
        x = x.reshape(b, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b * g * g, c * p * p)
        w = self.conv1.weight.reshape(self.conv1.weight.shape[0], -1)
        x = self.matmul(x, w).reshape(b, g * g, -1)
        cls = ops.broadcast_to(self.class_embedding.reshape(1, 1, -1), (b, 1, x.shape[-1]))
        return ops.concat((cls, x), 1) + self.positional_embedding

    def construct(self, pixels):
        """Returns (features [B, patches, H], tuple of every hidden state for diagnostics)."""
        emb = self.embed(pixels)
        x = self.ln_pre(emb)
        states = (emb, x)
        for block in self.transformer.resblocks:
            x = block(x)
            states = states + (x,)
        feats = x if self.keep_cls else x[:, 1:]
        return feats, states
