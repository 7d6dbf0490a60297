"""The inputs both sides get: the source's own processor (tokenizer, chat template, image processor) on the
image and prompt, and the end-of-sequence tokens greedy decoding stops at (llava_ckpt.prompts builds both,
for generate too).

The bundled image (assets/default_image.png, a house, a tree and the sun) was drawn with pillow.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import fail

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_IMAGE = os.path.join(ASSETS, "default_image.png")
DEFAULT_PROMPT = "Describe this image in one sentence."
# what a user who gave the two folders the wrong way round is told
SWAPPED = "did you swap HF_SRC and MS_DIR? (llava-ckpt verify HF_SRC MS_DIR)"


def resolve_source(hf_src: str) -> str:
    """A checkpoint folder as given, or a hub repo id downloaded first."""
    if os.path.isdir(hf_src):
        return hf_src
    from ..hub import is_repo_id, download
    if not is_repo_id(hf_src):
        raise fail(f"{hf_src} is neither a checkpoint folder nor a hub repo id")
    return download(hf_src, progress=False)["path"]


def build_inputs(hf_src: str, image: str | None = None, prompt: str | None = None, picture=None) -> dict:
    """Tokenized prompt and pixels from the checkpoint's own processor (real tokenizer and chat template), built
    as generate builds them (llava_ckpt.prompts), and the eos ids greedy decoding stops at. `picture`: the image
    (default: the bundled one) already read by prompts.load_image, if it was."""
    from ..prompts import encode, format_prompt, load_image, load_processor, special_ids
    path = image or DEFAULT_IMAGE
    picture = load_image(path) if picture is None else picture
    processor = load_processor(hf_src)
    text = format_prompt(processor, prompt or DEFAULT_PROMPT)
    ids, pixels, size = encode(processor, picture, text)
    tokenizer = processor.tokenizer
    return {"input_ids": ids[None], "pixel_values": pixels[None], "text": text, "image": os.path.abspath(path),
            "image_sizes": None if size is None else np.array([size], dtype=np.int64),
            "eos": special_ids(hf_src, tokenizer)[0],
            "decode": lambda ids: tokenizer.decode(ids, skip_special_tokens=False)}
