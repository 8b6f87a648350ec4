"""A URL list's own columns kept (issue 24 item 1): what they cost the driver.

    python bench/source_columns_bench.py [--quick]

Two lists of 1,000,000 rows (``--quick``: 50,000) with the same url and caption: one with nothing
else, one with ten LAION/DataComp columns besides (uid, WIDTH, HEIGHT, similarity, punsafe,
pwatermark, LICENSE, NSFW, clip_l14_similarity_score, face_bboxes as a list of float lists). Each
side, in a fresh process of its own, taking turns:

- **plan**: ``freeze_input`` (read the list, hash every row, drop repeats, write the plan with the
  source columns in its row groups), seconds and the process's peak RSS (VmHWM);
- **catalog**: download parts for every planned row are written (synthetic, ok), then
  ``build_catalog`` (views only) and ``materialise_policy_inputs`` for a policy reading
  ``similarity`` (the source column, joined from the plan) vs ``status`` (download alone), seconds.

The ratios are with / without the columns; the target is that planning stays streamed by row group:
plan time within 2x and driver peak memory within 2x of the plain list's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BenchResult, Context, Ratio, high_water_mib  # noqa: E402

NAME = "sources"
TITLE = "A URL list's own columns kept: planning time, driver peak memory, catalog build"
ROWS = {False: 1_000_000, True: 50_000}
SHARD_SIZE = 10_000
ROUNDS = 2


def make_lists(folder: Path, rows: int) -> tuple[Path, Path]:
    """(plain list, the same list with ten LAION/DataComp columns)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    urls = pa.array([f"http://127.0.0.1:9/img/{i}.jpg" for i in range(rows)])
    captions = pa.array([f"a photo of thing number {i} on a table" for i in range(rows)])
    plain = pa.table({"url": urls, "caption": captions})
    boxes = [[[0.1, 0.2, 0.3, 0.4]] if i % 4 == 0 else [] for i in range(rows)]
    extra = plain.append_column("uid", pa.array([f"{i:032x}" for i in range(rows)]))
    for name, values in {
        "WIDTH": pa.array(rng.integers(64, 2048, rows), pa.int32()),
        "HEIGHT": pa.array(rng.integers(64, 2048, rows), pa.int32()),
        "similarity": pa.array(rng.random(rows)),
        "punsafe": pa.array(rng.random(rows).astype(np.float32)),
        "pwatermark": pa.array(rng.random(rows).astype(np.float32)),
        "LICENSE": pa.array(["?"] * rows),
        "NSFW": pa.array(["UNLIKELY"] * rows),
        "clip_l14_similarity_score": pa.array(rng.random(rows).astype(np.float32)),
        "face_bboxes": pa.array(boxes, pa.list_(pa.list_(pa.float64()))),
    }.items():
        extra = extra.append_column(name, values)
    paths = folder / "plain.parquet", folder / "extra.parquet"
    pq.write_table(plain, paths[0])
    pq.write_table(extra, paths[1])
    return paths


