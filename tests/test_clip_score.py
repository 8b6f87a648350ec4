"""CLIP scoring with real open_clip forward passes (no pretrained weights exist offline).

A tiny CLIP architecture (2+2 layers, width 64) is registered with open_clip for speed and loaded
through the same ``create_model_and_transforms`` path as any model; one test also runs the default
ViT-S-32. Scores of random weights carry no meaning, but they are real cosines of real embeddings,
so determinism, masking and checkpoint round trips are all testable.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from core.devices import resolve_device
from manifests.schemas import schema_for
from models import clip as clip_mod
from models.clip import ClipModel, RandomWeightsWarning, load_clip, mask_text_regions, quad_points
from pipeline.config import ClipConfig, ConfigError
from sources.embedded import generate
from stages.clip_score import ClipScoreStage

TINY = "curation-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    """The stage sets torch's (process-wide) thread count; give other test modules theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory) -> str:
    import open_clip

    path = tmp_path_factory.mktemp("clipcfg") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    return TINY


@pytest.fixture(scope="module")
def tiny(tiny_name) -> ClipModel:
    clip_mod._warned_random = False
    with pytest.warns(RandomWeightsWarning, match="not meaningful"):
        return load_clip(tiny_name, "", device="cpu", precision="fp32", seed=0, batch_size=8)


@pytest.fixture(scope="module")
def samples() -> dict:
    """Decoded embedded samples: some with text (and ground-truth quads), some without."""
    out = {"text": [], "plain": []}
    for s in generate(16, 0):
        image = np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB"))
        row = {"uid": s.sample_id, "caption": s.caption, "image": image, "quads": [list(map(list, q)) for q in s.boxes]}
        out["text" if s.has_text else "plain"].append(row)
    assert len(out["text"]) >= 3 and len(out["plain"]) >= 2
    return out


def _batch(rows: list[dict], ocr_ok: bool = True) -> dict[str, list]:
    return {
        "uid": [r["uid"] for r in rows],
        "caption": [r["caption"] for r in rows],
        "image": [r["image"] for r in rows],
        "decode_error": [r.get("decode_error") for r in rows],
        "ocr_status": ["ok" if ocr_ok else "failed"] * len(rows),
        "n_regions": [len(r["quads"]) if ocr_ok else None for r in rows],
        "quads": [r["quads"] if ocr_ok else None for r in rows],
        "texts": [None] * len(rows),
    }


def _stage(model: ClipModel, **overrides) -> ClipScoreStage:
    stage = ClipScoreStage(dataclasses.replace(ClipConfig(), model=model.description.split()[0], **overrides))
    stage.clip = model  # the module's model: setup() is exercised separately
    return stage


# -- device and loading ----------------------------------------------------------------------------


def test_resolve_device() -> None:
    assert resolve_device("auto", cuda_available=False, key="clip.device") == "cpu"
    assert resolve_device("auto", cuda_available=True, key="clip.device") == "cuda"
    assert resolve_device("cpu", cuda_available=True, key="clip.device") == "cpu"
    assert resolve_device("cuda", cuda_available=True, key="clip.device") == "cuda"
    with pytest.raises(ValueError, match="no CUDA"):
        resolve_device("cuda", cuda_available=False, key="clip.device")
    assert issubclass(ConfigError, ValueError)


def test_resources_follow_device() -> None:
    cfg = ClipConfig(cpus_per_replica=2.0, gpus_per_replica=0.5, batch_size=16, replicas=3)
    on_gpu = ClipScoreStage(cfg).resources(gpus_available=True)
    assert (on_gpu.cpus, on_gpu.gpus, on_gpu.batch_size, on_gpu.replicas) == (2.0, 0.5, 16, 3)
    assert ClipScoreStage(cfg).resources(gpus_available=False).gpus == 0
    assert ClipScoreStage(dataclasses.replace(cfg, device="cpu")).resources(gpus_available=True).gpus == 0
    with pytest.raises(ValueError):
        ClipScoreStage(dataclasses.replace(cfg, device="cuda")).resources(gpus_available=False)


