"""OCR: device resolution, the stage's contract, batching correctness and an accuracy floor.

Real models, no mocks. Each engine is loaded once per module, and the 40-image stage run is
shared by the tests that only read its output, so the module stays within ~90 s on 2 cores.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import pipeline  # noqa: F401  (environment for easyocr's imports)
from core.devices import resolve_device
from manifests.schemas import schema_for
from models.ocr import MAX_UPSCALE, EasyOcrEngine, RapidOcrEngine, detector_scale, group_by_canvas, make_engine
from pipeline.config import OcrConfig
from pipeline.ocr_accuracy import match_regions, polygon_iou, score_ocr, score_ocr_rows
from sources.embedded import generate, ground_truth_table
from stages.ocr import OcrStage, text_area_ratio

N_IMAGES = 40
SEED = 3
DETECTOR_SIZE = 320  # the size the benchmark picks; 512 would triple this module's runtime
THREADS = os.cpu_count() or 1
BASE_URL = "http://127.0.0.1:9"


def _config(**overrides: object) -> OcrConfig:
    values: dict = dict(engine="easyocr", device="cpu", batch_size=8, cpus_per_replica=float(THREADS),
                        detector_size=DETECTOR_SIZE)
    values.update(overrides)
    return OcrConfig(**values)


# -- pure logic ------------------------------------------------------------------------------


def test_resolve_device_both_ways() -> None:
    assert resolve_device("auto", cuda_available=True, key="ocr.device") == "cuda"
    assert resolve_device("auto", cuda_available=False, key="ocr.device") == "cpu"
    assert resolve_device("cpu", cuda_available=True, key="ocr.device") == "cpu"
    assert resolve_device("cuda", cuda_available=True, key="ocr.device") == "cuda"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda", cuda_available=False, key="ocr.device")


def test_stage_resources_ask_for_a_gpu_only_when_it_runs_on_one() -> None:
    config = _config(device="auto", cpus_per_replica=2.0, gpus_per_replica=0.25, batch_size=16, replicas=3)
    stage = OcrStage(config)  # cheap: no model loaded
    assert stage.engine is None
    on_gpu = stage.resources(gpus_available=True)
    on_cpu = stage.resources(gpus_available=False)
    assert (on_gpu.cpus, on_gpu.gpus, on_gpu.batch_size, on_gpu.replicas) == (2.0, 0.25, 16, 3)
    assert (on_cpu.cpus, on_cpu.gpus, on_cpu.batch_size, on_cpu.replicas) == (2.0, 0.0, 16, 3)
    assert OcrStage(_config(device="cpu")).resources(gpus_available=True).gpus == 0.0
    assert OcrStage(_config(engine="rapidocr", device="auto")).resources(gpus_available=True).gpus == 0.0
    with pytest.raises(ValueError):
        OcrStage(_config(device="cuda")).resources(gpus_available=False)


def test_the_shipped_engine_loads_without_importing_torch() -> None:
    """An OCR actor on the onnxruntime engines (ppocr-v6, shipped, and rapidocr) never imports torch:
    asking torch whether CUDA exists cost 2 of an OCR actor's 2.3 s of set-up (issue 27)."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.config import load_config; from stages.ocr import OcrStage; "
            "cfg = load_config().ocr; stage = OcrStage(cfg); stage.setup(); "
            "assert stage.resources(gpus_available=False).gpus == 0; "
            "print(cfg.engine, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ppocr-v6", "False"], done.stdout


def test_small_images_are_enlarged_for_the_detector_at_most_max_upscale() -> None:
    """Large images shrink to detector_size; a 35x19 word crop is not blown up 15x (that split its
    letters and cost a full forward, see models.ocr.MAX_UPSCALE)."""
    assert detector_scale(1200, 1600, 512) == pytest.approx(0.32)
    assert detector_scale(348, 348, 512) == pytest.approx(512 / 348)  # within the cap
    assert detector_scale(19, 35, 512) == MAX_UPSCALE == 2.0
    assert detector_scale(19, 35, 512, max_upscale=float("inf")) == pytest.approx(512 / 35)
    assert detector_scale(19, 35, 512, max_upscale=0.5) == 1.0  # a cap below 1 never shrinks