def child(list_path: str, out: str) -> dict:
    """One side, in its own process: plan, synthetic download parts, catalog, policy inputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from manifests.catalog import build_catalog, materialise_policy_inputs
    from manifests.schemas import DOWNLOAD
    from manifests.store import RunLayout
    from pipeline.config import load_config
    from pipeline.download_runner import freeze_input
    from sources import open_source

    layout = RunLayout(out)
    source = open_source(load_config(None).dataset("laion-subset"), url_list=list_path)
    started = time.perf_counter()
    source.fingerprint()
    freeze_input(source, layout, SHARD_SIZE)
    plan_s = time.perf_counter() - started
    peak = high_water_mib()
    plan = pq.read_table(layout.input_path, columns=["uid", "url", "caption", "shard"])
    layout.stage_dir("download").mkdir(parents=True, exist_ok=True)
    for shard in sorted(set(plan.column("shard").to_pylist())):
        rows = plan.filter(pa.compute.equal(plan.column("shard"), shard))
        n = rows.num_rows
        part = {f.name: pa.nulls(n, f.type) for f in DOWNLOAD}
        part.update(uid=rows.column("uid"), url=rows.column("url"), caption=rows.column("caption"),
                    status=pa.array(["ok"] * n), shard=rows.column("shard"), key=rows.column("uid"))
        pq.write_table(pa.table(part, schema=DOWNLOAD), layout.part_path("download", shard))
    started = time.perf_counter()
    build_catalog(layout)
    catalog_s = time.perf_counter() - started
    started = time.perf_counter()
    column = "similarity" if "extra" in list_path else "status"
    inputs = materialise_policy_inputs(layout, ["status", column])
    return {"plan_s": plan_s, "peak_mib": peak, "catalog_s": catalog_s,
            "policy_inputs_s": time.perf_counter() - started, "rows": inputs.rows}


def _run_child(list_path: Path, out: Path) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            f"from bench.source_columns_bench import child; print(json.dumps(child({str(list_path)!r}, {str(out)!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(ctx: Context) -> BenchResult:
    rows = ROWS[ctx.quick]
    folder = ctx.work_dir / "sources"
    folder.mkdir(parents=True, exist_ok=True)
    plain, extra = make_lists(folder, rows)
    measured: dict[str, list[dict]] = {"plain": [], "extra": []}
    for r in range(ROUNDS):
        for side, path in (("plain", plain), ("extra", extra)):
            ctx.log(f"sources: {side} list, round {r + 1}")
            measured[side].append(_run_child(path, folder / f"out-{side}-{r}"))
    best = {side: {k: min(m[k] for m in runs) for k in runs[0]} for side, runs in measured.items()}
    p, e = best["plain"], best["extra"]
    plan_ratio, mem_ratio = e["plan_s"] / p["plan_s"], e["peak_mib"] / p["peak_mib"]
    result = BenchResult(NAME, TITLE, data={"rows": rows, "rounds": measured, "best": best})
    result.rows = [
        Ratio(NAME, f"plan {rows:,} rows: 10 source columns / none", plan_ratio, "x", "<= 2", plan_ratio <= 2,
              f"{e['plan_s']:.1f} s vs {p['plan_s']:.1f} s"),
        Ratio(NAME, "driver peak RSS while planning: with / without", mem_ratio, "x", "<= 2", mem_ratio <= 2,
              f"{e['peak_mib']:.0f} vs {p['peak_mib']:.0f} MiB"),
        Ratio(NAME, "catalog build (views): with / without", e["catalog_s"] / p["catalog_s"], "x", "", None,
              f"{e['catalog_s']:.2f} s vs {p['catalog_s']:.2f} s"),
        Ratio(NAME, "policy inputs reading a source column / a download column",
              e["policy_inputs_s"] / p["policy_inputs_s"], "x", "", None,
              f"{e['policy_inputs_s']:.2f} s vs {p['policy_inputs_s']:.2f} s"),
    ]
    result.markdown = (
        f"{rows:,}-row lists, shard size {SHARD_SIZE:,}, best of {ROUNDS} runs per side, each in a fresh process.\n\n"
        "| | plan s | driver peak MiB | catalog build s | policy inputs s |\n|---|---|---|---|---|\n"
        f"| url, caption | {p['plan_s']:.2f} | {p['peak_mib']:.0f} | {p['catalog_s']:.2f} | {p['policy_inputs_s']:.2f} (status) |\n"
        f"| + 10 source columns | {e['plan_s']:.2f} | {e['peak_mib']:.0f} | {e['catalog_s']:.2f} | "
        f"{e['policy_inputs_s']:.2f} (similarity) |\n"
    )
    return result


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(quick=args.quick, work_dir=Path(tmp), results_dir=Path(tmp))
        outcome = run(ctx)
        print(outcome.markdown)
        for row in outcome.rows:
            print(row.name, row.value, row.note)
