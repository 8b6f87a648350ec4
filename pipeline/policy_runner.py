"""Runs the pool stages on the driver: ``dup_group`` (one table over the whole pool) and the filter
stage for each configured policy (``selections/<policy>.parquet``).

Both are cheap next to the per-sample stages, so they are recomputed from the current manifests on
every run; a file is rewritten only when its content changed, so resharding (which compares the
selection's time and hash with its own completion marker) redoes only the policies whose
decision moved.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.catalog import (
    PolicyInputs, bound_memory, connect, materialise_policy_inputs, parquet_metadata, sql_string, write_file_atomic,
)
from manifests.store import RunLayout, read_table, write_table_atomic
from manifests.uids import UID_BATCH
from pipeline.config import Config
from pipeline.dag import STAGE_ORDER
from stages.base import PoolStage
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


def _write_if_changed(table: pa.Table, path) -> bool:
    changed = not path.exists() or not read_table(path).equals(table)
    if changed:
        write_table_atomic(table, path)
    return changed


def run_pool_step(layout: RunLayout, stage: PoolStage) -> bool:
    """Run one pool stage over the catalog; write its part when it changed. Returns whether it did."""
    con = connect(layout.catalog_path, layout)
    try:
        table = stage.process_pool(con)
    finally:
        con.close()
    stage.check_output(table.column_names)
    return _write_if_changed(table, layout.part_path(stage.name, POOL_PART))


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
