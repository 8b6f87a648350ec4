"""The whole curation DAG on the embedded dataset: OCR, parrot and CLIP columns for every sample,
policies that equal their SQL, resharded shards that stock webdataset reads, the statistics and
the report (checked in headless Chromium)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import webdataset as wds
from conftest import RESHARD_SIZE, SMALL_SAMPLES

from manifests.store import RunLayout, tar_key
from manifests.uids import read_selection
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.stats import parrot_stats

SCORE_COLUMNS = ["n_regions", "text_area_ratio", "texts", "parrot_score", "clip_score", "clip_score_masked"]


def _con(root: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(root / "catalog.duckdb"), read_only=True)


def test_every_ok_sample_has_every_score(embedded_run):
    con = _con(embedded_run["root"])
    n_ok = con.execute("select count(*) from samples where status = 'ok'").fetchone()[0]
    assert n_ok == SMALL_SAMPLES
    for column in SCORE_COLUMNS:
        missing = con.execute(f"select count(*) from samples where status = 'ok' and {column} is null").fetchone()[0]
        assert missing == 0, column
    statuses = con.execute("select distinct ocr_status, parrot_status, clip_status from samples where status='ok'").fetchall()
    assert statuses == [("ok", "ok", "ok")]
    # no missing value turned into the text "nan" on its way through the later stages' actors
    errors = con.execute("select count(ocr_error), count(clip_error), count(dedup_error) from samples where status = 'ok'").fetchone()
    assert errors == (0, 0, 0), errors
    provenance = con.execute("select distinct ocr_engine, ocr_device, ocr_precision, clip_device from samples where status='ok'").fetchall()
    assert len(provenance) == 1 and provenance[0][1] == "cpu" and provenance[0][3] == "cpu"


def test_ocr_finds_the_text_the_generator_drew(embedded_run):
    root = embedded_run["root"]
    con = _con(root)
    gt = str(root / "ground_truth.parquet")
    rows = con.execute(
        f"select g.has_text, s.n_regions > 0 from samples s join read_parquet('{gt}') g using (url) where s.status = 'ok'"
    ).fetchall()
    accuracy = sum(a == b for a, b in rows) / len(rows)
    assert accuracy >= 0.85, accuracy


def test_parrot_score_separates_parrot_from_descriptive_captions(embedded_run):
    stats = parrot_stats(RunLayout(embedded_run["root"]))
    by_kind = {kind: mean for kind, _, mean in stats.by_kind}
    assert by_kind["parrot"] > 0.6 > 0.1 > by_kind["descriptive"], by_kind
    assert stats.auc_parrot_vs_descriptive is not None and stats.auc_parrot_vs_descriptive > 0.9


def test_stats_command_prints_the_paper_measures(embedded_run, capsys):
    assert main(["stats", "--output", str(embedded_run["root"])]) == 0
    out = capsys.readouterr().out
    for phrase in ("images with embedded text", "CoTR, all captions", "fuzzy CoTR", "AUC parrot vs descriptive"):
        assert phrase in out


def _direct_sql_kept(con: duckdb.DuckDBPyConnection, rules: dict[str, str]) -> set[str]:
    cols = ", ".join(f"({sql}) as r{i}" for i, sql in enumerate(rules.values()))
    where = " and ".join(f"r{i}" for i in range(len(rules)))
    return {u for (u,) in con.execute(f"select uid from (select uid, {cols} from samples where status = 'ok') where {where}").fetchall()}


def test_each_policy_selection_matches_its_sql_in_duckdb(embedded_run):
    root = embedded_run["root"]
    config = load_config(embedded_run["config"])
    con = _con(root)
    for name in config.datasets["embedded"].policies:
        selection = read_selection(RunLayout(root).selection_path(name)).to_pylist()
        assert len(selection) == SMALL_SAMPLES
        kept = {r["uid"] for r in selection if r["kept"]}
        assert kept == _direct_sql_kept(con, config.policy(name).rendered_rules()), name
        assert all(r["reason"].startswith("kept" if r["kept"] else "dropped") for r in selection)
    counts = dict(con.execute("select policy, count(*) filter (where kept) from selections group by 1").fetchall())
    assert counts["all"] == SMALL_SAMPLES
    assert 0 < counts["no-text"] < SMALL_SAMPLES
    assert 0 < counts["tmars"] < SMALL_SAMPLES
    # the fractions the policies' params name are what they keep (ties aside)
    assert abs(counts["clip-score-top"] - 0.3 * SMALL_SAMPLES) <= 1
    assert abs(counts["tmars"] - 0.5 * SMALL_SAMPLES) <= 1
    parrots = con.execute("select count(*) filter (where is_parrot) from samples where status = 'ok'").fetchone()[0]
    assert counts["no-parrot"] == SMALL_SAMPLES - parrots  # is_parrot, set by [parrot] parrot_threshold, decides


def test_resharded_shards_hold_exactly_the_kept_uids(embedded_run):
    root = embedded_run["root"]
    layout = RunLayout(root)
    for name in load_config(embedded_run["config"]).datasets["embedded"].policies:
        kept = {r["uid"] for r in read_selection(layout.selection_path(name)).to_pylist() if r["kept"]}
        folder = layout.curated_dir(name)
        uids = []
        for tar in sorted(folder.glob("*.tar")):
            for sample in wds.WebDataset(str(tar), shardshuffle=False):
                assert {"jpg", "txt", "json"} <= set(sample)
                uids.append(json.loads(sample["json"])["uid"])
        assert sorted(uids) == sorted(kept), name
        sizes = json.loads((folder / "sizes.json").read_text())
        assert sum(sizes.values()) == len(kept) and max(sizes.values()) <= RESHARD_SIZE


def test_new_policy_reshards_only_itself(embedded_run, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(embedded_run["root"], root)
    layout = RunLayout(root)
    config = tmp_path / "more.toml"
    config.write_text(
        embedded_run["config"].read_text()
        + '\n[policies.short-captions]\ndescription = "captions of at most 6 words"\n'
        + "rules = { short = \"len(string_split(caption, ' ')) <= 6\" }\n"
    )
    before = {p: (layout.curated_dir(p) / "sizes.json").stat().st_mtime_ns for p in ("all", "no-text", "tmars")}
    args = list(embedded_run["args"])
    args[args.index("--output") + 1] = str(root)
    args[args.index("--config") + 1] = str(config)
    assert main(args + ["--policies", "all,no-text,tmars,short-captions"]) == 0
    out = capsys.readouterr().out
    assert "no download work done" in out
    assert {p: (layout.curated_dir(p) / "sizes.json").stat().st_mtime_ns for p in before} == before
    assert (layout.curated_dir("short-captions") / "sizes.json").exists()
    con = _con(root)
    assert con.execute("select count(*) from selection_short_captions").fetchone()[0] == SMALL_SAMPLES


def test_report_renders_in_headless_chromium(embedded_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium must be installed (make test installs it)"
    report = embedded_run["root"] / "report" / "index.html"
    assert report.exists()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", report.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-loaded="yes"' in dom.stdout
    assert 'data-broken-images="0"' in dom.stdout
    assert "data-js-errors" not in dom.stdout
    n_images = int(dom.stdout.split('data-images="')[1].split('"')[0])
    assert n_images >= 10
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1400,2400", report.resolve().as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000


def _rewrite_tar_with_corrupt_image(tar_path: Path) -> str:
    """Replace the first JPEG of a tar with garbage bytes; returns that sample's uid."""
    import io
    import tarfile

    members = []
    with tarfile.open(tar_path) as tar:
        for m in tar:
            members.append((m, tar.extractfile(m).read()))
    victim = tar_key(members[0][0].name)[0]
    uid = next(json.loads(d)["uid"] for m, d in members if m.name == f"{victim}.json")
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            if m.name == f"{victim}.jpg":
                data = b"\xff\xd8\xff not a jpeg any more"
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return uid


