"""CLIP scoring on onnxruntime (models/clip_onnx.py) against open_clip on torch, the definition.

Real open_clip models (random init: no pretrained weights offline), exported by the code the
actors run, compared on real photographs (shared/realdata/scenetext) and real LAION alt-texts
(shared/realdata/laion_captions10k) with the tokenizer and the forward open_clip itself uses.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.cache import CACHE_ENV
from core.errors import ConfigError
from models.clip import ClipModel, load_clip
from models.clip_onnx import OnnxClip, cache_folder, cache_key, load_clip_scorer
from models.clip_tokens import ClipTokenizer
from pipeline.config import ClipConfig
from sources.embedded import generate
from stages.clip_score import ClipScoreStage

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
CAPTIONS = REALDATA / "laion_captions10k" / "test_10000.parquet"
PHOTOS = [REALDATA / "scenetext" / p for p in ("mmocr_wildreceipt/1.jpeg", "mmocr_wildreceipt/2.jpeg",
                                                "rapidocr_tests/ch_en_num.jpg")]
TRICKY = ["", "   ", "&amp;amp; Tom &lt;3 &#39;quoted&#39;", "<start_of_text> hi <end_of_text>",
          "na\u00efve caf\u00e9 \u6771\u4eac \U0001F600 \u00c6\u00d8\u00c5", "word " * 100, "x" * 300,
          "It's they're I'll we'd", "ALL CAPS SALE 50% OFF!!!", "tab\there\nnewline", "\u2019curly\u2019 \u201cquotes\u201d"]


def _real_captions(n: int | None = None) -> list[str]:
    if not CAPTIONS.exists():
        pytest.skip(f"real captions not found at {CAPTIONS}")
    texts = [t or "" for t in pq.read_table(CAPTIONS, columns=["TEXT"]).column("TEXT").to_pylist()]
    return texts[:n] if n else texts


def _photos() -> list[np.ndarray]:
    found = [np.asarray(Image.open(p).convert("RGB")) for p in PHOTOS if p.exists()]
    embedded = [np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in generate(6, 0)]
    return found + embedded


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_tokenizer_gives_open_clips_ids_on_10000_real_captions() -> None:
    """The torch-free tokenizer against open_clip's own on every real alt-text and the edge cases
    (HTML entities, special-token text, non-Latin scripts, emoji, truncation at the context)."""
    import open_clip

    captions = _real_captions() + TRICKY
    ours = ClipTokenizer()(captions)
    theirs = open_clip.get_tokenizer("ViT-S-32")(captions).numpy()
    differ = [captions[i][:60] for i in np.flatnonzero((ours != theirs).any(axis=1))]
    assert differ == []
    assert ours.shape == (len(captions), 77) and (ours[:, 0] == ours[0, 0]).all()
    assert (ours[:, -1][ours[:, -1] != 0] == ClipTokenizer().end).all()  # cut captions still end with the end token


@pytest.mark.parametrize("model", ["ViT-S-32", "curation-tiny-rn"])
def test_onnx_scores_equal_open_clips(cache, model) -> None:
    """The exported model (the shipped default, and a ResNet image tower) embeds real photos and
    real captions as open_clip does on torch, to 1e-4 per unit-embedding component."""
    scorer = load_clip_scorer(model, "", device="cpu", precision="fp32", seed=3, num_threads=1, batch_size=4)
    assert isinstance(scorer, OnnxClip)
    reference = load_clip(model, "", device="cpu", precision="fp32", seed=3, batch_size=4)
    assert scorer.description == reference.description and scorer.meaningful is False
    images, captions = _photos(), _real_captions(40)[:9] + TRICKY[:2]
    images = images[: len(captions)]
    captions = captions[: len(images)]
    np.testing.assert_allclose(scorer.encode_images(images), reference.encode_images(images), atol=1e-4)
    np.testing.assert_allclose(scorer.encode_texts(captions), reference.encode_texts(captions), atol=1e-4)
    np.testing.assert_allclose(scorer.encode_pairs(images, captions), reference.encode_pairs(images, captions), atol=1e-4)
    assert (cache_folder(cache_key(model, "", 3)) / "meta.json").exists()
    assert not (cache_folder(cache_key(model, "", 4)) / "meta.json").exists()  # another seed, other weights: not this build


def test_a_cached_model_loads_without_torch_and_a_bad_one_is_rebuilt(cache, caplog) -> None:
    """A build sweeps what dead builds left; the second actor (a fresh process) reads the build and
    never imports torch; a build that fails its probe check is rebuilt, never used."""
    folder = cache_folder(cache_key("curation-tiny", "", 0))
    dead = folder.with_name(f".{folder.name}.999999999.tmp")  # an actor killed mid-export left its half-built folder
    live = folder.with_name(f".{folder.name}.{os.getppid()}.tmp")  # a process that is alive: another build now
    for tmp in (dead, live):
        tmp.mkdir(parents=True)
        (tmp / "image.onnx").write_bytes(b"half")
    first = load_clip_scorer("curation-tiny", "", device="cpu", precision="fp32", seed=0)
    assert isinstance(first, OnnxClip)
    assert not dead.exists() and live.exists()  # swept, and another process's build in progress left alone
    code = ("import sys; from models.clip_onnx import load_clip_scorer; "
            "s = load_clip_scorer('curation-tiny', '', device='cpu', precision='fp32', seed=0); "
            "print(type(s).__name__, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, CACHE_ENV: str(cache)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["OnnxClip", "False"], done.stdout

    meta = json.loads((folder / "meta.json").read_text())
    meta["probe_image"][0][0] += 0.01  # as if the model on disk no longer computed what torch did
    (folder / "meta.json").write_text(json.dumps(meta))
    again = load_clip_scorer("curation-tiny", "", device="cpu", precision="fp32", seed=0)
    assert isinstance(again, OnnxClip)
    assert "failed its check" in caplog.text and "rebuilding" in caplog.text
    assert json.loads((folder / "meta.json").read_text())["probe_image"] != meta["probe_image"]


def test_the_stage_scores_the_same_on_either_engine(cache) -> None:
    """ClipScoreStage with the default engine (onnxruntime here) and with engine 'torch': the same
    scores, masked scores and embeddings on the same batch, and the same labels."""
    samples = list(generate(12, 1))
    images = [np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples]
    batch = {"uid": [s.sample_id for s in samples], "caption": [s.caption for s in samples], "image": images,
             "decode_error": [None] * len(samples), "ocr_status": ["ok"] * len(samples),
             "quads": [[list(map(list, q)) for q in s.boxes] for s in samples]}
    outs = {}
    for engine in ("auto", "torch"):
        stage = ClipScoreStage(dataclasses.replace(ClipConfig(), model="curation-tiny", engine=engine))
        stage.setup()
        assert isinstance(stage.clip, OnnxClip if engine == "auto" else ClipModel)
        outs[engine] = stage.process_batch(batch)
    auto, torch_out = outs["auto"], outs["torch"]
    assert any(n for n in auto["clip_n_masked"])
    for column in ("clip_model", "clip_status", "clip_n_masked", "clip_device", "clip_precision"):
        assert auto[column] == torch_out[column], column
    for column in ("clip_score", "clip_score_masked"):
        np.testing.assert_allclose(np.asarray(auto[column], float), np.asarray(torch_out[column], float), atol=1e-4)
    np.testing.assert_allclose(np.stack(auto["image_embedding"]).astype(float),
                               np.stack(torch_out["image_embedding"]).astype(float), atol=2e-3)  # float16 columns


def test_engine_settings_that_cannot_be_served_are_config_errors(cache) -> None:
    with pytest.raises(ConfigError, match="clip.engine"):
        ClipConfig(engine="tensorrt").validate()
    with pytest.raises(ConfigError, match="runs on the CPU"):
        ClipConfig(engine="onnx", device="cuda").validate()
    with pytest.raises(ConfigError, match="needs a model whose open_clip config is a file"):
        load_clip_scorer("hf-hub:someone/some-clip", "", device="cpu", precision="fp32", seed=0, engine="onnx")
    assert isinstance(load_clip_scorer("curation-tiny", "", device="cpu", precision="fp32", seed=0, engine="torch"), ClipModel)
    assert not (cache / "clip").exists()  # engine torch builds nothing


def test_no_gpu_is_known_without_importing_torch() -> None:
    """The CLIP actor decides 'no GPU here' without torch (1.4 s) when there is plainly none."""
    code = "import sys; from core.devices import cuda_visible; print(cuda_visible(), 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]
