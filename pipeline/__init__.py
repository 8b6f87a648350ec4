"""Curation pipeline: wires the stages of `stages/` into a Ray DAG, owns config, resume and manifests."""

import os

# img2dataset imports albumentations, which otherwise phones home for updates at import time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
