"""Export a policy's selection for other tools: ``python -m pipeline export``.

Three formats, each read from the run's DuckDB catalog (read-only) and streamed to the file, so a
10^8-row pool is never a Python list:

- ``datacomp``: DataComp's subset file, as ``baselines/apply_filter.py`` writes it and the
  resharder's ``load_subset`` reads it (``--subset-file``): ``np.save`` of a sorted array of dtype
  ``u8,u8``, each uid split as ``(int(uid, 16) // 2**64, int(uid, 16) % 2**64)``. The uid is the
  pool's own (``source_uid``, a DataComp list's ``uid`` column) when the sample has one, else ours
  (``pipeline.download_runner.make_uid``: 128 bits, 32 hex characters already). The file is
  byte-for-byte what ``np.save`` writes: numpy's header has room for any row count, so it is
  written first with 0 rows and rewritten with the count once the rows are through.
- ``parquet``: the kept rows, with where they are (shard, key), why kept (reason) and the URL
  list's own columns (the catalog's ``source`` view).
- ``urls``: a URL list again (url, caption, the source columns; ``source_uid`` as ``uid``), which
  img2dataset (``--input_format parquet --url_col url --caption_col caption``) and our own
  ``curate --url-list`` read: a selection made here can be downloaded elsewhere.

The destination is a local path or an fsspec URL; the file appears whole or not at all
(``manifests.catalog.write_file_atomic``).
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.compute as pc
from numpy.lib import format as npy_format

from core.errors import ConfigError
from manifests.catalog import (
    SOURCE_VIEW,
    bound_memory,
    connect,
    selection_view,
    sql_string,
    write_file_atomic,
)
from manifests.schemas import SOURCE_UID
from manifests.store import RunLayout, as_path, is_remote, list_names
from pipeline.config import Config, load_config

FORMATS = {
    "datacomp": "DataComp's subset file (.npy, dtype u8,u8, sorted 128-bit uids; the pool's own uid "
    "(source_uid) where the sample has one, else ours), for DataComp's resharder.py --subset-file",
    "parquet": "the kept rows: uid, source_uid, url, caption, shard, key, reason and the URL list's own "
    "columns",
    "urls": "a URL list of the kept rows (url, caption, the URL list's own columns; the pool's uid as uid) that "
    "img2dataset (--input_format parquet --url_col url --caption_col caption) and `curate --url-list` read",
}
DATACOMP_DTYPE = np.dtype("u8,u8")  # DataComp's resharder.py: u16 = np.dtype("u8,u8")
_BATCH_ROWS = 1 << 20  # rows of uid pairs converted and written at a time (16 MiB)
_HEX_UID = "[0-9a-fA-F]{32}"


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    policy: str
    fmt: str
    rows: int
    to: str
    source_uids: int = 0  # rows identified by the pool's own uid (datacomp format)

    def summary(self) -> str:
        """One line for the CLI."""
        what = f"exported {self.rows} kept sample(s) of policy {self.policy!r} as {self.fmt} to {self.to}"
        if self.fmt == "datacomp":
            what += f" (uids: {self.source_uids} the pool's own source_uid, {self.rows - self.source_uids} ours)"
        return what


def _views(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {name for (name,) in con.execute("select table_name from information_schema.tables").fetchall()}


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _missing_selection(layout: RunLayout, policy: str, config: Config | None) -> ConfigError:
    """Why there is nothing to export: a policy no config defines, or one this run has not selected."""
    present = sorted(n.removesuffix(".parquet") for n in list_names(layout.selections_dir) if n.endswith(".parquet"))
    have = ", ".join(present) or "none"
    config = config if config is not None else load_config(None)
    if policy not in config.policies:
        return ConfigError(f"unknown policy {policy!r}; this run has selections for: {have} "
                           f"(the config knows: {', '.join(sorted(config.policies))})")
    return ConfigError(f"policy {policy!r} has no selection in {layout.root} yet (it has: {have}); run "
                       f"`python -m pipeline curate --output {layout.root} --policies {policy}` first")


def export_selection(layout_or_output: RunLayout | str | Path, policy: str, fmt: str, to: str,
                     config: Config | None = None) -> ExportResult:
    """Write the kept samples of ``policy`` in ``fmt`` to ``to`` (a path or an fsspec URL).

    ``config`` only tells an unknown policy from one the run has not selected (default: the
    shipped config). Any problem the user can fix is one ConfigError.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not to:
        raise ConfigError("no destination: pass --to PATH (a file path or an fsspec URL)")
    layout = layout_or_output if isinstance(layout_or_output, RunLayout) else RunLayout(layout_or_output)
    if not layout.catalog_path.exists():
        raise ConfigError(f"no catalog at {layout.catalog_path}: run `python -m pipeline curate --output "
                          f"{layout.root}` first")
    target = as_path(to)
    if not is_remote(target) and Path(target).is_dir():
        raise ConfigError(f"--to {to} is a folder: give a file name")
    con = connect(layout.catalog_path, layout)
    try:
        bound_memory(con, layout)
        views = _views(con)
        view = selection_view(policy)
        if view not in views:
            raise _missing_selection(layout, policy, config)
        source_columns: list[str] = []
        has_source_uid = False
        if SOURCE_VIEW in views:
            names = [c for (c, *_) in con.execute(f'describe "{SOURCE_VIEW}"').fetchall()]
            has_source_uid = SOURCE_UID in names
            source_columns = [c for c in names if c not in ("uid", SOURCE_UID)]
        kept = _kept_rows(view, policy, SOURCE_VIEW in views, has_source_uid, source_columns)
        if fmt == "datacomp":
            rows, from_source = _write_datacomp(con, layout, kept, target)
            return ExportResult(policy, fmt, rows, str(to), from_source)
        if fmt == "parquet":
            columns = [_ident(c) for c in ("uid", SOURCE_UID, "url", "caption", "shard", "key", "reason", *source_columns)]
        else:  # a list's uid column is read back as source_uid (sources.url_list)
            columns = ["url", "caption", *([f"{SOURCE_UID} as uid"] if has_source_uid else []),
                       *(_ident(c) for c in source_columns)]
        sql = f"select {', '.join(columns)} from ({kept}) order by uid"
        written: list[int] = []
        write_file_atomic(lambda tmp: written.append(con.execute(
            f"copy ({sql}) to {sql_string(tmp)} (format parquet, compression zstd)").fetchone()[0]), target, layout.local_dir)
        return ExportResult(policy, fmt, int(written[0]), str(to))
    finally:
        con.close()


