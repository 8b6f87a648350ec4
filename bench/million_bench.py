"""A million-row URL list: plan, download, account for every row, rerun with nothing to do.

    python bench/million_bench.py [--quick]

A local HTTP server on 127.0.0.1 (its own process) serves a few hundred small JPEGs under a
million distinct URLs (``/img/<i>.jpg`` is image ``i mod 300``); the list (url, caption) is a
Parquet file of 1,000,000 rows (``--quick``: 20,000), with DataComp's shard size of 10,000
(``--quick``: 2,000). The driver is a process of its own, doing what ``curate`` does for the
download step (plan, download the missing shards on a local Ray, build the catalog, print the
summary), so its memory is measured alone (its RSS sampled every 0.2 s; Ray's processes are its
children and are reported separately).

- **planning**: rows/s of the first ``plan_download`` (read the list, fingerprint, hash every row,
  drop repeats, write the plan), side by side with the pre-append planner (a Python set of uids,
  lists of every row, the plan built in memory: ``naive_plan`` below), each in a fresh process, the
  two taking turns; the ratio is the speed-up, and each side's peak RSS is reported;
- **download**: samples/s of ``run_download`` over all shards (one Ray task per shard, every core);
- **accounting**: ``manifests/download`` holds exactly one row per planned uid, every list row
  planned (the URLs are distinct), the count of ``ok`` rows;
- **no-op rerun**: the same driver again, a new process (interpreter start and imports
  included): nothing to plan, nothing to download, catalog and summary rebuilt. Target < 10 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BenchResult, Context, Ratio, high_water_mib, mib  # noqa: E402

NAME = "million"
TITLE = "A million-row URL list: planning, download, driver memory, no-op rerun"
SIZES = {False: (1_000_000, 10_000), True: (20_000, 2_000)}  # quick -> (rows, shard_size)
IMAGES = 300
NOOP_TARGET_S = 10.0
PLAN_ROUNDS = {False: 1, True: 2}
SAMPLE_PERIOD_S = 0.2


# -- the server (its own process) ------------------------------------------------------------------


def make_images(count: int = IMAGES) -> list[bytes]:
    """``count`` small distinct JPEGs (32-63 px wide), a few hundred bytes each."""
    import io

    from PIL import Image

    images = []
    for i in range(count):
        image = Image.new("RGB", (32 + i % 32, 24 + (i // 32) % 24), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        images.append(buffer.getvalue())
    return images


def serve() -> None:
    """Serve ``/img/<i>.jpg`` (image ``i mod IMAGES``) on 127.0.0.1; print the port, serve until killed."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    images = make_images()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            name = self.path.rsplit("/", 1)[-1]
            stem = name[: -len(".jpg")] if name.endswith(".jpg") else ""
            if not self.path.startswith("/img/") or not stem.isdigit():
                self.send_error(404)
                return
            body = images[int(stem) % len(images)]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # the default 5 drops connections when every task's threads connect at once

    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve"], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


