"""`python -m pipeline ablation` at a toy size: curate, train every policy at equal steps with a real
open_clip, re-score CLIP with the trained unfiltered model, evaluate, write table, plots and report;
a rerun trains nothing."""

from __future__ import annotations

import csv
from pathlib import Path

import duckdb
from conftest import free_port

from pipeline.cli import main

STEPS = 3


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "ablation.toml"
    path.write_text(
        f"""
[datasets.embedded]
port = {free_port()}
[download]
shard_size = 16
[reshard]
samples_per_shard = 16
[train]
steps = {STEPS}
batch_size = 8
workers = 0
shuffle_buffer = 16
[ablation]
samples = 32
policies = ["all", "no-text"]
eval_per_class = 2
"""
    )
    return path


def test_ablation_trains_each_policy_at_equal_steps_and_reports(ray_local, tmp_path, capsys):
    out = tmp_path / "ablation"
    args = ["ablation", "--config", str(_config(tmp_path)), "--output", str(out), "--no-progress"]
    assert main(args) == 0

    with open(out / "ablation" / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["policy"] for r in rows] == ["(untrained)", "all", "no-text"]
    assert [int(r["steps"]) for r in rows] == [0, STEPS, STEPS]  # equal compute for every policy
    for row in rows:
        for key in ("clean_top1", "typographic_top1", "attack_success_rate", "common_top1", "counter_top1", "i2t_r1"):
            assert 0.0 <= float(row[key]) <= 1.0, (row["policy"], key)

    con = duckdb.connect(str(out / "catalog.duckdb"), read_only=True)
    kept = dict(con.execute("select policy, count(*) filter (where kept) from selections group by 1").fetchall())
    assert int(rows[1]["kept"]) == kept["all"] == 32
    assert int(rows[2]["kept"]) == kept["no-text"] < kept["all"]
    scorers = {m for (m,) in con.execute("select distinct clip_model from clip_score").fetchall()}
    assert len(scorers) == 1 and next(iter(scorers)).startswith("curation-tiny ")  # re-scored by the trained model
    assert "models/all/checkpoints" in next(iter(scorers))

    for name in ("ablation.md", "per_class.csv", "ablation.png", "loss.png"):
        assert (out / "ablation" / name).stat().st_size > 100, name
    report = (out / "report" / "index.html").read_text()
    assert "Ablation: CLIP trained on each policy" in report and "data:image/png;base64" in report

    latest = out / "models" / "no-text" / "checkpoints" / "latest.pt"
    before = latest.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # a rerun: curation skips everything, training resumes at its end
    assert latest.stat().st_mtime_ns == before
    assert "no download work done" in capsys.readouterr().out


def test_train_and_evaluate_commands_on_a_curated_run(embedded_run, tmp_path, capsys):
    """`train` on a curated policy writes an open_clip checkpoint that `evaluate` scores."""
    config = tmp_path / "small.toml"
    config.write_text("[train]\nbatch_size = 8\nworkers = 0\nshuffle_buffer = 16\n[ablation]\neval_per_class = 2\n")
    root = embedded_run["root"]
    args = ["train", "--output", str(root), "--policy", "no-text", "--steps", "2", "--config", str(config), "--no-progress"]
    assert main(args) == 0
    assert "steps 1..2" in capsys.readouterr().out
    checkpoint = root / "models" / "no-text" / "checkpoints" / "latest.pt"
    assert main(["evaluate", str(checkpoint), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"curation-tiny {checkpoint}" in out and "attack_success_rate" in out
    assert main(args) == 0  # already at step 2: nothing to do, and it says so
    assert "no training done" in capsys.readouterr().out


def test_train_command_without_curated_shards_says_what_to_do(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path / "nothing"), "--policy", "all"]) == 2
    assert "run `make curate`" in capsys.readouterr().err
