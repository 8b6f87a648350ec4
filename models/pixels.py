"""open_clip's image transforms as work on uint8 pixels: per image only the resize, per batch the rest.

open_clip's transforms (``Resize`` + ``CenterCrop`` for scoring, ``RandomResizedCrop`` for training,
then ``ToTensor`` and ``Normalize``) run per image on PIL images. On 2 cores that per-image work is
what a CLIP scoring replica or a training loader spends beside the model, so :class:`Pixels`
recognises the transform and does the same steps more cheaply:

- **Crop and resize in one PIL call.** Scoring resizes the whole image and then cuts the centre; here
  only the centre's source box is resized (``Image.resize(box=...)``: same filter, same scale, the
  same source pixels under each tap, so the same pixels as torchvision's, give or take a rounding of
  the filter weights). A 4:3 image costs a quarter less.
- **JPEG decoded at the scale it is used** (training, :meth:`Pixels.from_encoded`): the random crop
  is drawn on the full-size header (:func:`random_crop_box`: torchvision's ``get_params`` step for
  step, from Python's RNG seeded by the process's torch seed: same distribution, a tenth of the
  cost), then the JPEG is decoded with libjpeg's DCT scaling (``Image.draft``) at the coarsest of
  1/2, 1/4, 1/8 that still leaves the crop at least the output size, and the crop is resized from
  there (:func:`draft_at`: any side, odd ones too, as web photos stored at 512 have them). The
  embedded 512x320 photos cropped to 96 px decode at 1/2: 0.79 instead of 1.57 ms. The pixels
  differ from a full decode by the DCT's box-like downscale (0.2-2.8 grey levels mean absolute
  difference on the embedded photos, up to 3.8 on real ones, ``tests/test_pixels.py``); the crop's
  region and output size are the same, and the image is never upsampled. Other formats take
  torchvision's exact steps.
- **Float once per batch, in numpy.** ``collate(normalise=True)`` stacks the uint8 images and
  converts and normalises the batch at once with the same float32 operations as ``ToTensor`` +
  ``Normalize`` (the same values bit for bit), on one thread: on a busy 2-core machine two torch
  threads spent 40 ms of CPU on these small elementwise ops per 64x96x96 batch, one thread about 6.
  For a GPU the batch stays uint8 (a quarter of the bytes to copy) and :meth:`Pixels.to_model`
  normalises it there.

A transform with anything else in it (colour jitter, ``ResizeKeepRatio``, a grayscale step) is not
recognised, and :class:`Pixels` then runs it as it is, per image: slower, never different.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DCT_SCALES = (8, 4, 2)  # libjpeg's scaled decodes Pillow's JPEG draft offers (1/8, 1/4, 1/2)


@dataclass(frozen=True)
class Recipe:
    """What a recognised open_clip transform does, as numbers."""

    out_hw: tuple[int, int]  # output (height, width)
    resample: int  # PIL filter
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None  # eval: the shorter side is resized to this, then the centre cut
    scale: tuple[float, float] | None = None  # train: RandomResizedCrop's area range
    ratio: tuple[float, float] | None = None  # train: its aspect range


def _recognise(transform: Any) -> Recipe | None:
    """The recipe of open_clip's eval or train transform, or None for anything else."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as F
    from open_clip.transform import MaybeConvertMode

    steps = list(getattr(transform, "transforms", None) or [])
    if not steps or not isinstance(steps[-1], T.Normalize) or steps[-1].inplace:
        return None
    normalize, steps = steps[-1], steps[:-1]
    if steps and isinstance(steps[-1], T.ToTensor):  # MaybeToTensor is a ToTensor
        steps = steps[:-1]
    else:
        return None
    steps = [s for s in steps if not (isinstance(s, MaybeConvertMode) and s.mode == "RGB")
             and getattr(s, "__name__", "") != "_convert_to_rgb"]  # we always convert to RGB
    mean, std = tuple(map(float, normalize.mean)), tuple(map(float, normalize.std))
    if len(mean) != 3 or len(std) != 3:
        return None
    if len(steps) == 1 and isinstance(steps[0], T.RandomResizedCrop):
        crop = steps[0]
        resample = F.pil_modes_mapping.get(crop.interpolation)
        if resample is None or crop.antialias is False:
            return None
        return Recipe(tuple(crop.size), resample, mean, std, scale=tuple(crop.scale), ratio=tuple(crop.ratio))
    if len(steps) == 2 and isinstance(steps[0], T.Resize) and isinstance(steps[1], T.CenterCrop):
        resize, centre = steps
        size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
        resample = F.pil_modes_mapping.get(resize.interpolation)
        if size is None or resize.max_size is not None or resample is None or resize.antialias is False:
            return None
        out = tuple(centre.size)
        if out[0] > size or out[1] > size:
            return None  # the crop would pad: leave it to torchvision
        return Recipe(out, resample, mean, std, resize=size)
    return None


