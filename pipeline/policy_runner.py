"""Runs the pool stages on the driver: ``dup_group`` (one table over the whole pool) and the filter
stage for each configured policy (``selections/<policy>.parquet``).

Both are cheap next to the per-sample stages, so they are recomputed from the current manifests on
every run; a file is rewritten only when its content changed, so resharding (which compares the
selection's time and hash with its own completion marker) redoes only the policies whose
decision moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from manifests.catalog import connect
from manifests.store import RunLayout, read_table, write_table_atomic
from pipeline.config import Config
from stages.base import PoolStage
from stages.filter import FilterStage

POOL_PART = "pool"  # a pool stage writes manifests/<stage>/part-pool.parquet: the catalog joins it like any part


@dataclass
class SelectionReport:
    policy: str
    kept: int
    total: int
    changed: bool
    description: str


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


def select_policies(layout: RunLayout, config: Config, policies: tuple[str, ...]) -> list[SelectionReport]:
    """Evaluate each named policy over the catalog's ``samples`` and write changed selections.

    The caller rebuilds the catalog before (so ``samples`` sees every part) and after (so the
    ``selection_<policy>`` views exist).
    """
    reports = []
    con = connect(layout.catalog_path, layout)
    try:
        for name in policies:
            policy = config.policy(name)
            stage = FilterStage(policy)
            table = stage.process_pool(con)
            stage.check_output(table.column_names)
            changed = _write_if_changed(table, layout.selection_path(name))
            kept = sum(table.column("kept").to_pylist())
            reports.append(SelectionReport(name, kept, table.num_rows, changed, policy.description))
    finally:
        con.close()
    return reports
