"""`python -m pipeline ablation` at a toy size: curate, train every policy and seed at equal steps with
a real open_clip (and the unfiltered policy again with CLIP-PGS masking), re-score CLIP with the
trained unfiltered model, evaluate, write the mean +- sd table, the claims, plots and report; a
rerun trains nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import duckdb
import pytest
from conftest import free_port

from pipeline.cli import main
from training.ablation import AblationResult, AblationRow, claims, table_rows

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
model = "curation-tiny-rn"
steps = {STEPS}
batch_size = 8
workers = 0
shuffle_buffer = 16
[ablation]
samples = 32
policies = ["all", "no-text"]
seeds = [0, 1]
masking = ["pgs"]
masking_model = "curation-tiny"
start = "reading"
eval_per_class = 2
class_word_fraction = 1.0
[reading]
steps = 2
batch_size = 4
warmup_steps = 1
held_out = 4
workers = 0
"""
    )
    return path


def test_ablation_trains_each_policy_at_equal_steps_and_reports(ray_local, tmp_path, capsys, monkeypatch):
    from core.cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # the reading starts are built here, not in ~/.cache
    out = tmp_path / "ablation"
    args = ["ablation", "--config", str(_config(tmp_path)), "--output", str(out), "--no-progress"]
    assert main(args) == 0
    # the scorer model (all, first seed) is the table's own: trained and announced once, its time in the table
    assert capsys.readouterr().err.count("== train all seed 0:") == 1

    with open(out / "ablation" / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    variants = ["all", "no-text", "all (curation-tiny)", "all +pgs (curation-tiny)"]
    assert [r["policy"] for r in rows] == ["(untrained)", "(reading start curation-tiny-rn)",
                                           "(reading start curation-tiny)", *variants]
    assert [int(r["steps"]) for r in rows] == [0, 0, 0] + [STEPS] * 4  # equal compute for every policy
    assert [r["seeds"] for r in rows] == ["", "", ""] + ["2"] * 4
    for row in rows:
        for key in ("clean_top1", "typographic_top1", "attack_success_rate", "text_only_top1", "common_top1",
                    "counter_top1", "i2t_r1"):
            assert 0.0 <= float(row[key]) <= 1.0, (row["policy"], key)
    with open(out / "ablation" / "ablation_seeds.csv") as f:
        per_seed = list(csv.DictReader(f))
    assert [(r["policy"], r["seed"]) for r in per_seed] == [(p, s) for p in variants for s in ("0", "1")]
    assert all(float(r["train_seconds"]) > 0 for r in per_seed)
    for policy, row in zip(variants, rows[3:]):  # the table's cells: mean and sd of the seeds
        values = [float(r["clean_top1"]) for r in per_seed if r["policy"] == policy]
        assert float(row["clean_top1"]) == pytest.approx(sum(values) / 2)
        assert float(row["clean_top1_sd"]) == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    starts = {p.name.rsplit("-", 1)[0]: p for p in (tmp_path / "cache" / "reading").iterdir()}
    assert set(starts) == {"curation-tiny-rn", "curation-tiny"}  # one reading start per model, shared by its variants
    models = out / "models" / "ablation"
    seeds = [json.loads((models / starts[model].name / name / f"seed-{s}" / "result.json").read_text())["config"]
             for model, name in (("curation-tiny-rn", "all"), ("curation-tiny-rn", "no-text"),
                                 ("curation-tiny", "all@curation-tiny"), ("curation-tiny", "all+pgs@curation-tiny"))
             for s in (0, 1)]
    assert [(c["seed"], c["masking"]) for c in seeds] == [(0, "none"), (1, "none")] * 3 + [(0, "pgs"), (1, "pgs")]
    assert [c["model"] for c in seeds] == ["curation-tiny-rn"] * 4 + ["curation-tiny"] * 4
    assert all(c["pretrained"] == str(starts[c["model"]] / "start.pt") for c in seeds)  # every variant from its start

    con = duckdb.connect(str(out / "catalog.duckdb"), read_only=True)
    kept = dict(con.execute("select policy, count(*) filter (where kept) from selections group by 1").fetchall())
    assert int(rows[3]["kept"]) == kept["all"] == 32
    assert int(rows[4]["kept"]) == kept["no-text"] < kept["all"]
    scorers = {m for (m,) in con.execute("select distinct clip_model from clip_score").fetchall()}
    assert len(scorers) == 1 and next(iter(scorers)).startswith("curation-tiny-rn ")  # re-scored by the trained model
    assert f"models/ablation/{starts['curation-tiny-rn'].name}/all/seed-0/checkpoints" in next(iter(scorers))
    # the dataset was drawn with [ablation]'s proportions: every text image names another class
    truth = con.execute("select count(*) filter (where has_text), count(*) filter (where text_class is not null) "
                        "from read_parquet(?)", [str(out / "ground_truth.parquet")]).fetchone()
    assert truth[0] > 0 and truth[1] >= 0.9 * truth[0], truth

    for name in ("ablation.md", "per_class.csv", "ablation.png", "loss.png"):
        assert (out / "ablation" / name).stat().st_size > 100, name
    markdown = (out / "ablation" / "ablation.md").read_text()
    assert " ± " in markdown and "The papers' claims at this scale" in markdown
    assert "Reading start curation-tiny-rn: held-out top-1" in markdown
    report = (out / "report" / "index.html").read_text()
    assert "Ablation: CLIP trained on each policy" in report and "data:image/png;base64" in report

    latest = models / starts["curation-tiny-rn"].name / "no-text" / "seed-1" / "checkpoints" / "latest.pt"
    before = latest.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # a rerun: curation skips everything, training resumes at its end
    assert latest.stat().st_mtime_ns == before
    assert "no download work done" in capsys.readouterr().out

    other = tmp_path / "other.toml"  # the same output drawn with other proportions would mix two datasets
    other.write_text(_config(tmp_path).read_text().replace("class_word_fraction = 1.0", "class_word_fraction = 0.5"))
    assert main(["ablation", "--config", str(other), "--output", str(out), "--no-progress"]) == 2
    assert "curated with other [ablation] dataset settings (class_word_fraction)" in capsys.readouterr().err


def test_masked_lines_train_the_masking_model_beside_its_unmasked_baseline():
    from pipeline.training_config import AblationConfig
    from training.ablation import Variant, variants

    same = AblationConfig(masking=("random", "pgs"))
    assert [v.name for v in variants(same, ("all", "no-text"), "curation-tiny")] == [
        "all", "no-text", "all +random", "all +pgs"]
    vit = AblationConfig(masking=("random", "pgs"), masking_model="curation-tiny")
    lines = variants(vit, ("all", "no-text"), "curation-tiny-rn")
    assert [v.name for v in lines] == ["all", "no-text", "all (curation-tiny)", "all +random (curation-tiny)",
                                       "all +pgs (curation-tiny)"]
    assert lines[2] == Variant("all", "none", "curation-tiny")  # the masked lines' comparison at equal steps
    assert [v.name for v in variants(AblationConfig(masking_model="curation-tiny"), ("all",), "x")] == ["all"]


def _row(policy: str, seed: int, **metrics: float) -> AblationRow:
    base = {"clean_top1": 0.6, "typographic_top1": 0.6, "typographic_drop": 0.0, "attack_success_rate": 0.1,
            "text_only_top1": 0.1, "common_top1": 0.7, "counter_top1": 0.5, "spurious_drop": 0.2, "chance": 0.125,
            "i2t_r1": 0.1, "i2t_r5": 0.3, "t2i_r1": 0.1, "t2i_r5": 0.3}
    base.update(metrics)
    base["typographic_drop"] = base["clean_top1"] - base["typographic_top1"]
    return AblationRow(policy=policy, kept=10, steps=3, samples_seen=24, final_loss=1.0, train_seconds=1.0,
                       metrics=base, seed=seed)


def test_claims_are_judged_on_the_means_over_seeds(tmp_path):
    """The report says which of the papers' claims held: checked here on made-up numbers."""
    rows = [
        _row("all", 0, clean_top1=0.6, typographic_top1=0.3, attack_success_rate=0.5, text_only_top1=0.7),
        _row("all", 1, clean_top1=0.6, typographic_top1=0.4, attack_success_rate=0.4, text_only_top1=0.5),
        _row("no-text", 0, clean_top1=0.62, typographic_top1=0.6),
        _row("no-text", 1, clean_top1=0.64, typographic_top1=0.6),
        _row("no-parrot", 0, clean_top1=0.5, typographic_top1=0.3),  # still falls for it, and loses accuracy
        _row("no-parrot", 1, clean_top1=0.5, typographic_top1=0.3),
    ]
    result = AblationResult(root=tmp_path, rows=rows, untrained={"clean_top1": 0.125}, seconds=0.0, files=[])
    table = {r["policy"]: r for r in table_rows(result)}
    assert table["all"]["text_only_top1"] == pytest.approx(0.6)
    assert table["all"]["text_only_top1_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert table["all"]["typographic_drop"] == pytest.approx(0.25)
    verdicts = [(c.claim, c.held) for c in claims(result)]
    assert verdicts[0] == ("the unfiltered CLIP learns to read (text-only top-1 >= 0.5)", True)
    assert verdicts[1][1] is True  # drop 0.25 >= 0.15, attack success 0.45 >= 2 x 0.125
    # the evidence says how far past chance, and how many of the errors the attack made (0.45 of 0.65 wrong)
    assert "attack success 0.450 (3.60x chance); 0.69 of its errors under the attack name the written class " \
        "(at random: 0.14)" in claims(result)[1].evidence
    by_claim = dict(verdicts)
    assert by_claim["no-text drops at most a third as much under the attack"] is True
    assert by_claim["no-text keeps clean zero-shot (within 0.05 of unfiltered, or better)"] is True
    assert by_claim["no-parrot drops at most a third as much under the attack"] is False
    assert by_claim["no-parrot keeps clean zero-shot (within 0.05 of unfiltered, or better)"] is False
    assert by_claim["tmars removes the attack"] is None  # not trained: not measured, never "held"

    unread = [_row(r.policy, r.seed, **{**r.metrics, "typographic_top1": r.metrics["clean_top1"]}) for r in rows]
    verdicts = dict((c.claim, c.held) for c in claims(AblationResult(tmp_path, unread, {}, 0.0, [])))
    # no attack on the unfiltered model: nothing for a filter to remove, so neither held nor not
    assert verdicts["no-text drops at most a third as much under the attack"] is None


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


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("seeds = [1, 1]", "ablation.seeds must not repeat a seed"),
        ("seeds = []", "ablation.seeds must name at least one seed"),
        ("masking = ['flip']", "ablation.masking may hold random and pgs, not ['flip']"),
        ("class_word_cap = [0.3, 0.1]", "ablation.class_word_cap must be 0 < low <= high <= 0.5"),
        ("parrot_fraction = 0.8", "ablation.parrot_fraction + mixed_fraction must be within [0, 1]"),
    ],
)
def test_bad_ablation_config_is_one_line_naming_the_key(tmp_path, capsys, toml, expected):
    path = tmp_path / "bad.toml"
    path.write_text(f"[ablation]\n{toml}\n")
    assert main(["ablation", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("preset", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.toml")))
def test_every_shipped_preset_loads(preset):
    from pipeline.config import load_config

    config = load_config(Path(__file__).parents[1] / "configs" / preset)
    for name in config.ablation.policies:
        config.policy(name)
