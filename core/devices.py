"""Where a model runs: one rule for every torch stage (OCR, CLIP scoring, training, evaluation)."""

from __future__ import annotations

import glob
import os

from core.errors import ConfigError


def cuda_visible() -> bool:
    """Whether torch sees a CUDA GPU here, without importing torch (1.4 s) where the answer is
    plainly no: ``CUDA_VISIBLE_DEVICES`` empty or -1, or no NVIDIA device file (``/dev/nvidia*``,
    WSL's ``/dev/dxg``). Otherwise torch is asked."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    if not glob.glob("/dev/nvidia*") and not os.path.exists("/dev/dxg"):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(requested: str, cuda_available: bool, key: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; "cuda" without a GPU is a config error
    naming ``key`` (e.g. ``ocr.device``). Pure, so both branches are testable on a CPU machine."""
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise ConfigError(
            f"{key} is 'cuda' but torch sees no CUDA GPU on this worker; use 'auto' (falls back to CPU) or 'cpu'"
        )
    if requested not in {"cpu", "cuda"}:
        raise ConfigError(f"{key} must be auto, cpu or cuda, not {requested!r}")
    return requested
