"""model/anyres.py against transformers' own LLaVA-NeXT code: the grid, the patch count, the packing (bit for bit
what LlavaNextModel.pack_image_features gives, on random features, for hundreds of image sizes of both the real
v1.6 grid and the tiny preset's) and the image-token count its processor expands <image> to; and the shapes
the model's entry refuses."""
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next import modeling_llava_next as hf

from llava_ckpt.errors import CheckpointError
from llava_ckpt.fixture import make_fixture
from llava_ckpt.model import anyres

REAL = {"model_type": "llava_next", "vision_config": {"image_size": 336, "patch_size": 14, "num_channels": 3},
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "vision_feature_select_strategy": "default"}
TINY = dict(REAL, vision_config={"image_size": 56, "patch_size": 14, "num_channels": 3},
            image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])


def _sizes(n, seed):
    rng = np.random.default_rng(seed)
    edge = [(1, 1), (336, 336), (672, 336), (336, 672), (1000, 3), (3, 1000), (337, 671)]
    return edge + [(int(h), int(w)) for h, w in rng.integers(1, 2500, (n, 2))]


@pytest.mark.parametrize("cfg", [REAL, TINY], ids=["v1.6", "tiny"])
def test_packing_is_transformers_pack_image_features_bit_for_bit(cfg):
    vc = SimpleNamespace(image_size=cfg["vision_config"]["image_size"], patch_size=14)
    model = SimpleNamespace(config=SimpleNamespace(vision_config=vc, image_grid_pinpoints=cfg["image_grid_pinpoints"]))
    side = vc.image_size // 14
    gen = torch.Generator().manual_seed(0)
    for size in _sizes(150, 1):
        n = hf.image_size_to_num_patches(list(size), cfg["image_grid_pinpoints"], vc.image_size)
        assert anyres.patch_count(cfg, size) == n, size
        assert anyres.grid_shape(cfg, size) == hf.get_anyres_image_grid_shape(list(size), cfg["image_grid_pinpoints"],
                                                                            vc.image_size), size
        feats, newline = torch.randn(n, side * side, 4, generator=gen), torch.randn(4, generator=gen)
        want, lens = model_pack(model, feats, size, newline)
        got = torch.cat([feats.reshape(-1, 4), newline[None]])[torch.from_numpy(anyres.pack_index(cfg, size))]
        assert got.shape == want.shape and torch.equal(got, want), size
        assert anyres.token_count(cfg, size) == int(lens[0])


def model_pack(model, feats, size, newline):
    packed, lens = hf.LlavaNextModel.pack_image_features(model, [feats], torch.tensor([size]), "default", newline)
    return packed[0], lens


def test_a_batch_packs_each_image_after_the_one_before():
    """Two images: the second's indices follow the first's features; one newline row past all of them."""
    sizes = [(40, 90), (100, 30)]
    counts, index = anyres.batch_index(TINY, sizes)
    first = anyres.pack_index(TINY, sizes[0])
    total = sum(counts) * 16
    assert counts == [anyres.patch_count(TINY, s) for s in sizes]
    assert np.array_equal(index[:first.size], np.where(first == counts[0] * 16, total, first))
    second = anyres.pack_index(TINY, sizes[1])
    assert np.array_equal(index[first.size:], np.where(second == counts[1] * 16, total, second + counts[0] * 16))


@pytest.fixture(scope="module")
def next_tiny(tmp_path_factory):
    return make_fixture(str(tmp_path_factory.mktemp("nx") / "hf"), preset="llava-next-mistral-tiny")


def test_the_processor_expands_the_image_to_the_packed_count(next_tiny):
    """LlavaNextProcessor (the fixture's processor files) on images of many sizes: as many <image> tokens as
    the packing fills, as many patches as the tower runs over, the image's own size."""
    from llava_ckpt.engine.config import load_config
    from llava_ckpt.prompts import encode, load_processor
    cfg = load_config(next_tiny)
    processor = load_processor(next_tiny)
    rng = np.random.default_rng(2)
    for h, w in [(56, 56), (20, 200), (200, 20), (57, 113)] + [tuple(int(v) for v in rng.integers(4, 300, 2))
                                                               for _ in range(10)]:
        picture = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        ids, pixels, size = encode(processor, picture, "[INST] <image>\nhi [/INST]")
        assert size == (h, w)
        assert int((ids == cfg["image_token_index"]).sum()) == anyres.token_count(cfg, size)
        assert pixels.shape == (anyres.patch_count(cfg, size), 3, 56, 56)


def test_tower_inputs_takes_each_image_s_own_patches():
    rng = np.random.default_rng(0)
    sizes = np.array([[40, 90], [56, 56]])
    counts = [anyres.patch_count(TINY, tuple(s)) for s in sizes]
    px = rng.standard_normal((2, max(counts), 3, 56, 56)).astype(np.float32)
    pixels, index, tokens = anyres.tower_inputs(TINY, px, sizes)
    assert pixels.shape[0] == sum(counts)
    assert np.array_equal(pixels[:counts[0]], px[0, :counts[0]]) and np.array_equal(pixels[counts[0]:],
                                                                                    px[1, :counts[1]])
    assert tokens == [anyres.token_count(TINY, tuple(s)) for s in sizes] and index.size == sum(tokens)


@pytest.mark.parametrize("px_shape, sizes, message", [
    ((1, 5, 3, 56, 56), None, "needs each image's size"),
    ((1, 5, 3, 56, 56), [[40, 90], [1, 1]], "image_sizes shape (2, 2), expected (1, 2)"),
    ((1, 2, 3, 56, 56), [[112, 112]], "needs 5 patches, pixel_values holds 2"),
    ((1, 3, 56, 56), [[56, 56]], "needs [batch, patches, 3, 56, 56]"),
])
def test_tower_inputs_refuses_shapes_that_disagree(px_shape, sizes, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        anyres.tower_inputs(TINY, np.zeros(px_shape, np.float32), sizes)


def test_llava_1_5_takes_every_feature_in_order():
    cfg = dict(TINY, model_type="llava")
    pixels, index, tokens = anyres.tower_inputs(cfg, np.zeros((2, 3, 56, 56), np.float32))
    assert np.array_equal(index, np.arange(32)) and tokens == [16, 16] and anyres.most_patches(cfg) == 1


def test_the_packing_needs_the_default_feature_selection():
    anyres.check_features(TINY)
    with pytest.raises(CheckpointError, match="needs vision_feature_select_strategy 'default', got 'full'"):
        anyres.check_features(dict(TINY, vision_feature_select_strategy="full"))
    for points in ([[56, 100]], [], [[56]], "56x112"):
        with pytest.raises(CheckpointError, match="image_grid_pinpoints must be .height, width. pairs, multiples"):
            anyres.check_features(dict(TINY, image_grid_pinpoints=points))
