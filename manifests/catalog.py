"""The DuckDB catalog of a run: one view per stage over its Parquet parts, ``samples`` joining
them on uid, ``selections`` (all policies) and ``selection_<policy>`` views (uids as text again:
a selection file holds them as 16 bytes, ``manifests.uids``), and ``curated``.

The CLIP stage's kept vectors (``image_embedding``, ``text_embedding``: float16 lists in its parts)
are left out of ``clip_score`` and ``samples`` (~1.5 KB a row: ``select * from samples`` stays
readable and fast) and shown in ``embeddings`` instead, as FLOAT[d] arrays that
``array_cosine_similarity`` takes: ``select uid from embeddings order by
array_cosine_similarity(image_embedding, ?::FLOAT[384]) desc limit 5``.

The catalog holds only views (no data), so it is cheap to rebuild after every stage and always
reflects the parts on disk. It is built under a temporary name and renamed into place, so a
reader never opens a half-written catalog.

A uid retried (``curate --retry``) has one download row per attempt: the ``download`` view, and
so ``samples``, the policies and resharding, see only each uid's latest attempt
(:func:`download_relations`); ``download_history`` shows every attempt.

The policies do not read ``samples``: at 10M rows its join on a string uid costs seconds per
query. :func:`materialise_policy_inputs` joins what they read once (``policy_inputs.parquet``:
the downloaded samples in uid order, only the columns the rules name) and rebuilds it only when
a part it joins changed; ``samples`` stays the live join, for people. Beside it, the same rows'
uids as 16 bytes (``policy_uids.parquet``), which every selection writes.

For an object-store root the catalog file stays local (``RunLayout.catalog_path``) and its views
read ``s3://...`` URLs through the store's fsspec filesystem, which every connection registers
(:func:`connect`); stock DuckDB does the same with ``con.register_filesystem(fsspec.filesystem("s3"))``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schemas import EMBEDDING_COLUMNS, SOURCE_COLUMNS_KEY
from manifests.store import RunLayout, is_remote, list_names, move_into_place, tmp_sibling
from manifests.uids import SQL_AS_TEXT, UID_BATCH, UID_TYPE, uids_as_bytes

MEMORY_LIMIT = "2GB"  # DuckDB's buffer for the policy join and queries; past it DuckDB spills to disk
SPILL_DIR = ".tmp-duckdb-spill"  # under the run's local folder; a temporary name, so a killed run's is swept
POLICY_INPUTS = "policy_inputs.parquet"
POLICY_UIDS = "policy_uids.parquet"  # the same rows' uids as 16 bytes, uncompressed: what a selection writes
_INPUTS_FORMAT = 2  # bump when what the file holds changes: every run then rebuilds it once
DOWNLOAD_HISTORY = "download_history"  # the view of every download attempt (``download``: the latest per uid)


def connect(catalog: Path, layout: RunLayout | None = None, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A connection to a catalog whose views can read the run's manifests, local or remote."""
    con = duckdb.connect(str(catalog), read_only=read_only)
    if layout is not None and layout.remote:
        fs = layout.root.fs
        names = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        if not any(con.filesystem_is_registered(n) for n in names):  # shared by connections to one file
            con.register_filesystem(fs)
    return con


def sql_string(path: Path | str) -> str:
    """A path or text as a SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def selection_view(policy: str) -> str:
    """The catalog view of a policy's selection: no-parrot -> selection_no_parrot."""
    return "selection_" + "".join(c if c.isalnum() else "_" for c in policy)


def _stages_in_order(layout: RunLayout, order: Sequence[str]) -> list[str]:
    """The stages with parts on disk, in join order: ``order`` (the DAG's), then the rest by name."""
    present = layout.stages_present()
    return [s for s in order if s in present] + sorted(s for s in present if s not in order)


def _stage_relation(layout: RunLayout, stage: str) -> str:
    """A stage's parts as one relation (parts may differ in columns: ``union_by_name``)."""
    return f"read_parquet({sql_string(layout.stage_dir(stage) / 'part-*.parquet')}, union_by_name=true)"


