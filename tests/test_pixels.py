"""models/pixels.py: open_clip's transforms on uint8 pixels give the model what open_clip's own give it.

Real open_clip transforms (the shipped ``curation-tiny`` and ``ViT-S-32`` ones), real JPEGs from the
embedded generator, real PIL decodes; the reference is always the stock transform on a full decode.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from models.clip import register_model_configs
from models.pixels import Pixels, dct_factor, draft_at, random_crop_box
from sources.embedded import generate


@pytest.fixture(scope="module")
def transforms():
    import open_clip

    register_model_configs()
    _, train, evaluate = open_clip.create_model_and_transforms("curation-tiny")
    return train, evaluate


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [s.image for s in generate(8, seed=3)]


def _decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_eval_batch_is_the_stock_transform(transforms, jpegs):
    """Centre box resized in one call + batch normalisation = Resize, CenterCrop, ToTensor, Normalize."""
    _, evaluate = transforms
    pixels = Pixels(evaluate)
    assert pixels.fast
    images = [_decoded(j) for j in jpegs] + [_decoded(jpegs[0]).transpose(Image.Transpose.ROTATE_90)]  # portrait too
    want = torch.stack([evaluate(im) for im in images])
    got = pixels.collate([pixels.from_image(im) for im in images], normalise=True)
    assert got.shape == want.shape and got.dtype == torch.float32
    diff = (want - got).abs()
    assert float(diff.max()) <= 1.01 / 255 / min(pixels.recipe.std)  # at most one grey level, from filter-weight rounding
    assert float((diff == 0).float().mean()) > 0.999


def _stock_crop(transform, image: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
    """What ``RandomResizedCrop`` + ``ToTensor`` + ``Normalize`` give for this crop box."""
    import torchvision.transforms.functional as F

    crop, *rest = transform.transforms
    resized = F.resized_crop(image, *box, list(crop.size), crop.interpolation, antialias=True)
    return rest[-1](F.to_tensor(resized))


def test_train_crop_of_a_png_is_the_stock_transform_exactly(transforms, jpegs):
    """No DCT scaling for other formats: for the same crop, the same floats bit for bit, normalised
    in numpy (CPU training) or in torch (a GPU's path)."""
    train, _ = transforms
    pixels = Pixels(train)
    buffer = io.BytesIO()
    _decoded(jpegs[1]).save(buffer, "PNG")
    image = _decoded(buffer.getvalue())
    for seed in range(3):
        pixels._rng = random.Random(seed)
        item = pixels.from_encoded(buffer.getvalue())
        want = _stock_crop(train, image, random_crop_box(*image.size, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(seed)))
        assert torch.equal(want, pixels.collate([item], normalise=True)[0])
        assert torch.equal(want, pixels.to_model(pixels.collate([item]))[0])


def test_train_jpeg_decoded_at_half_scale_is_nearly_the_full_decode(transforms, jpegs):
    """The crop drawn on the full size, decoded by libjpeg at 1/2: same shape, same region, within a
    few grey levels of the stock transform on a full decode."""
    train, _ = transforms
    pixels = Pixels(train)
    width, height = Image.open(io.BytesIO(jpegs[0])).size
    assert dct_factor((0, 0, 0.9 * width, 0.9 * height), (96, 96)) == 2  # this size really is decoded smaller
    std = torch.tensor(pixels.recipe.std).view(3, 1, 1)
    differences = []
    for k, data in enumerate(jpegs):
        image = _decoded(data)
        pixels._rng = random.Random(k)
        got = pixels.from_encoded(data)
        want = _stock_crop(train, image, random_crop_box(*image.size, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(k)))
        assert got.shape == (96, 96, 3) and got.dtype == np.uint8
        levels = ((want - pixels.collate([got], normalise=True)[0]).abs() * std * 255).mean()
        assert float(levels) < 4.0, k  # mean absolute difference in grey levels (0-255)
        differences.append(float(levels))
    assert max(differences) > 0.1  # decoded smaller for real (a full decode is the same pixels, as for the PNG)


def _jpeg_of_size(data: bytes, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    _decoded(data).resize(size, Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(385, 512), (512, 341), (333, 257), (512, 384)])
def test_draft_decodes_any_side_at_the_factor(jpegs, size):
    """A web photo stored with its largest side 512 has an odd other side as often as not (512x341):
    it is decoded at 1/2, 1/4, 1/8 like any other, not in full, and its scale is the factor's."""
    data = _jpeg_of_size(jpegs[2], size)
    for factor in (1, 2, 4, 8):
        image = Image.open(io.BytesIO(data))
        scale = draft_at(image, factor)
        image.load()
        assert scale == 1 / factor
        assert image.size == (-(-size[0] // factor), -(-size[1] // factor)), factor


def test_train_jpeg_of_odd_sides_is_decoded_smaller_and_nearly_the_full_decode(transforms, jpegs):
    """Photos of odd sizes (as the download stores web images) through the training path: within a few
    grey levels of the stock transform on a full decode, and decoded smaller for real."""
    train, _ = transforms
    pixels = Pixels(train)
    std = torch.tensor(pixels.recipe.std).view(3, 1, 1)
    differences = []
    for k, size in enumerate([(385, 512), (512, 341), (512, 293), (447, 512)]):
        data = _jpeg_of_size(jpegs[k], size)
        image = _decoded(data)
        pixels._rng = random.Random(k)
        got = pixels.from_encoded(data)
        box = random_crop_box(*image.size, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(k))
        assert dct_factor((box[1], box[0], box[1] + box[3], box[0] + box[2]), (96, 96)) >= 2  # decoded smaller
        want = _stock_crop(train, image, box)
        levels = float(((want - pixels.collate([got], normalise=True)[0]).abs() * std * 255).mean())
        assert levels < 4.0, size
        differences.append(levels)
    assert min(differences) > 0.05  # every one decoded at its factor (a full decode gives ~0.01)


def test_random_crop_box_draws_what_random_resized_crop_allows():
    """Inside the image, 90-100% of its area, aspect within 3/4..4/3; past ten misses, torchvision's
    own central fallback."""
    import torchvision.transforms as T

    rng = random.Random(0)
    for _ in range(300):
        top, left, h, w = random_crop_box(480, 360, (0.9, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 360 and 0 <= left and left + w <= 480
        assert 0.89 <= h * w / (480 * 360) <= 1.0 and 3 / 4 - 0.01 <= w / h <= 4 / 3 + 0.01
    strip = Image.new("RGB", (1000, 100))  # no allowed crop fits: the fallback
    assert random_crop_box(1000, 100, (0.9, 1.0), (3 / 4, 4 / 3), rng) == tuple(
        T.RandomResizedCrop.get_params(strip, [0.9, 1.0], [3 / 4, 4 / 3]))


def test_dct_factor_never_upsamples():
    assert dct_factor((0, 0, 96, 96), (96, 96)) == 1
    assert dct_factor((0, 0, 191, 400), (96, 96)) == 1
    assert dct_factor((0, 0, 192, 400), (96, 96)) == 2
    assert dct_factor((10, 10, 10 + 768, 10 + 800), (96, 96)) == 8
    assert dct_factor((0, 0, 4000, 3000), (96, 96)) == 8  # libjpeg scales no further than 1/8


def test_an_unrecognised_transform_runs_as_it_is(transforms, jpegs):
    import torchvision.transforms as T

    train, _ = transforms
    jitter = T.Compose([T.ColorJitter(0.4, 0.4, 0.4), *train.transforms])
    pixels = Pixels(jitter)
    assert not pixels.fast
    torch.manual_seed(0)
    want = jitter(_decoded(jpegs[0]))
    torch.manual_seed(0)
    got = pixels.to_model(pixels.collate([pixels.from_encoded(jpegs[0])], normalise=True))[0]
    assert torch.equal(want, got)

