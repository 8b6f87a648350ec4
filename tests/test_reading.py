"""The reading start (training/reading.py, issue 28): the vocabulary, the drawing, and the cached
checkpoint that open_clip's own loading path takes as ``[train] pretrained``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from core.cache import CACHE_ENV
from pipeline.training_config import ReadingConfig
from sources.embedded.vocabulary import CLASSES
from training.reading_render import draw, reading_words

TINY = ReadingConfig(steps=3, batch_size=4, warmup_steps=1, held_out=8, workers=0)
MODEL = "curation-tiny-rn"


def test_vocabulary_is_1000_whole_bpe_tokens_with_the_class_words():
    import open_clip

    words = reading_words()
    assert len(words) == len(set(words)) == 1000
    assert set(CLASSES) <= set(words)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    for word in words:  # each word one token of CLIP's BPE vocabulary: the text tower sees it whole
        assert 3 <= len(word) <= 10 and word.isascii() and word.isalpha() and word.islower(), word
        assert len(tokenizer.encode(word)) == 1, word


def test_draws_are_reproducible_and_vary():
    image, label = draw(0, 5, 96)
    again, label_again = draw(0, 5, 96)
    assert image.size == (96, 96) and label == label_again
    assert np.array_equal(np.asarray(image), np.asarray(again))
    other = [draw(1, 5, 96), draw(0, 6, 96)]
    assert all(not np.array_equal(np.asarray(image), np.asarray(o)) for o, _ in other)
    labels = [draw(0, i, 96)[1] for i in range(300)]
    assert len(set(labels)) > 200  # words drawn uniformly from the 1,000
    easy, _ = draw(0, 5, 96, hard=0.0)  # the easy end: no photograph behind the word
    assert easy.size == (96, 96)


def test_reading_start_is_built_once_cached_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    import open_clip
    import torch

    from models.clip import register_model_configs
    from training.reading import START_FILE, reading_start, start_folder

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    start = reading_start(MODEL, TINY, progress=False)
    assert start.built and start.steps == 3 and start.words == 1000 and 0.0 <= start.held_out_top1 <= 1.0
    folder = start_folder(MODEL, TINY)
    assert str(folder) == start.folder and folder.parent == tmp_path / "reading"
    info = json.loads((folder / "reading.json").read_text())
    assert info["settings"]["steps"] == 3 and len(info["held_out_curve"]) == 1

    # open_clip's own loader takes the checkpoint whole (strict): the trained image tower, the text tower's init
    register_model_configs()
    model, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=start.checkpoint)
    saved = torch.load(start.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    fresh = open_clip.create_model(MODEL)
    key = next(k for k in saved if k.startswith("visual.") and k.endswith("weight") and saved[k].ndim == 4)
    assert torch.equal(model.state_dict()[key], saved[key])
    assert not torch.equal(fresh.state_dict()[key], saved[key])  # it trained

    again = reading_start(MODEL, TINY, progress=False)
    assert not again.built and again.checkpoint == start.checkpoint  # found, not rebuilt
    assert start_folder(MODEL, dataclasses.replace(TINY, seed=1)) != folder  # other settings, another start

    (folder / START_FILE).write_bytes(b"damaged")
    rebuilt = reading_start(MODEL, TINY, progress=False)
    assert rebuilt.built  # a file that does not match its recorded SHA-256 is never used
    assert torch.load(rebuilt.checkpoint, map_location="cpu", weights_only=True)["state_dict"].keys() == saved.keys()


def test_killed_build_resumes_from_its_last_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    import torch

    from training import reading

    cfg = dataclasses.replace(TINY, steps=5)
    monkeypatch.setattr(reading, "CHECKPOINT_EVERY", 2)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "straight"))
    straight = reading.reading_start(MODEL, cfg, progress=False)

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "killed"))
    folder = reading.start_folder(MODEL, cfg)
    batch = reading._Draws.batch

    def dies_at_step_five(self, number):  # batch 4 is step 5's: the build dies after its step-4 checkpoint
        if number == 4 and self.batch_size == cfg.batch_size:
            raise KeyboardInterrupt("killed")
        return batch(self, number)

    monkeypatch.setattr(reading._Draws, "batch", dies_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        reading.reading_start(MODEL, cfg, progress=False)
    assert (folder / reading.PARTIAL_FILE).is_file() and not (folder / reading.INFO_FILE).exists()
    assert torch.load(folder / reading.PARTIAL_FILE, weights_only=True)["step"] == 4
    monkeypatch.setattr(reading._Draws, "batch", batch)

    resumed = reading.reading_start(MODEL, cfg, progress=False)
    assert resumed.built and resumed.held_out_curve == straight.held_out_curve
    assert not (folder / reading.PARTIAL_FILE).exists()  # the finished start needs it no more
    steps = [json.loads(line)["step"] for line in (folder / reading.LOG_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # every step logged once
    weights = [torch.load(s.checkpoint, weights_only=True)["state_dict"] for s in (straight, resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # as if never killed

    (folder / reading.START_FILE).unlink()  # a damaged partial checkpoint costs a fresh build, not an error
    (folder / reading.PARTIAL_FILE).write_bytes(b"damaged")
    again = reading.reading_start(MODEL, cfg, progress=False)
    rebuilt = torch.load(again.checkpoint, weights_only=True)["state_dict"]
    assert again.built and all(torch.equal(rebuilt[k], weights[0][k]) for k in rebuilt)


def test_a_shipped_start_is_used_for_its_own_recipe_only_and_only_when_it_reads(tmp_path, monkeypatch, capsys):
    """A new machine takes the shipped start instead of building it: the same whole checkpoint
    (trained tower, heads, the seed's text tower); another recipe, a damaged file or a tower that
    reads otherwise here than where it was built is built instead, with a message."""
    import torch

    from training import reading

    monkeypatch.setattr(reading, "PROBE_RENDERS", 24)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "built"))
    built = reading.reading_start(MODEL, TINY, progress=False)
    shipped_dir = tmp_path / "shipped"
    monkeypatch.setattr(reading, "SHIPPED_DIR", shipped_dir)
    info_path = reading.ship(MODEL, TINY, shipped_dir)
    info = json.loads(info_path.read_text())
    assert info["key"] == reading.shipped_key(MODEL, TINY) and info["probe_renders"] == reading.PROBE_RENDERS

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "new-machine"))
    start = reading.reading_start(MODEL, TINY, progress=False)
    assert start.shipped and not start.built and start.held_out_curve == built.held_out_curve
    assert "taken from training/reading_starts/" in start.summary()
    for name in (reading.START_FILE, reading.HEAD_FILE):  # the whole CLIP (tower, the seed's text tower) and heads
        got, want = (torch.load(Path(s.folder) / name, weights_only=True) for s in (start, built))
        got, want = (d.get("state_dict", d) for d in (got, want))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert reading.reading_start(MODEL, TINY, progress=False).shipped  # then found in the cache
    assert reading.reading_start(MODEL, dataclasses.replace(TINY, seed=1), progress=False).built  # another recipe
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "more-threads"))
    assert reading.reading_start(MODEL, dataclasses.replace(TINY, threads=1), progress=False).shipped  # how, not what

    def fresh_machine_builds(name: str) -> str:
        monkeypatch.setenv(CACHE_ENV, str(tmp_path / name))
        capsys.readouterr()
        assert reading.reading_start(MODEL, TINY, progress=False).built
        return capsys.readouterr().err

    info_path.write_text(json.dumps({**info, "probe_top1": info["probe_top1"] + 0.5}))
    assert "building it instead" in fresh_machine_builds("reads-otherwise")
    info_path.write_text(json.dumps(info))
    with open(shipped_dir / info["file"], "ab") as weights:
        weights.write(b"damaged")
    assert "does not match its recorded SHA-256" in fresh_machine_builds("damaged")
    info_path.write_text("{not json")
    assert "cannot be read" in fresh_machine_builds("unreadable")
    info_path.write_text(json.dumps(info))
    (shipped_dir / info["file"]).write_bytes(b"not a checkpoint")
    info_path.write_text(json.dumps({**info, "sha256": reading.sha256_of(shipped_dir / info["file"])}))
    assert "does not load here" in fresh_machine_builds("not-a-checkpoint")


def test_the_drawing_workers_run_below_the_towers_threads():
    """The drawing worker runs at the lowest priority, as a training loader's does (training.train):
    in the A/B of 150 build steps on 2 cores, 59 -> 48 s (medians of 4), the same batches in the same order."""
    import psutil
    import torch

    from training.reading import _stream
    from training.train import LOADER_NICENESS

    class Numbered:
        def batch(self, number: int):
            return torch.full((2, 3), float(number)), torch.tensor([number, number])

    batches = _stream(Numbered(), workers=1, first=5)
    firsts = [int(next(batches)[1][0]) for _ in range(3)]
    niceness = [p.nice() for p in psutil.Process().children()]
    del batches
    assert firsts == [5, 6, 7]
    assert LOADER_NICENESS in niceness, niceness


def test_probe_reads_the_eval_sets_through_the_word_head(tmp_path, monkeypatch):
    from sources.eval_sets import build_eval_sets
    from training.reading import probe, reading_start

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    start = reading_start(MODEL, TINY, progress=False)
    read = probe(start, build_eval_sets(seed=10_000, per_class=2))
    assert set(read) == {"text_only_top1_words", "text_only_top1_classes", "typographic_read_classes"}
    assert all(0.0 <= v <= 1.0 for v in read.values())


def test_precision_is_recorded_keys_the_start_and_the_checkpoint_is_in_the_standard_layout(tmp_path, monkeypatch):
    import torch

    from training.reading import computes_in_bf16, reading_start

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert computes_in_bf16("bf16") and not computes_in_bf16("fp32")
    assert computes_in_bf16("auto") == torch.ops.mkldnn._is_mkldnn_bf16_supported()  # native bf16 only
    built = {p: reading_start(MODEL, dataclasses.replace(TINY, precision=p), progress=False) for p in ("bf16", "fp32")}
    assert built["bf16"].folder != built["fp32"].folder  # another precision, another start
    weights = {}
    for precision, start in built.items():
        assert json.loads((Path(start.folder) / "reading.json").read_text())["precision"] == precision
        state = torch.load(start.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        convs = {k: v for k, v in state.items() if k.startswith("visual.") and v.ndim == 4}
        assert all(v.is_contiguous() for v in convs.values())  # trained channels-last, saved as every loader expects
        weights[precision] = convs
    # the same seed and draws: the bf16 build computed in bf16 (its weights differ from the fp32 build's)
    assert any(not torch.equal(weights["bf16"][k], weights["fp32"][k]) for k in weights["fp32"])


def test_the_default_rate_warms_up_holds_then_falls_linearly_to_zero():
    """open_clip's const-cooldown (warmup-stable-decay), the shipped default; cosine on request."""
    import torch

    from training.reading import learning_rate

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    shipped = ReadingConfig()
    assert (shipped.schedule, shipped.cooldown_share, shipped.steps) == ("const-cooldown", 0.2, 7000)
    cfg = ReadingConfig(steps=100, warmup_steps=10, lr=1e-3)
    rate = learning_rate(optimizer, cfg)
    rates = [rate(step) for step in range(cfg.steps)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)  # linear warmup
    assert rates[10:80] == [1e-3] * 70  # held at the peak
    assert rates[80] == pytest.approx(1e-3) and rates[90] == pytest.approx(5e-4) and rates[99] == pytest.approx(5e-5)
    assert optimizer.param_groups[0]["lr"] == rates[-1]  # set on the optimiser, not only returned
    cosine = learning_rate(optimizer, dataclasses.replace(cfg, schedule="cosine"))
    assert cosine(55) == pytest.approx(5e-4)  # halfway through the cosine's steps after warmup
    assert cosine(30) < 1e-3 and cosine(30) > cosine(55)


@pytest.mark.parametrize("toml, expected", [
    ("[reading]\nsteps = 0\n", "reading.steps must be >= 1"),
    ("[reading]\nschedule = \"linear\"\n", "reading.schedule must be 'const-cooldown' or 'cosine', not 'linear'"),
    ("[reading]\ncooldown_share = 0\n", "reading.cooldown_share must be above 0 and at most 1, not 0"),
    ("[reading]\nsteps = 100\nwarmup_steps = 90\n",
     r"reading.warmup_steps \(90\) and the cooldown \(reading.cooldown_share x steps = 20 steps\) must fit in "
     r"reading.steps \(100\)"),
    ("[reading]\nprecision = \"fp16\"\n", "reading.precision must be 'auto', 'bf16' or 'fp32', not 'fp16'"),
    ("[ablation]\nstart = \"pretrained\"\n", "ablation.start must be scratch or reading"),
])
def test_bad_reading_config_is_one_message(tmp_path, toml, expected):
    from core.errors import ConfigError
    from pipeline.config import load_config

    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