SOURCE_VIEW = "source"  # the URL list's own columns (manifests.schemas: source columns), joined into samples


def source_plans(layout: RunLayout) -> dict[Path, list[str]]:
    """The plan files (``input/urls*.parquet``) of the lists that brought source columns, each
    with its columns, from their footers alone; a retry's plan repeats earlier rows and has none."""
    plans = {}
    for name in sorted(list_names(layout.input_dir)):
        if not (name.startswith("urls") and name.endswith(".parquet")):
            continue
        path = layout.input_dir / name
        columns = json.loads(parquet_metadata(path).get(SOURCE_COLUMNS_KEY) or "[]")
        if columns:
            plans[path] = columns
    return plans


def source_relation(plans: dict[Path, list[str]]) -> str | None:
    """The source columns of every sample of ``plans`` (uid first) as one relation; None without plans.
    Lists appended with other columns: ``union_by_name``, so a column one list lacks is null there."""
    if not plans:
        return None
    files = "[" + ", ".join(sql_string(p) for p in plans) + "]"
    names = dict.fromkeys(n for columns in plans.values() for n in columns)
    select = ", ".join(_ident(n) for n in ["uid", *names])
    return f"(select {select} from read_parquet({files}, union_by_name=true))"


EMBEDDINGS_VIEW = "embeddings"  # uid, image_embedding, text_embedding (FLOAT[d]), model: from the clip_score parts


def _stage_view(con: duckdb.DuckDBPyConnection, layout: RunLayout, stage: str) -> str:
    """A stage's view query: all its columns but the embeddings (~1.5 KB a row: they would make
    ``select * from samples`` slow and unreadable; the ``embeddings`` view has them)."""
    relation = _stage_relation(layout, stage)
    if stage != "clip_score":
        return f"select * from {relation}"
    names = {c for (c, *_) in con.execute(f"describe select * from {relation}").fetchall()}
    wide = [_ident(c) for c in EMBEDDING_COLUMNS if c in names]  # parts written before embeddings lack them
    return f"select * exclude ({', '.join(wide)}) from {relation}" if wide else f"select * from {relation}"


def embeddings_select(con: duckdb.DuckDBPyConnection, layout: RunLayout) -> str | None:
    """The ``embeddings`` view's query: each sample that kept embeddings, as DuckDB arrays of the
    model's dimension (``array_cosine_similarity`` and friends need FLOAT[d], Parquet stores a
    list). None when no clip_score part kept any (written before, or ``clip.keep_embeddings`` off).

    One probe row per model names the dimension (a scan of the small ``clip_model`` column, not of
    the vectors). Models of different dimensions in one run (a pool's imported ViT-L/14 vectors
    beside the model's own) leave the vectors as FLOAT[] lists: ``list_cosine_similarity`` within
    one ``model`` still works, an array cast would fail."""
    relation = _stage_relation(layout, "clip_score")
    try:
        con.execute(f"describe select image_embedding from {relation}")
    except duckdb.BinderException:  # no part has the column
        return None
    models = [m for (m,) in con.execute(f"select distinct clip_model from {relation} where clip_status = 'ok'").fetchall()]
    dims = set()
    for model in models:
        row = con.execute(f"select len(image_embedding) from {relation} where clip_model is not distinct from ? "
                          "and image_embedding is not null limit 1", [model]).fetchone()
        if row is not None:
            dims.add(int(row[0]))
    if not dims:
        return None
    kind = f"FLOAT[{dims.pop()}]" if len(dims) == 1 else "FLOAT[]"
    arrays = ", ".join(f"{_ident(c)}::{kind} as {_ident(c)}" for c in EMBEDDING_COLUMNS)
    return f"select uid, {arrays}, clip_model as model from {relation} where image_embedding is not null"


