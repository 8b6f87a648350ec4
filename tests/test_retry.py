"""Retry by reason (``curate --retry``): only the rows whose latest attempt failed with a named
reason are fetched again, in new shards; the manifests then show each uid once with its latest
attempt (earlier ones in ``download_history``), the later steps cover the new samples, and the
result is the fault-free run's.

Real HTTP on 127.0.0.1: one server, which serves a few dozen real images and, while its faults
are switched on, fails a seeded 30% of them on their first request (a 503, a connection reset,
or a stall past ``download.timeout_s``); the fault-free reference run uses the same server (so
the same URLs, so the same uids) with the faults off. Real img2dataset, Ray, OCR, CLIP, DuckDB.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import socket
import struct
import tarfile
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from core.errors import ConfigError
from manifests.store import RunLayout, read_table
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.download_runner import ALL_TRANSIENT, TRANSIENT_ERROR_KINDS, RetryReasons, make_uid, plan_download
from run_compare import curated_digests, same
from sources import open_source

IMAGES = 20
FAULT_SHARE = 0.3
SEED = 16
SHARD_SIZE = 8
POLICIES = ("all", "no-parrot", "tmars")
RESHARD_SIZE = 2  # 20 samples of 'all' in 10 curated shards: the retried ones are spread over several
TIMEOUT_S = 2.0  # small, so that a stall costs the run little; not so small that a loaded machine times out
STALL_S = 5.0  # past download.timeout_s: the client gives up first
MODES = ("503", "reset", "stall")
KIND_OF_MODE = {"503": "http_503", "reset": "connection_error", "stall": "timeout"}
CONFIG = f"""
[download]
allow_networks = ["127.0.0.1/32"]
timeout_s = {TIMEOUT_S}
[ocr]
engine = "rapidocr"      # the fast engine: this test is about retrying, not OCR quality
batch_size = 4
[clip]
batch_size = 4
[reshard]
samples_per_shard = {RESHARD_SIZE}
"""
SHARDS = -(-(IMAGES + 2) // SHARD_SIZE)  # the list's shards: the images and two 404s
RETRY_SHARDS = -(-round(FAULT_SHARE * IMAGES) // SHARD_SIZE)


class FaultyServer:
    """Static images on 127.0.0.1; while ``faults`` maps a path to a mode, that path's first
    request fails that way (``fail_times`` requests, for a path failing more than once)."""

    def __init__(self, folder: Path) -> None:
        self.faults: dict[str, str] = {}
        self.fail_times: dict[str, int] = {}
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with server.lock:
                    seen = server.requests[self.path]
                    server.requests[self.path] += 1
                mode = server.faults.get(self.path)
                if mode is None or seen >= server.fail_times.get(self.path, 1):
                    super().do_GET()
                elif mode == "503":
                    self.send_error(503)
                elif mode == "reset":  # RST instead of a response: "connection reset by peer"
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                else:  # stall: say nothing until the client has timed out, then hang up
                    time.sleep(STALL_S)
                    self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.httpd.handle_error = lambda request, address: None  # a reset socket is the point, not news
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def arm(self, faults: dict[str, str], fail_times: dict[str, int] | None = None) -> None:
        self.faults, self.fail_times = dict(faults), dict(fail_times or {})
        self.requests.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    for i in range(IMAGES):
        image = Image.new("RGB", (96 + 6 * i, 80), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
        if i % 3 == 0:
            ImageDraw.Draw(image).text((8, 30), f"SALE {i}", fill=(255, 255, 255))
        image.save(folder / f"{i}.jpg", quality=90)
    served = FaultyServer(folder)
    yield served
    served.close()


def _url_list(base: str, tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """The images and two permanent 404s (a retry of transient failures must leave those alone)."""
    rows = [(f"{base}/{i}.jpg", f"picture {i}" + (f" SALE {i}" if i % 6 == 0 else "")) for i in range(IMAGES)]
    rows += [(f"{base}/missing-{i}.jpg", f"not there {i}") for i in range(2)]
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), path)
    return path, rows


def _seeded_faults() -> dict[str, str]:
    """A seeded 30% of the image paths, each with a failure mode (503, reset, stall in turn)."""
    picked = sorted(random.Random(SEED).sample(range(IMAGES), round(FAULT_SHARE * IMAGES)))
    return {f"/{i}.jpg": MODES[n % len(MODES)] for n, i in enumerate(picked)}


def _curate(url_list: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return ["curate", "--url-list", str(url_list), "--output", str(out), "--config", str(config),
            "--shard-size", str(SHARD_SIZE), "--policies", ",".join(POLICIES), "--no-progress", *extra]


def _query(root: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(RunLayout(root).catalog_path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _counts(root: Path) -> dict[str, int]:
    """ok and failed-by-reason, one per uid (the catalog's ``download`` view: latest attempts)."""
    rows = _query(root, "select coalesce(error_kind, 'ok'), count(*) from download group by 1")
    return dict(sorted(rows))


def _stage_rows(root: Path, stage: str) -> dict[str, dict]:
    """A stage's rows by uid, without where the sample sits and when it was fetched."""
    view = "download" if stage == "download" else stage
    con = duckdb.connect(str(RunLayout(root).catalog_path), read_only=True)
    try:
        table = con.execute(f"select * from {view}").to_arrow_table()
    finally:
        con.close()
    drop = {"shard", "key", "attempt", "downloaded_at", "error"}
    return {r["uid"]: {k: v for k, v in r.items() if k not in drop} for r in table.to_pylist()}


def _part_times(layout: RunLayout) -> dict[str, int]:
    return {f"{stage}/{p.name}": p.stat().st_mtime_ns for stage in ("download", "ocr", "clip_score")
            for p in layout.stage_dir(stage).glob("part-*.parquet")}


def test_retry_by_reason_equals_a_fault_free_run(ray_local, server, tmp_path, capsys):
    url_list, rows = _url_list(server.base, tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    reference, out = tmp_path / "reference", tmp_path / "retried"
    faults = _seeded_faults()
    uid_of = {u.split("/", 3)[3]: make_uid(u, c) for u, c in rows}
    retried = {uid_of[path.lstrip("/")] for path in faults}

    server.arm({})
    assert main(_curate(url_list, reference, config)) == 0
    server.arm(faults)
    assert main(_curate(url_list, out, config)) == 0  # failed samples are samples: the run succeeds
    layout = RunLayout(out)

    # before: the faulty 30% failed, each with its reason, beside the two permanent 404s
    before = _counts(out)
    by_mode = Counter(KIND_OF_MODE[m] for m in faults.values())
    assert before == dict(sorted({"ok": IMAGES - len(faults), "http_404": 2, **by_mode}.items())), before
    assert _counts(reference) == {"http_404": 2, "ok": IMAGES}
    first_parts = _part_times(layout)
    assert len(first_parts) == 3 * SHARDS
    capsys.readouterr()

    assert main(_curate(url_list, out, config, "--retry", ALL_TRANSIENT)) == 0
    printed = capsys.readouterr().out
    after = _counts(out)
    with capsys.disabled():
        print(f"\nbefore retry: {before}\nafter retry:  {after}")
    assert after == {"http_404": 2, "ok": IMAGES}
    assert f"retry ({ALL_TRANSIENT}): {len(faults)} sample(s) whose latest attempt failed so" in printed
    assert f"retried now: ok {len(faults)}\n" in printed
    assert f"{RETRY_SHARDS} shard(s) downloaded now, {SHARDS} already done" in printed  # new shards only

    # the retry is a list of its own in dataset.json, in new shards after the existing ones
    meta = json.loads((out / "input" / "dataset.json").read_text())
    inputs = [(i["fingerprint"].split(":")[0], i["first_shard"], i["shards"], i.get("reasons")) for i in meta["inputs"]]
    assert inputs == [("url_list", 0, SHARDS, None), ("retry", SHARDS, RETRY_SHARDS, [ALL_TRANSIENT])]
    assert meta["samples"] == IMAGES + 2
    # the earlier attempts' parts were not rewritten, and no stage redid their shards
    assert {k: v for k, v in _part_times(layout).items() if k in first_parts} == first_parts
    every_shard = {f"{i:06d}" for i in range(SHARDS + RETRY_SHARDS)}
    assert layout.done_shards("ocr") == layout.done_shards("clip_score") == every_shard
    # each uid once, at its latest attempt; the history keeps the first, failed attempts
    assert _query(out, "select count(*), count(distinct uid) from download") == [(IMAGES + 2, IMAGES + 2)]
    assert _query(out, "select count(*) from samples") == [(IMAGES + 2,)]
    history = _query(out, "select uid, attempt, status, error_kind, shard from download_history")
    assert len(history) == IMAGES + 2 + len(faults)
    firsts = {uid: kind for uid, attempt, status, kind, _ in history if attempt == 1 and uid in retried}
    assert Counter(firsts.values()) == by_mode
    seconds = {(uid, status, shard >= f"{SHARDS:06d}") for uid, attempt, status, _, shard in history if attempt == 2}
    assert seconds == {(uid, "ok", True) for uid in retried}
    for uid, attempt, status, kind, shard in history:  # the 404s were never retried
        assert kind != "http_404" or attempt == 1

    # every stage, selection and curated set is the fault-free run's
    for stage in ("download", "ocr", "parrot", "clip_score", "dedup"):
        got, want = _stage_rows(out, stage), _stage_rows(reference, stage)
        assert got.keys() == want.keys(), stage
        for uid, row in want.items():
            for column, value in row.items():
                assert same(got[uid][column], value), (stage, uid, column, got[uid][column], value)
    key = ("policy", "uid", "kept", "reason")
    selections = [sorted(tuple(r[k] for k in key) for r in read_table(RunLayout(root).selections_dir).to_pylist())
                  for root in (out, reference)]
    assert selections[0] == selections[1]

    # curated shards: byte-identical to the fault-free run's. Only the lineage in the curated
    # manifest differs: a retried sample was read from the retry's new shard
    lineage = [{(r["policy"], r["uid"]): (r["shard"], r["key"], r["source_shard"], r["source_key"])
                for r in read_table(root / "curated" / policy / "manifest.parquet").to_pylist()}
               for root in (out, reference) for policy in POLICIES]
    for got, want in zip(lineage[: len(POLICIES)], lineage[len(POLICIES):]):
        assert got.keys() == want.keys()
        for (policy, uid), (shard, key, source_shard, source_key) in want.items():
            if uid in retried:
                assert got[policy, uid][:2] == (shard, key) and got[policy, uid][2] >= f"{SHARDS:06d}", (policy, uid)
            else:
                assert got[policy, uid] == (shard, key, source_shard, source_key), (policy, uid)
    digests = [curated_digests(str(root), POLICIES) for root in (out, reference)]
    assert digests[0] == digests[1]
    with capsys.disabled():
        print(f"curated tars byte-identical to the fault-free run's: {len(digests[1])} of {len(digests[1])}")

    # a rerun (with or without --retry) does nothing more: nothing failed transiently
    capsys.readouterr()
    assert main(_curate(url_list, out, config, "--retry", ALL_TRANSIENT)) == 0
    printed = capsys.readouterr().out
    assert "nothing to retry" in printed and "no download work done" in printed
    assert json.loads((out / "input" / "dataset.json").read_text()) == meta


def test_a_retry_that_fails_again_is_attempt_two_and_can_be_retried(ray_local, server, tmp_path, capsys):
    """Download only: reasons pick the rows; a row failing again is attempt 2 with its new reason;
    a second retry fetches it; unknown names are one error; nothing to retry does nothing."""
    url_list, rows = _url_list(server.base, tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    layout = RunLayout(out)
    uid_of = {u.split("/", 3)[3]: make_uid(u, c) for u, c in rows}
    # 1 and 2 answer 503 twice, then the image; 3 resets once; 4 stalls once
    server.arm({"/1.jpg": "503", "/2.jpg": "503", "/3.jpg": "reset", "/4.jpg": "stall"},
               fail_times={"/1.jpg": 2, "/2.jpg": 2})
    download_only = ("--stages", "download")
    assert main(_curate(url_list, out, config, *download_only)) == 0
    assert _counts(out) == {"connection_error": 1, "http_404": 2, "http_503": 2, "ok": IMAGES - 4, "timeout": 1}

    # an unknown reason: one line naming it and the known ones; nothing planned
    planned = sorted(p.name for p in layout.input_dir.iterdir())
    capsys.readouterr()
    assert main(_curate(url_list, out, config, "--retry", "timeout,timout", *download_only)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'timout'" in err and "known: all-transient" in err and "http_5xx" in err
    assert sorted(p.name for p in layout.input_dir.iterdir()) == planned

    # http_5xx and timeout: 1, 2 (503 again: attempt 2, failed) and 4 (now ok); 3 (reset) is not asked for
    assert main(_curate(url_list, out, config, "--retry", "http_5xx,timeout", *download_only)) == 0
    assert server.requests["/3.jpg"] == 1 and server.requests["/4.jpg"] == 2
    latest = {uid: (a, s, k) for uid, a, s, k in _query(out, "select uid, attempt, status, error_kind from download")}
    assert latest[uid_of["1.jpg"]] == latest[uid_of["2.jpg"]] == (2, "failed", "http_503")
    assert latest[uid_of["4.jpg"]] == (2, "ok", None) and latest[uid_of["3.jpg"]] == (1, "failed", "connection_error")

    # again, by the explicit name: attempt 3 for 1 and 2. The first try is killed right after
    # planning (the plan only, no download): the rerun downloads that retry's shard and plans no
    # second retry of the same rows
    settings = load_config(str(config))
    source = open_source(settings.dataset("laion-subset"), url_list=str(url_list))
    download = dataclasses.replace(settings.download, shard_size=SHARD_SIZE)
    killed = plan_download(source, layout, download, retry="http_503")
    assert killed.todo == [f"{SHARDS + 1:06d}"]
    capsys.readouterr()
    assert main(_curate(url_list, out, config, "--retry", "http_503", *download_only)) == 0
    printed = capsys.readouterr().out
    assert "2 failed sample(s) already planned for retry in shards not downloaded yet" in printed
    assert "nothing to retry" in printed
    assert "1 shard(s) downloaded now" in printed
    # then the reset, by all-transient
    assert main(_curate(url_list, out, config, "--retry", ALL_TRANSIENT, *download_only)) == 0
    latest = {uid: (a, s) for uid, a, s in _query(out, "select uid, attempt, status from download")}
    assert latest[uid_of["1.jpg"]] == latest[uid_of["2.jpg"]] == (3, "ok")
    assert latest[uid_of["3.jpg"]] == (2, "ok")
    assert _counts(out) == {"http_404": 2, "ok": IMAGES}
    assert _query(out, "select count(*) from download_history") == [(IMAGES + 2 + 3 + 2 + 1,)]
    inputs = json.loads((out / "input" / "dataset.json").read_text())["inputs"]
    assert [(i["first_shard"], i["samples"], i.get("reasons")) for i in inputs] == [
        (0, IMAGES + 2, None), (SHARDS, 3, ["http_5xx", "timeout"]), (SHARDS + 1, 2, ["http_503"]),
        (SHARDS + 2, 1, [ALL_TRANSIENT])]

    # nothing left to retry: says so, plans nothing, downloads nothing
    capsys.readouterr()
    assert main(_curate(url_list, out, config, "--retry", ALL_TRANSIENT, *download_only)) == 0
    printed = capsys.readouterr().out
    assert f"retry ({ALL_TRANSIENT}): no sample's latest attempt failed with these reasons: nothing to retry" in printed
    assert "no download work done" in printed
    assert json.loads((out / "input" / "dataset.json").read_text())["inputs"] == inputs


def test_retry_reasons_name_kinds_and_classes():
    reasons = RetryReasons.parse("timeout, http_5xx,HTTP_429")
    assert reasons.given == ("timeout", "http_5xx", "http_429")
    assert [k for k in ("timeout", "http_503", "http_599", "http_429", "http_404", "http_4xx", None, "connection_error")
            if reasons.matches(k)] == ["timeout", "http_503", "http_599", "http_429"]
    transient = RetryReasons.parse(ALL_TRANSIENT)
    assert set(transient.names()) == set(TRANSIENT_ERROR_KINDS)
    never = ("http_404", "http_403", "not_an_image", "corrupt_image", "blocked_address", "invalid_url",
             "unsupported_scheme", "decompression_bomb", "response_too_large", "other")
    assert not any(transient.matches(k) for k in never)
    assert all(transient.matches(k) for k in ("timeout", "connection_error", "http_500", "http_503", "http_429"))
    for bad in ("", " , ", "http_6xx", "http_50", "timeouts"):
        with pytest.raises(ConfigError, match="known: all-transient"):
            RetryReasons.parse(bad)
