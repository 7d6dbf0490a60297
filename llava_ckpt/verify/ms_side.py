"""The MindSpore side, one module at a time: the bundled reference model's own cells (VisionEncoder's
embedding and ln_pre, ResBlock, Adapter, LlavaVlm.embed's merge, DecoderLayer.prefill, the norm and
lm_head of LanguageModel), each built with the model's classes, filled with that module's converted
weights only (read from the converted files into the verify's arena, weights.py, which the
next step reuses) and emptied after it ran.

Cells are built per step and hold only what that step loads (a parameter built but never loaded may be
filled with zeros by MindSpore: measured, 1.1 GB for the 7B's unused resblocks). The cells run eagerly
(PyNative): a compiled MindSpore graph keeps a private copy of the parameter data it was compiled with
(measured: set_data after compiling does not reach the graph), so a graph could not be reused across
layers, and one compile per layer would cost more than it saves.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..errors import fail
from ..io.readers import FileReader
from ..model.kernels import SMALL_ROWS
from .weights import Arena, cast_into, read_into_arena

TEXT = "language_model.model."


class MsSide:
    """The reference model's steps for one process (`rank`/`world` None: whole tensors) or for one
    tensor-parallel rank under msrun (`rank`, `world`: this rank's slices from its own rank file, in the
    parallel cells of model/parallel.py built by `layout`'s split kinds, communicating with the other ranks
    inside each step). `matmul` "bfloat16": the Linear cells are built in kernels.prefill_matmul("bfloat16"), so
    their many-row products run bf16_matmul (the caller checks that it runs here)."""

    def __init__(self, cfg: dict, tensors, dtype: str = "float32", device_target: str = "CPU",
                 arena: Arena | None = None, rank: int | None = None, world: int = 1, layout: dict | None = None,
                 matmul: str = "float32"):
        from mindspore import Tensor, ops
        from ..model.layers import NP_DTYPES
        from ..model.llava import LlavaVlm
        from ..model.loading import detect_fused, run_ops_blocking, set_device, synchronize
        from ..model.parallel import build_parallel, local_config
        set_device(device_target)
        if device_target == "CPU":
            run_ops_blocking()  # the walk is eager: see model/loading.py
        self.Tensor, self.ops, self.synchronize = Tensor, ops, synchronize
        self.arena = Arena() if arena is None else arena
        self.reader = FileReader()
        self.infos = getattr(tensors, "infos", None)  # a single file: read straight into the arena
        self.cfg, self.tensors, self.dtype = cfg, tensors, dtype
        from ..model.kernels import check_prefill_mode, prefill_matmul
        check_prefill_mode(matmul)
        self.matmul, self._mode = matmul, prefill_matmul
        self.rank, self.world, self.layout = rank, int(world), layout
        if rank is not None and layout is None:
            raise fail("a tensor-parallel rank needs the checkpoint's split layout")
        self.target = NP_DTYPES[dtype]
        self.fused = detect_fused(tensors.keys())
        # lazy parameters: names and shapes, no memory
        whole = (LlavaVlm(cfg, dtype=dtype, fused=self.fused) if rank is None
                 else build_parallel(cfg, rank, self.world, self.fused, layout, dtype))
        self.check_names({p.name: tuple(p.shape) for p in whole.get_parameters()})
        self.image_token = whole.image_token
        del whole
        self.tc = (cfg if rank is None else local_config(cfg, self.world))["text_config"]  # this rank's sizes
        self.keep_cls = cfg["vision_feature_select_strategy"] == "full"
        from ..model.anyres import is_anyres
        self.anyres = is_anyres(cfg)
        from ..model.llama import LanguageModel
        rope = LanguageModel(dict(self.tc, num_hidden_layers=0), self.fused, self.dtype)  # RoPE tables only
        self.cos, self.sin, self.max_positions = rope.cos, rope.sin, rope.max_positions
        del rope

    def check_names(self, params: dict) -> None:
        """Every parameter of the model is in the checkpoint and nothing else is (besides LLaVA's unused
        vision tail), before any weight is read."""
        from ..engine.config import model_title
        from ..model.loading import detect_fused, name_mismatch
        names = list(self.tensors.keys())
        mismatch = name_mismatch(self.cfg, params, names)
        if mismatch:
            raise fail(f"checkpoint does not match the {model_title(self.cfg)} model: " + mismatch
                       + (" (layout: " + ("fused --fuse-qkv" if detect_fused(names) else "unfused") + ")"))

    # ---- weights in and out of one cell

    def _begin(self):
        """A new step: MindSpore has finished the last one (its ops may run asynchronously), so the arena's
        buffers can be handed out again."""
        self.synchronize()
        self.arena.reset()

    def _load(self, cell, prefix: str, step: bool = False):
        """Fill every parameter of `cell` from `prefix` + its path in the cell, cast to the compute dtype, in
        the arena (call _begin first). A Linear's 16-bit weight is instead a map of its file, as generate holds
        it, in the bfloat16 mode and for a decode `step` under float32 compute: bf16_matmul rounds it to
        bfloat16 as it packs it, and a step's small_matmul widens it in registers (the same sums as from a
        float32 copy), so the cast into the arena is left out (~40 ms a 7B decoder layer, on every layer of
        every greedy token)."""
        from ..model.layers import Linear, stored_dtype_owners
        from ..model.loading import put_stored
        owners = {}
        if (self.matmul == "bfloat16" or step) and self.dtype == "float32" and self.infos is not None:
            # Linears only (a bfloat16 Gather has no CPU kernel)
            owners = {n: o for n, o in stored_dtype_owners(cell).items() if isinstance(o[0], Linear)}
        for path, p in cell.parameters_and_names():
            name = prefix + path
            mapped = self._mapped(name, tuple(p.shape)) if p.name in owners else None
            if mapped is not None:
                put_stored(*owners[p.name], mapped)
            else:
                p.set_data(self.Tensor.from_numpy(self._weight(name, tuple(p.shape))))
        return cell

    def _mapped(self, name: str, shape: tuple):
        """The 16-bit stored tensor `name` as a map of its file, or None (another dtype, not one run of bytes)."""
        stored = self.infos[name]
        if tuple(stored.shape) != shape or stored.dtype not in ("F16", "BF16"):
            return None
        return self.reader.mapped(stored)

    def _weight(self, name: str, shape: tuple) -> np.ndarray:
        stored = self.infos[name] if self.infos is not None else self.tensors[name]  # header only, or the data
        if tuple(stored.shape) != shape:
            raise fail(f"{name}: checkpoint shape {tuple(stored.shape)}, the config needs {shape}")
        if self.infos is not None:
            return read_into_arena(self.arena, self.reader, stored, self.target)
        if stored.dtype.kind not in "fV" and str(stored.dtype) != "bfloat16":
            raise fail(f"{name}: dtype {stored.dtype} is not a float type")
        return cast_into(self.arena.take(shape, self.target), stored)

    def _release(self, *cells):
        """Give a step's weights back now. Cells sit in reference cycles (only a full gc.collect, ~0.5-1 s
        with torch and transformers loaded, would free them), so each parameter's data is swapped for a
        one-element placeholder instead; the empty cells go with the next ordinary collection."""
        for cell in cells:
            for p in cell.get_parameters():
                p.set_data(self.ops.zeros((1,), p.dtype), slice_shape=True)  # a map held: its own dtype

    # ---- the cells a step builds: the plain ones, or this rank's parallel ones

    def _cells(self):
        """Where a step builds its cells: in the matmul mode asked for."""
        return self._mode(self.matmul)

    def _embedding_cell(self):
        from ..model.llama import Embedding
        return self._rank(Embedding(self.tc["vocab_size"], self.tc["hidden_size"], self.dtype),
                          f"{TEXT}tok_embeddings.embedding_weight")

    def _head_cell(self):
        from ..model.layers import Linear
        with self._cells():
            return self._rank(Linear(self.tc["vocab_size"], self.tc["hidden_size"], False, self.dtype),
                              "language_model.lm_head.weight")

    def _decoder_cell(self, i: int):
        from ..model.llama import DecoderLayer
        with self._cells():
            return self._parallel(DecoderLayer(self.tc, self.fused, self.dtype), f"{TEXT}layers.{i}.")

    def _adapter_cell(self):
        from ..model.llava import Adapter
        with self._cells():
            return self._parallel(Adapter(self.cfg, self.dtype), "adapter.")

    def _rank(self, cell, weight: str):
        """A lone Embedding / Linear as this rank holds it (itself in one process)."""
        from ..model.parallel import rank_cell
        return cell if self.rank is None else rank_cell(cell, weight, self.layout, self.rank, self.world, self.dtype)

    def _parallel(self, cell, prefix: str):
        """A cell with its Linears as this rank holds them (itself in one process)."""
        from ..model.parallel import parallelize
        return cell if self.rank is None else parallelize(cell, prefix, self.layout, self.rank, self.world,
                                                          self.dtype)

    def _language_model(self, **cells):
        """What LanguageModel's own methods read from `self`, holding only the cells a step loaded."""
        return SimpleNamespace(model=SimpleNamespace(**cells.pop("model", {})), **cells)

    # ---- vision tower and projector

    def vision_embeddings(self, pixels, image_sizes=None):
        """(patch + class + position embeddings, ln_pre of them): VisionEncoder's own embed and ln_pre over the
        tower's inputs (anyres.tower_inputs: LLaVA-NeXT's patches of each image); its resblocks stay empty here
        (each runs as its own step)."""
        from ..model.anyres import tower_inputs
        from ..model.vision import VisionEncoder
        self._begin()
        stem = dict(self.cfg, vision_feature_layer=0)  # the same encoder built with no resblocks
        enc = self._load(VisionEncoder(stem, self.dtype), "vision_encoder.")
        emb = enc.embed(self.Tensor(tower_inputs(self.cfg, pixels, image_sizes)[0]))
        x = enc.ln_pre(emb)
        self._release(enc)
        return emb, x

    def ln_pre(self, x):
        """VisionEncoder's ln_pre alone, on given embeddings (drift.py reruns it on transformers' input)."""
        from ..model.layers import LayerNorm
        self._begin()
        vc = self.cfg["vision_config"]
        norm = self._load(LayerNorm(vc["hidden_size"], vc["layer_norm_eps"], self.dtype), "vision_encoder.ln_pre.")
        y = norm(x)
        self._release(norm)
        return y

    def vision_block(self, i: int, x):
        from ..model.vision import ResBlock
        self._begin()
        with self._cells():
            block = ResBlock(self.cfg["vision_config"], self.dtype)
        block = self._load(block, f"vision_encoder.transformer.resblocks.{i}.")
        y = block(x)
        self._release(block)
        return y

    def adapter(self, x):
        self._begin()
        feats = x if self.keep_cls else x[:, 1:]
        adapter = self._load(self._adapter_cell(), "adapter.")
        y = adapter(feats)
        self._release(adapter)
        return y

    # ---- language model

    def pack(self, image, image_sizes):
        """LLaVA-NeXT: LlavaVlm.pack, the adapter's features [N, T, H] in its anyres packing with image_newline
        (model/anyres.py): [K, H]. (LLaVA-1.5's merge takes the adapter's output as it is.)"""
        from ..model.anyres import image_index
        from ..model.llava import LlavaVlm
        self._begin()
        index = self.Tensor(image_index(self.cfg, len(np.asarray(image_sizes)), image_sizes))
        newline = self.Tensor.from_numpy(self._weight("image_newline", (self.cfg["text_config"]["hidden_size"],)))
        return LlavaVlm.pack(SimpleNamespace(anyres=True, image_newline=newline), image, index)

    def merge(self, input_ids, packed):
        """LlavaVlm.place: the token embeddings with the image features (the adapter's output, or LLaVA-NeXT's
        packing of it) written at the image tokens."""
        from ..model.llava import LlavaVlm
        self._begin()
        table = self._load(self._embedding_cell(), f"{TEXT}tok_embeddings.")
        model = SimpleNamespace(language_model=self._language_model(model={"tok_embeddings": table}),
                                image_token=self.image_token)
        x = LlavaVlm.place(model, self.Tensor(np.asarray(input_ids, dtype=np.int32)), packed)
        self._release(table)
        return x

    def token_embeddings(self, tokens: list):
        """[1, len(tokens), H]. In one process: the Embedding cell over just these tokens' rows of
        tok_embeddings (the rows it would gather from the whole table), so a few generated tokens do not
        read 131M entries; a rank looks them up in its vocabulary slice with the others (AllReduce)."""
        from ..model.llama import Embedding
        self._begin()
        name = f"{TEXT}tok_embeddings.embedding_weight"
        vocab, hidden = self.cfg["text_config"]["vocab_size"], self.tc["hidden_size"]
        if any(not 0 <= t < vocab for t in tokens):
            raise fail(f"a token of {tokens} is outside the vocabulary ({vocab})")
        if self.rank is not None:
            table = self._load(self._embedding_cell(), f"{TEXT}tok_embeddings.")
            x = table(self.Tensor(np.asarray(tokens, dtype=np.int32)[None]))
            self._release(table)
            return x
        if self.infos is not None:
            rows = [self.reader.read_rows(self.infos[name], t, t + 1) for t in tokens]
        else:
            table = self.tensors[name]
            rows = [table[t:t + 1] for t in tokens]
        cell = Embedding(len(tokens), hidden, self.dtype)
        cell.embedding_weight.set_data(self.Tensor.from_numpy(cast_into(self.arena.take((len(tokens), hidden),
                                                                                        self.target),
                                                                        np.concatenate(rows))))
        x = cell(self.Tensor(np.arange(len(tokens), dtype=np.int32)[None]))
        self._release(cell)
        return x

    def rope(self, positions):
        pos = self.Tensor(np.asarray(positions, dtype=np.int32))
        return self.ops.gather(self.cos, pos, 0), self.ops.gather(self.sin, pos, 0)

    def decoder_prefill(self, i: int, x, cos, sin, bias):
        """DecoderLayer.prefill of layer i: (output, k, v)."""
        self._begin()
        layer = self._load(self._decoder_cell(i), f"{TEXT}layers.{i}.")
        after = f"{TEXT}layers.{i + 1}."  # read while this one runs (a single file's; others read as they go)
        self.reader.prefetch(info for name, info in (self.infos or {}).items() if name.startswith(after))
        out = layer.prefill(x, cos, sin, bias)
        self._release(layer)
        return out

    def decoder_step(self, i: int, x, cos, sin, bias, k_cache, v_cache):
        """DecoderLayer.step of layer i (one new position attending over the KV cache and itself): (output,
        the new position's k, v) for the caller to write into the cache (model.llama.KVCache)."""
        self._begin()
        rows = x.shape[0] * x.shape[1]
        layer = self._load(self._decoder_cell(i), f"{TEXT}layers.{i}.", step=rows <= SMALL_ROWS[1])
        out = layer.step(x, cos, sin, bias, k_cache, v_cache)
        self.synchronize()  # done reading the cache before the caller writes the new slot into it
        self._release(layer)
        return out

    def norm_and_logits(self, x):
        """(norm_out(x), float32 logits) with LanguageModel's own logits()."""
        from ..model.layers import RMSNorm
        from ..model.llama import LanguageModel
        self._begin()
        norm = self._load(RMSNorm(self.tc["hidden_size"], self.tc["rms_norm_eps"], self.dtype), f"{TEXT}norm_out.")
        head = self._load(self._head_cell(), "language_model.lm_head.")
        lm = self._language_model(model={"norm_out": norm}, lm_head=head)
        normed = norm(x)
        logits = LanguageModel.logits(lm, x)
        self._release(norm, head)
        return normed, logits

    def close(self):
        self.synchronize()
        self.reader.close()
