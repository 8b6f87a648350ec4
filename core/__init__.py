"""The bottom layer: what every package may import and which imports no other package of ours
(errors users fix, device choice, image arrays, the address guard)."""

import os

# easyocr (models.ocr) and img2dataset's resizer (stages.download) import albumentations, which
# otherwise asks pypi.org for a newer version at import time: a request to the internet from
# every worker, which this project never makes. Set here, the layer everything imports first.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
