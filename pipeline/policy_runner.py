"""Runs the pool stages (``dup_group``, ``decontaminate``: one part over the whole pool, their heavy
work as tasks on the cluster through :class:`stages.base.PoolWork`) and the filter stage for each
configured policy (``selections/<policy>.parquet``).

A pool part records in its footer a digest of what it was computed from (every per-shard part's
name, size and time, and the stage's config): a rerun with the same digest does nothing, and a run
killed mid-step resumes in the same work folder. Policies are cheap SQL, recomputed every run. A
file is rewritten only when its content changed, so resharding (which compares the selection's
time and hash with its own completion marker) redoes only the policies whose decision moved.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.catalog import (
    PolicyInputs, bound_memory, connect, materialise_policy_inputs, parquet_metadata, sql_string,
    write_file_atomic,
)
from manifests.store import RunLayout, list_names, move_into_place, remove_tree, tmp_sibling
from manifests.uids import UID_BATCH
from pipeline.config import Config
from pipeline.dag import STAGE_ORDER
from stages.base import PoolStage, PoolWork
from stages.filter import Decisions, FilterStage, PolicyInput, PoolConstants, pool_constant_queries

POOL_PART = "pool"  # a pool stage writes manifests/<stage>/part-pool.parquet: the catalog joins it like any part
DIGEST_KEY = "selection_digest"  # in a selection's Parquet footer: what it holds, to skip an unchanged rewrite
_SELECTION_FORMAT = 2  # 2: uids as 16 bytes (a run made before rewrites its selections once)


@dataclass
class SelectionReport:
    policy: str
    kept: int
    total: int
    changed: bool
    description: str
    seconds: float = 0.0  # deciding and (when changed) writing this policy's selection


SCRATCH_DIR = ".tmp-pool"  # the driver's own files while a pool step runs (a temporary name: a killed run's is swept)
QUIET_SECONDS = 10.0  # a pool step's progress lines start after this long (a small pool's step prints nothing)
INPUTS_KEY = "pool_inputs"  # in a pool part's footer: what it was computed from (parts and config)


def pool_inputs_digest(layout: RunLayout, stage: PoolStage) -> str:
    """What a pool step's part depends on, without reading a row: every per-shard manifest part (name,
    size, time), the stage's config and its :meth:`~stages.base.PoolStage.inputs_key`. Equal digests: the part on disk is the answer, nothing to do."""
    listing = []
    for name in sorted(layout.stages_present()):
        folder = layout.stage_dir(name)
        for part in sorted(list_names(folder)):
            if part.startswith("part-") and part.endswith(".parquet") and part != f"part-{POOL_PART}.parquet":
                info = (folder / part).stat()
                listing.append([name, part, info.st_size, getattr(info, "st_mtime", None)])
    head = json.dumps([stage.name, repr(getattr(stage, "config", None)), stage.inputs_key(), listing], default=str)
    return hashlib.sha256(head.encode()).hexdigest()