def download_relations(con: duckdb.DuckDBPyConnection, layout: RunLayout) -> tuple[str, str]:
    """The download parts as relations with an ``attempt`` column (NULL or absent, as in parts
    written before retries existed, reads as 1): (every attempt, each uid's latest attempt).

    The window that picks the latest attempt costs about as much again as the scan, so it is
    added only when some row is a retry (attempt > 1): a run that never retried reads its parts
    as before. One probe of the parts decides both (a column no part has fails to bind).
    """
    parts = _stage_relation(layout, "download")
    try:
        retried = con.execute(f"select coalesce(max(attempt), 1) > 1 from {parts}").fetchone()[0]
    except duckdb.BinderException:  # no part has the column
        plain = f"(select *, 1::integer as attempt from {parts})"
        return plain, plain
    history = f"(select * replace (coalesce(attempt, 1)::integer as attempt) from {parts})"
    if not retried:
        return history, history
    newest_first = "partition by uid order by attempt desc, shard desc"
    return history, f"(select * from {history} qualify row_number() over ({newest_first}) = 1)"


def latest_downloads(layout: RunLayout, columns: Sequence[str]) -> pa.Table:
    """``columns`` of each uid's latest download attempt (what resharding reads: shard and key)."""
    con = connect(Path(":memory:"), layout, read_only=False)
    try:
        bound_memory(con, layout)
        select = ", ".join(_ident(c) for c in columns)
        _, latest = download_relations(con, layout)
        return con.execute(f"select {select} from {latest} as download").to_arrow_table()
    finally:
        con.close()


def bound_memory(con: duckdb.DuckDBPyConnection, layout: RunLayout) -> None:
    """Cap DuckDB's memory for work over the whole pool; what passes the cap spills to the run's
    local folder (a joined 10^8-row pool needs disk, not RAM)."""
    con.execute(f"set memory_limit = '{MEMORY_LIMIT}'")
    con.execute(f"set temp_directory = {sql_string(layout.local_dir / SPILL_DIR)}")


def _selection_relation(path: Path) -> str:
    """A selection's rows with the uid as text: the file holds it as 16 bytes (``manifests.uids``);
    one written before that (text) is read as it is, until the next run rewrites it."""
    try:
        with fsspec.open(str(path), "rb") as f:
            binary = pa.types.is_fixed_size_binary(pq.read_schema(f).field("uid").type)
    except (OSError, ValueError, KeyError):
        binary = True  # unreadable: the query will say so
    source = f"read_parquet({sql_string(path)})"
    return f"select * replace ({SQL_AS_TEXT} as uid) from {source}" if binary else f"select * from {source}"


def build_catalog(layout: RunLayout, order: Sequence[str] = ("download",)) -> Path:
    """(Re)create ``<root>/catalog.duckdb`` with a view per stage present and a ``samples`` view.

    ``download`` (and so ``samples``) has each uid's latest attempt; ``download_history`` every attempt.

    ``order`` is the order in which stages join into ``samples`` (the DAG's, from the pipeline);
    download comes first, it has every input sample; stages not named follow by name.
    """
    stages = _stages_in_order(layout, order)
    target = layout.catalog_path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(target)
    try:
        con = connect(tmp, layout, read_only=False)
        try:
            for stage in stages:
                if stage == "download":
                    history, latest = download_relations(con, layout)
                    con.execute(f'create view "{DOWNLOAD_HISTORY}" as select * from {history}')
                    con.execute(f'create view download as select * from {latest}')
                else:
                    con.execute(f'create view "{stage}" as {_stage_view(con, layout, stage)}')
            embeddings = embeddings_select(con, layout) if "clip_score" in stages else None
            if embeddings is not None:
                con.execute(f'create view "{EMBEDDINGS_VIEW}" as {embeddings}')
            source = source_relation(source_plans(layout))
            if source is not None:
                con.execute(f'create view "{SOURCE_VIEW}" as select * from {source}')
            if "download" in stages:
                joins = " ".join(f'left join "{s}" using (uid)' for s in stages if s != "download")
                if source is not None:
                    joins = f'left join "{SOURCE_VIEW}" using (uid) ' + joins
                con.execute(f'create view samples as select * from download {joins}')
            selections = sorted(layout.selections_dir.glob("*.parquet")) if layout.selections_dir.is_dir() else []
            if selections:
                views = []
                for path in selections:
                    view = selection_view(path.stem)
                    con.execute(f'create view "{view}" as {_selection_relation(path)}')
                    views.append(f'select * from "{view}"')
                con.execute("create view selections as " + " union all by name ".join(views))
            curated = sorted(layout.root.glob("curated/*/manifest.parquet"))
            if curated:
                glob = layout.root / "curated" / "*" / "manifest.parquet"
                con.execute(f"create view curated as select * from read_parquet({sql_string(glob)})")
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


