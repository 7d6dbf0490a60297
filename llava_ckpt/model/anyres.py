"""LLaVA-NeXT's anyres image packing, as index arithmetic (numpy only, no MindSpore).

A LLaVA-NeXT image reaches the vision tower as 1 + rows x cols square patches of `image_size` pixels: the
whole image resized (the base) and the image resized onto the best grid of `image_grid_pinpoints` and cut
into tiles. Their features are packed into one sequence: the base's, then the tiles' laid out as one big
feature map, cropped back to the image's own aspect ratio (the padding the resize added is dropped), with
`image_newline` after every row. transformers does this with view / permute / slice / cat
(LlavaNextModel.pack_image_features); here the same result is one gather: `pack_index` says, for every
packed position, which feature row it copies (the last index, one past the features, is the newline). A
gather copies values, so the packed features are bit for bit what the tower and projector gave.

The rules (best resolution, grid shape, unpadding rounding) are transformers' own, checked against it in
tests/model/test_anyres.py for many image sizes; image sizes are (height, width) as the processor gives them.
"""
from __future__ import annotations

import numpy as np

from ..engine.config import image_token_count
from ..errors import fail


def is_anyres(cfg: dict) -> bool:
    """Whether images are packed (LLaVA-NeXT) rather than one 576-feature block each (LLaVA-1.5)."""
    return cfg.get("model_type") == "llava_next"


def best_resolution(size: tuple, pinpoints: list) -> tuple:
    """The (height, width) of `pinpoints` an image of `size` (height, width) is resized onto: the most of the
    image's own pixels kept, then the least padding."""
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise fail(f"image size must be positive, got {height}x{width}")
    best, most, least = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (int(h), int(w)), effective, wasted
    return best


def grid_shape(cfg: dict, size: tuple) -> tuple:
    """(rows, cols) of tiles an image of `size` is cut into."""
    tile = cfg["vision_config"]["image_size"]
    h, w = best_resolution(size, cfg["image_grid_pinpoints"])
    return h // tile, w // tile