def test_canvas_groups_cover_the_batch_once() -> None:
    shapes = [(240, 320), (320, 240), (240, 320), (200, 320), (320, 320)]
    for tolerance in (0.0, 0.15, 100.0):
        groups = group_by_canvas(shapes, tolerance)
        assert sorted(i for g in groups for i in g) == list(range(len(shapes)))
    assert len(group_by_canvas(shapes, 100.0)) == 1
    # a landscape and a portrait image never share a canvas at a CPU-sized tolerance
    assert all(not {0, 1} <= set(g) for g in group_by_canvas(shapes, 0.15))


def test_scoring_bounds() -> None:
    samples = generate(12, SEED)
    truth = [dataclasses.asdict(s) for s in samples]
    boxes = [list(s.boxes) for s in samples]
    texts = [list(s.box_texts) for s in samples]
    assert sum(map(len, boxes)) > 0
    perfect = score_ocr_rows(boxes, texts, truth)
    assert (perfect.precision, perfect.recall, perfect.f1) == (1.0, 1.0, 1.0)
    assert perfect.word_recall == 1.0 and perfect.has_text_accuracy == 1.0
    empty = score_ocr_rows([[] for _ in samples], [[] for _ in samples], truth)
    assert empty.f1 == 0.0 and empty.recall == 0.0 and empty.word_recall == 0.0
    square = [[0, 0], [10, 0], [10, 10], [0, 10]]
    half = [[5, 0], [15, 0], [15, 10], [5, 10]]
    assert polygon_iou(square, square) == pytest.approx(1.0)
    assert polygon_iou(square, half) == pytest.approx(1 / 3)
    assert match_regions([square, half], [square], 0.5) == [(0, 0, 1.0)]  # one-to-one


# -- real engines ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples() -> list:
    return generate(N_IMAGES, SEED)


@pytest.fixture(scope="module")
def images(samples: list) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples]


@pytest.fixture(scope="module")
def easy_engine() -> EasyOcrEngine:
    engine = make_engine(_config(), cuda_available=False)
    assert isinstance(engine, EasyOcrEngine)
    return engine


@pytest.fixture(scope="module")
def stage(easy_engine: EasyOcrEngine) -> OcrStage:
    return OcrStage(_config(), engine=easy_engine)


@pytest.fixture(scope="module")
def stage_run(stage: OcrStage, samples: list, images: list[np.ndarray]) -> dict:
    """The stage over all images; the first call has 12 images plus one undecodable row."""
    uids = [s.sample_id for s in samples]
    first = {
        "uid": uids[:5] + ["broken"] + uids[5:12],
        "image": images[:5] + [None] + images[5:12],
        "decode_error": [None] * 5 + ["corrupt image: image file is truncated"] + [None] * 7,
    }
    batches = [stage.process_batch(first)]
    for lo in range(12, N_IMAGES, 8):
        hi = min(N_IMAGES, lo + 8)
        batches.append(stage.process_batch({"uid": uids[lo:hi], "image": images[lo:hi],
                                             "decode_error": [None] * (hi - lo)}))
    return {"first": batches[0], "all": {c: sum((b[c] for b in batches), []) for c in batches[0]}}


def _ok_rows(stage_run: dict) -> dict[str, list]:
    cols = stage_run["all"]
    keep = [i for i, uid in enumerate(cols["uid"]) if uid != "broken"]
    return {c: [v[i] for i in keep] for c, v in cols.items()}