@dataclass(frozen=True)
class PolicyInputs:
    """The materialised table the policies read: where it is and what identifies its rows."""

    path: Path
    uids_path: Path  # the rows' uids, in the same order, as 16 bytes (``manifests.uids``)
    rows: int
    uid_digest: str  # the uid column's content (not its files): a selection over the same uids keeps its digest
    built: bool  # joined now; False when the file on disk already matched the parts


def policy_inputs_path(layout: RunLayout) -> Path:
    """Local, beside the catalog: derived data that any run can rebuild from the manifests."""
    return layout.local_dir / POLICY_INPUTS


def policy_uids_path(layout: RunLayout) -> Path:
    return layout.local_dir / POLICY_UIDS


def _part_listing(layout: RunLayout, stage: str) -> list[tuple[str, int, str]]:
    """(name, size, modification stamp) of each part of a stage: one listing, no read of any part."""
    folder = layout.stage_dir(stage)
    if layout.remote:
        entries = folder.fs.ls(folder.path, detail=True)
        return sorted((e["name"].rsplit("/", 1)[-1], int(e.get("size") or 0),
                       str(e.get("ETag") or e.get("LastModified") or e.get("mtime") or ""))
                      for e in entries if e["name"].rsplit("/", 1)[-1].startswith("part-"))
    with os.scandir(folder) as it:
        return sorted((e.name, e.stat().st_size, str(e.stat().st_mtime_ns))
                      for e in it if e.name.startswith("part-") and e.name.endswith(".parquet"))


def parquet_metadata(path: Path) -> dict[str, str]:
    """A Parquet file's key-value metadata (its footer only); empty when the file is absent or unreadable."""
    try:
        with fsspec.open(str(path), "rb") as f:
            raw = pq.read_metadata(f).metadata or {}
    except (OSError, ValueError):
        return {}
    return {k.decode(): v.decode() for k, v in raw.items()}


def write_file_atomic(write: Callable[[Path], None], path: Path, scratch: Path) -> None:
    """``write(tmp)`` makes a local file; it appears at ``path`` whole or not at all: a temporary
    name beside it, fsync, rename; or, for a remote ``path``, a local file then one upload."""
    tmp = tmp_sibling(Path(scratch) / path.name if is_remote(path) else Path(path))
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        move_into_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_to_parquet_atomic(con: duckdb.DuckDBPyConnection, sql: str, path: Path, metadata: dict[str, str],
                           scratch: Path) -> None:
    """DuckDB writes a query's rows to ``path`` (zstd, ``metadata`` in the footer), atomically
    (:func:`write_file_atomic`), in the query's order (DuckDB preserves insertion order)."""
    kv = ", ".join(f"{k}: {sql_string(v)}" for k, v in metadata.items())
    options = "format parquet, compression zstd, compression_level 1" + (f", kv_metadata {{{kv}}}" if kv else "")
    write_file_atomic(lambda tmp: con.execute(f"copy ({sql}) to {sql_string(tmp)} ({options})"), path, scratch)


