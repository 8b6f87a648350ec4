"""Reshard throughput (MB/s) vs a raw tar-to-tar copy of the same bytes.

    python bench/reshard_bench.py [--quick]

Input: embedded samples downloaded by the pipeline (img2dataset shards + download manifest; with
--quick, the same layout written directly, without Ray or a download) and a
selection keeping every other sample (a policy that keeps half the pool), planned into output
shards by ``pipeline.reshard_runner.plan_reshard``: uid order, so every output shard draws from
every source tar, as in a real run.

- **reshard**: ``ReshardStage.process_shard`` for each planned output shard (stream each source tar
  once, seek over the samples not kept, rewrite the ``.json`` with the new key and lineage, write
  the tar with webdataset's ``TarWriter`` and a Parquet sibling, fsync, rename);
- **raw copy**: the same plan, the same source tars read in the same order with ``tarfile``, each
  kept member's bytes written unchanged into a new tar with ``tarfile.addfile``, fsync.

Both write the same samples; MB/s counts the kept samples' bytes in the source tars for both, so
the ratio is the ratio of times. Output shards take turns (reshard, copy, reshard, copy...), with
the source tars in the page cache for both. Also reported: ``reshard_policy`` end to end (Ray tasks,
one per output shard, on all cores; the plan, ``manifest.parquet`` and ``sizes.json``) against
the same raw copy run sequentially: information, not the target.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BenchResult, Context, Ratio, Timer, standalone_main, synthetic_pool  # noqa: E402

NAME = "reshard"
TITLE = "Reshard throughput vs a raw tar-to-tar copy of the same bytes"
TARGET = 0.5
POLICY = "bench-half"


def write_selection(layout: Any, policy: str, keep_every: int = 2) -> int:
    """``selections/<policy>.parquet`` keeping every ``keep_every``-th downloaded sample (by uid)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from manifests.schemas import SELECTION
    from manifests.store import write_table_atomic
    from manifests.uids import with_uid_bytes

    download = pq.read_table(layout.stage_dir("download"), columns=["uid", "status"])
    uids = sorted(download.filter(pc.equal(download.column("status"), "ok")).column("uid").to_pylist())
    kept = [i % keep_every == 0 for i in range(len(uids))]
    table = with_uid_bytes(pa.Table.from_pylist(
        [{"uid": u, "policy": policy, "kept": k, "reason": "kept: bench" if k else "dropped: bench"}
         for u, k in zip(uids, kept)])).cast(SELECTION)
    write_table_atomic(table, layout.selection_path(policy))
    return sum(kept)


def raw_copy(inputs: list[tuple[str, Any]], out_path: Path) -> int:
    """The floor: the kept members of each source tar copied unchanged into one tar; bytes copied."""
    from manifests.store import tar_key

    copied = 0
    with open(out_path, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as out:
        for source, keys in inputs:
            wanted = set(keys)
            with tarfile.open(source, mode="r:") as tar:
                while (info := tar.next()) is not None:
                    tar.members.clear()
                    if not info.isfile() or tar_key(info.name)[0] not in wanted:
                        continue
                    out.addfile(info, tar.extractfile(info))
                    copied += info.size
        out.close()
        raw.flush()
        os.fsync(raw.fileno())
    return copied


def kept_bytes(inputs: list[tuple[str, Any]]) -> int:
    """Bytes of the kept samples' members in the source tars (what both sides move)."""
    from manifests.store import tar_key

    total = 0
    for source, keys in inputs:
        wanted = set(keys)
        with tarfile.open(source, mode="r:") as tar:
            for info in tar:
                if info.isfile() and tar_key(info.name)[0] in wanted:
                    total += info.size
    return total


def run(ctx: Context) -> BenchResult:
    from pipeline.reshard_runner import plan_reshard, reshard_policy
    from stages.reshard import ReshardStage

    result = BenchResult(NAME, TITLE)
    pool = synthetic_pool(ctx, 128) if ctx.quick else ctx.pool(512)
    layout = pool.layout
    samples_per_shard = 32 if ctx.quick else 64
    rounds = 2 if ctx.quick else 5
    kept = write_selection(layout, POLICY)
    plan = plan_reshard(layout, POLICY, samples_per_shard)
    payload = sum(kept_bytes(s.inputs) for s in plan.shards)
    stage = ReshardStage(POLICY, samples_per_shard)
    out = ctx.work_dir / "reshard-out"
    timers = {"reshard": Timer(), "raw copy": Timer()}
    for r in range(rounds + 1):  # round 0 warms the page cache and the imports, untimed
        for shard in plan.shards:
            dest = out / f"r{r}"
            dest.mkdir(parents=True, exist_ok=True)
            reshard = (lambda: stage.process_shard(shard.shard, shard.inputs, dest / "stage"))
            copy = (lambda: raw_copy(shard.inputs, dest / f"raw-{shard.shard}.tar"))
            if r == 0:
                reshard(), copy()
                continue
            timers["reshard"].run(reshard)
            timers["raw copy"].run(copy)
        shutil.rmtree(out / f"r{r}", ignore_errors=True)
    mb = payload * rounds / 1e6
    rate = {k: mb / t.wall_s for k, t in timers.items()}
    ratio = rate["reshard"] / rate["raw copy"]
    result.rows.append(Ratio(NAME, "ReshardStage MB/s / raw tar-to-tar copy MB/s", ratio, "x", f">= {TARGET:g}",
                             ratio >= TARGET, f"{rate['reshard']:.0f} vs {rate['raw copy']:.0f} MB/s"))

    policy_rate = None
    if not ctx.quick:  # end to end on Ray: planning, parallel tasks, manifest and sizes.json
        ctx.ensure_ray()
        reshard_policy(layout, POLICY, samples_per_shard, progress=False)  # warm-up (worker start)
        runs = []
        for _ in range(2):
            (layout.root / "curated" / POLICY / "sizes.json").unlink(missing_ok=True)  # force a redo
            started = time.perf_counter()
            report = reshard_policy(layout, POLICY, samples_per_shard, progress=False)
            runs.append(time.perf_counter() - started)
            assert report.kept == kept and not report.skipped
        policy_rate = payload / 1e6 / min(runs)
        result.rows.append(Ratio(NAME, f"reshard_policy on Ray ({ctx.cores} cores) / raw copy (1 core)",
                                 policy_rate / rate["raw copy"], "x", "", None,
                                 f"{policy_rate:.0f} MB/s end to end, incl. plan and manifest"))
    result.data = {"pool_samples": pool.ok, "kept": kept, "output_shards": len(plan.shards),
                   "samples_per_shard": samples_per_shard, "payload_mb": payload / 1e6, "rounds": rounds,
                   "mb_per_s": rate, "cpu_s": {k: t.cpu_s for k, t in timers.items()},
                   "reshard_policy_mb_per_s": policy_rate}
    result.markdown = "\n".join([
        f"{kept} of {pool.ok} downloaded samples kept (every other uid), {len(plan.shards)} output shards of "
        f"{samples_per_shard}, {payload / 1e6:.1f} MB of kept sample bytes, {rounds} timed rounds; each output shard "
        f"reads {sum(len(s.inputs) for s in plan.shards) / max(1, len(plan.shards)):.1f} source tars on average.",
        "",
        "| side | MB/s | CPU s |",
        "|---|---:|---:|",
        *[f"| {k} | {rate[k]:.1f} | {timers[k].cpu_s:.2f} |" for k in timers],
        *([f"| reshard_policy on Ray, end to end | {policy_rate:.1f} | — |"] if policy_rate else []),
    ])
    return result


def main(argv: list[str] | None = None) -> int:
    return standalone_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