def _ray_map(fn: Callable, calls: Sequence[tuple], say: Callable[[str], None]) -> list:
    """``fn(*call)`` for each call as Ray tasks of one CPU (a line every ~10 % done), results in order."""
    import ray

    if not calls:
        return []
    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    refs = [remote.remote(*call) for call in calls]
    pending, step, done, started = list(refs), max(1, len(refs) // 10), 0, time.monotonic()
    while pending:
        ready, pending = ray.wait(pending, num_returns=min(step, len(pending)))
        done += len(ready)
        if pending and time.monotonic() - started > QUIET_SECONDS:  # a small pool's step stays off the console
            say(f"  {getattr(fn, '__name__', 'task')}: {done}/{len(refs)} tasks done")
    return ray.get(refs)


def pool_work(layout: RunLayout, stage: PoolStage, digest: str) -> PoolWork:
    """The work folder (one per inputs digest: a killed run resumes in it) and the task runner of a
    pool step: Ray tasks when Ray is up (the run's cluster), this process otherwise."""
    folder = layout.stage_dir(stage.name) / "work" / digest[:16]
    folder.mkdir(parents=True, exist_ok=True)

    def parts(name: str) -> list:
        return [layout.stage_dir(name) / n for n in sorted(list_names(layout.stage_dir(name)))
                if n.startswith("part-") and n.endswith(".parquet") and n != f"part-{POOL_PART}.parquet"]

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    import ray

    scratch = layout.local_dir / SCRATCH_DIR
    scratch.mkdir(parents=True, exist_ok=True)
    if ray.is_initialized():
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return PoolWork(folder, parts, lambda fn, calls: _ray_map(fn, calls, say), say, cpus, scratch)
    return PoolWork(folder, parts, say=say, cpus=1, scratch=scratch)


def run_pool_step(layout: RunLayout, stage: PoolStage) -> bool:
    """Run one pool stage over the catalog unless its inputs are those its part was computed from;
    stream its rows to a temporary file and put it in place when it changed. Returns whether it did."""
    path = layout.part_path(stage.name, POOL_PART)
    digest = pool_inputs_digest(layout, stage)
    if path.exists() and parquet_metadata(path).get(INPUTS_KEY) == digest:
        # a run killed after its part was put in place, before its work folder was removed
        remove_tree(layout.stage_dir(stage.name) / "work")
        return False
    work = pool_work(layout, stage, digest)
    con = connect(layout.catalog_path, layout)
    bound_memory(con, layout)
    new = tmp_sibling(work.scratch / path.name)
    try:
        rows = stage.process_pool(con, work)
        batches = rows.to_batches() if isinstance(rows, pa.Table) else rows
        with pq.ParquetWriter(new, stage.output_schema, compression="zstd") as writer:
            for batch in batches:
                stage.check_output(batch.schema.names)
                writer.write_batch(batch)
            writer.add_key_value_metadata({INPUTS_KEY: digest})
        changed = not path.exists() or not _same_rows(new, path)
        if changed or parquet_metadata(path).get(INPUTS_KEY) != digest:
            move_into_place(new, path)
    finally:
        con.close()
        new.unlink(missing_ok=True)
    remove_tree(layout.stage_dir(stage.name) / "work")  # done: its intermediate files are not needed again
    return changed


def _same_rows(new: Path, old) -> bool:
    """Whether two Parquet files hold the same rows, compared batch by batch (memory: two batches)."""
    with old.open("rb") as f:
        a, b = pq.ParquetFile(new), pq.ParquetFile(f)
        if a.metadata.num_rows != b.metadata.num_rows or not a.schema_arrow.equals(b.schema_arrow):
            return False
        return all(x.equals(y) for x, y in zip(a.iter_batches(batch_size=1 << 16), b.iter_batches(batch_size=1 << 16)))


def selection_digest(inputs: PolicyInputs, policy: str, decisions: Decisions) -> str:
    """What a selection holds, without reading it: its uids (the input's, in order), the policy's
    name, each outcome's reason and every row's outcome. Equal digests, equal files' rows."""
    head = json.dumps([_SELECTION_FORMAT, policy, inputs.uid_digest, sorted(decisions.reasons.items()), decisions.digest])
    return hashlib.sha256(head.encode()).hexdigest()


def _write_selection(stage: FilterStage, decisions: Decisions, inputs: PolicyInputs, digest: str, path) -> None:
    """Stream the input's uids (16 bytes each, batch by batch, from ``policy_uids.parquet``) beside
    the decisions into the Parquet file; the digest goes in its footer. Memory: a batch, whatever
    the pool's size."""

    def write(tmp) -> None:
        uids = (b.column(0) for b in pq.ParquetFile(inputs.uids_path).iter_batches(batch_size=UID_BATCH))
        # the uids: 16 random bytes each, nothing for a codec, a dictionary or min/max statistics to gain;
        # statistics only for kept (``where kept`` skips pages): on the dictionary columns they cost more than the write
        compression = {"uid": "none", "policy": "zstd", "kept": "zstd", "reason": "zstd"}
        with pq.ParquetWriter(tmp, stage.written_schema, compression=compression, use_dictionary=["policy", "reason"],
                              write_statistics=["kept"], store_schema=False) as writer:
            for batch in stage.selection_batches(decisions, uids):
                writer.write_batch(batch)
            writer.add_key_value_metadata({DIGEST_KEY: digest})

    write_file_atomic(write, path, inputs.path.parent)


def select_policies(layout: RunLayout, config: Config, policies: tuple[str, ...]) -> list[SelectionReport]:
    """Evaluate each named policy and write the selections that changed.

    The policies read ``policy_inputs.parquet`` (:func:`materialise_policy_inputs`: joined once,
    rebuilt only when a manifest part changed), not the ``samples`` join. DuckDB decides; the
    selection is streamed to Parquet from Arrow (temporary name then rename) only when its digest,
    kept in the file's footer, differs from the new one; the file is left alone otherwise, so resharding,
    which compares the selection's time and hash, redoes only the policies whose decision moved.

    The caller rebuilds the catalog before (so the stage views see every part) and after (so the
    ``selection_<policy>`` views exist).
    """
    stages = {name: FilterStage(config.policy(name)) for name in policies}
    columns = sorted({c for stage in stages.values() for c in stage.policy_reads()})
    inputs = materialise_policy_inputs(layout, columns, STAGE_ORDER)
    source = PolicyInput(f"read_parquet({sql_string(inputs.path)}, file_row_number = true)", "file_row_number")
    reports = []
    con = connect(layout.catalog_path, layout)  # the catalog's views stay visible to a rule's subquery
    bound_memory(con, layout)
    # pool-wide values (a quantile over the pool): computed once for the policies that share them,
    # in the background while the policies before them decide and write
    constants = PoolConstants(con)
    try:
        constants.prefetch(query for stage in stages.values()
                           for query in pool_constant_queries(stage.decision_sql(source), source.relation))
        for name, stage in stages.items():
            started = time.perf_counter()
            decisions = stage.decide(con, source, constants)
            stage.check_output(stage.written_schema.names)
            path = layout.selection_path(name)
            digest = selection_digest(inputs, name, decisions)
            changed = parquet_metadata(path).get(DIGEST_KEY) != digest
            if changed:
                _write_selection(stage, decisions, inputs, digest, path)
            reports.append(SelectionReport(name, decisions.kept, decisions.total, changed,
                                           stage.policy.description, time.perf_counter() - started))
    finally:
        constants.close()
        con.close()
    return reports