def test_stage_resume_and_decode_failure_in_the_dag(embedded_run, tmp_path, capsys):
    """Remove one shard's per-sample parts and break one of its images: the rerun redoes that shard
    only, records the broken image as a failed row with the reason, and scores the others."""
    root = tmp_path / "copy"
    shutil.copytree(embedded_run["root"], root)
    layout = RunLayout(root)
    for stage in ("ocr", "parrot", "clip_score", "dedup"):
        layout.part_path(stage, "000001").unlink()
    keep = {s: layout.part_path(s, "000000").stat().st_mtime_ns for s in ("ocr", "parrot", "clip_score")}
    broken_uid = _rewrite_tar_with_corrupt_image(layout.shards_dir / "000001.tar")
    args = list(embedded_run["args"])
    args[args.index("--output") + 1] = str(root)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no download work done" in out
    assert {s: layout.part_path(s, "000000").stat().st_mtime_ns for s in keep} == keep
    con = _con(root)
    row = con.execute("select ocr_status, ocr_error, clip_status, n_regions from samples where uid = ?", [broken_uid]).fetchone()
    assert row[0] == "failed" and "decode failed" in row[1] and row[2] == "failed" and row[3] is None
    others = con.execute(
        "select count(*) from samples where status = 'ok' and shard = '000001' and uid <> ? and ocr_status = 'ok' and clip_status = 'ok'",
        [broken_uid],
    ).fetchone()[0]
    assert others == con.execute("select count(*) from download where status = 'ok' and shard = '000001'").fetchone()[0] - 1
    assert con.execute("select count(*), count(distinct uid) from ocr").fetchone() == (SMALL_SAMPLES, SMALL_SAMPLES)
    # the dedup stage hashes the others exactly as in the first run (a null among 64-bit ints must
    # not turn the column into floats on its way through Ray), and fails the broken one with the reason
    first = dict(_con(embedded_run["root"]).execute("select uid, phash from dedup").fetchall())
    again = con.execute("select uid, phash, dedup_status, dedup_error from dedup join download using (uid) where shard = '000001'").fetchall()
    assert all(h == first[u] for u, h, st, _ in again if u != broken_uid) and len(again) > 1
    assert [(st, "decode failed" in (e or "")) for u, _, st, e in again if u == broken_uid] == [("failed", True)]