def test_process_batch_rows_order_and_failures(stage_run: dict, samples: list) -> None:
    first = stage_run["first"]
    expected = [s.sample_id for s in samples[:5]] + ["broken"] + [s.sample_id for s in samples[5:12]]
    assert list(first) == list(schema_for("ocr").names)
    assert first["uid"] == expected
    assert all(len(v) == len(expected) for v in first.values())
    broken = expected.index("broken")
    assert first["ocr_status"][broken] == "failed"
    assert first["ocr_error"][broken] == "corrupt image: image file is truncated"
    assert first["n_regions"][broken] is None and first["quads"][broken] is None
    others = [i for i in range(len(expected)) if i != broken]
    assert all(first["ocr_status"][i] == "ok" and first["ocr_error"][i] is None for i in others)
    assert first["ocr_engine"][broken].startswith("easyocr")


def test_text_images_get_regions_and_text_free_ones_do_not(stage_run: dict, samples: list) -> None:
    cols = _ok_rows(stage_run)
    has_text = [s.has_text for s in samples]
    n = cols["n_regions"]
    with_text = [k for k, t in zip(n, has_text) if t]
    without = [k for k, t in zip(n, has_text) if not t]
    assert with_text and without
    assert sum(k > 0 for k in with_text) >= 0.9 * len(with_text)
    assert sum(k == 0 for k in without) >= 0.9 * len(without)
    for texts, joined in zip(cols["texts"], cols["ocr_text"]):
        assert joined == " ".join(texts)


def test_text_area_ratio_is_positive_exactly_when_regions_exist(stage_run: dict, images: list) -> None:
    cols = _ok_rows(stage_run)
    for ratio, n, quads, image in zip(cols["text_area_ratio"], cols["n_regions"], cols["quads"], images):
        assert 0.0 <= ratio <= 1.0
        assert (ratio > 0) == (n > 0)
        assert len(quads) == n
        assert ratio == pytest.approx(text_area_ratio(quads, image.shape[1], image.shape[0]))
    # union, not sum: two identical quads cover what one covers
    quad = [[0, 0], [50, 0], [50, 20], [0, 20]]
    assert text_area_ratio([quad, quad], 100, 100) == pytest.approx(0.1)


def test_output_casts_to_the_ocr_schema(stage_run: dict) -> None:
    table = pa.Table.from_pydict(stage_run["all"], schema=schema_for("ocr"))
    assert table.num_rows == N_IMAGES + 1
    assert table.schema.equals(schema_for("ocr"))
    ok = table.filter(pa.compute.equal(table["ocr_status"], "ok"))
    assert set(ok["ocr_device"].to_pylist()) == {"cpu"}
    assert set(ok["ocr_detector_size"].to_pylist()) == {DETECTOR_SIZE}


def test_accuracy_floor(stage_run: dict, samples: list) -> None:
    """Real detection clears these floors by a margin; a detector that is off or misplaced cannot."""
    cols = _ok_rows(stage_run)
    acc = score_ocr_rows(cols["quads"], cols["texts"], [dataclasses.asdict(s) for s in samples])
    print(acc.format())
    assert acc.f1 >= 0.7
    assert acc.recall >= 0.7
    assert acc.word_recall >= 0.85
    assert acc.has_text_accuracy >= 0.9


def test_score_ocr_joins_manifests(stage_run: dict, samples: list) -> None:
    truth = ground_truth_table(samples, BASE_URL)
    urls = truth["url"].to_pylist()
    lost = samples[0].sample_id  # its download failed: not scored
    download = pa.table({
        "uid": [s.sample_id for s in samples],
        "url": urls,
        "status": ["failed" if s.sample_id == lost else "ok" for s in samples],
    })
    ocr = pa.Table.from_pydict(stage_run["all"], schema=schema_for("ocr"))
    acc = score_ocr(ocr, download, truth)
    cols = _ok_rows(stage_run)
    direct = score_ocr_rows(cols["quads"][1:], cols["texts"][1:], [dataclasses.asdict(s) for s in samples[1:]])
    assert acc.n_images == N_IMAGES - 1
    assert (acc.f1, acc.word_recall, acc.n_failed) == (direct.f1, direct.word_recall, 0)


