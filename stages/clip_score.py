"""CLIP-score stage: cosine of image and caption embeddings, before and after hiding text (T-MARS).

``clip_score`` rewards parrot captions (Parrot Captions: mean 0.336 with text vs 0.297 after text
removal), so each sample also gets ``clip_score_masked``: the same score with every OCR text
region filled by its surroundings' mean colour. Only images with text regions need the second
image forward; for the others the masked score *is* the score (the same float, not a recompute).
Each caption is embedded once and reused for both images.

Row semantics (``clip_status`` is "ok" exactly when ``clip_score`` is present):
- no decoded image -> "failed", the decode error in ``clip_error``;
- a forward that raises for the batch is retried row by row, so a bad row fails alone;
- OCR failed (or did not run), so the text regions are unknown -> "ok" with ``clip_score`` but
  null ``clip_score_masked`` / ``clip_n_masked`` and the reason in ``clip_error``: equating the
  masked score with the raw one would claim "no text" without evidence;
- a quad that cannot be drawn (malformed geometry) likewise nulls only the masked score.

With ``clip.keep_embeddings`` (the default) an ok row also keeps the two unit vectors its score is
the cosine of: ``image_embedding`` (the plain image, not the masked one) and ``text_embedding``,
as float16 in the same part as the scores, so the two can never disagree. Near-duplicate search,
clustering or a new score then read them (the catalog's ``embeddings`` view) and decode no image.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np

from core.devices import cuda_visible, resolve_device
from core.settings import config_section, require
from manifests.schemas import schema_for
from models.clip import (
    RANDOM_WEIGHTS_MESSAGE,
    ClipModel,
    RandomWeightsWarning,
    cosine_rows,
    mask_text_regions,
    relative_image_cost,
)
from models.clip_onnx import ENGINES, OnnxClip, load_clip_scorer
from stages.base import BatchStage, Resources, optional_column


@config_section
class ClipConfig:
    """CLIP scoring (stages/clip_score.py, models/clip.py) with open_clip."""

    model: str = "ViT-S-32"  # any open_clip model name
    pretrained: str = ""  # "" = random init (scores NOT meaningful); an open_clip tag; or a checkpoint file
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    # "auto": on the CPU, open_clip's model exported once to onnxruntime and cached (models/clip_onnx.py:
    # the actor starts without torch, ~4 s sooner on 2 cores, and embeds ~1.3x faster; the same scores
    # to ~1e-5), on a GPU torch; "torch": always open_clip on torch; "onnx": onnxruntime or an error
    engine: str = "auto"
    # images per forward and per actor call: a count, or "auto": CPU_BATCH on CPU, GPU_BATCH on a GPU
    batch_size: int | str = "auto"
    replicas: int | str = "auto"  # a count, or "auto": sized from the cluster and cost_per_image (pipeline/sample_runner.py)
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.5
    precision: str = "fp32"  # "fp32" | "amp" (autocast fp16/bf16 on GPU)
    seed: int = 0  # seed of the random init, so offline scores are reproducible
    keep_embeddings: bool = True  # keep each ok sample's image and caption embedding (float16) beside its scores
    # "pool": where the URL list brought the pool's own embeddings (DataComp's .npz, clip-retrieval's
    # .npy: [datasets.<name>] embeddings), import them, score by their cosine and decode no image
    # (pipeline/clip_import.py); "model": always compute with the model above
    embeddings_from: str = "pool"

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        problems = require(
            (bool(self.model), "clip.model must name an open_clip model"),
            (self.device in {"auto", "cpu", "cuda"}, f"clip.device must be auto, cpu or cuda, not {self.device!r}"),
            (self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1),
             f"clip.batch_size must be a count >= 1 or \"auto\", not {self.batch_size!r}"),
            (self.replicas == "auto" or (isinstance(self.replicas, int) and self.replicas >= 1),
             f"clip.replicas must be a count >= 1 or \"auto\", not {self.replicas!r}"),
            (self.cpus_per_replica > 0, "clip.cpus_per_replica must be > 0"),
            (0 < self.gpus_per_replica <= 1, "clip.gpus_per_replica must be in (0, 1]"),
            (self.precision in {"fp32", "amp"}, "clip.precision must be fp32 or amp"),
            (self.engine in ENGINES, f"clip.engine must be one of {', '.join(ENGINES)}, not {self.engine!r}"),
            (not (self.engine == "onnx" and self.device == "cuda"), "clip.engine 'onnx' runs on the CPU; clip.device is 'cuda'"),
            (self.embeddings_from in {"pool", "model"}, f"clip.embeddings_from must be pool or model, not {self.embeddings_from!r}"),
        )
        return problems

    def batch_for(self, device: str) -> int:
        """The batch on ``device`` ("cpu" or "cuda"): the count given, or the auto one."""
        if isinstance(self.batch_size, int):
            return self.batch_size
        return GPU_BATCH if device == "cuda" else CPU_BATCH


# "auto" batches. On CPU a forward of 8 images runs at ~0.9x the images/s of 32 (ViT-S-32, one
# thread: 21.5 vs 24 img/s), which is nothing next to OCR's ~1 CPU-s an image; but a CLIP batch
# waits for that many OCR'd images, so 32 held the run's first scores back by 24 more OCR'd images
# (~10 s on 2 cores; issue 27). On a GPU the forward wants the larger batch: 32 as before.
CPU_BATCH = 8
GPU_BATCH = 32

logger = logging.getLogger(__name__)

# CPU-seconds per sample of one single-threaded ViT-S-32 replica on the embedded set (a caption
# forward, the image, and the text-masked image for the ~half with text; 0.046 in make bench's dag
# stages alone): the weight ``cost_per_image`` gives the pool sizing, scaled by the model's size.
VIT_S_32_CPU_S_PER_IMAGE = 0.05


class Scored(NamedTuple):
    """One row's forward: its scores and the unit embeddings the raw score is the cosine of."""

    raw: float
    masked: float | None  # None: no masked image (no text), or the masked forward was not run
    image_embedding: np.ndarray  # float32, of the plain image
    text_embedding: np.ndarray  # float32


