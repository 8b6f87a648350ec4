"""The DAG, declared in one place.

    download (img2dataset, one Ray task per shard)
      -> [ decode -> ocr -> parrot -> clip_score ]   one streaming Ray Data pipeline,
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


def _parrot(config: Config) -> Any:
    from stages.parrot import ParrotStage

    return ParrotStage(config.parrot)


def _clip_score(config: Config) -> Any:
    from stages.clip_score import ClipScoreStage

    return ClipScoreStage(config.clip)


PER_SAMPLE_STAGES: tuple[StageSpec, ...] = (
    StageSpec("ocr", _ocr, reads=("image",)),
    StageSpec("parrot", _parrot, reads=("caption", "texts", "n_regions", "ocr_status")),
    StageSpec("clip_score", _clip_score, reads=("image", "caption", "quads", "n_regions")),
)


def per_sample_stage(name: str) -> StageSpec:
    for spec in PER_SAMPLE_STAGES:
        if spec.name == name:
            return spec
    raise KeyError(name)
