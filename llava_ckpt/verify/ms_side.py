"""The MindSpore side, one module at a time: the bundled reference model's own cells (VisionEncoder's
embedding and ln_pre, ResBlock, Adapter, LlavaVlm.embed's merge, DecoderLayer.prefill / step, the norm and
lm_head of LanguageModel), each built with the model's classes, filled with that module's converted
weights only (read lazily from the converted files) and emptied after it ran.

The cells run eagerly (PyNative): a compiled MindSpore graph keeps a private copy of the parameter data it
was compiled with (measured: set_data after compiling does not reach the graph), so a graph could not be
reused across layers, and one compile per layer and decode step would cost more than it saves.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..errors import fail

TEXT = "language_model.model."


def _short(names, limit=6) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class MsSide:
    def __init__(self, cfg: dict, tensors, dtype: str = "float32", device_target: str = "CPU"):
        from mindspore import Tensor, ops
        from ..model.layers import NP_DTYPES
        from ..model.llava import LlavaVlm
        from ..model.loading import detect_fused, set_device
        set_device(device_target)
        self.Tensor, self.ops = Tensor, ops
        self.cfg, self.tensors, self.dtype = cfg, tensors, dtype
        self.target = NP_DTYPES[dtype]
        self.fused = detect_fused(tensors.keys())
        whole = LlavaVlm(cfg, dtype=dtype, fused=self.fused)  # lazy parameters: names and shapes, no memory
        self.check_names({p.name: tuple(p.shape) for p in whole.get_parameters()})
        self.image_token = whole.image_token
        del whole
        self.tc = cfg["text_config"]
        self.keep_cls = cfg["vision_feature_select_strategy"] == "full"
        self.head = self._head()
        self.cos, self.sin = self.head.cos, self.head.sin
        self.max_positions = self.head.max_positions

    def check_names(self, params: dict) -> None:
        """Every parameter of the model is in the checkpoint and nothing else is (besides LLaVA's unused
        vision tail), before any weight is read."""
        from ..model.loading import detect_fused, ignored_names
        names = list(self.tensors.keys())
        skip = set(ignored_names(self.cfg, names))
        missing = [n for n in params if n not in self.tensors]
        unexpected = [n for n in names if n not in params and n not in skip]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)}: {_short(missing)}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
            raise fail("checkpoint does not match the LLaVA-1.5 model: " + "; ".join(parts)
                       + (" (layout: " + ("fused --fuse-qkv" if detect_fused(names) else "unfused") + ")"))

    # ---- weights in and out of one cell

    def _load(self, cell, prefix: str, only: str = "", skip: str | None = None):
        """Fill `cell`'s parameters (those whose path starts with `only`, not with `skip`) from `prefix` +
        their path in the cell, cast to the compute dtype."""
        for path, p in cell.parameters_and_names():
            if not path.startswith(only) or (skip and path.startswith(skip)):
                continue
            name = prefix + path
            value = self.tensors[name]
            if tuple(value.shape) != tuple(p.shape):
                raise fail(f"{name}: checkpoint shape {tuple(value.shape)}, the config needs {tuple(p.shape)}")
            if value.dtype.kind not in "fV" and str(value.dtype) != "bfloat16":
                raise fail(f"{name}: dtype {value.dtype} is not a float type")
            p.set_data(self._tensor(value))
            del value
        return cell

    def _tensor(self, value):
        """A MindSpore tensor of the compute dtype sharing one fresh buffer: torch casts (vectorized, ~6x
        numpy's float16 -> float32 on this CPU) and Tensor.from_numpy does not copy again."""
        import torch
        a = np.ascontiguousarray(np.asarray(value))
        if str(a.dtype) == "bfloat16":  # ml_dtypes' bfloat16: torch reads it through its bits
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        out = t.to(getattr(torch, self.dtype)).numpy()
        if out.ctypes.data == a.ctypes.data:  # already the compute dtype: the buffer is ours to share
            out = np.array(out) if not a.flags.writeable else out
        return self.Tensor.from_numpy(out)

    @staticmethod
    def _free(cell):
        """Give the parameters' memory back (lazy zero initializers again)."""
        from mindspore.common.initializer import initializer
        for p in cell.get_parameters():
            if not p.has_init:
                p.set_data(initializer("zeros", p.shape, p.dtype))

    def _head(self):
        """LanguageModel without decoder layers: tok_embeddings, norm_out, lm_head, RoPE tables."""
        from ..model.llama import LanguageModel
        return LanguageModel(dict(self.tc, num_hidden_layers=0), self.fused, self.dtype)

    # ---- vision tower and projector

    def vision_embeddings(self, pixels):
        """(patch + class + position embeddings, ln_pre of them): VisionEncoder's own embed and ln_pre; its
        resblocks stay empty here (each runs as its own step)."""
        from ..model.vision import VisionEncoder
        enc = self._load(VisionEncoder(self.cfg, self.dtype), "vision_encoder.", skip="transformer.")
        emb = enc.embed(self.Tensor(np.asarray(pixels, dtype=np.float32)))
        x = enc.ln_pre(emb)
        self._free(enc)
        return emb, x

    def vision_block(self, i: int, x):
        from ..model.vision import ResBlock
        block = self._load(ResBlock(self.cfg["vision_config"], self.dtype), f"vision_encoder.transformer.resblocks.{i}.")
        y = block(x)
        self._free(block)
        return y

    def adapter(self, x):
        from ..model.llava import Adapter
        feats = x if self.keep_cls else x[:, 1:]
        adapter = self._load(Adapter(self.cfg, self.dtype), "adapter.")
        y = adapter(feats)
        self._free(adapter)
        return y

    # ---- language model

    def merge(self, input_ids, image):
        """LlavaVlm.embed's own merge, with the vision tower and adapter already run step by step."""
        from ..model.llava import LlavaVlm
        self._load(self.head, "language_model.", only="model.tok_embeddings.")
        model = SimpleNamespace(vision_encoder=lambda pixels: (image, ()), adapter=lambda feats: feats,
                                language_model=self.head, image_token=self.image_token)
        x, _, _ = LlavaVlm.embed(model, self.Tensor(np.asarray(input_ids, dtype=np.int32)), None)
        self._free(self.head)
        return x

    def rope(self, positions):
        pos = self.Tensor(np.asarray(positions, dtype=np.int32))
        return self.ops.gather(self.cos, pos, 0), self.ops.gather(self.sin, pos, 0)

    def _decoder(self, i: int):
        from ..model.llama import DecoderLayer
        return self._load(DecoderLayer(self.tc, self.fused, self.dtype), f"{TEXT}layers.{i}.")

    def decoder_prefill(self, i: int, x, cos, sin, keep):
        layer = self._decoder(i)
        out = layer.prefill(x, cos, sin, keep)
        self._free(layer)
        return out

    def decoder_step(self, i: int, x, cos, sin, keep, slot, k_cache, v_cache):
        layer = self._decoder(i)
        out = layer.step(x, cos, sin, keep, slot, k_cache, v_cache)
        self._free(layer)
        return out

    def norm_and_logits(self, x):
        """(norm_out(x), float32 logits) with LanguageModel's own logits()."""
        self._load(self.head, "language_model.", only="model.norm_out.")
        self._load(self.head, "language_model.", only="lm_head.")
        normed = self.head.model.norm_out(x)
        logits = self.head.logits(x)
        self._free(self.head)
        return normed, logits

    def token_embeddings(self, token: int):
        self._load(self.head, "language_model.", only="model.tok_embeddings.")
        x = self.head.model.tok_embeddings(self.Tensor(np.array([[int(token)]], dtype=np.int32)))
        self._free(self.head)
        return x