class ClipScoreStage(BatchStage):
    """Scores (image, caption) with open_clip, raw and with OCR text regions masked."""

    name = "clip_score"
    reads = ("image", "caption", "ocr_status", "quads")
    output_schema = schema_for("clip_score")
    status_column = "clip_status"

    def __init__(self, config: ClipConfig) -> None:
        self.config = config
        self.clip: ClipModel | OnnxClip | None = None

    def resources(self, gpus_available: bool) -> Resources:
        device = resolve_device(self.config.device, gpus_available, "clip.device")
        return Resources(
            cpus=self.config.cpus_per_replica,
            gpus=self.config.gpus_per_replica if device == "cuda" else 0.0,
            batch_size=self.config.batch_for(device),
            replicas=self.config.replicas,
        )

    def cost_per_image(self) -> float:
        """CPU-seconds one replica spends per sample, in proportion to the other stages' (see
        stages/ocr.py ``cost_per_image``): what ``replicas = "auto"`` sizes the pools by."""
        return VIT_S_32_CPU_S_PER_IMAGE * relative_image_cost(self.config.model)

    announced_warnings = (RandomWeightsWarning,)

    def notices(self) -> list[str]:
        """Random weights are allowed (offline runs, tests) but their scores mean nothing: said once."""
        return [] if self.config.pretrained else [RANDOM_WEIGHTS_MESSAGE]

    def setup(self) -> None:
        """Load the model once per actor (models/clip_onnx.py picks the engine); threads follow the
        replica's CPU share. On a machine without a GPU nothing here imports torch once the
        exported model is cached."""
        if self.clip is not None:
            return
        cfg = self.config
        device = resolve_device(cfg.device, cuda_visible(), "clip.device")
        self.clip = load_clip_scorer(
            cfg.model,
            cfg.pretrained,
            device=device,
            precision=cfg.precision,
            seed=cfg.seed,
            engine=cfg.engine,
            num_threads=max(1, int(cfg.cpus_per_replica)),
            batch_size=cfg.batch_for(device),
        )

    # -- batch ---------------------------------------------------------------------------------

    def process_batch(self, batch: dict[str, list]) -> dict[str, list]:
        """One CLIP_SCORE row per input row, same order."""
        if self.clip is None:
            self.setup()
        clip = self.clip
        assert clip is not None
        n = len(batch["uid"])
        images = optional_column(batch, "image", n)
        captions = [c if c is not None else "" for c in optional_column(batch, "caption", n)]
        decode_errors = optional_column(batch, "decode_error", n)
        ocr_status = optional_column(batch, "ocr_status", n)
        quads_col = optional_column(batch, "quads", n)

        out: dict[str, list] = {c: [None] * n for c in self.output_schema.names}
        out["uid"] = [str(u) for u in batch["uid"]]
        out["clip_model"] = [clip.description] * n
        out["clip_weights_meaningful"] = [clip.meaningful] * n
        out["clip_device"] = [clip.device] * n
        out["clip_precision"] = [clip.precision] * n

        # Per row: the masked image (None: same as original; "unknown": no masked score) and why.
        ok_rows: list[int] = []
        masked: dict[int, np.ndarray] = {}
        for i in range(n):
            if images[i] is None or np.asarray(images[i]).size == 0:
                out["clip_status"][i] = "failed"
                out["clip_error"][i] = decode_errors[i] or "no decoded image"
                continue
            ok_rows.append(i)
            if ocr_status[i] is None or str(ocr_status[i]) != "ok":
                out["clip_error"][i] = "masked score unavailable: OCR failed or did not run for this sample"
                continue
            quads = quads_col[i]
            n_quads = 0 if quads is None else len(quads)
            try:
                if n_quads:
                    masked[i] = mask_text_regions(images[i], quads)
                out["clip_n_masked"][i] = n_quads
            except Exception as err:  # noqa: BLE001 - a malformed quad costs this row's masked score only
                out["clip_error"][i] = f"masked score unavailable: {type(err).__name__}: {err}"

        scores = self._score(ok_rows, masked, images, captions, out)
        for i, row in scores.items():
            out["clip_status"][i] = "ok"
            out["clip_score"][i] = row.raw
            if out["clip_n_masked"][i] is not None:
                out["clip_score_masked"][i] = row.masked if row.masked is not None else row.raw
            if self.config.keep_embeddings:
                out["image_embedding"][i] = row.image_embedding.astype(np.float16)
                out["text_embedding"][i] = row.text_embedding.astype(np.float16)
        return out

    def _score(
        self,
        rows: list[int],
        masked: dict[int, np.ndarray],
        images: list[Any],
        captions: list[str],
        out: dict[str, list],
    ) -> dict[int, Scored]:
        """Each row's forward; whole batch first, then row by row if that raises."""
        try:
            return self._forward(rows, masked, images, captions)
        except Exception as err:  # noqa: BLE001 - find the bad row(s) below
            logger.warning("CLIP batch of %d failed (%s: %s); retrying row by row", len(rows), type(err).__name__, err)
        result: dict[int, Scored] = {}
        for i in rows:
            try:
                result.update(self._forward([i], masked, images, captions))
            except Exception as err:  # noqa: BLE001 - this row fails alone
                out["clip_status"][i] = "failed"
                out["clip_error"][i] = f"clip forward failed: {type(err).__name__}: {err}"
        return result

    def _forward(
        self, rows: list[int], masked: dict[int, np.ndarray], images: list[Any], captions: list[str]
    ) -> dict[int, Scored]:
        """One text forward per caption, one image forward per original and per masked image."""
        if not rows:
            return {}
        clip = self.clip
        assert clip is not None
        with_text = [i for i in rows if i in masked]
        texts = clip.encode_texts([captions[i] for i in rows])
        pixels = clip.encode_images([images[i] for i in rows] + [masked[i] for i in with_text])
        raw = cosine_rows(pixels[: len(rows)], texts)
        position = {i: k for k, i in enumerate(rows)}
        hidden = cosine_rows(pixels[len(rows) :], texts[[position[i] for i in with_text]]) if with_text else []
        result = {i: Scored(float(raw[k]), None, pixels[k], texts[k]) for k, i in enumerate(rows)}
        for i, value in zip(with_text, hidden):
            result[i] = result[i]._replace(masked=float(value))
        for row in result.values():
            if not np.isfinite(row.raw) or (row.masked is not None and not np.isfinite(row.masked)):
                raise FloatingPointError("non-finite CLIP score")
        return result

