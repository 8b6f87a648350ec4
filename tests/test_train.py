"""The train stage on tiny shards built here (coloured shapes, captions naming colour and shape),
with the real open_clip ``curation-tiny`` model on the CPU: the loss falls, checkpoints load in
stock open_clip, a run resumes from its checkpoint, patch masking shortens the image sequence."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from pipeline.config import ConfigError, TrainConfig, load_config
from training.train import LATEST, LOG, RESULT, TrainResult, shard_urls, train

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
SAMPLES, PER_SHARD = 64, 32
# Small batches, no worker process and one torch thread (more only spin against the other
# processes of a busy machine) keep a step to about 0.1 s.
TINY = TrainConfig(batch_size=8, lr=1e-3, warmup_steps=3, workers=0, shuffle_buffer=64, device="cpu", threads=1)


def _image(colour: tuple[int, int, int], shape: str, rng: random.Random) -> bytes:
    image = Image.new("RGB", (96, 96), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    cx, cy, r = rng.randint(35, 61), rng.randint(35, 61), rng.randint(22, 32)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=colour)
        draw.rectangle((cx - r // 3, cy - r, cx + r // 3, cy + r), fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A curated-style folder: two tars of 32 samples and their sizes.json."""
    folder = tmp_path_factory.mktemp("curated") / "policy"
    folder.mkdir()
    rng = random.Random(0)
    for shard in range(SAMPLES // PER_SHARD):
        with wds.TarWriter(str(folder / f"{shard:06d}.tar")) as writer:
            for i in range(PER_SHARD):
                colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                key = f"{shard:06d}{i:02d}"
                writer.write({
                    "__key__": key,
                    "jpg": _image(COLOURS[colour], shape, rng),
                    "txt": f"a {colour} {shape}",
                    "json": {"uid": f"uid-{key}"},
                })
    (folder / "sizes.json").write_text(json.dumps({f"{s:06d}.tar": PER_SHARD for s in range(SAMPLES // PER_SHARD)}))
    return folder


def _create(model: str, pretrained: str | None = None):
    import open_clip

    from models.clip import register_model_configs

    register_model_configs()
    return open_clip.create_model_and_transforms(model, pretrained=pretrained)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> tuple[TrainResult, TrainConfig]:
    cfg = dataclasses.replace(TINY, steps=30, workers=1)  # the default: a DataLoader worker process
    return train(shards, tmp_path_factory.mktemp("train") / "run", cfg, progress=False), cfg


def test_a_few_dozen_steps_reduce_the_contrastive_loss(trained):
    result, cfg = trained
    losses = [loss for _, loss in result.loss_curve]
    assert [s for s, _ in result.loss_curve] == list(range(1, cfg.steps + 1))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.4, f"loss {first:.3f} -> {last:.3f}"
    assert (result.step, result.steps_done, result.device, result.precision) == (30, 30, "cpu", "fp32")
    assert result.step_time_s > 0 and result.samples_per_s > 0
    assert "steps 1..30" in result.summary() and "cpu fp32" in result.summary()
    saved = json.loads((Path(result.out_dir) / RESULT).read_text())
    assert saved["final_loss"] == result.final_loss and saved["config"]["steps"] == 30


def test_checkpoint_loads_in_stock_open_clip_and_scores(trained):
    result, cfg = trained
    path = Path(result.checkpoint)
    assert path.name == "step_30.pt" and (path.parent / LATEST).samefile(path)
    model, _, preprocess = _create(cfg.model, str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["step"] == 30 and state["name"] == cfg.model
    loaded = model.state_dict()
    assert loaded.keys() == state["state_dict"].keys()
    assert all(torch.equal(loaded[k], v) for k, v in state["state_dict"].items())
    fresh, _, _ = _create(cfg.model)  # the trained weights are not an init
    assert not torch.equal(fresh.state_dict()["visual.conv1.weight"], loaded["visual.conv1.weight"])

    import open_clip

    model.eval()
    image = preprocess(Image.open(io.BytesIO(_image(COLOURS["red"], "circle", random.Random(1))))).unsqueeze(0)
    with torch.no_grad():
        image_features = model.encode_image(image)
        text_features = model.encode_text(open_clip.get_tokenizer(cfg.model)(["a red circle", "a blue square"]))
    assert image_features.shape == (1, 128) and text_features.shape == (2, 128)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()


def test_a_checkpoint_as_pretrained_starts_from_its_weights(trained, shards, tmp_path):
    result, _ = trained
    fresh = train(shards, tmp_path / "fresh", dataclasses.replace(TINY, steps=1), progress=False)
    cfg = dataclasses.replace(TINY, steps=1, pretrained=result.checkpoint)
    tuned = train(shards, tmp_path / "tuned", cfg, progress=False)
    assert tuned.loss_curve[0][1] < fresh.loss_curve[0][1] - 0.3


def test_resume_continues_from_the_checkpoint_and_then_does_nothing(shards, tmp_path):
    first = train(shards, tmp_path, dataclasses.replace(TINY, steps=4, checkpoint_every=2), progress=False)
    assert first.step == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.pt", "step_2.pt", "step_4.pt"]
    weights_at_4 = torch.load(tmp_path / "checkpoints" / LATEST, weights_only=True)["state_dict"]

    more = dataclasses.replace(TINY, steps=7, checkpoint_every=2)
    resumed = train(shards, tmp_path, more, progress=False)
    assert (resumed.start_step, resumed.step, resumed.steps_done) == (4, 7, 3)
    assert [s for s, _ in resumed.loss_curve] == [5, 6, 7]
    assert [json.loads(line)["step"] for line in (tmp_path / LOG).read_text().splitlines()] == list(range(1, 8))
    latest = torch.load(tmp_path / "checkpoints" / LATEST, weights_only=True)
    assert latest["step"] == 7 and (tmp_path / "checkpoints" / "step_6.pt").is_file()
    assert not torch.equal(latest["state_dict"]["visual.conv1.weight"], weights_at_4["visual.conv1.weight"])

    mtime = (tmp_path / "checkpoints" / LATEST).stat().st_mtime_ns
    again = train(shards, tmp_path, more, progress=False)
    assert again.skipped and again.steps_done == 0 and again.step == 7
    assert again.final_loss == resumed.final_loss
    assert (tmp_path / "checkpoints" / LATEST).stat().st_mtime_ns == mtime
    assert "no training done" in again.summary()


def test_a_resumed_log_drops_lines_past_the_checkpoint(shards, tmp_path):
    """A run killed after logging step 3 but checkpointing step 2 redoes step 3, logged once."""
    train(shards, tmp_path, dataclasses.replace(TINY, steps=2), progress=False)
    with open(tmp_path / LOG, "a") as log:
        log.write(json.dumps({"step": 3, "loss": 9.9}) + "\n")
    train(shards, tmp_path, dataclasses.replace(TINY, steps=3), progress=False)
    records = [json.loads(line) for line in (tmp_path / LOG).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] != 9.9


def test_the_same_seed_gives_the_same_run(shards, tmp_path):
    """Init, shard draws, shuffle and crops follow the seed, in this process or in a worker process."""
    for workers in (0, 1):
        cfg = dataclasses.replace(TINY, steps=3, workers=workers)
        one = train(shards, tmp_path / f"one-{workers}", cfg, progress=False)
        torch.manual_seed(1000 + workers)  # a caller whose own RNG is elsewhere: it must not matter
        two = train(shards, tmp_path / f"two-{workers}", cfg, progress=False)
        assert one.loss_curve == two.loss_curve
    other = train(shards, tmp_path / "other", dataclasses.replace(cfg, seed=1), progress=False)
    assert one.loss_curve != other.loss_curve


@pytest.mark.parametrize("masking", ["random", "pgs"])
def test_patch_masking_feeds_fewer_tokens_and_resets(shards, tmp_path, masking):
    patch_masking = pytest.importorskip("models.patch_masking")
    from open_clip.transformer import Transformer

    lengths: list[int] = []
    droppers: list[torch.nn.Module] = []

    def observe(module, inputs, output):  # every module's forward, in this process, while training
        if isinstance(module, Transformer) and inputs[0].shape[-1] == 192:  # the vision tower's width
            lengths.append(inputs[0].shape[1])
        if isinstance(module, patch_masking.IndexedPatchDropout):
            droppers.append(module)

    hook = torch.nn.modules.module.register_module_forward_hook(observe)
    try:
        cfg = dataclasses.replace(TINY, steps=2, masking=masking, mask_ratio=0.5)
        result = train(shards, tmp_path, cfg, progress=False)
    finally:
        hook.remove()
    assert result.masking == masking and result.step == 2
    # curation-tiny: 96 px / 12 px patches = 64 patches + the class token; half the patches kept
    assert lengths == [33, 33]
    assert len(droppers) == 2 and droppers[0] is droppers[1] and droppers[0].keep is None


def test_the_shards_of_a_curated_folder_come_from_sizes_json(shards, tmp_path):
    assert shard_urls(shards) == [str(shards / "000000.tar"), str(shards / "000001.tar")]
    assert shard_urls(str(shards / "{000000..000001}.tar")) == shard_urls(shards)
    with pytest.raises(ValueError, match="sizes.json"):
        shard_urls(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        shard_urls([tmp_path / "missing.tar"])


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("steps = 0", "train.steps"),
        ('masking = "blocks"', "train.masking"),
        ("mask_ratio = 1.0", "train.mask_ratio"),
        ('precision = "fp8"', "train.precision"),
        ("batch_size = 1", "train.batch_size"),
        ('steps = "many"', "train.steps"),
        ("epochs = 3", "epochs"),
    ],
)
def test_bad_train_config_names_the_key(tmp_path, toml, key):
    path = tmp_path / "bad.toml"
    path.write_text(f"[train]\n{toml}\n")
    with pytest.raises(ConfigError, match=key):
        load_config(path)


def test_train_refuses_a_bad_config_before_any_work(shards, tmp_path):
    with pytest.raises(ConfigError, match="train.masking"):
        train(shards, tmp_path, dataclasses.replace(TINY, masking="blocks"), progress=False)
    assert not any(tmp_path.iterdir())


def test_a_cpu_training_loader_worker_runs_below_the_training_threads(shards):
    """On a CPU the DataLoader worker is niced to the lowest priority, so that it decodes in the gaps
    the model's threads leave instead of taking a core from one of them (bench: train rows)."""
    import open_clip
    import psutil

    from models.pixels import Pixels
    from training.train import LOADER_NICENESS, CuratedShards, _batches

    _, preprocess, _ = _create("curation-tiny")
    cfg = dataclasses.replace(TINY, workers=1)
    loader = iter(_batches(CuratedShards(shard_urls(shards)), Pixels(preprocess), open_clip.get_tokenizer("curation-tiny"),
                           cfg, 0, "cpu"))
    images, _ = next(loader)
    assert images.shape[0] == cfg.batch_size
    niceness = {p.pid: p.nice() for p in psutil.Process().children()}  # the worker process
    del loader
    assert LOADER_NICENESS in niceness.values(), niceness


def test_the_train_command_lets_idle_openmp_threads_sleep_before_torch_loads(tmp_path):
    """``train`` sets OMP_WAIT_POLICY=PASSIVE before it imports torch (libgomp reads it once, at load);
    a policy the user set is kept; once torch is loaded the call changes nothing."""
    import os
    import subprocess
    import sys

    run = ("import os, sys\n"
           "from pipeline.cli import main\n"
           "try:\n"
           "    main(['train', '--output', sys.argv[1], '--no-progress'])\n"
           "except SystemExit:\n"
           "    pass\n"
           "print('policy', os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", run, str(tmp_path / "empty")], env=env, capture_output=True, text=True)
    assert "no finished curated shards" in done.stdout + done.stderr  # the command ran and refused: nothing to train
    assert done.stdout.strip().splitlines()[-1] == "policy PASSIVE"

    mine = subprocess.run([sys.executable, "-c", run, str(tmp_path / "empty")], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                          capture_output=True, text=True)
    assert mine.stdout.strip().splitlines()[-1] == "policy ACTIVE"

    late = subprocess.run([sys.executable, "-c", "import os, torch\nfrom training.train import sleeping_omp_threads\n"
                           "sleeping_omp_threads()\nprint('policy', os.environ.get('OMP_WAIT_POLICY'))"],
                          env=env, capture_output=True, text=True)
    assert late.stdout.strip().splitlines()[-1] == "policy None"
