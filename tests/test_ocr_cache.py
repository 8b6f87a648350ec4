"""The CRAFT models kept on disk (models/ocr.py ``_OrtCraft``, core/cache.py): built once, read
back by later engines, rebuilt when anything they are built from changes, never trusted unchecked.

Real easyocr weights, real torch export, real onnxruntime quantisation, each test on its own
temporary cache folder. Building the int8 model costs ~25 s on a busy 2-core machine, so the
module builds it three times in all (about a minute) and reads it back everywhere else.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

import pipeline  # noqa: F401  (environment for easyocr's imports)
import models.ocr as ocr
from core.cache import CACHE_ENV, file_sha256
from models.ocr import EasyOcrEngine, _OrtCraft, craft_cache_paths
from sources.embedded import generate

REAL_PHOTO = Path("/work/shared/realdata/scenetext/mmocr_wildreceipt")  # mmocr's kie toy set (Apache-2.0)


class Counted:
    """Wraps a module function of models.ocr and counts its calls (the real function runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls = 0
        real = getattr(ocr, name)

        def counted(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(ocr, name, counted)


@pytest.fixture(scope="module")
def craft() -> tuple[object, str]:
    """A loader of easyocr's CRAFT net (torch), loaded once, and the weights file it came from."""
    import easyocr
    import easyocr_en_models

    reader = easyocr.Reader(["en"], gpu=False, recognizer=False, model_storage_directory=easyocr_en_models.model_dir(),
                            download_enabled=False, verbose=False)
    return (lambda: reader.detector), ocr._craft_weights(reader)


@pytest.fixture(scope="module")
def built(craft: tuple[object, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, _OrtCraft]:
    """A cache folder holding the fp32 and int8 models, built once for the module (at the shipped
    calibration), and the detector that built them."""
    folder = tmp_path_factory.mktemp("ocr-cache")
    os.environ[CACHE_ENV] = str(folder)
    try:
        detector = _OrtCraft(craft[0], 1, int8=True, weights=craft[1])
    finally:
        del os.environ[CACHE_ENV]
    assert detector.int8 and detector.from_cache == {"fp32": False, "int8": False}
    return folder, detector


@pytest.fixture
def cache(built: tuple[Path, _OrtCraft], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the built cache, the project cache for this test."""
    folder = tmp_path / "cache"
    for path in built[0].rglob("*"):
        if path.is_file():
            target = folder / path.relative_to(built[0])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def quick_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests of rebuilding calibrate on one image, not eight (4x faster; the first shape is also
    the int8 check's probe): what they test is when a model is built, not how well."""
    monkeypatch.setattr(ocr, "_CALIBRATION_SHAPES", ocr._CALIBRATION_SHAPES[:1])


def _images() -> list[np.ndarray]:
    """Real photographs with text (mmocr's two WildReceipt receipts) and rendered ones."""
    from PIL import Image

    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(REAL_PHOTO.iterdir())
              if p.suffix.lower() in {".jpg", ".jpeg", ".png"}]
    rendered = [np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in generate(8, seed=5) if s.has_text]
    return photos + rendered[:3]


def test_a_second_engine_reads_the_cache_and_finds_the_same_boxes(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   built: tuple[Path, _OrtCraft]) -> None:
    """The engine of a later actor exports and quantises nothing, reads only the int8 file (no
    fp32 model needed), and finds and reads exactly what the freshly built detector does."""
    quantise, export = Counted(monkeypatch, "quantize_craft"), Counted(monkeypatch, "_export_craft_onnx")
    engine = EasyOcrEngine(device="cpu", quantize=True, num_threads=1)
    assert (quantise.calls, export.calls) == (0, 0)
    assert engine._ort.from_cache == {"fp32": False, "int8": True}
    assert getattr(engine._reader, "detector", None) is None  # torch's CRAFT was not even loaded
    assert engine.precision == "detector int8, recogniser int8-dynamic" and "int8_cached_s" in engine.load_timings
    images = _images()
    assert len(images) >= 4
    got = engine.detect_batch(images, 512)
    engine._ort = built[1]  # the same engine with the detector built in memory, not read from disk
    want = engine.detect_batch(images, 512)
    assert sum(len(r) for r in want) > 10
    assert [[(r.quad, r.text) for r in rs] for rs in got] == [[(r.quad, r.text) for r in rs] for rs in want]


def test_a_corrupt_cached_model_is_rebuilt(cache: Path, monkeypatch: pytest.MonkeyPatch, craft: tuple[object, str],
                                           quick_calibration: None) -> None:
    """A file that is not a model, or a truncated one, is built again (and then read back)."""
    paths = craft_cache_paths(craft[1])
    paths["int8"].write_bytes(b"not a model" * 100)
    paths["fp32"].write_bytes(paths["fp32"].read_bytes()[:1_000_000])
    quantise, export = Counted(monkeypatch, "quantize_craft"), Counted(monkeypatch, "_export_craft_onnx")
    detector = _OrtCraft(craft[0], 1, int8=True, weights=craft[1])
    assert (quantise.calls, export.calls) == (1, 1)  # int8 failed -> rebuilt from fp32, which failed -> exported
    assert detector.int8 and detector.from_cache == {"fp32": False, "int8": False}
    again = _OrtCraft(craft[0], 1, int8=False, weights=craft[1])  # the rebuilt files are whole
    again_int8 = _OrtCraft(craft[0], 1, int8=True, weights=craft[1])
    assert (quantise.calls, export.calls) == (1, 1) and again.from_cache["fp32"] and again_int8.from_cache["int8"]


def test_a_cached_model_that_fails_its_check_is_rebuilt_once_then_fp32(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      craft: tuple[object, str],
                                                                      caplog: pytest.LogCaptureFixture,
                                                                      quick_calibration: None) -> None:
    """Never trusted unchecked: when the cached int8 model (and then its rebuild) disagrees with
    fp32 beyond the bound, the detector runs in fp32, as without a cache; nothing bad is kept."""
    path = craft_cache_paths(craft[1])["int8"]
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(ocr, "INT8_MIN_TEXT_IOU", 1.01)  # no model passes
    quantise = Counted(monkeypatch, "quantize_craft")
    with caplog.at_level("INFO", logger="models.ocr"):
        detector = _OrtCraft(craft[0], 1, int8=True, weights=craft[1])
    assert quantise.calls == 1 and not detector.int8 and detector.from_cache["fp32"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("failed its check" in m and "rebuilding" in m for m in messages)
    assert any(m.startswith("int8 CRAFT unavailable (int8 CRAFT disagrees with fp32") for m in messages)
    assert path.stat().st_mtime_ns == stamp  # the failed rebuild was not written


def test_a_changed_key_rebuilds(cache: Path, monkeypatch: pytest.MonkeyPatch, craft: tuple[object, str],
                                quick_calibration: None) -> None:
    """Another onnxruntime is another key: both models are built again, beside the old ones."""
    import onnxruntime

    before = craft_cache_paths(craft[1])
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.0-other")
    after = craft_cache_paths(craft[1])
    assert after["int8"] != before["int8"] and after["fp32"] != before["fp32"]
    quantise, export = Counted(monkeypatch, "quantize_craft"), Counted(monkeypatch, "_export_craft_onnx")
    detector = _OrtCraft(craft[0], 1, int8=True, weights=craft[1])
    assert (quantise.calls, export.calls) == (1, 1) and detector.int8 and not any(detector.from_cache.values())
    assert after["int8"].is_file() and before["int8"].is_file()


def test_the_key_names_every_input(cache: Path, monkeypatch: pytest.MonkeyPatch, craft: tuple[object, str]) -> None:
    """torch's version and the cache version change both files; reduce_range (a CPU without VNNI)
    only the int8 one."""
    import torch

    monkeypatch.setattr(ocr, "cpu_has_vnni", lambda: True)
    base = craft_cache_paths(craft[1])
    monkeypatch.setattr(ocr, "cpu_has_vnni", lambda: False)
    no_vnni = craft_cache_paths(craft[1])
    assert no_vnni["fp32"] == base["fp32"] and no_vnni["int8"] != base["int8"]
    monkeypatch.setattr(ocr, "CRAFT_CACHE_VERSION", ocr.CRAFT_CACHE_VERSION + 1)
    bumped = craft_cache_paths(craft[1])
    assert bumped["fp32"] != no_vnni["fp32"] and bumped["int8"] != no_vnni["int8"]
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    other_torch = craft_cache_paths(craft[1])
    assert other_torch["fp32"] != bumped["fp32"] and other_torch["int8"] != bumped["int8"]


def test_weights_are_hashed_once_per_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights' sha256 is remembered by (path, size, mtime), on disk for the next process;
    a file rewritten in place is hashed again."""
    import hashlib

    import core.cache as cache

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights one")
    assert file_sha256(weights, "ocr") == hashlib.sha256(b"weights one").hexdigest()
    monkeypatch.setattr(cache, "_FILE_HASHES", {})  # a new process: only the disk record is left
    record = next((tmp_path / "cache" / "ocr" / "file-hashes").glob("*.json"))
    record.write_text(record.read_text().replace(hashlib.sha256(b"weights one").hexdigest(), "a" * 64))
    assert file_sha256(weights, "ocr") == "a" * 64  # read from the record, not hashed
    weights.write_bytes(b"weights two, longer")
    assert file_sha256(weights, "ocr") == hashlib.sha256(b"weights two, longer").hexdigest()


def test_without_an_onnx_model_the_engine_detects_with_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Reader is built without torch's CRAFT on the CPU path; when no ONNX model can be had
    (the export fails, nothing cached) the engine loads it then and detects with torch."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))

    def broken(net: object) -> bytes:
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(ocr, "_export_craft_onnx", broken)
    engine = EasyOcrEngine(device="cpu", quantize=True, num_threads=1)
    assert engine.detector_backend == "torch" and engine.precision.startswith("detector fp32")
    image = _images()[-1]  # a rendered one
    assert engine.detect_batch([image], 320)[0]
    assert not list((tmp_path / "cache" / "ocr").glob("craft-*"))  # nothing half-built was kept
