"""Appending a second URL list to a run: only new uids are planned, in new shards after the
existing ones (which are never rewritten), known uids are not fetched again, reruns of either list
are no-ops, and the result equals one run over the two lists concatenated (apart from shard names).

Real HTTP on 127.0.0.1 (a server that counts requests per path), real img2dataset, real Ray.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from core.errors import ConfigError
from manifests.store import RunLayout, as_path, read_table
from pipeline.cli import main
from pipeline.download_runner import make_uid, plan_download, uids_of
from sources import DatasetConfig, DatasetSource
from stages.download import DownloadConfig

SHARD_SIZE = 5
POLICIES = "all,no-parrot,tmars"
CONFIG = """
[download]
allow_networks = ["127.0.0.1/32"]
[ocr]
engine = "rapidocr"      # the fast engine: this test is about appending, not OCR quality
[reshard]
samples_per_shard = 8
"""
VOLATILE = {"downloaded_at", "error"}  # wall-clock time; a message may name the attempt's timing
RENUMBERED = {"shard", "key", "input_row"}  # where a sample sits: differs between the two ways, by design


class _CountingHandler(SimpleHTTPRequestHandler):
    requests: Counter

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requests[self.path] += 1
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def image_server(tmp_path):
    """20 small distinct images on 127.0.0.1 (some with a word drawn on them); counts GETs per path."""
    folder = tmp_path / "www"
    folder.mkdir()
    for i in range(20):
        image = Image.new("RGB", (96 + 8 * i, 80), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
        if i % 3 == 0:
            ImageDraw.Draw(image).text((8, 30), f"SALE {i}", fill=(255, 255, 255))
        image.save(folder / f"{i}.jpg", quality=90)
    requests: Counter = Counter()
    handler = type("Handler", (_CountingHandler,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def _lists(base: str, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two lists sharing some (url, caption) pairs, each with an internal repeat and a 404; and
    the two concatenated."""
    first = [(f"{base}/{i}.jpg", f"picture {i}") for i in range(12)]
    first += [(f"{base}/missing-1.jpg", "not there"), (f"{base}/3.jpg", "picture 3")]  # a 404, a repeat
    second = [(f"{base}/{i}.jpg", f"picture {i}") for i in range(8, 20)]  # 8..11 are already in the run
    second += [(f"{base}/5.jpg", "the same picture, another caption"),  # a new uid for a known URL
               (f"{base}/missing-2.jpg", "not there either"), (f"{base}/15.jpg", "picture 15")]  # a 404, a repeat
    paths = []
    for name, rows in (("first", first), ("second", second), ("both", first + second)):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), path)
        paths.append(path)
    return paths[0], paths[1], paths[2]


def _curate(url_list: Path, out: Path, config: Path) -> list[str]:
    return ["curate", "--url-list", str(url_list), "--output", str(out), "--config", str(config),
            "--shard-size", str(SHARD_SIZE), "--policies", POLICIES, "--no-progress"]


def _stage_rows(root: Path, stage: str) -> list[dict]:
    rows = read_table(RunLayout(root).stage_dir(stage)).to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in VOLATILE | RENUMBERED} for r in rows), key=lambda r: r["uid"])


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def _download(url_list: Path, out: Path):
    """The download step alone, as ``curate`` runs it: plan (append), then the missing shards."""
    from pipeline.download_runner import run_download

    source = DatasetSource(DatasetConfig(name="mine", source="url_list", allow_networks=("127.0.0.1/32",)),
                           url_list=str(url_list))
    config = source.download_config(DownloadConfig(shard_size=SHARD_SIZE, thread_count=4))
    layout = RunLayout(out)
    work = plan_download(source, layout, config)
    return work, run_download(source, layout, config, work, progress=False)