def test_auto_batch_is_small_on_cpu_and_today_s_on_a_gpu() -> None:
    """"auto" (the default): a CPU batch of 8, so the first scores wait for 8 OCR'd images, not 32
    (issue 27); a GPU keeps 32. A count is used as given, on both."""
    from stages.clip_score import CPU_BATCH, GPU_BATCH

    auto = ClipConfig()
    assert auto.batch_size == "auto" and (CPU_BATCH, GPU_BATCH) == (8, 32)
    assert ClipScoreStage(auto).resources(gpus_available=False).batch_size == 8
    assert ClipScoreStage(auto).resources(gpus_available=True).batch_size == 32
    assert ClipScoreStage(dataclasses.replace(auto, device="cpu")).resources(gpus_available=True).batch_size == 8
    assert ClipConfig(batch_size=5).batch_for("cpu") == ClipConfig(batch_size=5).batch_for("cuda") == 5
    for bad in ("big", 0):
        with pytest.raises(ConfigError, match="clip.batch_size must be a count >= 1 or \"auto\""):
            ClipConfig(batch_size=bad).validate()


def test_pool_sizing_reads_model_configs_as_open_clip_does_without_importing_it() -> None:
    """The driver sizes pools from the model's config; it reads the JSON open_clip reads (every
    model open_clip lists, ours included), and importing open_clip (3 s of torch and torchvision
    on the driver before the first actor started) is not needed for it."""
    import subprocess
    import sys

    import open_clip

    clip_mod.register_model_configs()
    names = open_clip.list_models()
    assert "ViT-S-32" in names and "curation-tiny" in names
    for name in names:
        assert clip_mod.model_config(name) == open_clip.get_model_config(name), name
    probe = ("import sys; from models.clip import relative_image_cost; "
             "print(relative_image_cost('ViT-B-32'), 'open_clip' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1])).stdout.split()
    assert out == ["4.0", "False", "False"]


def test_scores_are_finite_cosines_and_deterministic(tiny, tiny_name, samples) -> None:
    rows = samples["text"][:3] + samples["plain"][:2]
    images, captions = [r["image"] for r in rows], [r["caption"] for r in rows]
    first = tiny.encode_pairs(images, captions)
    assert first.shape == (5,) and first.dtype == np.float32
    assert np.isfinite(first).all() and (np.abs(first) <= 1).all()
    assert tiny.description == f"{tiny_name} random-init(seed=0)" and tiny.meaningful is False
    again = load_clip(tiny_name, "", device="cpu", precision="fp32", seed=0, batch_size=8)
    np.testing.assert_allclose(again.encode_pairs(images, captions), first, rtol=0, atol=1e-6)
    other = load_clip(tiny_name, "", device="cpu", precision="fp32", seed=1, batch_size=8)
    assert np.abs(other.encode_pairs(images, captions) - first).max() > 1e-3
    # Batching does not change a score (beyond float rounding).
    single = np.array([tiny.encode_pairs([im], [c])[0] for im, c in zip(images, captions)])
    np.testing.assert_allclose(single, first, rtol=0, atol=1e-5)


def test_checkpoint_file_loads_through_open_clip(tiny, tiny_name, samples, tmp_path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = load_clip(tiny_name, str(path), device="cpu", precision="fp32", seed=123)  # seed ignored
    assert loaded.meaningful is True
    assert loaded.description.startswith(f"{tiny_name} {path} sha256:")
    assert len(loaded.description.rsplit("sha256:", 1)[1]) == 8
    rows = samples["text"][:2] + samples["plain"][:1]
    images, captions = [r["image"] for r in rows], [r["caption"] for r in rows]
    np.testing.assert_allclose(loaded.encode_pairs(images, captions), tiny.encode_pairs(images, captions), atol=1e-6)
    with pytest.raises(ConfigError, match="neither a file nor an open_clip tag"):
        load_clip(tiny_name, str(tmp_path / "missing.pt"), device="cpu", precision="fp32", seed=0)
    with pytest.raises(ConfigError, match="not an open_clip model"):
        load_clip("no-such-clip", "", device="cpu", precision="fp32", seed=0)


def test_amp_on_cpu_runs_fp32(tiny_name) -> None:
    model = load_clip(tiny_name, "", device="cpu", precision="amp", seed=0)
    assert model.precision == "fp32"


# -- masking -------------------------------------------------------------------------------------


def _inside_outside(image: np.ndarray, quads) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(quad_points(q)).astype(np.int32) for q in quads], 1)
    return mask > 0, mask == 0


