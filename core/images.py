"""Image arrays as the model stages expect them."""

from __future__ import annotations

import numpy as np


def as_rgb(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8, C-contiguous, whatever came in (greyscale, HxWx1, RGBA, other dtypes).

    The stages' contract is RGB uint8; decoders and tests hand over the other shapes now and then.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB array, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)
