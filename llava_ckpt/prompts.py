"""Prompts as Hugging Face users build them: the checkpoint's own AutoProcessor (tokenizer, image processor)
and chat template, so a question becomes `USER: <image>\\n... ASSISTANT:` for llava-1.5 and the image the
processor's resized, center-cropped, normalized pixels."""
from __future__ import annotations

import os

import numpy as np

from .errors import fail

# LLaVA-1.5's conversation format, used only when a checkpoint ships no chat template.
FALLBACK_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


def load_image(path: str):
    """The image at `path` as RGB (PIL), or one clear error for a missing, unreadable or non-image file."""
    from PIL import Image
    if not os.path.exists(path):
        raise fail(f"image {path} does not exist")
    if not os.path.isfile(path):
        raise fail(f"image {path} is not a file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # PIL reports truncated / non-image files this way
        raise fail(f"cannot read image {path}: {exc}") from None


def load_processor(folder: str):
    """The folder's AutoProcessor (tokenizer + image processor + chat template)."""
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise fail(f"cannot load the processor (tokenizer, image processor) from {folder}: "
                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def image_token(processor) -> str:
    return getattr(processor, "image_token", None) or "<image>"


def format_prompt(processor, question: str, raw: bool = False) -> str:
    """The exact text the model reads: the question inside the chat template, or `question` itself when raw
    (then it must hold the image placeholder exactly once: LLaVA-1.5 takes one image per prompt)."""
    if not isinstance(question, str):
        raise fail(f"a prompt must be text, got {type(question).__name__}")
    token = image_token(processor)
    if raw:
        count = question.count(token)
        if count != 1:
            raise fail(f"a --raw prompt is the whole prompt and must contain {token} exactly once "
                       f"(found {count}): {question[:80]!r}")
        return question
    if token in question:
        raise fail(f"the prompt already contains {token}; pass --raw to give the whole prompt yourself")
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return FALLBACK_TEMPLATE.format(question=question)


def encode(processor, picture, text: str):
    """(input_ids [S] int64, pixel_values [C, H, W] float32) for one image and its formatted prompt."""
    batch = processor(images=picture, text=text, return_tensors="np")
    return (np.asarray(batch["input_ids"])[0].astype(np.int64),
            np.asarray(batch["pixel_values"], dtype=np.float32)[0])