def test_mask_text_regions_removes_text(samples) -> None:
    row = samples["text"][0]
    image, quads = row["image"], row["quads"]
    masked = mask_text_regions(image, quads)
    assert masked is not image and masked.shape == image.shape and masked.dtype == np.uint8
    inside, outside = _inside_outside(image, quads)
    np.testing.assert_array_equal(masked[outside], image[outside])  # nothing outside the quads moves
    for quad in quads:
        one, _ = _inside_outside(image, [quad])
        before = image[one].astype(float).var(axis=0).sum()
        after = masked[one].astype(float).var(axis=0).sum()
        assert before > 100 and after < 0.05 * before, (before, after)
    # The untouched input and the no-text case.
    assert not np.array_equal(masked[inside], image[inside])
    assert mask_text_regions(image, []) is image and mask_text_regions(image, None) is image


def test_mask_fill_is_the_surrounding_mean_colour() -> None:
    image = np.zeros((60, 80, 3), np.uint8)
    image[:, :] = (10, 200, 30)
    image[20:40, 20:60] = (255, 255, 255)  # the "text"
    image[22:38, 25:55:3] = (0, 0, 0)
    quad = [[20, 20], [59, 20], [59, 39], [20, 39]]
    masked = mask_text_regions(image, [quad])
    assert (masked[20:40, 20:60] == (10, 200, 30)).all()
    telea = mask_text_regions(image, [quad], method="telea")
    assert telea[20:40, 20:60].astype(float).var(axis=(0, 1)).sum() < 0.05 * image[20:40, 20:60].astype(float).var(axis=(0, 1)).sum()
    with pytest.raises(ValueError):
        mask_text_regions(image, [[[0, 0], [1, float("nan")], [2, 2], [0, 2]]])


# -- the stage -----------------------------------------------------------------------------------


def test_stage_masked_score_changes_only_for_text_images(tiny, samples) -> None:
    rows = samples["text"][:4] + samples["plain"][:2]
    stage = _stage(tiny)
    out = stage.process_batch(_batch(rows))
    assert list(out) == schema_for("clip_score").names
    assert out["uid"] == [r["uid"] for r in rows]
    assert out["clip_status"] == ["ok"] * len(rows) and out["clip_error"] == [None] * len(rows)
    raw, hidden = np.array(out["clip_score"]), np.array(out["clip_score_masked"])
    np.testing.assert_allclose(raw, tiny.encode_pairs([r["image"] for r in rows], [r["caption"] for r in rows]), atol=1e-5)
    for k, r in enumerate(rows):
        assert out["clip_n_masked"][k] == len(r["quads"])
        if r["quads"]:
            assert abs(hidden[k] - raw[k]) > 1e-5, r["uid"]  # the text really left the image
            expected = tiny.encode_pairs([mask_text_regions(r["image"], r["quads"])], [r["caption"]])[0]
            assert hidden[k] == pytest.approx(expected, abs=1e-5)
        else:
            assert out["clip_score_masked"][k] == out["clip_score"][k]  # exactly: reused, not recomputed
    diffs = raw[: len(samples["text"][:4])] - hidden[:4]
    print(f"\ntiny random CLIP: raw - masked on text images: mean {diffs.mean():+.5f}, max |d| {np.abs(diffs).max():.5f}")
    assert out["clip_model"] == [tiny.description] * len(rows)
    assert out["clip_weights_meaningful"] == [False] * len(rows)
    assert out["clip_device"] == ["cpu"] * len(rows) and out["clip_precision"] == ["fp32"] * len(rows)
    table = pa.Table.from_pydict(out, schema=schema_for("clip_score"))
    assert table.num_rows == len(rows)