def test_second_list_is_appended_in_new_shards_and_known_uids_are_not_fetched(ray_local, image_server, tmp_path):
    base, requests = image_server
    first, second, both = _lists(base, tmp_path)
    out = tmp_path / "appended"
    layout = RunLayout(out)

    work, report = _download(first, out)
    assert work.todo == ["000000", "000001", "000002"] and not report.shards_failed  # 13 distinct uids
    before = {"shards": _files(out / "shards"), "parts": _files(layout.stage_dir("download"))}
    fetched_once = dict(requests)

    work, report = _download(second, out)
    assert work.todo == ["000003", "000004"] and report.shards_already_done == 3 and not report.shards_failed
    assert report.input_lines() == [
        "2 URL lists in this output; this list (15 rows) was appended now: 10 sample(s) of its own in shard(s) "
        "000003..000004",
        "4 row(s) of this list already in the run (an earlier list's): not fetched again",
        "1 repeated (url, caption) rows of the input planned once",
    ]
    # the first list's shards and parts were not rewritten
    after = {"shards": _files(out / "shards"), "parts": _files(layout.stage_dir("download"))}
    for what in before:
        assert {k: after[what][k] for k in before[what]} == before[what], what
    # a uid already in the run was not fetched again; a known URL under a new caption was
    for i in range(8, 12):
        assert requests[f"/{i}.jpg"] == fetched_once[f"/{i}.jpg"] == 1
    assert requests["/5.jpg"] == 2

    uids = read_table(layout.stage_dir("download")).column("uid").to_pylist()
    wanted = {make_uid(u, c) for path in (first, second) for u, c in zip(*pq.read_table(path).to_pydict().values())}
    assert len(uids) == len(set(uids)) and set(uids) == wanted and len(wanted) == 23
    meta = json.loads((out / "input" / "dataset.json").read_text())
    assert [(i["rows"], i["samples"], i["already_present"], i["first_shard"], i["shards"], i["first_input_row"])
            for i in meta["inputs"]] == [(14, 13, 0, 0, 3, 0), (15, 10, 4, 3, 2, 14)]

    # a rerun of either list plans nothing and downloads nothing: both are part of the run now
    for again in (second, first):
        work, report = _download(again, out)
        assert work.todo == [] and report.shards_already_done == 5 and report.samples_run == 0
    assert json.loads((out / "input" / "dataset.json").read_text()) == meta
    assert _files(out / "shards") == after["shards"]

    # one run over the two lists concatenated: the same samples with the same outcome, and the
    # same plan rows (input_row numbers rows across the lists in order) apart from shard names
    single = tmp_path / "single"
    _download(both, single)
    assert _stage_rows(out, "download") == _stage_rows(single, "download")
    plans = [sorted((r["uid"], r["input_row"]) for path in sorted(RunLayout(root).input_dir.glob("*.parquet"))
                    for r in read_table(path).to_pylist()) for root in (out, single)]
    assert plans[0] == plans[1]