def patch_count(cfg: dict, size: tuple) -> int:
    """How many vision-tower inputs (the base plus the tiles) an image of `size` becomes."""
    tile = cfg["vision_config"]["image_size"]
    h, w = best_resolution(size, cfg["image_grid_pinpoints"])
    return 1 + (-(-h // tile)) * (-(-w // tile))


def most_patches(cfg: dict) -> int:
    """The most vision-tower inputs one image can become (1 for LLaVA-1.5): the largest grid plus the base."""
    if not is_anyres(cfg):
        return 1
    tile = cfg["vision_config"]["image_size"]
    return 1 + max((-(-int(h) // tile)) * (-(-int(w) // tile)) for h, w in cfg["image_grid_pinpoints"])


def stack_images(pixels: list) -> np.ndarray:
    """One image's pixels each ([C, H, W], or LLaVA-NeXT's [P, C, H, W]) -> one batch array; NeXT's padded
    with zero patches to the most any of them has, as its processor pads a batch (image_sizes say how many
    are real)."""
    if not pixels or np.ndim(pixels[0]) != 4:
        return np.stack(pixels)
    most = max(p.shape[0] for p in pixels)
    out = np.zeros((len(pixels), most) + tuple(pixels[0].shape[1:]), dtype=np.float32)
    for b, p in enumerate(pixels):
        out[b, :p.shape[0]] = p
    return out


def _kept(rows: int, cols: int, size: tuple) -> tuple:
    """(first row, end row, first col, end col) of the tiled feature map (rows x cols features) that show the
    image, not the padding its resize added: transformers' unpad_image, rounding included."""
    height, width = int(size[0]), int(size[1])
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return pad, rows - pad, 0, cols
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return 0, rows, pad, cols - pad


def pack_index(cfg: dict, size: tuple) -> np.ndarray:
    """For one image of `size`: int64 indices into its features flattened to [patches * per_patch] with one
    row appended (the newline, index patches * per_patch), giving the packed sequence."""
    side = cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]
    per_patch = side * side
    rows, cols = grid_shape(cfg, size)
    n = patch_count(cfg, size)
    newline = n * per_patch
    base = np.arange(per_patch, dtype=np.int64)
    if n == 1:  # one patch only: its features, then the newline
        return np.append(base, newline)
    y0, y1, x0, x1 = _kept(rows * side, cols * side, size)
    y, x = np.meshgrid(np.arange(y0, y1), np.arange(x0, x1), indexing="ij")
    tile = 1 + (y // side) * cols + (x // side)  # tiles follow the base, row by row
    grid = tile * per_patch + (y % side) * side + (x % side)
    grid = np.concatenate([grid, np.full((grid.shape[0], 1), newline)], axis=1)
    return np.concatenate([base, grid.reshape(-1)])


def token_count(cfg: dict, size: tuple) -> int:
    """How many image tokens the prompt holds for one image of `size` (the processor expands <image> to it)."""
    return int(pack_index(cfg, size).size)


def check_features(cfg: dict) -> None:
    """The packing lays each tile's features out as a side x side map, so a tile's features must be exactly
    its patches: the 'default' selection (CLS dropped); and the grid must be whole tiles. Refused otherwise
    (transformers would misplace the features, or fail)."""
    if not is_anyres(cfg):
        return
    if cfg.get("vision_feature_select_strategy") != "default":
        raise fail("LLaVA-NeXT's anyres packing needs vision_feature_select_strategy 'default', got "
                   f"{cfg.get('vision_feature_select_strategy')!r}")
    tile = cfg["vision_config"]["image_size"]
    points = cfg.get("image_grid_pinpoints")
    if not isinstance(points, list) or not points or any(
            not isinstance(p, (list, tuple)) or len(p) != 2 or any(not isinstance(v, int) or isinstance(v, bool)
                                                                   or v <= 0 or v % tile for v in p) for p in points):
        raise fail(f"image_grid_pinpoints must be [height, width] pairs, multiples of the vision tower's "
                   f"{tile}-pixel image_size, got {points!r}")


def tower_inputs(cfg: dict, pixel_values, image_sizes=None) -> tuple:
    """(pixels [N, C, H, W] float32: what the vision tower runs over, int32 index: which of its projected
    features, flattened, fill the prompts' image tokens in order (image_index), the image tokens each image
    fills).

    LLaVA-1.5: pixel_values [B, C, H, W], one image each. LLaVA-NeXT: pixel_values [B, P, C, H, W] as its
    processor pads a batch (P the most patches of any image) and image_sizes [B, 2]; each image's own patches
    are taken. One clear error for shapes that disagree."""
    vc = cfg["vision_config"]
    tile = (vc["num_channels"], vc["image_size"], vc["image_size"])
    px = np.asarray(pixel_values, dtype=np.float32)
    if not is_anyres(cfg):
        if px.ndim != 4 or px.shape[1:] != tile:
            raise fail(f"pixel_values shape {px.shape}, the vision tower needs [batch, {', '.join(map(str, tile))}]")
        index = image_index(cfg, px.shape[0])
        return px, index, [index.size // max(px.shape[0], 1)] * px.shape[0]
    if px.ndim != 5 or px.shape[2:] != tile:
        raise fail(f"pixel_values shape {px.shape}, LLaVA-NeXT's vision tower needs [batch, patches, "
                   f"{', '.join(map(str, tile))}]")
    sizes = _sizes(image_sizes, px.shape[0])
    counts = [patch_count(cfg, tuple(s)) for s in sizes]
    if max(counts) > px.shape[1]:
        raise fail(f"an image of size {tuple(int(v) for v in sizes[int(np.argmax(counts))])} needs {max(counts)} "
                   f"patches, pixel_values holds {px.shape[1]}")
    return (np.concatenate([px[b, :n] for b, n in enumerate(counts)]), image_index(cfg, px.shape[0], sizes),
            [token_count(cfg, tuple(s)) for s in sizes])


def image_index(cfg: dict, images: int, image_sizes=None) -> np.ndarray:
    """int32 index into the projected features of `images` images flattened (LLaVA-NeXT: with the newline one
    past them) giving what fills the prompts' image tokens, in order: LLaVA-1.5 every feature in order,
    LLaVA-NeXT each image's anyres packing (batch_index)."""
    if not is_anyres(cfg):
        return np.arange(images * image_token_count(cfg), dtype=np.int32)
    return batch_index(cfg, _sizes(image_sizes, images))[1].astype(np.int32)


def _sizes(image_sizes, images: int) -> np.ndarray:
    if image_sizes is None:
        raise fail("LLaVA-NeXT needs each image's size (image_sizes, as its processor gives them)")
    sizes = np.asarray(image_sizes)
    if sizes.shape != (images, 2) or sizes.dtype.kind not in "iu":
        raise fail(f"image_sizes shape {sizes.shape}, expected ({images}, 2) integers: one (height, width) per "
                   "image")
    return sizes


def batch_index(cfg: dict, sizes) -> tuple:
    """For a batch of images with `sizes` [B, 2]: (patches per image, one index into all their features
    flattened in order with the newline appended after them) — the packed features of every image, in order."""
    side = cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]
    per_patch = side * side
    counts = [patch_count(cfg, tuple(s)) for s in np.asarray(sizes).reshape(-1, 2)]
    total = sum(counts) * per_patch
    parts, offset = [], 0
    for s, n in zip(np.asarray(sizes).reshape(-1, 2), counts):
        index = pack_index(cfg, tuple(s))
        parts.append(np.where(index == n * per_patch, total, index + offset))
        offset += n * per_patch
    return counts, np.concatenate(parts) if parts else np.zeros((0,), np.int64)