def test_none_image_row_fails_alone(tiny, samples) -> None:
    rows = [samples["text"][0], {"uid": "bad", "caption": "x", "image": None, "quads": [],
                                 "decode_error": "decode failed: OSError: truncated"}, samples["plain"][0]]
    out = _stage(tiny).process_batch(_batch(rows))
    assert out["clip_status"] == ["ok", "failed", "ok"]
    assert out["clip_error"][1] == "decode failed: OSError: truncated"
    assert out["clip_score"][1] is None and out["clip_score_masked"][1] is None
    pa.Table.from_pydict(out, schema=schema_for("clip_score"))


def test_forward_error_is_retried_per_row(tiny, samples) -> None:
    broken = {"uid": "weird", "caption": "five channels", "image": np.zeros((8, 8, 5), np.uint8), "quads": []}
    rows = [samples["text"][1], broken, samples["plain"][1]]
    out = _stage(tiny).process_batch(_batch(rows))
    assert out["clip_status"] == ["ok", "failed", "ok"]
    assert out["clip_error"][1].startswith("clip forward failed")
    good = tiny.encode_pairs([rows[0]["image"], rows[2]["image"]], [rows[0]["caption"], rows[2]["caption"]])
    np.testing.assert_allclose([out["clip_score"][0], out["clip_score"][2]], good, atol=1e-5)


def test_failed_ocr_gives_raw_score_and_no_masked_score(tiny, samples) -> None:
    rows = samples["text"][:2]
    out = _stage(tiny).process_batch(_batch(rows, ocr_ok=False))
    assert out["clip_status"] == ["ok", "ok"]
    assert all(s is not None for s in out["clip_score"])
    assert out["clip_score_masked"] == [None, None] and out["clip_n_masked"] == [None, None]
    assert all("OCR failed" in e for e in out["clip_error"])
    pa.Table.from_pydict(out, schema=schema_for("clip_score"))


def test_setup_loads_once_and_default_model_scores(samples) -> None:
    """The shipped default (ViT-S-32, random init) loads offline and scores through setup()."""
    stage = ClipScoreStage(ClipConfig(batch_size=4))
    clip_mod._warned_random = False
    with pytest.warns(RandomWeightsWarning):
        stage.setup()
    loaded = stage.clip
    stage.setup()
    assert stage.clip is loaded and loaded.description == "ViT-S-32 random-init(seed=0)"
    # the default engine on a CPU is onnxruntime (tests/test_clip_onnx.py), its threads the replica's share
    assert loaded.engine == "onnxruntime" and loaded.image.get_session_options().intra_op_num_threads == 1
    rows = samples["text"][:2] + samples["plain"][:1]
    t0 = time.perf_counter()
    out = stage.process_batch(_batch(rows))
    print(f"\nViT-S-32 CPU, 1 thread: 3 samples (+2 masked) in {time.perf_counter() - t0:.2f} s")
    assert out["clip_status"] == ["ok"] * 3
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in out["clip_score"] + out["clip_score_masked"])


def test_malformed_quad_costs_only_the_masked_score(tiny, samples) -> None:
    bad = dict(samples["text"][0], quads=[[[0, 0], [10, float("nan")], [10, 10], [0, 10]]])
    out = _stage(tiny).process_batch(_batch([bad, samples["text"][1]]))
    assert out["clip_status"] == ["ok", "ok"]
    assert out["clip_score"][0] is not None and out["clip_score_masked"][0] is None
    assert out["clip_n_masked"][0] is None and out["clip_error"][0].startswith("masked score unavailable")
    assert out["clip_score_masked"][1] is not None and out["clip_error"][1] is None
