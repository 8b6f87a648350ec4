"""The dup_group step at scale (issue 25 item 3): pHash grouping and semantic dedup at 10^6 and 10^7 rows.

    python bench/dedup_bench.py [--quick] [--rows 1000000,10000000] [--tiers phash,semantic,phash-r4]

A synthetic pool written as the stages write it (download, dedup and clip_score parts of 10,000
rows; 2 % byte copies, 5 % pHash near copies 2-6 bits away, 5 % embedding near copies at cosine
~0.97, 384-dim float16 embeddings as ViT-S-32's, from a model that is not a random init), then
``run_pool_step`` with one tier at a time at the shipped ``[dedup]`` defaults (radius 10,
worker_memory_mb 512, clusters of 1,000), on a local Ray of 2 CPUs, in a fresh process per run.
Reported per run: seconds, the driver's peak RSS (VmHWM) and the largest worker's peak RSS
(VmHWM of the Ray worker processes that ran the tasks), and per tier the growth from the smallest
to the largest pool against linear (target: within 1.3x of linear).
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

NAME = "dedup-scale"
TITLE = "Dedup tiers at scale: pHash grouping and semantic dedup, 10^6 and 10^7 rows, 2 cores"
ROWS = {False: (1_000_000, 10_000_000), True: (20_000, 200_000)}
TIERS = ("semantic", "phash", "phash-r4")
# pHash at the shipped radius 10 is an exact search whose plan needs more band combinations as the pool grows
# (286 at 10^6, 1001 at 10^7: about 38 min on 2 cores there), so `make bench` runs it up to this size only; name
# it in --tiers with --rows to run it larger. "phash-r4" (radius 4) shows the machinery around the search.
PHASH_R10_MAX_ROWS = 1_000_000
SHARD = 10_000
DIM = 384
MODEL = "bench: synthetic vectors"


def make_pool(root: Path, rows: int) -> None:
    """Download, dedup and clip_score parts for ``rows`` synthetic samples with planted duplicates."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from manifests.catalog import build_catalog
    from manifests.store import RunLayout
    from pipeline.dag import STAGE_ORDER

    layout = RunLayout(root)
    if (root / "done").exists():
        return
    for stage in ("download", "dedup", "clip_score"):
        layout.stage_dir(stage).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for start in range(0, rows, SHARD):
        n = min(SHARD, rows - start)
        shard = f"{start // SHARD:06d}"
        uids = [f"{start + i:032x}" for i in range(n)]
        sha = rng.integers(0, 2**63, n)
        copy = rng.random(n) < 0.02
        sha[copy] = sha[np.maximum(np.flatnonzero(copy) - 1, 0)]
        hashes = rng.integers(0, 2**63, n, dtype=np.int64).view(np.uint64)
        near = np.flatnonzero(rng.random(n) < 0.05)
        flips = np.zeros(near.size, np.uint64)
        for _ in range(3):
            flips |= np.uint64(1) << rng.integers(0, 64, near.size).astype(np.uint64)
        hashes[near] = hashes[np.maximum(near - 1, 0)] ^ flips
        vectors = rng.standard_normal((n, DIM), dtype=np.float32)
        close = np.flatnonzero(rng.random(n) < 0.05)
        vectors[close] = vectors[np.maximum(close - 1, 0)] + 0.25 * rng.standard_normal((close.size, DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        flat = pa.array(vectors.astype(np.float16).ravel(), pa.float16())
        embedding = pa.ListArray.from_arrays(pa.array(np.arange(0, n * DIM + 1, DIM, dtype=np.int32)), flat)
        area = rng.integers(64, 2048, n)
        pq.write_table(pa.table({"uid": uids, "status": ["ok"] * n, "shard": [shard] * n,
                                 "sha256": pa.array([f"{s:x}" for s in sha]),
                                 "original_width": pa.array(area, pa.int32()), "original_height": pa.array(area, pa.int32())}),
                       layout.part_path("download", shard))
        pq.write_table(pa.table({"uid": uids, "dedup_status": ["ok"] * n, "phash": pa.array(hashes.view(np.int64))}),
                       layout.part_path("dedup", shard))
        pq.write_table(pa.table({"uid": uids, "clip_status": ["ok"] * n, "clip_model": [MODEL] * n,
                                 "image_embedding": embedding, "text_embedding": pa.nulls(n, embedding.type)}),
                       layout.part_path("clip_score", shard), use_dictionary=["clip_status", "clip_model"],
                       compression={"uid": "zstd", "clip_status": "zstd", "clip_model": "zstd",
                                    "image_embedding": "none", "text_embedding": "zstd"})
    build_catalog(layout, STAGE_ORDER)
    (root / "done").write_text("")


def _measured(fn, *args):
    """A task that also says its worker's peak RSS (module-level: Ray pickles it by reference)."""
    return fn(*args), high_water_mib()


def child(root: str, tier: str) -> dict:
    """One run of the dup_group step with one tier, in its own process, on a local Ray of 2 CPUs."""
    import shutil

    import ray

    from manifests.store import RunLayout
    from pipeline import policy_runner
    from stages.dedup import DedupConfig, DupGroupStage

    layout = RunLayout(root)
    layout.part_path("dup_group", "pool").unlink(missing_ok=True)
    shutil.rmtree(layout.stage_dir("dup_group") / "work", ignore_errors=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    workers: list[float] = []
    shipped = policy_runner._ray_map

    def measured_map(fn, calls, say):
        results = shipped(_measured, [(fn, *call) for call in calls], say)
        workers.extend(peak for _, peak in results)
        return [result for result, _ in results]

    policy_runner._ray_map = measured_map
    name, _, radius = tier.partition("-r")  # "phash-r4": the pHash tier at radius 4 (default: the shipped 10)
    config = DedupConfig(tiers=(name,), radius=int(radius)) if radius else DedupConfig(tiers=(name,))
    started = time.perf_counter()
    policy_runner.run_pool_step(layout, DupGroupStage(config))
    seconds = time.perf_counter() - started
    ray.shutdown()
    return {"seconds": seconds, "driver_mib": high_water_mib(), "worker_mib": max(workers, default=0.0)}


def _run_child(root: Path, tier: str) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            f"from bench.dedup_bench import child; print('RESULT ' + json.dumps(child({str(root)!r}, {tier!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"dedup bench child failed: {done.stderr[-2000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]  # Ray may print after it
    return json.loads(lines[-1][len("RESULT "):])


def run(ctx: Context, rows: tuple[int, ...] | None = None, tiers: tuple[str, ...] = TIERS,
        explicit: bool = False) -> BenchResult:
    sizes = rows or ROWS[ctx.quick]
    measured: dict[str, dict[int, dict]] = {tier: {} for tier in tiers}
    for n in sizes:
        root = ctx.work_dir / f"dedup-pool-{n}"
        ctx.log(f"dedup-scale: writing a {n:,}-row pool")
        started = time.perf_counter()
        make_pool(root, n)
        ctx.log(f"dedup-scale: pool written in {time.perf_counter() - started:.0f} s")
        for tier in tiers:
            if tier == "phash" and n > PHASH_R10_MAX_ROWS and not explicit:
                continue
            ctx.log(f"dedup-scale: {tier} tier over {n:,} rows")
            measured[tier][n] = _run_child(root, tier)
            ctx.log(f"dedup-scale: {tier} {n:,}: {measured[tier][n]}")
    result = BenchResult(NAME, TITLE, data={"rows": list(sizes), "measured": measured})
    lines = ["| tier | rows | seconds | driver peak MiB | worker peak MiB |", "|---|---|---|---|---|"]
    for tier in tiers:
        for n in sizes:
            m = measured[tier].get(n)
            if m is None:
                lines.append(f"| {tier} | {n:,} | not run (see PHASH_R10_MAX_ROWS) | | |")
                continue
            lines.append(f"| {tier} | {n:,} | {m['seconds']:.1f} | {m['driver_mib']:.0f} | {m['worker_mib']:.0f} |")
        small, large = min(measured[tier], default=0), max(measured[tier], default=0)
        if small == large:
            continue
        growth = measured[tier][large]["seconds"] / measured[tier][small]["seconds"]
        of_linear = growth / (large / small)
        result.rows.append(Ratio(NAME, f"{tier}: time growth {small:,} -> {large:,} rows, / linear", of_linear, "x",
                                 "<= 1.3", of_linear <= 1.3,
                                 f"{measured[tier][small]['seconds']:.1f} s -> {measured[tier][large]['seconds']:.1f} s"))
    result.markdown = (__doc__.split("\n\n", 2)[2] + "\n" + "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", default="", help="comma-separated pool sizes (default: 10^6 and 10^7)")
    parser.add_argument("--tiers", default=",".join(TIERS))
    parser.add_argument("--work-dir", default="", help="keep the synthetic pools here (reused when present)")
    args = parser.parse_args()
    chosen = tuple(int(r) for r in args.rows.split(",") if r) or None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        ctx = Context(quick=args.quick, work_dir=work, results_dir=work)
        outcome = run(ctx, chosen, tuple(t for t in args.tiers.split(",") if t), explicit=args.tiers != ",".join(TIERS))
        print(outcome.markdown)
        for row in outcome.rows:
            print(row.name, row.value, row.note)
        print(json.dumps(outcome.data))
