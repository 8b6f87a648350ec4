"""Face detection: MTCNN (facenet-pytorch) on batches of decoded images, boxes as DataComp writes them.

Why MTCNN from ``facenet-pytorch``: its three small nets (pnet/rnet/onet, 2 MB) ship inside the
wheel, so nothing is downloaded at run time, and it ran on torch, which every model stage already
loads. Of the detectors whose weights ship in a package (OpenCV's Haar cascades, MediaPipe's
BlazeFace short/full range, MTCNN), it was the best on all three real-photo sets we measured
(scikit-image's LFW crops, full photographs with and without faces, mosaics of LFW faces on real
backgrounds; README "Faces"), at ~0.12 CPU-s a 512 px image on one thread.

Licences: facenet-pytorch is MIT (Tim Esler); its MTCNN weights are David Sandberg's facenet port
(MIT) of Kaipeng Zhang's original MTCNN models (kpzhang93/MTCNN_face_detection_alignment, MIT).

Its package metadata pins torch<2.3, numpy<2 and Pillow<10.3, which are stale (the detector uses
nothing those releases changed), so the Makefile installs it with ``--no-deps`` (versions from
constraints.txt).

Boxes are ``[x1, y1, x2, y2]`` as fractions of the image's width and height, clipped to [0, 1]:
DataComp's ``face_bboxes``, which img2dataset's ``BoundingBoxBlurrer`` (DataComp's resharder) reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Protocol, Sequence

import numpy as np

from core.devices import resolve_device
from core.images import as_rgb
from models.ocr import threads_for

FaceBox = list[float]  # [x1, y1, x2, y2], fractions of width / height
MIN_FACE_PX = 20  # MTCNN's own default: the smallest face its image pyramid looks for


class FaceSettings(Protocol):
    """What :func:`make_detector` reads from the stage's config (stages.faces.FaceConfig)."""

    device: str
    cpus_per_replica: float
    min_confidence: float
    min_face_size: int


def to_fractions(box: Sequence[float], width: int, height: int) -> FaceBox:
    """A pixel box as DataComp's fractions, clipped to the image: a detector's box may reach past
    the frame (MTCNN regresses boxes from the face, not from the image), a fraction may not."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731 - one expression, four uses
    return [clip(x1 / width), clip(y1 / height), clip(x2 / width), clip(y2 / height)]


@dataclass
class FaceDetector:
    """MTCNN, loaded once (per Ray actor); ``detect_batch`` maps images to lists of boxes."""

    device: str = "cpu"  # "cpu" | "cuda" (resolved)
    min_confidence: float = 0.9
    min_face_size: int = MIN_FACE_PX
    num_threads: int | None = None
    pad_batches: bool | None = None  # one padded call per batch; None: on GPU only (see detect_batch)
    _mtcnn: Any = None

    def __post_init__(self) -> None:
        import torch

        try:
            from facenet_pytorch import MTCNN
        except ImportError:
            raise ImportError("the faces step needs facenet-pytorch, which `make setup` installs "
                              "(pip install --no-deps -c constraints.txt facenet-pytorch)") from None
        if self.device not in {"cpu", "cuda"}:
            raise ValueError(f"device must be 'cpu' or 'cuda' (resolve it first), not {self.device!r}")
        if self.num_threads is not None and self.device == "cpu":
            torch.set_num_threads(max(1, int(self.num_threads)))
        # keep_all: every face, not the largest one (MTCNN's default is to pick one for cropping)
        self._mtcnn = MTCNN(keep_all=True, min_face_size=self.min_face_size, device=torch.device(self.device))
        self._mtcnn.eval()

    @property
    def engine(self) -> str:
        """What the rows record as ``face_engine``: the package, its version and the settings."""
        return f"facenet-pytorch {version('facenet-pytorch')} mtcnn min_face={self.min_face_size}px conf>={self.min_confidence:g}"

    @property
    def device_name(self) -> str:
        return "cuda:0" if self.device == "cuda" else "cpu"

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceBox]]:
        """Face boxes (fractions, at least ``min_confidence``) of each image, in order.

        MTCNN takes a batch only of one size. On a GPU the batch is padded (bottom and right, with
        black) to its largest height and width and run as one call, then each image's boxes are cut
        back to its own frame; on CPU, where a batch is no faster than its images one by one (0.130
        vs 0.124 CPU-s per 512 px image, measured), images of one size go together and no pixel is
        added.
        """
        images = [as_rgb(im) for im in images]
        if not images:
            return []
        out: list[list[FaceBox] | None] = [None] * len(images)
        pad = self.device == "cuda" if self.pad_batches is None else self.pad_batches
        if pad:
            groups = [list(range(len(images)))]
        else:
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, im in enumerate(images):
                by_shape.setdefault(im.shape, []).append(i)
            groups = list(by_shape.values())
        for group in groups:
            height = max(images[i].shape[0] for i in group)
            width = max(images[i].shape[1] for i in group)
            batch = np.zeros((len(group), height, width, 3), np.uint8)
            for k, i in enumerate(group):
                h, w = images[i].shape[:2]
                batch[k, :h, :w] = images[i]
            boxes, probs = self._mtcnn.detect(batch)
            for k, i in enumerate(group):
                out[i] = self._kept(boxes[k], probs[k], images[i].shape[1], images[i].shape[0])
        return [b if b is not None else [] for b in out]

    def _kept(self, boxes: Any, probs: Any, width: int, height: int) -> list[FaceBox]:
        """One image's boxes above the confidence bar, as fractions of its own frame (a box that
        padding left wholly outside the frame is dropped), largest first as MTCNN orders them."""
        if boxes is None:
            return []
        kept = []
        for box, prob in zip(boxes, probs):
            if prob is None or float(prob) < self.min_confidence:
                continue
            frac = to_fractions(box, width, height)
            if frac[2] > frac[0] and frac[3] > frac[1]:
                kept.append(frac)
        return kept


def detector_device(config: FaceSettings, cuda_available: bool) -> str:
    """The device a detector built from ``config`` would use, without loading anything."""
    return resolve_device(config.device, cuda_available, "faces.device")


def make_detector(config: FaceSettings, cuda_available: bool | None = None) -> FaceDetector:
    """Build the detector on the resolved device, with the replica's thread budget."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return FaceDetector(
        device=detector_device(config, cuda_available),
        min_confidence=config.min_confidence,
        min_face_size=config.min_face_size,
        num_threads=threads_for(config.cpus_per_replica),
    )


__all__ = ["FaceBox", "FaceDetector", "detector_device", "make_detector", "to_fractions"]
