"""Curation pipeline: wires the stages of `stages/` into a Ray DAG, owns config, resume and manifests."""

import core  # noqa: F401  (its import keeps albumentations from phoning home: see core/__init__.py)

__version__ = "0.1.0"