def _write_uids(batches: pa.RecordBatchReader, path: Path, metadata: dict[str, str], scratch: Path) -> None:
    """The uids of ``batches`` (first column, text) as 16-byte values in one uncompressed column:
    read back by every policy's selection, 10M rows in a tenth of a second."""

    def write(tmp: Path) -> None:
        schema = pa.schema([pa.field("uid", UID_TYPE, nullable=False)])
        with pq.ParquetWriter(tmp, schema, compression="none", use_dictionary=False, write_statistics=False) as writer:
            for batch in batches:
                for piece in uids_as_bytes(batch.column(0)).chunks:
                    writer.write_batch(pa.record_batch([piece], schema=schema))
            writer.add_key_value_metadata(metadata)

    write_file_atomic(write, path, scratch)


def materialise_policy_inputs(layout: RunLayout, columns: Sequence[str], order: Sequence[str] = ("download",)) -> PolicyInputs:
    """Join the stages once into ``policy_inputs.parquet``: the downloaded samples (status 'ok' at
    their latest attempt) in uid order with ``columns`` (those the policies' rules name), the
    values ``samples`` has.

    Only the stages that hold a wanted column are joined. The file's footer records a fingerprint
    of every part it was made from (name, size, time), the columns and DuckDB's version; when the
    parts on disk give the same fingerprint the file is reused, else rebuilt: once per run that
    changed a manifest, however many policies read it.
    """
    stages = _stages_in_order(layout, order)
    if "download" not in stages:
        raise FileNotFoundError(f"no download manifest under {layout.stage_dir('download')}: nothing to select from")
    stages.remove("download")
    con = connect(Path(":memory:"), layout, read_only=False)
    try:
        bound_memory(con, layout)
        wanted = list(dict.fromkeys(["uid", *columns]))
        found = {c for (c, *_) in con.execute(f"describe select * from {_stage_relation(layout, 'download')}").fetchall()}
        plans = source_plans(layout)
        relations = {s: _stage_relation(layout, s) for s in stages}
        if plans:
            relations = {SOURCE_VIEW: source_relation(plans), **relations}
        joined = []
        for stage, relation in relations.items():
            if set(wanted) - found:
                names = {c for (c, *_) in con.execute(f"describe select * from {relation}").fetchall()}
                if (set(wanted) - found) & (names - {"uid"}):
                    joined.append(stage)
                    found |= names
        kept_columns = [c for c in wanted if c in found]  # a missing one fails in the policy, which names it
        fingerprint = hashlib.sha256(json.dumps({
            "format": _INPUTS_FORMAT, "duckdb": duckdb.__version__, "columns": kept_columns,
            "parts": {s: _part_listing(layout, s) for s in ["download", *joined] if s != SOURCE_VIEW},
            "source": [(p.name, columns) for p, columns in plans.items()] if SOURCE_VIEW in joined else [],
        }).encode()).hexdigest()
        path, uids_path = policy_inputs_path(layout), policy_uids_path(layout)
        meta = parquet_metadata(path)
        if meta.get("fingerprint") == fingerprint and parquet_metadata(uids_path).get("fingerprint") == fingerprint:
            return PolicyInputs(path, uids_path, int(meta["rows"]), meta["uid_digest"], built=False)
        joins = " ".join(f'left join {relations[s]} as "{s}" using (uid)' for s in joined)
        select = ", ".join(_ident(c) for c in kept_columns)
        con.execute(f"create temp table policy_inputs as select {select} "
                    f"from {download_relations(con, layout)[1]} as download {joins} where status = 'ok' order by uid")
        rows, xor, total = con.execute(
            "select count(*), coalesce(bit_xor(hash(uid)), 0), coalesce(sum(hash(uid)::hugeint), 0) from policy_inputs"
        ).fetchone()
        uid_digest = hashlib.sha256(f"{rows}:{xor}:{total}".encode()).hexdigest()
        copy_to_parquet_atomic(con, "select * from policy_inputs", path,
                               {"fingerprint": fingerprint, "uid_digest": uid_digest, "rows": str(rows)}, layout.local_dir)
        _write_uids(con.execute("select uid from policy_inputs").to_arrow_reader(UID_BATCH), uids_path,
                    {"fingerprint": fingerprint}, layout.local_dir)
        return PolicyInputs(path, uids_path, rows, uid_digest, built=True)
    finally:
        con.close()


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
