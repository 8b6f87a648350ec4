"""Runs the filter stage for each configured policy and writes ``selections/<policy>.parquet``.

Selections are cheap SQL, so they are always recomputed from the current manifests; the file is
rewritten only when its content changed, so resharding (which compares the selection's time with
its own completion marker) redoes only the policies whose decision moved.
"""

from __future__ import annotations

from dataclasses import dataclass

from manifests.catalog import build_catalog, connect
from manifests.store import RunLayout, read_table, write_table_atomic
from pipeline.config import Config
from stages.filter import FilterStage


@dataclass
class SelectionReport:
    policy: str
    kept: int
    total: int
    changed: bool
    description: str


def select_policies(layout: RunLayout, config: Config, policies: tuple[str, ...]) -> list[SelectionReport]:
    """Evaluate each named policy over the catalog's ``samples`` and write changed selections."""
    build_catalog(layout)
    reports = []
    con = connect(layout.catalog_path, layout)
    try:
        for name in policies:
            policy = config.policy(name)
            table = FilterStage(policy).select(con)
            path = layout.selection_path(name)
            changed = not path.exists() or not read_table(path).equals(table)
            if changed:
                write_table_atomic(table, path)
            kept = sum(table.column("kept").to_pylist())
            reports.append(SelectionReport(name, kept, table.num_rows, changed, policy.description))
    finally:
        con.close()
    build_catalog(layout)
    return reports