@pytest.mark.slow
def test_appended_run_equals_one_run_over_both_lists(ray_local, image_server, tmp_path, capsys):
    """The whole DAG: after an append every stage, selection and curated manifest covers both
    lists, each uid once, as one run over the concatenated list does. (The first list is only
    downloaded: the second, full run then scores both lists' shards, as a staged run would.)"""
    base, _ = image_server
    first, second, both = _lists(base, tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    out, single = tmp_path / "appended", tmp_path / "single"
    assert main([*_curate(first, out, config), "--stages", "download"]) == 0
    for url_list, root in ((second, out), (both, single)):
        assert main(_curate(url_list, root, config)) == 0
    assert main(_curate(first, out, config)) == 0  # the first list again: nothing to do
    capsys.readouterr()
    assert main(_curate(second, out, config)) == 0
    assert "no download work done" in capsys.readouterr().out

    layout = RunLayout(out)
    ok = {r["uid"] for r in read_table(layout.stage_dir("download")).to_pylist() if r["status"] == "ok"}
    assert len(ok) == 21  # 23 samples, 2 of them 404s
    for stage in ("download", "ocr", "parrot", "clip_score"):
        got, want = _stage_rows(out, stage), _stage_rows(single, stage)
        assert len(got) == len(want) == len({r["uid"] for r in got}), stage
        for g, w in zip(got, want):
            for column, value in w.items():
                same = value == g[column] or (isinstance(value, float) and abs(value - g[column]) < 1e-4) or (
                    # an embedding: a batch's other images change the forward's last float16 bits
                    isinstance(value, list) and value and isinstance(value[0], float)
                    and len(value) == len(g[column]) and max(abs(a - b) for a, b in zip(value, g[column])) < 1e-3)
                assert same, (stage, w["uid"], column, g[column], value)
    key = ("policy", "uid", "kept", "reason")
    selections = [sorted(tuple(r[k] for k in key) for r in read_table(RunLayout(root).selections_dir).to_pylist())
                  for root in (out, single)]
    assert selections[0] == selections[1] and len(selections[0]) == len(ok) * len(POLICIES.split(","))
    for policy in POLICIES.split(","):
        curated = [sorted(read_table(as_path(root) / "curated" / policy / "manifest.parquet").column("uid").to_pylist())
                   for root in (out, single)]
        assert curated[0] == curated[1] and set(curated[0]) <= ok, policy


def test_only_url_lists_are_appended(tmp_path, capsys):
    """A URL list onto an embedded run, or another embedded dataset, is one clear error; nothing written."""
    out = tmp_path / "out"
    embedded = DatasetConfig(name="embedded", source="embedded", samples=4)
    plan_download(DatasetSource(embedded), RunLayout(out), DownloadConfig(shard_size=SHARD_SIZE))  # plans only
    planned = _files(out / "input")
    listed = tmp_path / "list.csv"
    listed.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    assert main(["curate", "--url-list", str(listed), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output ") and "holds a run of the embedded dataset" in err
    assert "a URL list cannot be added to it" in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="already holds a run of another input"):
        plan_download(DatasetSource(dataclasses.replace(embedded, samples=5)), RunLayout(out), DownloadConfig())
    assert _files(out / "input") == planned


def test_plan_reads_a_run_planned_before_lists_could_be_appended(tmp_path):
    """An output planned by the earlier format (one list, no "inputs" in dataset.json) resumes, and
    accepts an appended list after its shards."""
    rows = [(f"http://127.0.0.1:9/{i}.jpg", f"c{i}") for i in range(7)]
    first = tmp_path / "first.csv"
    first.write_text("url,caption\n" + "".join(f"{u},{c}\n" for u, c in rows))
    layout = RunLayout(tmp_path / "out")
    uids = [make_uid(u, c) for u, c in rows]
    plan = pa.table({"uid": uids, "url": [u for u, _ in rows], "caption": [c for _, c in rows],
                     "shard": [f"{i // 3:06d}" for i in range(7)], "input_row": list(range(7))})
    layout.input_dir.mkdir(parents=True)
    pq.write_table(plan, layout.input_path)
    source = DatasetSource(DatasetConfig(name="old", source="url_list"), url_list=str(first))
    legacy = {"dataset": "old", "fingerprint": source.fingerprint(), "shard_size": 3, "samples": 7, "duplicates_dropped": 0}
    layout.input_meta_path.write_text(json.dumps(legacy))
    work = plan_download(source, layout, DownloadConfig(shard_size=3))
    assert work.todo == ["000000", "000001", "000002"] and [s.samples for s in work.shards] == [3, 3, 1]
    assert work.shards[2].read(layout).column("uid").to_pylist() == uids[6:]
    second = tmp_path / "second.csv"
    second.write_text("url,caption\nhttp://127.0.0.1:9/6.jpg,c6\nhttp://127.0.0.1:9/7.jpg,c7\n")
    work = plan_download(DatasetSource(source.config, url_list=str(second)), layout, DownloadConfig(shard_size=3))
    assert work.todo[-1] == "000003" and work.shards[-1].read(layout).column("input_row").to_pylist() == [8]
    assert work.report.already_present == 1


def test_uids_of_a_table_are_make_uid_of_each_row():
    urls = pa.table({"url": ["http://a/1.jpg", None, "http://a/ü.jpg", ""], "caption": ["x", "y", "café ☕", None]})
    assert uids_of(urls).to_pylist() == [make_uid(u or "", c or "") for u, c in zip(*urls.to_pydict().values())]


@pytest.mark.parametrize("remote", [False, True])
def test_listings_find_parts_locally_and_on_an_object_store(tmp_path, remote):
    """done_shards and stages_present list each folder once; the object-store path (one recursive
    listing) agrees with the local one."""
    from manifests.store import write_bytes_atomic

    layout = RunLayout(f"memory://append-{tmp_path.name}" if remote else tmp_path / "run")
    assert layout.done_shards("download") == set() and layout.stages_present() == []
    for stage, shards in (("download", 3), ("ocr", 2)):
        for i in range(shards):
            write_bytes_atomic(b"x", layout.part_path(stage, f"{i:06d}"))
    write_bytes_atomic(b"x", layout.stage_dir("empty") / "notes.txt")
    assert layout.done_shards("download") == {"000000", "000001", "000002"}
    assert layout.done_shards("ocr") == {"000000", "000001"}
    assert layout.stages_present() == ["download", "ocr"]