def dct_factor(box: tuple[float, float, float, float], out_hw: tuple[int, int]) -> int:
    """The JPEG decode's reduction (1, 2, 4 or 8) that leaves the source ``box`` at least ``out_hw``
    pixels: the coarsest decode that never makes the resize upsample."""
    room = min((box[2] - box[0]) / out_hw[1], (box[3] - box[1]) / out_hw[0])  # source pixels per output pixel
    return next((s for s in DCT_SCALES if s <= room), 1)


def draft_at(image: Any, factor: int) -> float:
    """Sets a JPEG (opened, not yet loaded) to decode at ``1/factor`` of its size (1, 2, 4 or 8);
    returns the scale from source to decoded pixels.

    Pillow's ``draft`` picks ``min(width // asked_width, height // asked_height)``, rounded down to a
    power of two, so the size asked for is the floor of size / factor: asking for the ceiling gives an
    odd side (a 385x512 photo) a full decode. The scale is exactly ``1/factor`` (libjpeg scales whole
    8x8 blocks; a partial last block only adds a part-pixel on the far edge), not the ratio of the
    decoded to the source size, which that part-pixel skews."""
    if factor <= 1:
        return 1.0
    width, height = image.size
    drafted = image.draft("RGB", (max(1, width // factor), max(1, height // factor)))
    return 1.0 if drafted is None else drafted[1][2] / width  # draft's box: the source in decoded pixels


def random_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)``: torchvision's ``RandomResizedCrop.get_params``, step for step,
    drawing from Python's ``rng``: the same distribution of crops for about a tenth of the cost
    (torchvision makes ~15 one-element torch calls per image, 0.12 ms, a tenth of a decode)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # ten misses: the central crop of the nearest allowed aspect
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class Pixels:
    """A model's image transform, split into per-image uint8 work and one per-batch normalisation.

    ``from_image`` / ``from_encoded`` give what one image contributes to a batch, ``collate`` stacks
    them, ``to_model`` makes the model's input of the stacked batch. Unrecognised transforms run
    whole per image (``fast`` is False), and ``to_model`` then only moves the batch.
    """

    def __init__(self, transform: Any, recipe: Recipe | None = None) -> None:
        """``transform``: open_clip's (recognised here, which imports torchvision); or None and the
        ``recipe`` it was recognised as before (models/clip_onnx.py keeps it beside an exported
        model, so its actor needs neither torch nor torchvision)."""
        self.transform = transform
        self.recipe = recipe if transform is None else _recognise(transform)
        self.fast = self.recipe is not None
        self._norm: dict[str, tuple[Any, Any]] = {}
        self._rng: random.Random | None = None  # the crops' draws, made in the process that decodes

    def __getstate__(self) -> dict[str, Any]:
        """Sent to a DataLoader worker without tensors or RNG: each process makes its own from its seed."""
        return {**self.__dict__, "_norm": {}, "_rng": None}

    # -- per image ---------------------------------------------------------------------------------

    def from_image(self, image: Any) -> Any:
        """One decoded image (PIL, any mode) as the batch holds it: HxWx3 uint8 (or the transform's tensor)."""
        recipe = self.recipe
        if recipe is None:
            return self.transform(image)
        image = image if image.mode == "RGB" else image.convert("RGB")
        if recipe.resize is not None:
            return np.asarray(image.resize(recipe.out_hw[::-1], recipe.resample, box=self._centre_box(*image.size)))
        top, left, h, w = self._random_crop(*image.size)
        return self._resized(image.crop((left, top, left + w, top + h)), (0, 0, w, h))

    def from_encoded(self, data: bytes) -> Any:
        """One encoded image (JPEG, PNG, ...) as the batch holds it; a JPEG is decoded only at the
        scale its crop needs (module docstring)."""
        from PIL import Image

        image = Image.open(io.BytesIO(data))
        recipe = self.recipe
        if recipe is None or image.format != "JPEG":
            image.load()
            return self.from_image(image)
        width, height = image.size
        if recipe.resize is not None:
            box = self._centre_box(width, height)
        else:
            top, left, h, w = self._random_crop(width, height)
            box = (left, top, left + w, top + h)
        scale = draft_at(image, dct_factor(box, recipe.out_hw))
        if image.mode != "RGB":
            image = image.convert("RGB")
        if scale == 1.0 and recipe.resize is None:
            return self._resized(image.crop(box), (0, 0, box[2] - box[0], box[3] - box[1]))  # torchvision's own steps
        return self._resized(image, tuple(v * scale for v in box))

    def _resized(self, image: Any, box: tuple[float, float, float, float]) -> np.ndarray:
        recipe = self.recipe
        assert recipe is not None
        size = recipe.out_hw[::-1]
        if image.size == size and box == (0, 0, *size):
            return np.asarray(image)  # torchvision returns an image already at the size unchanged
        return np.asarray(image.resize(size, recipe.resample, box=box))

    def _centre_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The source box of torchvision's ``Resize(size)`` then ``CenterCrop``: the resized size and
        the crop offsets computed as torchvision computes them, mapped back at the resize's scale."""
        recipe = self.recipe
        assert recipe is not None and recipe.resize is not None
        size = recipe.resize
        if width <= height:
            new_w, new_h = size, int(size * height / width)
        else:
            new_w, new_h = int(size * width / height), size
        out_h, out_w = recipe.out_hw
        top, left = int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))
        sx, sy = width / new_w, height / new_h
        return (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)

    def _random_crop(self, width: int, height: int) -> tuple[int, int, int, int]:
        """A crop drawn as ``RandomResizedCrop`` draws it, from an RNG seeded by torch's seed of this
        process (a DataLoader worker's own), so a run's crops follow its seed."""
        import torch

        recipe = self.recipe
        assert recipe is not None and recipe.scale is not None and recipe.ratio is not None
        if self._rng is None:
            self._rng = random.Random(torch.initial_seed())
        return random_crop_box(width, height, recipe.scale, recipe.ratio, self._rng)

    # -- per batch ---------------------------------------------------------------------------------

    def collate(self, items: Sequence[Any], normalise: bool = False) -> Any:
        """Per-image results as one NCHW batch tensor: uint8, or (``normalise``) the model's float32
        input made here in numpy, on one thread (for CPU models: on a busy machine two torch threads
        spend 8x the CPU on these small elementwise ops, waiting for each other)."""
        import torch

        if not self.fast:
            return torch.stack(list(items))
        if not normalise:
            return torch.from_numpy(np.ascontiguousarray(np.stack(items).transpose(0, 3, 1, 2)))
        return torch.from_numpy(self.normalised(items))

    def normalised(self, items: Sequence[np.ndarray]) -> np.ndarray:
        """HxWx3 uint8 images as the model's float32 NCHW input, in numpy (no torch): the float32
        operations of ``ToTensor`` and ``Normalize``, in their order, so the same values."""
        recipe = self.recipe
        assert recipe is not None
        x = np.stack(items).transpose(0, 3, 1, 2).astype(np.float32, order="C")
        x /= np.float32(255)
        x -= np.asarray(recipe.mean, np.float32).reshape(1, 3, 1, 1)
        x /= np.asarray(recipe.std, np.float32).reshape(1, 3, 1, 1)
        return x

    def to_model(self, batch: Any, device: str = "cpu") -> Any:
        """The model's input on ``device``: a uint8 batch normalised there (``ToTensor`` + ``Normalize``),
        a float one only moved."""
        import torch

        batch = batch.to(device, non_blocking=True)
        if batch.dtype != torch.uint8:
            return batch
        mean, std = self._stats(str(batch.device))
        return batch.float().div_(255).sub_(mean).div_(std)

    def _stats(self, device: str) -> tuple[Any, Any]:
        import torch

        if device not in self._norm:
            recipe = self.recipe
            assert recipe is not None
            self._norm[device] = (torch.tensor(recipe.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
                                  torch.tensor(recipe.std, dtype=torch.float32, device=device).view(1, -1, 1, 1))
        return self._norm[device]

