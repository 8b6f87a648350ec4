"""Training from a selection (``[train] source = "selection"``): a policy's kept samples read from the
download shards of the real embedded run, equal to what resharding wrote, and trained on through
the same loader as curated shards."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pyarrow.compute as pc
import pytest
import webdataset as wds

from manifests.catalog import latest_downloads
from manifests.store import RunLayout
from manifests.uids import read_selection
from pipeline.cli import main
from training.selection_data import plan_selection, selection_samples
from training.train import shard_urls

POLICIES = ("all", "no-text", "no-parrot")
TINY = "[train]\nbatch_size = 8\nworkers = 0\nshuffle_buffer = 16\nthreads = 1\ndevice = 'cpu'\n"


def _fingerprint(sample: dict) -> tuple[str, str, bytes]:
    """What training reads of a sample: its uid, its image bytes (as a hash) and its caption bytes."""
    return json.loads(sample["json"])["uid"], hashlib.sha256(sample["jpg"]).hexdigest(), sample["txt"]


@pytest.mark.parametrize("policy", POLICIES)
def test_selection_stream_is_the_resharded_stream(embedded_run, policy):
    """Same uids, same jpg bytes, same captions as curated/<policy>/*.tar, each sample once, and only
    the download shards that hold a kept sample are read."""
    layout = RunLayout(embedded_run["root"])
    plan = plan_selection(layout, policy)
    streamed = list(selection_samples(plan))
    curated_tars = wds.SimpleShardList(shard_urls(layout.curated_dir(policy)))
    curated = list(wds.DataPipeline(curated_tars, wds.tarfile_to_samples()))
    assert Counter(map(_fingerprint, streamed)) == Counter(map(_fingerprint, curated))
    assert len(streamed) == len(curated) == plan.samples

    selection = read_selection(layout.selection_path(policy), columns=["uid", "kept"])
    kept = set(selection.filter(pc.equal(selection.column("kept"), True)).column("uid").to_pylist())
    assert {json.loads(s["json"])["uid"] for s in streamed} == kept
    downloads = latest_downloads(layout, ["uid", "shard"]).to_pylist()
    holding = {r["shard"] for r in downloads if r["uid"] in kept}
    assert [u.rsplit("/", 1)[-1].removesuffix(".tar") for u in plan.urls] == sorted(holding)
    per_shard = Counter(r["shard"] for r in downloads if r["uid"] in kept)
    assert plan.counts == tuple(per_shard[s] for s in sorted(holding))


def test_train_command_from_selection(embedded_run, tmp_path, capsys):
    """`train --source selection` trains on the policy's selection and says so; a resumed run is a no-op."""
    config = tmp_path / "small.toml"
    config.write_text(TINY)
    root = embedded_run["root"]
    args = ["train", "--output", str(root), "--policy", "no-parrot", "--source", "selection", "--steps", "2",
            "--config", str(config), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "steps 1..2" in out and "selection shard(s)" in out
    result = json.loads((root / "models" / "no-parrot" / "result.json").read_text())
    assert result["source"] == "selection" and result["config"]["source"] == "selection"
    assert result["shards"] == len(plan_selection(RunLayout(root), "no-parrot").urls)
    assert main(args) == 0 and "no training done" in capsys.readouterr().out


def test_bad_source_and_missing_selection_are_one_line(embedded_run, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsource = 'shards'\n")
    assert main(["train", "--output", str(embedded_run["root"]), "--config", str(bad)]) == 2
    assert "train.source must be curated or selection, not 'shards'" in capsys.readouterr().err
    assert main(["train", "--output", str(embedded_run["root"]), "--policy", "nope", "--source", "selection"]) == 2
    err = capsys.readouterr().err
    assert "cannot train on policy 'nope' from its selection" in err and "run `make curate`" in err
