"""What every stage declares as data, so the runner can schedule it without knowing what it does."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resources:
    """Resources one replica of a stage asks the scheduler for."""

    cpus: float = 1.0
    gpus: float = 0.0  # fractional GPUs allowed: 0.25 packs four replicas on one GPU
    batch_size: int = 1
    replicas: int = 1