def test_text_only_rerun_opens_no_tar_and_decodes_no_image(embedded_run, tmp_path):
    """Parrot declares that it reads captions and OCR text, not pixels. With every parrot part gone
    and every shard tar moved away, the rerun rebuilds the parrot parts, equal to the first run's:
    it cannot have opened a tar, since there is none, and it reports no image decoded."""
    from pipeline.config import load_config
    from pipeline.dag import SAMPLE_STEPS
    from pipeline.sample_runner import run_per_sample

    root = tmp_path / "copy"
    shutil.copytree(embedded_run["root"], root)
    layout = RunLayout(root)
    parts = sorted(layout.stage_dir("parrot").glob("part-*.parquet"))
    before = {p.name: pq.read_table(p) for p in parts}
    for part in parts:
        part.unlink()
    aside = tmp_path / "tars-aside"
    shutil.move(layout.shards_dir, aside)
    report = run_per_sample(layout, load_config(embedded_run["config"]), SAMPLE_STEPS, progress=False)
    assert report.images_decoded == 0 and report.samples == SMALL_SAMPLES and not report.incomplete_shards
    assert report.stages["parrot"].shards_run == len(parts) and report.stages["ocr"].shards_run == 0
    for part in parts:
        assert pq.read_table(part).sort_by("uid").equals(before[part.name].sort_by("uid")), part.name
