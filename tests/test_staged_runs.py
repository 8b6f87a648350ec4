"""`curate --stages`: a run done in three steps (download; ocr,parrot,clip_score; the rest) ends
with the same manifests and byte-identical curated shards as one full run, and a step whose
inputs are incomplete waits (exit 1, named) instead of deciding over part of the pool."""

from __future__ import annotations

from pathlib import Path

from manifests.store import RunLayout
from pipeline.cli import main
from run_compare import assert_runs_equal, curated_digests, load_run


def _args_for(embedded_run: dict, root: Path, stages: str | None) -> list[str]:
    args = list(embedded_run["args"])
    args[args.index("--output") + 1] = str(root)
    return args + (["--stages", stages] if stages else [])


def _policies(root: Path) -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in RunLayout(root).selections_dir.glob("*.parquet")))


def test_three_staged_runs_equal_one_full_run(embedded_run, tmp_path, capsys):
    root = tmp_path / "staged"
    layout = RunLayout(root)

    assert main(_args_for(embedded_run, root, "download")) == 0
    out = capsys.readouterr().out
    assert "steps run (--stages): download" in out
    assert layout.done_shards("download") and not layout.done_shards("ocr")
    assert not (root / "report").exists() and not layout.selections_dir.exists()

    # a policy step cannot decide over a pool that has no scores yet: it waits, names why, exit 1
    assert main(_args_for(embedded_run, root, "filter")) == 1
    out = capsys.readouterr().out
    assert "== filter WAITING: 4 downloaded shard(s) have no ocr part yet (add 'ocr' to --stages)" in out
    assert "== dup_group WAITING: 4 downloaded shard(s) have no dedup part yet (add 'dedup' to --stages)" in out
    assert not layout.selections_dir.exists() or not any(layout.selections_dir.glob("*.parquet"))

    assert main(_args_for(embedded_run, root, "ocr,parrot,clip_score")) == 0
    out = capsys.readouterr().out
    assert "not in --stages" in out  # the download step did not run (and says so)
    downloaded = layout.done_shards("download")
    assert layout.done_shards("ocr") == layout.done_shards("clip_score") == downloaded
    assert not layout.done_shards("dedup")

    assert main(_args_for(embedded_run, root, "dedup,filter,reshard,report")) == 0  # dup_group comes along
    capsys.readouterr()
    assert (root / "report" / "index.html").exists()

    policies = _policies(embedded_run["root"])
    assert policies and _policies(root) == policies
    assert_runs_equal(load_run(str(root), policies), load_run(str(embedded_run["root"]), policies))
    assert curated_digests(str(root), policies) == curated_digests(str(embedded_run["root"]), policies)

    # a full rerun of the same output finds nothing left to do
    assert main(_args_for(embedded_run, root, None)) == 0
    assert "no download work done" in capsys.readouterr().out


def test_unknown_step_is_one_clear_error(embedded_run, tmp_path, capsys):
    assert main(_args_for(embedded_run, tmp_path / "x", "download,ocrr")) == 2
    err = capsys.readouterr().err
    assert "'ocrr'" in err and "steps: download, ocr" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_a_step_whose_inputs_are_not_on_disk_waits(embedded_run, tmp_path, capsys):
    """clip_score reads the OCR boxes: asked for alone on shards without an ocr part, it runs on
    none of them and says which step is missing (exit 1), then runs once ocr has."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(embedded_run["root"], root)
    layout = RunLayout(root)
    before = {p.name: p.stat().st_mtime_ns for p in layout.stage_dir("clip_score").glob("part-*.parquet")}
    for stage in ("ocr", "clip_score"):
        layout.part_path(stage, "000001").unlink()
    assert main(_args_for(embedded_run, root, "clip_score")) == 1
    out = capsys.readouterr().out
    assert "WAITING: clip_score needs ocr, which has not run on this shard: 1 shard(s) (000001)" in out
    assert not layout.part_path("clip_score", "000001").exists()
    assert main(_args_for(embedded_run, root, "ocr,clip_score")) == 0
    capsys.readouterr()
    assert {p.name: p.stat().st_mtime_ns for p in layout.stage_dir("clip_score").glob("part-*.parquet")
            if p.name != "part-000001.parquet"} == {k: v for k, v in before.items() if k != "part-000001.parquet"}
    assert layout.part_path("clip_score", "000001").exists()
