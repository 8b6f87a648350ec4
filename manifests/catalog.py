"""The DuckDB catalog of a run: one view per stage over its Parquet parts, ``samples`` joining
them on uid, ``selections`` (all policies) and ``selection_<policy>`` views, and ``curated``.

The catalog holds only views (no data), so it is cheap to rebuild after every stage and always
reflects the parts on disk. It is built under a temporary name and renamed into place, so a
reader never opens a half-written catalog.

For an object-store root the catalog file stays local (``RunLayout.catalog_path``) and its views
read ``s3://...`` URLs through the store's fsspec filesystem, which every connection registers
(:func:`connect`); stock DuckDB does the same with ``con.register_filesystem(fsspec.filesystem("s3"))``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb

from manifests.store import RunLayout, tmp_sibling


def connect(catalog: Path, layout: RunLayout | None = None, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A connection to a catalog whose views can read the run's manifests, local or remote."""
    con = duckdb.connect(str(catalog), read_only=read_only)
    if layout is not None and layout.remote:
        fs = layout.root.fs
        names = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        if not any(con.filesystem_is_registered(n) for n in names):  # shared by connections to one file
            con.register_filesystem(fs)
    return con


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _safe(name: str) -> str:
    """A policy name as a plain identifier: no-parrot -> no_parrot."""
    return "".join(c if c.isalnum() else "_" for c in name)


def build_catalog(layout: RunLayout, order: Sequence[str] = ("download",)) -> Path:
    """(Re)create ``<root>/catalog.duckdb`` with a view per stage present and a ``samples`` view.

    ``order`` is the order in which stages join into ``samples`` (the DAG's, from the pipeline);
    download comes first, it has every input sample; stages not named follow by name.
    """
    present = layout.stages_present()
    stages = [s for s in order if s in present]
    stages += sorted(s for s in present if s not in stages)
    target = layout.catalog_path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(target)
    try:
        con = connect(tmp, layout, read_only=False)
        try:
            for stage in stages:
                glob = layout.stage_dir(stage) / "part-*.parquet"
                con.execute(f'create view "{stage}" as select * from read_parquet({_quote(glob)}, union_by_name=true)')
            if "download" in stages:
                joins = " ".join(f'left join "{s}" using (uid)' for s in stages if s != "download")
                con.execute(f'create view samples as select * from download {joins}')
            selections = sorted(layout.selections_dir.glob("*.parquet")) if layout.selections_dir.is_dir() else []
            if selections:
                glob = layout.selections_dir / "*.parquet"
                con.execute(f"create view selections as select * from read_parquet({_quote(glob)})")
                for path in selections:
                    view = "selection_" + _safe(path.stem)
                    con.execute(f'create view "{view}" as select * from read_parquet({_quote(path)})')
            curated = sorted(layout.root.glob("curated/*/manifest.parquet"))
            if curated:
                glob = layout.root / "curated" / "*" / "manifest.parquet"
                con.execute(f"create view curated as select * from read_parquet({_quote(glob)})")
            con.execute("checkpoint")  # raises when the disk is full, instead of leaving the views in a WAL
        finally:
            con.close()
        wal = tmp.with_name(tmp.name + ".wal")
        if wal.exists():  # DuckDB could not fold its log into the file: the catalog would lack views
            wal.unlink()
            raise OSError(28, f"could not finish writing the catalog {target}: No space left on device?")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def run_query(catalog: Path | RunLayout, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run SQL against a run's catalog (read-only) and return (column names, rows)."""
    layout = catalog if isinstance(catalog, RunLayout) else None
    path = layout.catalog_path if layout is not None else Path(catalog)
    if not path.exists():
        raise FileNotFoundError(f"no catalog at {path}: run `make curate` (or `python -m pipeline curate`) first")
    con = connect(path, layout)
    try:
        result = con.execute(sql)
        columns = [d[0] for d in result.description] if result.description else []
        return columns, result.fetchall()
    finally:
        con.close()


def format_table(columns: list[str], rows: list[tuple[Any, ...]], max_width: int = 60) -> str:
    """A plain-text table, for the CLI."""

    def cell(value: Any) -> str:
        text = "NULL" if value is None else str(value)
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
