"""The inputs both sides get: the source's own processor (tokenizer, chat template, image processor) on the
image and prompt, and the end-of-sequence tokens greedy decoding stops at.

The bundled image (assets/default_image.png, a house, a tree and the sun) was drawn with pillow.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import fail

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_IMAGE = os.path.join(ASSETS, "default_image.png")
DEFAULT_PROMPT = "Describe this image in one sentence."


def resolve_source(hf_src: str) -> str:
    """A checkpoint folder as given, or a hub repo id downloaded first."""
    if os.path.isdir(hf_src):
        return hf_src
    from ..hub import is_repo_id, download
    if not is_repo_id(hf_src):
        raise fail(f"{hf_src} is neither a checkpoint folder nor a hub repo id")
    return download(hf_src, progress=False)["path"]


def build_inputs(hf_src: str, image: str | None, prompt: str | None) -> dict:
    """Tokenized prompt and pixels from the checkpoint's own processor (real tokenizer and chat template)."""
    from PIL import Image
    from transformers import AutoProcessor
    path = image or DEFAULT_IMAGE
    try:
        with Image.open(path) as im:
            picture = im.convert("RGB")
    except FileNotFoundError:
        raise fail(f"image {path} does not exist") from None
    except OSError as exc:
        raise fail(f"cannot read image {path}: {exc}") from None
    try:
        processor = AutoProcessor.from_pretrained(hf_src)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot load the processor (tokenizer, image processor) from {hf_src}: {exc}") from None
    question = prompt or DEFAULT_PROMPT
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    else:
        text = f"USER: <image>\n{question} ASSISTANT:"
    batch = processor(images=picture, text=text, return_tensors="np")
    tokenizer = processor.tokenizer
    return {"input_ids": np.asarray(batch["input_ids"]).astype(np.int64),
            "pixel_values": np.asarray(batch["pixel_values"], dtype=np.float32),
            "text": text, "image": os.path.abspath(path),
            "decode": lambda ids: tokenizer.decode(ids, skip_special_tokens=False)}


def eos_tokens(hf_src: str) -> tuple:
    """The eos ids transformers' generate would stop at (generation_config.json, else config.json)."""
    from transformers import GenerationConfig, LlavaConfig
    try:
        gen = GenerationConfig.from_pretrained(hf_src)
    except (OSError, ValueError):
        gen = GenerationConfig.from_model_config(LlavaConfig.from_pretrained(hf_src))
    eos = gen.eos_token_id
    return () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
