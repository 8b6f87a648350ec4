"""Face stage: decoded images -> one ``manifests.schemas.FACES`` row per image (face boxes, count).

Why: CLIP pools are photographs of people taken from the web; DataComp detects every face and
blurs it in the data it distributes (its pool metadata carries ``face_bboxes``), and a policy may
want to keep or drop images by how many faces they show. This stage writes ``face_bboxes`` in
DataComp's form (``[x1, y1, x2, y2]`` fractions of the image) and ``n_faces``; resharding with
``[reshard] blur_faces = true`` blurs every box (stages/reshard.py), as DataComp's resharder does.

When the URL list brings the pool's own boxes (a DataComp pool's ``face_bboxes``, kept as the
source column ``source_face_bboxes``), those are the faces and no detector runs:
``pipeline/face_import.py`` writes this stage's part from the plan, ``face_source = "pool"``.

Off by default (``[faces] enabled = false``): the detector costs ~0.12 CPU-s a 512 px image, a
quarter again of the default run's per-sample work, and the embedded dataset has no faces.

Failure policy as OCR's: a row whose image could not be decoded, or whose detection raised, is a
``failed`` row with the message; a batch that raises is retried image by image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.settings import config_section, require
from manifests.schemas import FACES, schema_for
from models.faces import MIN_FACE_PX, FaceBox, FaceDetector, detector_device, make_detector
from stages.base import BatchStage, Resources, batch_or_each

FACE_COLUMNS: tuple[str, ...] = tuple(FACES.names)
DETECTOR_SOURCE = "mtcnn"  # face_source of a detected row; "pool" when the list brought the boxes
POOL_SOURCE = "pool"
# CPU-s per 512 px image of one one-thread replica (facenet-pytorch MTCNN, min face 20 px; measured
# on scikit-image's astronaut, 2-core AMD EPYC): what ``replicas = "auto"`` sizes the pool by, next
# to OCR's 0.41 (easyocr int8) and CLIP's 0.05.
CPU_S_PER_IMAGE = 0.12


@config_section
class FaceConfig:
    """Face detection (stages/faces.py, models/faces.py)."""

    enabled: bool = False  # a step of the run only when true (the detector adds ~0.12 CPU-s an image)
    device: str = "auto"  # "auto" (GPU when torch sees one) | "cpu" | "cuda"
    batch_size: int = 16  # images per process_batch call (one padded MTCNN batch on GPU)
    replicas: int | str = "auto"  # detector actors, each loads MTCNN once: a count, or "auto" (sized from the cluster)
    cpus_per_replica: float = 1.0  # threads per replica (floor, at least 1)
    gpus_per_replica: float = 0.25  # used only on GPU; fractional packs replicas on one GPU
    min_confidence: float = 0.9  # MTCNN's final probability below which a box is not a face
    min_face_size: int = MIN_FACE_PX  # smallest face searched for, pixels of the stored image

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        return require(
            (self.device in {"auto", "cpu", "cuda"}, f"faces.device must be auto, cpu or cuda, not {self.device!r}"),
            (self.batch_size >= 1, "faces.batch_size must be >= 1"),
            (self.replicas == "auto" or (isinstance(self.replicas, int) and self.replicas >= 1),
             f"faces.replicas must be a count >= 1 or \"auto\", not {self.replicas!r}"),
            (self.cpus_per_replica > 0, "faces.cpus_per_replica must be > 0"),
            (0 < self.gpus_per_replica <= 1, "faces.gpus_per_replica must be in (0, 1]"),
            (0 <= self.min_confidence <= 1, "faces.min_confidence must be within 0..1"),
            (12 <= self.min_face_size <= 1024, "faces.min_face_size must be within 12..1024 (MTCNN's net sees 12 px)"),
        )


class FaceStage(BatchStage):
    """Detects faces; one output row per input row, in order."""

    name = "faces"
    reads = ("image",)
    output_schema = schema_for("faces")
    status_column = "face_status"

    def __init__(self, config: FaceConfig, detector: FaceDetector | None = None) -> None:
        """Cheap: no model is loaded here. ``detector`` lets tests share one loaded MTCNN."""
        self.config = config
        self.detector = detector

    def resources(self, gpus_available: bool) -> Resources:
        """Per-replica request; a GPU share only when the detector would run on CUDA."""
        cfg = self.config
        on_gpu = detector_device(cfg, gpus_available) == "cuda"
        return Resources(cpus=cfg.cpus_per_replica, gpus=cfg.gpus_per_replica if on_gpu else 0.0,
                         batch_size=cfg.batch_size, replicas=cfg.replicas)

    def cost_per_image(self) -> float:
        """CPU-s a replica spends per image (the pool sizing's weight; see CPU_S_PER_IMAGE)."""
        return CPU_S_PER_IMAGE * (MIN_FACE_PX / self.config.min_face_size) ** 2  # the pyramid's first scale sets the pixels

    def setup(self) -> None:
        """Load MTCNN once (per Ray actor); a second call is a no-op."""
        if self.detector is None:
            self.detector = make_detector(self.config)

    # -- rows --------------------------------------------------------------------------------

    def _provenance(self) -> dict[str, Any]:
        assert self.detector is not None
        return {"face_source": DETECTOR_SOURCE, "face_engine": self.detector.engine,
                "face_device": self.detector.device_name}

    def _failed(self, uid: str, error: str) -> dict[str, Any]:
        return {"uid": uid, "face_status": "failed", "face_error": error, "face_bboxes": None, "n_faces": None,
                **self._provenance()}

    def _ok(self, uid: str, boxes: list[FaceBox]) -> dict[str, Any]:
        return {"uid": uid, "face_status": "ok", "face_error": None, "face_bboxes": boxes, "n_faces": len(boxes),
                **self._provenance()}

    def _run(self, images: list[np.ndarray]) -> list[list[FaceBox] | Exception]:
        """One batched call; if it raises, each image alone so a bad one fails by itself."""
        detector = self.detector
        assert detector is not None
        return batch_or_each(lambda batch: detector.detect_batch(batch), images)

    def process_batch(self, batch: dict[str, Any]) -> dict[str, list]:
        """uid/image/decode_error columns in -> ``schemas.FACES`` columns out, one row per input."""
        self.setup()
        uids = [str(u) for u in batch["uid"]]
        images = list(batch["image"])
        errors = list(batch.get("decode_error", [None] * len(uids)))
        rows: list[dict[str, Any] | None] = [None] * len(uids)
        todo: list[int] = []
        for i, (uid, image, error) in enumerate(zip(uids, images, errors)):
            if image is None:
                rows[i] = self._failed(uid, str(error) if error else "no image: decoding produced nothing")
            else:
                todo.append(i)
        if todo:
            for i, result in zip(todo, self._run([np.asarray(images[i]) for i in todo])):
                if isinstance(result, Exception):
                    rows[i] = self._failed(uids[i], f"face detection error: {type(result).__name__}: {result}")
                else:
                    rows[i] = self._ok(uids[i], result)
        return {c: [row[c] for row in rows if row is not None] for c in FACE_COLUMNS}


__all__ = ["FACE_COLUMNS", "FaceConfig", "FaceStage", "POOL_SOURCE"]
