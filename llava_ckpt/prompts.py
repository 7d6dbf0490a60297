"""Prompts as Hugging Face users build them, for verify and generate alike: the checkpoint's own AutoProcessor
(tokenizer, image processor) and chat template, so a question becomes `USER: <image>\\n... ASSISTANT:` for
llava-1.5 and the image the processor's resized, center-cropped, normalized pixels; and the token ids greedy
decoding stops at and pads with, read as transformers' generate reads them."""
from __future__ import annotations

import os

import numpy as np

from .errors import fail

# LLaVA-1.5's conversation format, used only when a checkpoint ships no chat template.
FALLBACK_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


def load_image(path: str):
    """The image at `path` as RGB (PIL), or one clear error for a missing, unreadable, oversized or non-image
    file. Fast (no transformers): callers read every image before anything slow starts."""
    import warnings
    from PIL import Image
    if not os.path.exists(path):
        raise fail(f"image {path} does not exist")
    if not os.path.isfile(path):
        raise fail(f"image {path} is not a file")
    try:
        with warnings.catch_warnings():
            # a large but legal image (above half of PIL's bomb limit) would print a warning; the limit
            # itself still raises DecompressionBombError, refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise fail(f"cannot read image {path}: too large ({exc})") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as exc:  # PIL's truncated / non-image files
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


def prompt_floor(folder: str, question: str, image_tokens: int) -> int | None:
    """A lower bound of the prompt's length in tokens, without transformers (its import takes seconds): the
    question tokenized alone by the checkpoint's tokenizer.json (the fast `tokenizers` library), less two for
    the merges its neighbours may change, plus the image's tokens. None when there is no tokenizer.json. Used
    to refuse a prompt that cannot fit before anything slow starts; the exact length is checked once the
    processor has formatted it."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception:  # noqa: BLE001 - the processor, loaded later, reports a broken tokenizer properly
        return None
    return max(0, len(tokenizer.encode(question, add_special_tokens=False).ids) - 2) + image_tokens


def check_length(length: int, max_new_tokens: int, cfg: dict, what: str, exact: bool = True) -> None:
    """Refuse a prompt whose `length` tokens and `max_new_tokens` do not fit the model's context
    (engine.config.context_limit)."""
    from .engine.config import context_limit
    max_positions, limit = context_limit(cfg)
    if length + max_new_tokens > max_positions:
        size = f"{length} tokens" if exact else f"at least {length} tokens"
        raise fail(f"{what} is {size} with its image; with {max_new_tokens} new tokens that exceeds the model's "
                   f"context of {max_positions} positions ({limit}): shorten it or lower --max-new-tokens")


def encode(processor, picture, text: str):
    """(input_ids [S] int64, pixel_values float32, image size) for one image and its formatted prompt:
    llava-1.5's [C, H, W] and None, LLaVA-NeXT's [patches, C, H, W] and the image's (height, width)."""
    batch = processor(images=picture, text=text, return_tensors="np")
    sizes = batch.get("image_sizes")
    return (np.asarray(batch["input_ids"])[0].astype(np.int64),
            np.asarray(batch["pixel_values"], dtype=np.float32)[0],
            None if sizes is None else tuple(int(v) for v in np.asarray(sizes)[0]))


def special_ids(folder: str, tokenizer) -> tuple:
    """(eos ids, pad id) as transformers' generate takes them: generation_config.json's eos_token_id and
    pad_token_id, else config.json's (top level, then text_config), else the tokenizer's; pad falls back on
    the first eos id."""
    from .io.files import read_json
    found = {}
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        data = read_json(path)
        if not isinstance(data, dict):
            raise fail(f"{path} is not a JSON object")
        text = data.get("text_config") if isinstance(data.get("text_config"), dict) else {}
        for key in ("eos_token_id", "pad_token_id"):
            value = data.get(key, text.get(key))
            if key not in found and value is not None:
                found[key] = (value, path)
        if name == "generation_config.json":
            break  # transformers reads config.json only when there is no generation_config.json
    eos, where = found.get("eos_token_id", (tokenizer.eos_token_id, "the tokenizer"))
    eos = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    pad, pad_where = found.get("pad_token_id", (tokenizer.pad_token_id, "the tokenizer"))
    if pad is None:
        pad = eos[0] if eos else 0
    for value, source in [(e, where) for e in eos] + [(pad, pad_where)]:
        if not isinstance(value, int) or isinstance(value, bool):
            raise fail(f"{source}: eos_token_id / pad_token_id must be integers, got {value!r}")
    return tuple(int(e) for e in eos), int(pad)