def test_batched_detection_matches_one_at_a_time(easy_engine: EasyOcrEngine, samples: list,
                                                 images: list[np.ndarray]) -> None:
    """One padded canvas for images of different shapes (the GPU path) finds what single calls find."""
    picked = [i for i, s in enumerate(samples) if s.has_text][:8] + [i for i, s in enumerate(samples) if not s.has_text][:2]
    assert len({images[i].shape for i in picked}) >= 3  # really mixed sizes
    single = [easy_engine.detect_batch([images[i]], DETECTOR_SIZE)[0] for i in picked]
    saved = easy_engine.canvas_tolerance
    easy_engine.canvas_tolerance = 1e9  # everything in one forward
    try:
        batched = easy_engine.detect_batch([images[i] for i in picked], DETECTOR_SIZE)
    finally:
        easy_engine.canvas_tolerance = saved
    same_count = sum(len(a) == len(b) for a, b in zip(single, batched))
    assert same_count >= 0.9 * len(picked), ([len(a) for a in single], [len(b) for b in batched])
    same_text = sum(sorted(r.text for r in a) == sorted(r.text for r in b) for a, b in zip(single, batched))
    assert same_text >= 0.8 * len(picked)


def test_one_bad_image_fails_alone(stage: OcrStage, images: list[np.ndarray]) -> None:
    """The batched call raises on the malformed array; the retry keeps the good rows."""
    bad = np.zeros((40, 40, 5), dtype=np.uint8)  # not RGB: the engine refuses it
    out = stage.process_batch({"uid": ["a", "bad", "b"], "image": [images[0], bad, images[1]],
                               "decode_error": [None, None, None]})
    assert out["uid"] == ["a", "bad", "b"]
    assert out["ocr_status"] == ["ok", "failed", "ok"]
    assert "HxWx3" in out["ocr_error"][1]


def test_rapidocr_finds_text(samples: list, images: list[np.ndarray]) -> None:
    config = _config(engine="rapidocr")
    engine = make_engine(config, cuda_available=False)
    assert isinstance(engine, RapidOcrEngine)
    index = next(i for i, s in enumerate(samples) if s.has_text and len(s.box_texts) >= 2)
    out = OcrStage(config, engine=engine).process_batch(
        {"uid": ["x", "y"], "image": [images[index], images[index][:, ::-1].copy()], "decode_error": [None, None]})
    assert out["ocr_status"] == ["ok", "ok"]
    assert out["n_regions"][0] > 0
    found = {w.casefold() for t in out["texts"][0] for w in t.split()}
    assert found & {w.casefold() for w in samples[index].words}
    assert out["ocr_engine"][0].startswith("rapidocr-onnxruntime")
    pa.Table.from_pydict(out, schema=schema_for("ocr"))


def test_int8_detector_falls_back_to_fp32_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    """The int8 detector is built at load; if the quantiser fails (or disagrees with fp32), the
    engine detects in fp32 and records that as its precision (each row's ocr_precision, the run's
    summary) and in its log: never a failed actor, nor a line on the console from every actor."""
    import models.ocr as ocr
    from core.cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # an empty cache: the int8 model must be built here

    def broken(model_bytes: bytes) -> bytes:
        raise RuntimeError("no quantiser here")

    monkeypatch.setattr(ocr, "quantize_craft", broken)
    with caplog.at_level("INFO", logger="models.ocr"):
        engine = EasyOcrEngine(device="cpu", quantize=True, num_threads=1)
    assert engine.precision == "detector fp32, recogniser int8-dynamic"
    assert engine.detector_backend == "onnxruntime"
    assert any("int8 CRAFT unavailable (no quantiser here)" in r.getMessage() for r in caplog.records)
    assert all(r.levelname == "INFO" for r in caplog.records if "int8" in r.getMessage())


def test_int8_calibration_is_rendered_the_same_every_time() -> None:
    """Every actor (and every run) calibrates on the same pixels, so builds the same int8 model."""
    from models.ocr import _calibration_batches

    first, again = _calibration_batches(), _calibration_batches()
    assert len(first) == 8 and all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(b.dtype == np.float32 and b.shape[:2] == (1, 3) and max(b.shape[2:]) == 512 for b in first)
