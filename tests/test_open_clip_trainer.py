"""open_clip's own trainer (``open_clip_train.main``, unmodified, through ``training.open_clip_main``
which only registers our model configs) trains on the curated shards of the real embedded run: a
subprocess on the CPU with the ``curation-tiny`` model, the sample count read from our sizes.json."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from importlib.metadata import distribution, version
from pathlib import Path

import torch
from packaging.requirements import Requirement

from manifests.store import RunLayout

ROOT = Path(__file__).resolve().parents[1]
POLICY = "no-parrot"
BATCH = 8
# open_clip_train's progress line, logged every step with --log-every-n-steps 1
STEP = re.compile(r"Train Epoch: 0 \[\s*(\d+)/(\d+) .*?\] .* Loss: (\S+) ")


def test_webdataset_satisfies_open_clip_training_extra():
    """The installed webdataset is one open_clip_torch[training] accepts (from 0.2.87 on its loader
    fails at the first batch with KeyError: 'fname')."""
    extra = [
        Requirement(r) for r in distribution("open_clip_torch").requires or []
        if Requirement(r).name == "webdataset" and Requirement(r).marker
        and Requirement(r).marker.evaluate({"extra": "training"})
    ]
    assert extra, "open_clip_torch's training extra no longer names webdataset: recheck the pin"
    assert all(r.specifier.contains(version("webdataset")) for r in extra), (version("webdataset"), extra)


def _brace_pattern(folder: Path) -> tuple[str, list[str]]:
    """``folder/{000000..00000N}.tar`` for the shards sizes.json lists (contiguous names), and them."""
    names = sorted(json.loads((folder / "sizes.json").read_text()))
    first, last = names[0].removesuffix(".tar"), names[-1].removesuffix(".tar")
    assert names == [f"{i:0{len(first)}d}.tar" for i in range(int(first), int(last) + 1)]
    return str(folder / f"{{{first}..{last}}}.tar"), names


def test_open_clip_trainer_on_curated_shards(embedded_run, tmp_path):
    folder = RunLayout(embedded_run["root"]).curated_dir(POLICY)
    pattern, names = _brace_pattern(Path(str(folder)))
    samples = sum(json.loads((Path(str(folder)) / "sizes.json").read_text()).values())
    assert len(names) >= 2 and samples > BATCH
    args = [
        sys.executable, "-m", "training.open_clip_main",
        "--model", "curation-tiny",
        "--dataset-type", "webdataset",
        "--train-data", pattern,  # no --train-num-samples: open_clip reads it from our sizes.json
        "--batch-size", str(BATCH),
        "--epochs", "1",
        "--workers", "1",
        "--device", "cpu",
        "--precision", "fp32",
        "--lr", "1e-3",
        "--warmup", "1",
        "--seed", "0",
        "--log-every-n-steps", "1",
        "--save-frequency", "1",
        "--report-to", "",
        "--logs", str(tmp_path),
        "--name", "run",
    ]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    steps = [(int(n), int(total), float(loss)) for n, total, loss in STEP.findall((tmp_path / "run" / "out.log").read_text())]
    expected = math.ceil(samples / BATCH)  # open_clip_train's batches per epoch (one worker)
    assert len(steps) == expected, steps
    assert [n for n, _, _ in steps] == [BATCH * (i + 1) for i in range(expected)]
    assert all(total == expected * BATCH for _, total, _ in steps)
    assert all(math.isfinite(loss) and loss > 0 for _, _, loss in steps), steps

    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["name"] == "run"
    # the optimiser stepped (open_clip's default warmup, 10000 steps, would have kept the lr at 0)
    assert abs(checkpoint["state_dict"]["logit_scale"].item() - math.log(1 / 0.07)) > 1e-4
    import open_clip

    from models.clip import register_model_configs

    register_model_configs()
    model = open_clip.create_model("curation-tiny")
    model.load_state_dict(checkpoint["state_dict"])  # strict: the trained weights are stock open_clip's
    assert all(torch.isfinite(p).all() for p in model.parameters())