def write_list(path: Path, rows: int, base: str) -> None:
    """The URL list, built in Arrow (no Python object per row): distinct URLs, distinct captions."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    numbers = pc.cast(pa.array(np.arange(rows)), pa.string())
    urls = pc.binary_join_element_wise(f"{base}/img/", numbers, ".jpg", "")
    captions = pc.binary_join_element_wise("a small picture, number ", numbers, "")
    pq.write_table(pa.table({"url": urls, "caption": captions}), path, compression="zstd")


# -- the driver (its own process) ------------------------------------------------------------------


def _source(url_list: str) -> Any:
    from sources import DatasetConfig, DatasetSource

    dataset = DatasetConfig(name="million", source="url_list", url_list=url_list, allow_networks=("127.0.0.1/32",))
    dataset.validate()
    return DatasetSource(dataset)


def drive(url_list: str, out: str, shard_size: int, plan_only: bool = False) -> dict[str, Any]:
    """What ``curate`` does for the download step, timed: plan, download (Ray only when there is
    work), catalog, summary."""
    import dataclasses

    from manifests.catalog import build_catalog
    from manifests.store import RunLayout
    from pipeline.config import load_config
    from pipeline.dag import STAGE_ORDER
    from pipeline.download_runner import plan_download, run_download

    times: dict[str, float] = {}
    layout = RunLayout(out)
    source = _source(url_list)
    base = load_config().download
    config = source.download_config(dataclasses.replace(base, shard_size=shard_size, timeout_s=10.0))
    rss_start = _rss_mib()  # after the imports: what the work adds is the peak minus this
    started = time.perf_counter()
    source.fingerprint()  # the CLI reads and checks the list before anything else
    work = plan_download(source, layout, config)
    times["plan_s"] = time.perf_counter() - started
    out_info: dict[str, Any] = {"todo": len(work.todo), "shards_total": work.report.shards_total,
                                "planned": work.inputs.samples}
    if not plan_only:
        if work.todo:
            import logging

            import ray

            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR,
                     log_to_driver=False)
            started = time.perf_counter()
            report = run_download(source, layout, config, work, progress=False)
            times["download_s"] = time.perf_counter() - started
            out_info.update(samples_run=report.samples_run, shards_failed=len(report.shards_failed))
            ray.shutdown()
        started = time.perf_counter()
        build_catalog(layout, STAGE_ORDER)
        times["catalog_s"] = time.perf_counter() - started
        started = time.perf_counter()
        from pipeline.summary import download_summary

        download_summary(layout, work.report, 0.0)
        times["summary_s"] = time.perf_counter() - started
    out_info["times"] = times
    out_info["rss_start_mib"] = rss_start
    out_info["maxrss_mib"] = high_water_mib()
    return out_info


def naive_plan(url_list: str, out: str, shard_size: int) -> dict[str, Any]:
    """The planner before appending (reference): every uid in a Python set and list, the plan
    built whole in memory, then written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from manifests.schemas import INPUT
    from manifests.store import shard_name
    from pipeline.download_runner import make_uid, plan_download  # noqa: F401 - the same imports as drive

    rss_start = _rss_mib()
    started = time.perf_counter()
    source = _source(url_list)
    source.fingerprint()
    urls = source.load_urls()
    uids: list[str] = []
    rows: list[int] = []
    seen: set[str] = set()
    for i, (url, caption) in enumerate(zip(urls.column("url").to_pylist(), urls.column("caption").to_pylist())):
        uid = make_uid(url or "", caption or "")
        if uid in seen:
            continue
        seen.add(uid)
        uids.append(uid)
        rows.append(i)
    kept = urls.take(pa.array(rows, pa.int64()))
    shards = [shard_name(j // shard_size) for j in range(len(rows))]
    plan = pa.table({"uid": uids, "url": kept.column("url"), "caption": kept.column("caption"), "shard": shards,
                     "input_row": rows}, schema=INPUT)
    Path(out).mkdir(parents=True, exist_ok=True)
    pq.write_table(plan, Path(out) / "urls.parquet", compression="zstd")
    return {"planned": plan.num_rows, "times": {"plan_s": time.perf_counter() - started}, "rss_start_mib": rss_start,
            "maxrss_mib": high_water_mib()}


def _rss_mib() -> float:
    import psutil

    return mib(psutil.Process().memory_info().rss)


def _child_main(argv: list[str]) -> int:
    """``--serve`` or ``--child <json>``: the processes the benchmark starts."""
    if argv[0] == "--serve":
        serve()
        return 0
    spec = json.loads(argv[1])
    fn = {"drive": drive, "naive_plan": naive_plan}[spec.pop("fn")]
    print("RESULT " + json.dumps(fn(**spec)), flush=True)
    return 0


# -- the benchmark -------------------------------------------------------------------------------


class _Sampled:
    """A child process run to completion while its RSS (alone, and with its children) is sampled."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.peak_rss = 0
        self.peak_tree_rss = 0

    def run(self) -> dict[str, Any]:
        import psutil

        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(self.spec)],
                                stdout=subprocess.PIPE, text=True)
        watched = psutil.Process(proc.pid)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(SAMPLE_PERIOD_S):
                try:
                    rss = watched.memory_info().rss
                    tree = rss + sum(c.memory_info().rss for c in watched.children(recursive=True))
                except psutil.Error:
                    continue
                self.peak_rss, self.peak_tree_rss = max(self.peak_rss, rss), max(self.peak_tree_rss, tree)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        output, _ = proc.communicate()
        done.set()
        sampler.join()
        if proc.returncode != 0:
            raise RuntimeError(f"{self.spec['fn']} exited {proc.returncode}")
        line = [x for x in output.splitlines() if x.startswith("RESULT ")][-1]
        result = json.loads(line[len("RESULT "):])
        result["wall_s"] = time.perf_counter() - started
        result["peak_rss_mib"] = mib(self.peak_rss)
        result["peak_tree_rss_mib"] = mib(self.peak_tree_rss)
        return result


def _added(run: dict[str, Any]) -> float:
    """Peak RSS (sampled, and the process's own high-water mark) minus its RSS after the imports."""
    return max(run["peak_rss_mib"], run["maxrss_mib"]) - run["rss_start_mib"]


def account(out: Path) -> dict[str, int]:
    """Rows, distinct uids and ok rows of manifests/download, and rows planned (DuckDB over the parts)."""
    import duckdb

    parts = out / "manifests" / "download" / "part-*.parquet"
    plans = out / "input" / "urls*.parquet"
    rows, distinct, ok = duckdb.sql(
        f"select count(*), count(distinct uid), count(*) filter (where status = 'ok') from read_parquet('{parts}')"
    ).fetchone()
    planned, planned_distinct = duckdb.sql(f"select count(*), count(distinct uid) from read_parquet('{plans}')").fetchone()
    return {"rows": rows, "distinct_uids": distinct, "ok": ok, "planned": planned, "planned_distinct": planned_distinct}


def run(ctx: Context) -> BenchResult:
    from bench.common import load_average

    result = BenchResult(NAME, TITLE)
    rows, shard_size = SIZES[ctx.quick]
    server, base = start_server()
    try:
        url_list = ctx.work_dir / "million.parquet"
        write_list(url_list, rows, base)
        ctx.log(f"  {rows} rows written to {url_list} ({url_list.stat().st_size / 1e6:.1f} MB); server at {base}")

        plans: dict[str, list[dict[str, Any]]] = {"pipeline": [], "naive": []}
        for r in range(PLAN_ROUNDS[ctx.quick]):  # the two planners take turns, each in a fresh process
            for side in ("naive", "pipeline"):
                target = ctx.work_dir / f"plan-{side}-{r}"
                fn = "naive_plan" if side == "naive" else "drive"
                spec = {"fn": fn, "url_list": str(url_list), "out": str(target), "shard_size": shard_size}
                if side == "pipeline":
                    spec["plan_only"] = True
                plans[side].append(_Sampled(spec).run())
        best = {side: min(runs, key=lambda x: x["times"]["plan_s"]) for side, runs in plans.items()}

        out = ctx.work_dir / "million-run"
        load_before = load_average()
        first = _Sampled({"fn": "drive", "url_list": str(url_list), "out": str(out), "shard_size": shard_size}).run()
        load_during = load_average()
        ctx.log(f"  first run: {first}")
        counts = account(out)
        rerun = _Sampled({"fn": "drive", "url_list": str(url_list), "out": str(out), "shard_size": shard_size}).run()
        ctx.log(f"  no-op rerun: {rerun}")
    finally:
        server.kill()
        server.wait()

    plan_rate = rows / first["times"]["plan_s"]
    download_rate = first["samples_run"] / first["times"]["download_s"]
    accounted = counts["rows"] == counts["distinct_uids"] == counts["planned"] == counts["planned_distinct"] == rows
    speedup = best["naive"]["times"]["plan_s"] / best["pipeline"]["times"]["plan_s"]
    result.rows += [
        Ratio(NAME, f"planning {rows:,} rows: pipeline rows/s / pre-append planner rows/s", speedup, "x", "", None,
              f"{rows / best['pipeline']['times']['plan_s']:,.0f} vs {rows / best['naive']['times']['plan_s']:,.0f} rows/s; "
              f"RSS added {_added(best['pipeline']):.0f} vs {_added(best['naive']):.0f} MiB"),
        Ratio(NAME, f"no-op rerun of a {rows:,}-row run (new process, imports included)", rerun["wall_s"], "s",
              f"< {NOOP_TARGET_S:g} s", rerun["wall_s"] < NOOP_TARGET_S,
              f"plan {rerun['times']['plan_s']:.2f} s, catalog {rerun['times']['catalog_s']:.2f} s, "
              f"summary {rerun['times']['summary_s']:.2f} s"),
        Ratio(NAME, "every row accounted for once (manifest rows == distinct uids == rows planned == list rows)",
              1.0 if accounted else 0.0, "x", "== 1", accounted,
              f"{counts['rows']:,} rows, {counts['distinct_uids']:,} uids, {counts['ok']:,} ok"),
        Ratio(NAME, "driver peak RSS over plan + download", first["peak_rss_mib"], "MiB", "", None,
              f"Ray's processes (children) and the driver: {first['peak_tree_rss_mib']:.0f} MiB"),
    ]
    result.data = {"rows": rows, "shard_size": shard_size, "images": IMAGES, "planning": plans, "first_run": first,
                   "noop_rerun": rerun, "accounting": counts, "plan_rows_per_s": plan_rate,
                   "download_samples_per_s": download_rate, "load_before": load_before, "load_after": load_during}
    result.markdown = "\n".join([
        f"{rows:,} distinct URLs ({IMAGES} JPEGs of 32-63 px under distinct names) from a local server on 127.0.0.1 "
        f"(its own process), shard size {shard_size:,} ({first['shards_total']} shards), {ctx.cores} cores; the "
        f"driver is its own process (`drive` in bench/million_bench.py). Load average before / after the run: "
        f"{load_before[0]:.1f} / {load_during[0]:.1f}.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| planning (read list, fingerprint, hash, dedup, write plan) | {plan_rate:,.0f} rows/s ({first['times']['plan_s']:.1f} s) |",
        f"| pre-append planner, same list (reference) | {rows / best['naive']['times']['plan_s']:,.0f} rows/s |",
        f"| RSS added by planning (peak minus after imports): pipeline / pre-append | {_added(best['pipeline']):.0f} / "
        f"{_added(best['naive']):.0f} MiB |",
        f"| download (img2dataset, one Ray task per shard) | {download_rate:,.0f} samples/s ({first['times']['download_s']:.0f} s) |",
        f"| driver peak RSS, plan + download | {first['peak_rss_mib']:.0f} MiB ({first['rss_start_mib']:.0f} after imports; "
        f"with Ray's processes: {first['peak_tree_rss_mib']:.0f} MiB) |",
        f"| no-op rerun, new process | {rerun['wall_s']:.1f} s (plan {rerun['times']['plan_s']:.2f} s, catalog "
        f"{rerun['times']['catalog_s']:.2f} s, summary {rerun['times']['summary_s']:.2f} s; peak RSS {rerun['peak_rss_mib']:.0f} MiB) |",
        f"| rows in manifests/download / distinct uids / planned / ok | {counts['rows']:,} / {counts['distinct_uids']:,} / "
        f"{counts['planned']:,} / {counts['ok']:,} |",
    ])
    return result


def main(argv: list[str] | None = None) -> int:
    from bench.common import standalone_main

    return standalone_main(run, __doc__, argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--serve", "--child"):
        sys.exit(_child_main(sys.argv[1:]))
    sys.exit(main())
