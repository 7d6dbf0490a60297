"""The transformers side, one module at a time: transformers' own classes (CLIPVisionEmbeddings,
CLIPEncoderLayer, LlavaMultiModalProjector or LLaVA-NeXT's with its pack_image_features, the text model's
decoder layer, RMSNorm, rotary embedding and causal mask (Llama's, or Mistral's for bakLlava: TEXT_CLASSES),
LlavaModel's placeholder mask) built from the checkpoint's config, each filled with its own
weights read lazily from the source safetensors (per tensor) and freed after it ran. Nothing here
re-implements transformers' math; only the order of calls (LlavaModel.forward's) is spelled out.

Weights are float32 (rounded through `round_to` first: the dtypes the converted checkpoint or the reference
model's compute narrows them to, so both sides compute on the same numbers), read into the verify's arena
(weights.read_into_arena: pread, or a cast from a map of the file), which the next module reuses; float64
for drift.py's rerun of one module. The next decoder layer's bytes are asked of the page cache while one runs.

With matmul="bfloat16" (verify --dtype bfloat16, where the reference model's Linear cells run bf16_matmul) every
nn.Linear's weight is held in bfloat16 (rounded to nearest even after the storage rounding, as the kernel rounds
it) and F.linear runs as torch's bfloat16 GEMM on the input rounded to bfloat16, its output widened back to
float32 before the float32 bias is added (bf16_linear). Everything else (norms, attention, activations, the
residual stream) stays float32 on both sides. torch's GEMM sums in float32 too but rounds its output to bfloat16,
which the kernel does not: that rounding, one per product, is what the bfloat16 tolerance covers.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np

from ..errors import fail
from ..io.dtypes import dtype_name
from ..io.readers import FileReader
from ..model.anyres import is_anyres
from .weights import Arena, as_torch, cast_into, read_into_arena

VISION = "vision_tower.vision_model."
TEXT = "language_model.model."
# transformers' own text-model classes, by the text config's model_type: (module, decoder layer, RMSNorm,
# rotary embedding, the causal-mask function its model uses)
TEXT_CLASSES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaDecoderLayer", "LlamaRMSNorm", "LlamaRotaryEmbedding",
              "create_causal_mask"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralDecoderLayer", "MistralRMSNorm",
                "MistralRotaryEmbedding", "create_sliding_window_causal_mask"),
}


def text_classes(model_type: str) -> SimpleNamespace:
    """transformers' decoder layer, RMSNorm, rotary embedding and causal-mask function for a text model."""
    import importlib
    if model_type not in TEXT_CLASSES:
        raise fail(f"verify knows transformers' text models {', '.join(TEXT_CLASSES)}, not {model_type!r}")
    module, layer, norm, rotary, mask = TEXT_CLASSES[model_type]
    m = importlib.import_module(module)
    masks = importlib.import_module("transformers.masking_utils")
    return SimpleNamespace(layer=getattr(m, layer), norm=getattr(m, norm), rotary=getattr(m, rotary),
                           mask=getattr(masks, mask), causal=masks.create_causal_mask)