def _kept_rows(view: str, policy: str, has_source: bool, has_source_uid: bool, source_columns: list[str]) -> str:
    """The kept samples of a selection with their download row and source columns: one relation."""
    extras = "".join(f", src.{_ident(c)}" for c in source_columns)
    source_uid = f"src.{SOURCE_UID}" if has_source_uid else "null::varchar"
    join = f'left join "{SOURCE_VIEW}" as src on src.uid = sel.uid' if has_source else ""
    return (f"select sel.uid, {source_uid} as {SOURCE_UID}, d.url, d.caption, d.shard, d.key, sel.reason{extras} "
            f'from "{view}" as sel join download as d on d.uid = sel.uid {join} '
            f"where sel.kept and sel.policy = {sql_string(policy)}")


def _npy_header(rows: int) -> bytes:
    """numpy's own header for ``rows`` uid pairs (its length does not depend on ``rows``)."""
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, {"descr": npy_format.dtype_to_descr(DATACOMP_DTYPE),
                                               "fortran_order": False, "shape": (rows,)})
    return buffer.getvalue()


def _write_datacomp(con: duckdb.DuckDBPyConnection, layout: RunLayout, kept: str, target: Path) -> tuple[int, int]:
    """DataComp's subset file: the uid pairs sorted by DuckDB (unsigned, as numpy sorts ``u8,u8``),
    streamed into a ``.npy`` in one pass over the kept rows, which also finds any source_uid that is
    not a 128-bit hex uid (then nothing is written). Returns (rows, rows identified by source_uid)."""
    uid = f"coalesce({SOURCE_UID}, uid)"
    half = "try_cast(('0x' || substr(u, {start}, 16)) as ubigint)"
    sql = (f"select {half.format(start=1)} as hi, {half.format(start=17)} as lo, from_source, bad "
           f"from (select lower({uid}) as u, {SOURCE_UID} is not null as from_source, "
           f"case when not regexp_full_match({uid}, '{_HEX_UID}') then {uid} end as bad from ({kept})) "
           "order by hi, lo, bad")
    rows = from_source = bad = 0
    example = None

    def write(tmp: Path) -> None:
        nonlocal rows, from_source, bad, example
        header = _npy_header(0)
        with open(tmp, "wb") as f:
            f.write(header)
            for batch in con.execute(sql).to_arrow_reader(_BATCH_ROWS):
                wrong = batch.num_rows - batch.column(3).null_count
                if wrong:
                    bad += wrong
                    example = example or pc.drop_null(batch.column(3))[0].as_py()
                if bad:
                    continue
                pairs = np.empty(batch.num_rows, DATACOMP_DTYPE)
                pairs["f0"] = batch.column(0).to_numpy(zero_copy_only=False)
                pairs["f1"] = batch.column(1).to_numpy(zero_copy_only=False)
                f.write(pairs.tobytes())
                rows += batch.num_rows
                from_source += pc.sum(batch.column(2)).as_py() or 0
            if bad:
                raise ConfigError(f"{bad} kept sample(s) have a source_uid that is not 32 hex digits (a DataComp "
                                  f"uid), e.g. {example!r}: export --format parquet or urls instead, or leave the "
                                  "list's uid column out (--drop-columns uid) when curating")
            final = _npy_header(rows)
            if len(final) != len(header):  # numpy reserves room for any count; this would be a numpy change
                raise RuntimeError("numpy's .npy header changed length with the row count")
            f.seek(0)
            f.write(final)

    write_file_atomic(write, target, layout.local_dir)
    return rows, from_source


