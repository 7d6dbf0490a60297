"""The MindSpore side, one module at a time: the bundled reference model's own cells (VisionEncoder's
embedding and ln_pre, ResBlock, Adapter, LlavaVlm.embed's merge, DecoderLayer.prefill / step, the norm and
lm_head of LanguageModel), each built with the model's classes, filled with that module's converted
weights only (read lazily from the converted files) and emptied after it ran.

Cells are built per step and hold only what that step loads (a parameter built but never loaded may be
filled with zeros by MindSpore: measured, 1.1 GB for the 7B's unused resblocks). The cells run eagerly (PyNative): a compiled MindSpore graph keeps a private copy of the parameter data it
was compiled with (measured: set_data after compiling does not reach the graph), so a graph could not be
reused across layers, and one compile per layer and decode step would cost more than it saves.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..errors import fail

TEXT = "language_model.model."


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
        from ..model.llama import LanguageModel
        rope = LanguageModel(dict(self.tc, num_hidden_layers=0), self.fused, self.dtype)  # RoPE tables only
        self.cos, self.sin, self.max_positions = rope.cos, rope.sin, rope.max_positions
        del rope

    def check_names(self, params: dict) -> None:
        """Every parameter of the model is in the checkpoint and nothing else is (besides LLaVA's unused
        vision tail), before any weight is read."""
        from ..model.loading import detect_fused, name_mismatch
        names = list(self.tensors.keys())
        mismatch = name_mismatch(self.cfg, params, names)
        if mismatch:
            raise fail("checkpoint does not match the LLaVA-1.5 model: " + mismatch
                       + (" (layout: " + ("fused --fuse-qkv" if detect_fused(names) else "unfused") + ")"))

    # ---- weights in and out of one cell

    def _load(self, cell, prefix: str):
        """Fill every parameter of `cell` from `prefix` + its path in the cell, cast to the compute dtype."""
        for path, p in cell.parameters_and_names():
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

    def _release(self, *cells):
        """Give a step's weights back now. Cells sit in reference cycles (only a full gc.collect, ~0.5-1 s
        with torch and transformers loaded, would free them), so each parameter's data is swapped for a
        one-element placeholder instead; the empty cells go with the next ordinary collection."""
        for cell in cells:
            for p in cell.get_parameters():
                p.set_data(self.Tensor(np.zeros((1,), self.target)), slice_shape=True)

    def _embedding(self):
        from ..model.llama import Embedding
        return self._load(Embedding(self.tc["vocab_size"], self.tc["hidden_size"], self.dtype), f"{TEXT}tok_embeddings.")

    def _language_model(self, **cells):
        """What LanguageModel's own methods read from `self`, holding only the cells a step loaded."""
        return SimpleNamespace(model=SimpleNamespace(**cells.pop("model", {})), **cells)

    # ---- vision tower and projector

    def vision_embeddings(self, pixels):
        """(patch + class + position embeddings, ln_pre of them): VisionEncoder's own embed and ln_pre; its
        resblocks stay empty here (each runs as its own step)."""
        from ..model.vision import VisionEncoder
        stem = dict(self.cfg, vision_feature_layer=0)  # the same encoder built with no resblocks
        enc = self._load(VisionEncoder(stem, self.dtype), "vision_encoder.")
        emb = enc.embed(self.Tensor(np.asarray(pixels, dtype=np.float32)))
        x = enc.ln_pre(emb)
        self._release(enc)
        return emb, x

    def vision_block(self, i: int, x):
        from ..model.vision import ResBlock
        block = self._load(ResBlock(self.cfg["vision_config"], self.dtype), f"vision_encoder.transformer.resblocks.{i}.")
        y = block(x)
        self._release(block)
        return y

    def adapter(self, x):
        from ..model.llava import Adapter
        feats = x if self.keep_cls else x[:, 1:]
        adapter = self._load(Adapter(self.cfg, self.dtype), "adapter.")
        y = adapter(feats)
        self._release(adapter)
        return y

    # ---- language model

    def merge(self, input_ids, image):
        """LlavaVlm.embed's own merge, with the vision tower and adapter already run step by step."""
        from ..model.llava import LlavaVlm
        table = self._embedding()
        model = SimpleNamespace(vision_encoder=lambda pixels: (image, ()), adapter=lambda feats: feats,
                                language_model=self._language_model(model={"tok_embeddings": table}),
                                image_token=self.image_token)
        x, _, _ = LlavaVlm.embed(model, self.Tensor(np.asarray(input_ids, dtype=np.int32)), None)
        self._release(table)
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
        self._release(layer)
        return out

    def decoder_step(self, i: int, x, cos, sin, keep, k_cache, v_cache):
        layer = self._decoder(i)
        out = layer.step(x, cos, sin, keep, k_cache, v_cache)
        self._release(layer)
        return out

    def norm_and_logits(self, x):
        """(norm_out(x), float32 logits) with LanguageModel's own logits()."""
        from ..model.layers import Linear, RMSNorm
        from ..model.llama import LanguageModel
        norm = self._load(RMSNorm(self.tc["hidden_size"], self.tc["rms_norm_eps"], self.dtype), f"{TEXT}norm_out.")
        head = self._load(Linear(self.tc["vocab_size"], self.tc["hidden_size"], False, self.dtype),
                          "language_model.lm_head.")
        lm = self._language_model(model={"norm_out": norm}, lm_head=head)
        normed = norm(x)
        logits = LanguageModel.logits(lm, x)
        self._release(norm, head)
        return normed, logits

    def token_embeddings(self, token: int):
        table = self._embedding()
        x = table(self.Tensor(np.array([[int(token)]], dtype=np.int32)))
        self._release(table)
        return x
