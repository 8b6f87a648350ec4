"""OCR stage: decoded images -> one ``manifests.schemas.OCR`` row per image (text regions + text).

NeMo-Curator style: the stage declares its resources as data, loads its model once in
``setup()`` (once per Ray actor), and maps batches of columns to batches of columns. It knows
nothing of Ray or paths; the runner decodes images, calls ``process_batch`` and writes manifests.

Failure policy: a row whose image could not be decoded, or whose OCR raised, becomes a
``failed`` row with the message; it never fails the batch. When the batched call raises, the
rows are retried one by one so that one bad image fails alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from core.settings import config_section, require
from manifests.schemas import OCR, schema_for
from models.ocr import OCR_ENGINES, OcrEngine, Region, engine_device, make_engine
from stages.base import BatchStage, Resources, batch_or_each


@config_section
class OcrConfig:
    """Text-region detection and recognition (stages/ocr.py, models/ocr.py)."""

    # "ppocr-v6": PP-OCRv6 small on onnxruntime, CPU: reads real text best at ~1/6 of easyocr's CPU |
    # "easyocr": CRAFT + english_g2 on torch, batched on a GPU when there is one | "rapidocr": PP-OCRv4
    engine: str = "ppocr-v6"
    device: str = "auto"  # "auto" (GPU when torch sees one) | "cpu" | "cuda"
    batch_size: int = 8  # images per process_batch call (one batched detector forward)
    replicas: int | str = "auto"  # model actors, each loads the model once: a count, or "auto" (sized from the cluster, see cost_per_image)
    cpus_per_replica: float = 1.0  # threads per replica (floor, at least 1); replicas, not threads, are what scale on CPU
    gpus_per_replica: float = 0.25  # used only on GPU; fractional packs replicas on one GPU
    detector_size: int = 512  # longest image side fed to the text detector, pixels (small images enlarged <= 2x)
    min_confidence: float = 0.0  # regions recognised below this confidence are dropped
    quantize: bool = True  # easyocr on CPU: CRAFT in static int8 (onnxruntime, calibrated once per machine, kept in the cache), the recogniser in dynamic int8; false: fp32 (recorded as ocr_precision)

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        problems = require(
            (self.engine in OCR_ENGINES, f"ocr.engine must be one of {', '.join(OCR_ENGINES)}, not {self.engine!r}"),
            (self.device in {"auto", "cpu", "cuda"}, f"ocr.device must be auto, cpu or cuda, not {self.device!r}"),
            (self.batch_size >= 1, "ocr.batch_size must be >= 1"),
            (self.replicas == "auto" or (isinstance(self.replicas, int) and self.replicas >= 1),
             f"ocr.replicas must be a count >= 1 or \"auto\", not {self.replicas!r}"),
            (self.cpus_per_replica > 0, "ocr.cpus_per_replica must be > 0"),
            (0 < self.gpus_per_replica <= 1, "ocr.gpus_per_replica must be in (0, 1]"),
            (64 <= self.detector_size <= 4096, "ocr.detector_size must be within 64..4096"),
            (0 <= self.min_confidence <= 1, "ocr.min_confidence must be within 0..1"),
        )
        return problems

OCR_COLUMNS: tuple[str, ...] = tuple(OCR.names)
# CPU-seconds per image of one replica at detector_size 512 on the embedded set, CRAFT on
# onnxruntime (make bench, 2-core AMD EPYC with AVX-512 VNNI): easyocr's stage 0.41 with CRAFT in
# int8 (``quantize``, the default on CPU) and 1.88 in fp32 (bench/ocr_bench.py); rapidocr's 0.06
# (bench/dag_bench.py's stages alone); a ViT-S-32 CLIP replica costs 0.05. The weights
# ``cost_per_image`` gives the pool sizing: only the ratios matter, and they hold on other CPUs
# far better than the seconds do.
# ppocr-v6: 0.14, measured on one thread like the CLIP replica's 0.05 (96 embedded images,
# 2026-12-06; easyocr's stage cost 0.92 and rapidocr's 0.115 in the same run, so easyocr's and
# rapidocr's older figures above understate them against ppocr-v6 and CLIP by about 2x).
CPU_S_PER_IMAGE = {"easyocr": 0.41, "easyocr-fp32": 1.88, "rapidocr": 0.06, "ppocr-v6": 0.14}
_RESULT_COLUMNS = ("n_regions", "text_area_ratio", "quads", "texts", "confidences", "ocr_text")


def text_area_ratio(quads: Sequence[Sequence[Sequence[float]]], width: int, height: int) -> float:
    """Area of the union of the quads, clipped to the image, over the image area.

    The union (shapely ``unary_union``) so that overlapping boxes are not counted twice; clipped
    so that a detector's margin outside the frame cannot push the ratio above 1.
    """
    if not quads or width <= 0 or height <= 0:
        return 0.0
    from shapely.geometry import Polygon, box
    from shapely.ops import unary_union

    polys = []
    for quad in quads:
        poly = Polygon([(float(x), float(y)) for x, y in quad])
        if not poly.is_valid:
            poly = poly.buffer(0)
        polys.append(poly)
    area = unary_union(polys).intersection(box(0, 0, width, height)).area
    return float(min(1.0, max(0.0, area / (width * height))))


def _visible(region: Region, width: int, height: int) -> bool:
    """A region with no area inside the frame is not a region (keeps ratio > 0 iff n > 0)."""
    return text_area_ratio([region.quad], width, height) > 0.0


class OcrStage(BatchStage):
    """Detects and reads embedded text; one output row per input row, in order."""

    name = "ocr"
    reads = ("image",)
    output_schema = schema_for("ocr")
    status_column = "ocr_status"

    def __init__(self, config: OcrConfig, engine: OcrEngine | None = None) -> None:
        """Cheap: no model is loaded here (the driver builds stages; actors call ``setup``).

        ``engine`` lets tests and benchmarks share one loaded engine between stages.
        """
        self.config = config
        self.engine: OcrEngine | None = engine

    def resources(self, gpus_available: bool) -> Resources:
        """Per-replica CPU/GPU request; a GPU share only when the engine would run on CUDA."""
        cfg = self.config
        device = engine_device(cfg, gpus_available)
        return Resources(
            cpus=cfg.cpus_per_replica,
            gpus=cfg.gpus_per_replica if device == "cuda" else 0.0,
            batch_size=cfg.batch_size,
            replicas=cfg.replicas,  # "auto": sized by the runner from the cluster and cost_per_image
        )

    def cost_per_image(self) -> float:
        """CPU-seconds one replica spends per image: what ``replicas = "auto"`` sizes the pools by
        (pipeline/sample_runner.py). Only its ratio to the other stages' costs matters, on a GPU
        too (where it stands for the share of the device each stage needs).

        The detector is most of it, and its cost grows with its input's pixels.
        """
        fp32 = self.config.engine == "easyocr" and not self.config.quantize
        return CPU_S_PER_IMAGE[self.config.engine + ("-fp32" if fp32 else "")] * (self.config.detector_size / 512) ** 2

    def setup(self) -> None:
        """Load the engine once (per Ray actor); a second call is a no-op."""
        if self.engine is None:
            self.engine = make_engine(self.config)

    # -- rows --------------------------------------------------------------------------------

    def _provenance(self) -> dict[str, Any]:
        engine = self.engine
        assert engine is not None
        return {
            "ocr_engine": engine.engine,
            "ocr_device": engine.device,
            "ocr_precision": engine.precision,
            "ocr_detector_size": int(self.config.detector_size),
        }

    def _failed(self, uid: str, error: str) -> dict[str, Any]:
        row: dict[str, Any] = {"uid": uid, "ocr_status": "failed", "ocr_error": error}
        row.update({c: None for c in _RESULT_COLUMNS})
        row.update(self._provenance())  # which engine failed is part of the record
        return row

    def _ok(self, uid: str, image: np.ndarray, regions: list[Region]) -> dict[str, Any]:
        height, width = int(image.shape[0]), int(image.shape[1])
        kept = [
            r for r in regions
            if r.confidence >= self.config.min_confidence and _visible(r, width, height)
        ]
        quads = [[[float(x), float(y)] for x, y in r.quad] for r in kept]
        texts = [r.text for r in kept]
        row: dict[str, Any] = {
            "uid": uid,
            "ocr_status": "ok",
            "ocr_error": None,
            "n_regions": len(kept),
            "text_area_ratio": text_area_ratio(quads, width, height),
            "quads": quads,
            "texts": texts,
            "confidences": [float(r.confidence) for r in kept],
            "ocr_text": " ".join(texts),
        }
        row.update(self._provenance())
        return row

    def _run(self, images: list[np.ndarray]) -> list[list[Region] | Exception]:
        """One batched call; if it raises, each image alone so a bad one fails by itself."""
        engine = self.engine
        assert engine is not None
        size = self.config.detector_size
        return batch_or_each(lambda batch: engine.detect_batch(batch, size), images)

    def process_batch(self, batch: dict[str, Any]) -> dict[str, list]:
        """uid/image/decode_error columns in -> ``schemas.OCR`` columns out, one row per input."""
        self.setup()
        uids = [str(u) for u in batch["uid"]]
        images = list(batch["image"])
        errors = list(batch.get("decode_error", [None] * len(uids)))
        if not (len(uids) == len(images) == len(errors)):
            raise ValueError(f"batch columns differ in length: {len(uids)} uids, {len(images)} images, {len(errors)} errors")

        rows: list[dict[str, Any] | None] = [None] * len(uids)
        todo: list[int] = []
        for i, (uid, image, error) in enumerate(zip(uids, images, errors)):
            if image is None:
                rows[i] = self._failed(uid, str(error) if error else "no image: decoding produced nothing")
            else:
                todo.append(i)
        if todo:
            results = self._run([np.asarray(images[i]) for i in todo])
            for i, result in zip(todo, results):
                if isinstance(result, Exception):
                    rows[i] = self._failed(uids[i], f"ocr error: {type(result).__name__}: {result}")
                else:
                    rows[i] = self._ok(uids[i], np.asarray(images[i]), result)
        return {c: [row[c] for row in rows if row is not None] for c in OCR_COLUMNS}


__all__ = ["OCR_COLUMNS", "OcrStage", "text_area_ratio"]