class HfSide:
    def __init__(self, hf_src: str, cfg: dict, round_to: list, arena: Arena | None = None, compute: str = "float32",
                 matmul: str = "float32"):
        import torch
        from transformers import AutoConfig
        from ..io.hf_folder import read_tensors
        from ..engine.mapping import detect_layout, plan, table_for, to_canonical
        self.torch = torch
        self.config = AutoConfig.from_pretrained(hf_src)  # LlavaConfig, or LlavaNextConfig
        self.text, self.vision = self.config.text_config, self.config.vision_config
        for c in (self.config, self.text, self.vision):  # the attention transformers' verify used before: eager
            c._attn_implementation = "eager"
        tensors, _ = read_tensors(hf_src)
        table = table_for(cfg)
        expected = {s for t in plan(table, cfg, {}) for s in t.sources}
        layout = table["layouts"][detect_layout(table, tensors, expected)]
        self.where = {to_canonical(n, layout): info for n, info in tensors.items()}
        self.round_to = [getattr(torch, d) for d in round_to]
        self.compute = np.dtype(compute)  # the weights' dtype: float32, or float64 for a rerun (drift.py)
        from ..model.kernels import check_prefill_mode
        check_prefill_mode(matmul)
        self.matmul = matmul  # "bfloat16": nn.Linear weights in bfloat16, F.linear through bf16_linear
        self.arena = Arena() if arena is None else arena
        self.reader = FileReader()
        self.image_token = int(cfg["image_token_index"])
        self.keep_cls = cfg["vision_feature_select_strategy"] == "full"
        self.anyres = is_anyres(cfg)
        module = "llava_next" if self.anyres else "llava"
        import importlib
        self.llava = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        self.classes = text_classes(self.text.model_type)

    # ---- weights

    def _info(self, name: str):
        if name not in self.where:
            raise fail(f"the transformers checkpoint has no tensor {name!r} (hub spelling)")
        return self.where[name]

    def _read(self, names: list, narrow: set = frozenset()) -> dict:
        """canonical name -> float32 (self.compute) tensor, rounded, in the arena (no file stays mapped); the names
        in `narrow` in bfloat16 (after the same rounding)."""
        infos = {name: self._info(name) for name in names}
        return {name: self._bfloat16(info) if name in narrow else
                self._rounded(info, read_into_arena(self.arena, self.reader, info, self.compute))
                for name, info in infos.items()}

    def _bfloat16(self, info):
        """One weight in bfloat16: cast straight from its stored bytes where the storage rounding leaves them
        as they are (one rounding either way), else through float32 and the rounding first."""
        from ..io.dtypes import numpy_dtype
        bf16 = numpy_dtype("BF16")
        stored = dtype_name(info.dtype)
        if not self.round_to or (len(self.round_to) == 1 and self.round_to[0] == getattr(self.torch, stored)):
            return as_torch(read_into_arena(self.arena, self.reader, info, bf16))
        wide = self._rounded(info, read_into_arena(self.arena, self.reader, info, np.float32)).numpy()
        return as_torch(cast_into(self.arena.take(tuple(info.shape), bf16), wide))

    def _rounded(self, info, a: np.ndarray):
        """`a` (float32, read from `info`) rounded in place through self.round_to."""
        t = as_torch(a)
        for i, d in enumerate(self.round_to):
            if not (i == 0 and d == getattr(self.torch, dtype_name(info.dtype))):  # values stored in d are d's already
                t.copy_(t.to(d))
        return t

    def _module(self, make, prefix: str, meta: bool = True):
        """transformers' module from `make()`, its state filled from `prefix` + its own state_dict keys."""
        torch = self.torch
        if meta:  # no memory and no random init: every parameter is assigned from the checkpoint
            with torch.device("meta"):
                module = make()
        else:  # modules with non-persistent buffers (position ids) are built for real; they are small
            module = make()
        keys = list(module.state_dict().keys())
        narrow = set()
        if self.matmul == "bfloat16":  # the Linears' weights, which bf16_linear multiplies in bfloat16
            narrow = {prefix + (f"{n}." if n else "") + "weight" for n, m in module.named_modules()
                      if isinstance(m, self.torch.nn.Linear)}
        self.arena.reset()  # the module before this one has run and is gone
        state = self._read([prefix + k for k in keys], narrow)
        module.load_state_dict({k: state[prefix + k] for k in keys}, strict=True, assign=True)
        return module.eval()

    def _computing(self):
        """No autograd, and with matmul="bfloat16" F.linear through bf16_linear."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.torch.no_grad())
        if self.matmul == "bfloat16":
            stack.enter_context(bf16_linear())
        return stack

    # ---- vision tower and projector

    def vision_embeddings(self, pixels, image_sizes=None):
        """CLIPVisionEmbeddings over the images (LLaVA-NeXT: over each image's own patches, taken as
        LlavaNextModel.get_image_features takes them)."""
        from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
        pixels = self.torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        if self.anyres:
            counts = self._patch_counts(image_sizes)
            pixels = self.torch.cat([p[:n] for p, n in zip(pixels, counts)])
        emb = self._module(lambda: CLIPVisionEmbeddings(self.vision), VISION + "embeddings.", meta=False)
        with self._computing():
            return emb(pixels)

    def _patch_counts(self, image_sizes) -> list:
        return [self.llava.image_size_to_num_patches(image_size=[int(v) for v in size],
                                                     grid_pinpoints=self.config.image_grid_pinpoints,
                                                     patch_size=self.vision.image_size)
                for size in np.asarray(image_sizes)]

    def ln_pre(self, x):
        norm = self._module(lambda: self.torch.nn.LayerNorm(self.vision.hidden_size, eps=self.vision.layer_norm_eps),
                            VISION + "pre_layrnorm.")
        with self._computing():
            return norm(x)

    def vision_block(self, i: int, x):
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer
        block = self._module(lambda: CLIPEncoderLayer(self.vision), f"{VISION}encoder.layers.{i}.")
        with self._computing():
            return block(x, None)

    def projector(self, x):
        """LlavaModel.get_image_features' selection ('default' drops CLS), then the projector (LLaVA-NeXT's own)."""
        cls = self.llava.LlavaNextMultiModalProjector if self.anyres else self.llava.LlavaMultiModalProjector
        proj = self._module(lambda: cls(self.config), "multi_modal_projector.")
        with self._computing():
            return proj(x if self.keep_cls else x[:, 1:])

    def pack(self, image, image_sizes):
        """LLaVA-NeXT: LlavaNextModel.pack_image_features on the projected features of each image's patches
        (split as get_image_features splits them), with image_newline from the checkpoint: [K, H]."""
        torch = self.torch
        self.arena.reset()
        newline = self._read(["image_newline"])["image_newline"]
        parts = torch.split(image, self._patch_counts(image_sizes), dim=0)
        with self._computing():
            packed, _ = self.llava.LlavaNextModel.pack_image_features(
                SimpleNamespace(config=self.config), parts, torch.from_numpy(np.asarray(image_sizes)),
                vision_feature_select_strategy=self.config.vision_feature_select_strategy, image_newline=newline)
            return torch.cat(packed, dim=0)

    # ---- language model

    def _embed(self, ids):
        torch = self.torch
        table = self._module(lambda: torch.nn.Embedding(self.text.vocab_size, self.text.hidden_size),
                             TEXT + "embed_tokens.")
        with self._computing():
            return table(ids)

    def merge(self, input_ids, image):
        """Token embeddings with the image features scattered in (LlavaModel.forward's own two calls; LLaVA-NeXT's
        with its packed features)."""
        model = self.llava.LlavaNextModel if self.anyres else self.llava.LlavaModel
        ids = self.torch.from_numpy(input_ids)
        embeds = self._embed(ids)
        features = image.reshape(-1, image.shape[-1]).to(embeds.dtype)
        mask = model.get_placeholder_mask(SimpleNamespace(config=self.config), ids, inputs_embeds=embeds,
                                          image_features=features)
        return embeds.masked_scatter(mask, features)

    def begin(self, x):
        """Rotary embeddings and causal mask for `x` [1, S, H] from position 0, as LlamaModel makes them for a
        forward with no KV cache (nothing here decodes after a forward: the reference model's tokens come in
        with the prompt)."""
        torch = self.torch
        positions = torch.arange(x.shape[1]).unsqueeze(0)
        rotary = self.classes.rotary(config=self.text)
        with self._computing():
            pe = rotary(x, position_ids=positions)
            # MistralModel's choice: the sliding-window mask only when the config sets a window
            make = self.classes.mask if getattr(self.text, "sliding_window", None) is not None else self.classes.causal
            mask = make(config=self.text, inputs_embeds=x,
                        attention_mask=torch.ones((1, x.shape[1]), dtype=torch.long), cache=None,
                        position_ids=positions)
        return {"position_embeddings": pe, "attention_mask": mask, "position_ids": positions}

    def decoder_layer(self, i: int, x, ctx: dict):
        layer = self._module(lambda: self.classes.layer(self.text, i), f"{TEXT}layers.{i}.")
        if i + 1 < self.text.num_hidden_layers:  # the next layer read while this one runs
            after = f"{TEXT}layers.{i + 1}."
            self.reader.prefetch(info for name, info in self.where.items() if name.startswith(after))
        with self._computing():
            return layer(x, attention_mask=ctx["attention_mask"], position_ids=ctx["position_ids"], cache=None,
                         use_cache=False, position_embeddings=ctx["position_embeddings"])

    def norm(self, x):
        norm = self._module(lambda: self.classes.norm(self.text.hidden_size, eps=self.text.rms_norm_eps),
                            TEXT + "norm.")
        with self._computing():
            return norm(x)

    def lm_head(self, x):
        torch = self.torch
        head = self._module(lambda: torch.nn.Linear(self.text.hidden_size, self.text.vocab_size, bias=False),
                            "language_model.lm_head.")
        with self._computing():
            return head(x)

    def token_embeddings(self, token: int):
        """The embedding of one generated token: its row of embed_tokens alone (8 KB, not the 131M-entry
        table), looked up by torch's Embedding as the whole table would be."""
        torch = self.torch
        info = self._info(TEXT + "embed_tokens.weight")
        if not 0 <= int(token) < info.shape[0]:
            raise fail(f"token {token} is outside the vocabulary ({info.shape[0]})")
        row = self.reader.read_rows(info, int(token), int(token) + 1)
        weight = self._rounded(info, cast_into(np.empty(row.shape, np.float32), row))
        with self._computing():
            return torch.nn.functional.embedding(torch.zeros((1, 1), dtype=torch.long), weight)

    def close(self):
        self.reader.close()


def bf16_linear():
    """A torch function mode in which F.linear with a bfloat16 weight and a float32 input runs as torch's
    bfloat16 GEMM on the input rounded to bfloat16 (float32 sums, output rounded to bfloat16), widened back to
    float32, then the bias added in float32. Any other call runs as it is."""
    import torch
    from torch.overrides import TorchFunctionMode
    F = torch.nn.functional

    class Bf16Linear(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.linear:
                x, w = args[0], args[1]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                if w.dtype == torch.bfloat16 and x.dtype == torch.float32:
                    y = F.linear(x.to(torch.bfloat16), w).to(torch.float32)
                    return y if bias is None else y + bias
            return func(*args, **kwargs)

    return Bf16Linear()


def to_numpy(t):
    import torch
    return t.detach().to(torch.float32).numpy()