def add_export_parser(subparsers: argparse._SubParsersAction, default_output: str) -> argparse.ArgumentParser:
    """The ``export`` subcommand (its handler: :func:`cmd_export`)."""
    formats = "\n".join(f"  {name:9s} {text}" for name, text in FORMATS.items())
    parser = subparsers.add_parser(
        "export",
        help="write a policy's kept samples for other tools: DataComp subset (.npy), Parquet, or a URL list",
        description="Write the samples a policy kept, read from <output>/catalog.duckdb, to a file (a local "
        "path or an fsspec URL such as s3://bucket/key).",
        epilog="formats:\n" + formats + "\n\nexample:\n  python -m pipeline export --output out/pool --policy "
        "clip-score-top --format datacomp --to subset.npy\n  python resharder.py -i <the pool's shards> -o "
        "subset_shards -s subset.npy   # DataComp's resharder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", default=default_output, help="the run's output folder (or fsspec URL)")
    parser.add_argument("--policy", required=True, help="the policy whose kept samples to write")
    parser.add_argument("--format", required=True, dest="fmt", metavar="FORMAT",
                        help=f"one of {', '.join(FORMATS)} (below)")
    parser.add_argument("--to", required=True, help="the file to write: a path or an fsspec URL")
    parser.add_argument("--config", default=None,
                        help="TOML file merged over pipeline/default.toml (to name a policy it defines)")
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else None
    result = export_selection(args.output, args.policy, args.fmt, args.to, config=config)
    print(result.summary())
    return 0
