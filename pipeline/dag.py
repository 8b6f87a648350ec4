"""The DAG, declared in one place.

    download (img2dataset, one Ray task per shard)
      -> [ decode -> ocr ]                 one streaming Ray Data pipeline per run,
                                           each image read and decoded once
Each per-sample stage writes its own manifest part per shard; a shard runs only the stages whose
part is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config


@dataclass(frozen=True)
class StageSpec:
    """A per-sample stage as the runner sees it: a name, a factory, and what it reads."""

    name: str
    make: Callable[[Config], Any]  # -> a stage object with resources(), setup(), process_batch()
    reads: tuple[str, ...]  # input columns: "image", "caption", or an earlier stage's columns


def _ocr(config: Config) -> Any:
    from stages.ocr import OcrStage

    return OcrStage(config.ocr)


PER_SAMPLE_STAGES: tuple[StageSpec, ...] = (StageSpec("ocr", _ocr, reads=("image",)),)


def per_sample_stage(name: str) -> StageSpec:
    for spec in PER_SAMPLE_STAGES:
        if spec.name == name:
            return spec
    raise KeyError(name)
