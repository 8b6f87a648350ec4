"""Reading a user's URL list (parquet, csv/tsv, jsonl) from a path or an fsspec URL.

Every way a list can be wrong ends in one ConfigError that names the file and the problem, before
any work starts: a curation run on a mis-read list is worse than no run.

A list that is readable but holds bad *values* is not wrong as a whole: those rows are kept and
fail one by one at download (a null or malformed URL gets ``error_kind = invalid_url``). Text
that is not valid UTF-8 (bytes from a mis-encoded CSV, lone surrogates in JSON) is repaired here
so that every later stage sees valid strings:

- in a caption, each undecodable byte or lone surrogate becomes U+FFFD (the caption is still
  stored and trained on; the rest of it is kept exactly);
- in a URL, each undecodable byte is percent-encoded (``%E9``), which is how that byte travels
  in a request anyway, so the URL still fetches what it named.

Captions are never truncated: a 100 KB caption is stored whole (the CLIP tokenizer truncates).
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from core.errors import ConfigError
from manifests.schemas import SOURCE_UID, pipeline_columns

# pyarrow parses csv/json in blocks of 1 MiB and refuses a row longer than a block ("straddles
# block boundaries"); such a list (a very long caption) is read again with blocks this large. The
# default stays first because the blocks decide the column chunks, which the input fingerprint hashes.
_BIG_BLOCK_SIZE = 64 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def _format_of(path: str) -> str:
    lowered = path.lower()
    for suffix in (".gz", ".zst", ".bz2"):
        if lowered.endswith(suffix):
            lowered = lowered[: -len(suffix)]
    for ext, fmt in FORMATS.items():
        if lowered.endswith(ext):
            return fmt
    raise ConfigError(
        f"URL list {path}: cannot tell its format from the name; use one of {', '.join(sorted(FORMATS))}"
    )


ColumnNames = str | tuple[str, ...]  # one name, or candidates tried in order (LAION's "URL", ours "url")


def read_url_list(
    path: str,
    url_column: ColumnNames = "url",
    caption_column: ColumnNames = "caption",
    drop_columns: Sequence[str] = (),
    rename_columns: Mapping[str, str] | None = None,
) -> pa.Table:
    """Return ``url`` and ``caption`` (strings, caption never null), then the list's other columns
    as source columns (module ``sources.source_columns``): typed as in the list, renamed by
    ``rename_columns`` (keys matched case-insensitively), without ``drop_columns``; a ``uid``
    column becomes ``source_uid``."""
    if not path:
        raise ConfigError("no URL list given: pass URL_LIST=<file> (make) or --url-list <file>")
    fmt = _format_of(path)
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"URL list {path}: file not found") from None
    except Exception as err:  # noqa: BLE001 - fsspec raises many kinds; all mean "cannot read it"
        raise ConfigError(f"URL list {path}: cannot be read ({type(err).__name__}: {err})") from None
    if not data.strip():
        raise ConfigError(f"URL list {path}: the file is empty")
    try:
        table = _read_any(data, fmt, path, _candidates(url_column), _candidates(caption_column))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as err:
        raise ConfigError(f"URL list {path}: not a readable {fmt} table ({err})") from None
    url_name = _pick(table.column_names, url_column)
    caption_name = _pick(table.column_names, caption_column)
    missing = [_candidates(c)[0] for c, found in ((url_column, url_name), (caption_column, caption_name)) if found is None]
    if missing:
        raise ConfigError(
            f"URL list {path}: missing column(s) {', '.join(map(repr, missing))}; it has "
            f"{', '.join(map(repr, table.column_names)) or 'no columns'} "
            "(set url_column / caption_column in the dataset's config, or --url-column / --caption-column, to map other names)"
        )
    if table.num_rows == 0:
        raise ConfigError(f"URL list {path}: the table has no rows")
    urls = _as_text(table.column(url_name), url=True)
    captions = pc.fill_null(_as_text(table.column(caption_name), url=False), "")
    extra = table.drop_columns([url_name, caption_name])
    extra = source_columns(extra, path, drop_columns, rename_columns or {})
    return pa.table([urls, captions, *extra.columns], names=["url", "caption", *extra.column_names])


def _candidates(names: ColumnNames) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def _pick(present: Sequence[str], wanted: ColumnNames) -> str | None:
    """The first candidate the list has by its exact name, else the one it has in another case."""
    candidates = _candidates(wanted)
    for name in candidates:
        if name in present:
            return name
    for name in candidates:
        folded = [p for p in present if p.lower() == name.lower()]
        if len(folded) == 1:
            return folded[0]
    return None


def source_columns(table: pa.Table, path: str, drop: Sequence[str], rename: Mapping[str, str]) -> pa.Table:
    """The list's columns besides url and caption, as the run keeps them, or one ConfigError.

    Refused before any work, each by name: a column the pipeline writes too (compared without
    case, as DuckDB compares names), two columns that differ only in case, a type the catalog
    (Parquet read by DuckDB) cannot hold. A ``uid`` column is the pool's own id: ``source_uid``.
    """
    by_lower = {name.lower(): name for name in table.column_names}
    unknown = [d for d in drop if d.lower() not in by_lower]
    if unknown:
        raise ConfigError(f"URL list {path}: --drop-columns names {', '.join(map(repr, unknown))}, which the list "
                          f"does not have; its other columns: {', '.join(map(repr, table.column_names)) or 'none'}")
    dropped = {d.lower() for d in drop}
    table = table.select([n for n in table.column_names if n.lower() not in dropped])
    renames = {old.lower(): new for old, new in rename.items()}
    renames.setdefault("uid", SOURCE_UID)
    names = [renames.get(n.lower(), n) for n in table.column_names]
    table = table.rename_columns(names)
    if SOURCE_UID in table.column_names:
        uid = table.column(SOURCE_UID)
        text = _as_text(uid, url=False) if not pa.types.is_string(uid.type) else uid
        table = table.set_column(table.column_names.index(SOURCE_UID), SOURCE_UID, text)
    reserved = pipeline_columns()
    seen: dict[str, str] = {}
    for name in names:
        lowered = name.lower()
        if lowered in seen:
            raise ConfigError(f"URL list {path}: columns {seen[lowered]!r} and {name!r} differ only in case, and "
                              "DuckDB's names do not; rename or drop one (--drop-columns)")
        seen[lowered] = name
        if lowered in reserved and name != SOURCE_UID:
            raise ConfigError(
                f"URL list {path}: column {name!r} has the name of a column the pipeline writes ({lowered!r}; "
                f"DuckDB's names are case-insensitive): rename it in the dataset's config, e.g. "
                f'rename_columns = {{ {name} = "source_{lowered}" }} under [datasets.<name>] in a --config '
                f"file (or --rename-columns {name}=source_{lowered}), or leave it out with --drop-columns {name}"
            )
    if SOURCE_UID in names and names.count(SOURCE_UID) > 1:
        raise ConfigError(f"URL list {path}: both 'uid' and 'source_uid' columns; drop one (--drop-columns)")
    _check_catalog_types(table, path)
    return table


def _check_catalog_types(table: pa.Table, path: str) -> None:
    """The columns written to Parquet and read by DuckDB, as the catalog will (a few rows, all
    columns at once; one by one only to name the one that fails): a type that fails either is
    named now, not when the first query runs."""
    if table.num_columns == 0:
        return
    with tempfile.TemporaryDirectory(prefix="curation-types-") as tmp:
        con = duckdb.connect()
        try:
            if _catalog_problem(con, table.slice(0, 16), Path(tmp) / "all.parquet") is None:
                return
            for name in table.column_names:
                problem = _catalog_problem(con, table.select([name]).slice(0, 16), Path(tmp) / "one.parquet")
                if problem is not None:
                    raise ConfigError(
                        f"URL list {path}: column {name!r} has type {table.schema.field(name).type}, which the "
                        f"catalog (Parquet read by DuckDB) cannot hold ({problem}); leave it out with --drop-columns {name}"
                    )
        finally:
            con.close()


def _catalog_problem(con: duckdb.DuckDBPyConnection, sample: pa.Table, target: Path) -> str | None:
    """Why ``sample`` cannot go through Parquet into DuckDB, or None."""
    try:
        for field in sample.schema:
            if pa.types.is_decimal(field.type) and field.type.precision > 38:  # DuckDB reads it as a wrong DOUBLE
                raise NotImplementedError(f"DuckDB's DECIMAL holds at most 38 digits, this one {field.type.precision}")
        pq.write_table(sample, target)
        con.execute(f"describe select * from read_parquet('{target}')").fetchall()
    except (pa.ArrowException, duckdb.Error, NotImplementedError, ValueError) as err:
        return str(err).splitlines()[0][:160]
    return None


def _read_any(data: bytes, fmt: str, path: str, url_names: Sequence[str], caption_names: Sequence[str]) -> pa.Table:
    """The whole list, each column typed as the format says (bad values of a row never fail it)."""
    text_columns = [*url_names, *caption_names]
    try:
        return _read_table(data, fmt, path, text_columns, block_size=None, url_names=url_names)
    except pa.ArrowInvalid as err:
        if fmt == "parquet":
            raise
        if "straddl" in str(err):
            return _read_table(data, fmt, path, text_columns, block_size=_BIG_BLOCK_SIZE, url_names=url_names)
        raise


def _read_table(data: bytes, fmt: str, path: str, text_columns: Sequence[str], block_size: int | None,
                url_names: Sequence[str]) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data))
    if fmt in ("csv", "tsv"):
        read_options = pacsv.ReadOptions() if block_size is None else pacsv.ReadOptions(block_size=block_size)
        # pyarrow reads a number column with one word in it, anywhere in the file, as text (it infers
        # over every block, never fails on it): such a column is typed by majority again
        return _type_by_majority(pacsv.read_csv(
            io.BytesIO(data),
            read_options=read_options,
            parse_options=_csv_parse(fmt),
            # bytes, not strings: a CSV with one mis-encoded byte is still read (see _as_text)
            convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in text_columns}),
        ), skip=text_columns)
    return _read_jsonl(data, path, url_names, block_size)


def _csv_parse(fmt: str) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")


def _type_by_majority(table: pa.Table, skip: Sequence[str]) -> pa.Table:
    """Text columns whose values are nearly all numbers (>= 90% of the non-null ones, not all: an
    all-number column was typed by the reader) become BIGINT or DOUBLE, the values that are not
    numbers null (DuckDB's TRY_CAST); others stay text."""
    con = duckdb.connect()
    con.register("t", table)
    for name in table.column_names:
        if name in skip or not pa.types.is_string(table.column(name).type):
            continue
        quoted = '"' + name.replace('"', '""') + '"'
        values, numbers, integers = con.execute(
            f"select count({quoted}), count(try_cast({quoted} as double)), count(try_cast({quoted} as bigint)) filter (where regexp_full_match(trim({quoted}), '[+-]?[0-9]+')) from t"
        ).fetchone()
        if values and 0.9 * values <= numbers < values:
            sql_type = "bigint" if integers == numbers else "double"
            typed = con.execute(f"select try_cast({quoted} as {sql_type}) as v from t").to_arrow_table().column(0)
            table = table.set_column(table.column_names.index(name), name, typed)
    con.close()
    return table


def _read_jsonl(data: bytes, path: str, url_names: Sequence[str], block_size: int | None) -> pa.Table:
    """pyarrow's JSON reader; Python's for the rows it refuses (lone surrogates such as "\\ud800", a
    key whose values change type between rows: those become text, typed by majority)."""
    try:
        read_options = pajson.ReadOptions() if block_size is None else pajson.ReadOptions(block_size=block_size)
        return pajson.read_json(io.BytesIO(data), read_options=read_options)
    except pa.ArrowInvalid as err:
        if "surrogate" not in str(err) and "changed from" not in str(err) and "straddl" not in str(err):
            raise
    columns: dict[str, list[object]] = {}
    rows = 0
    for number, line in enumerate(data.decode("utf-8", "surrogateescape").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"URL list {path}: line {number} is not JSON ({err})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"URL list {path}: line {number} is not a JSON object")
        for column in row:
            columns.setdefault(column, [None] * rows)
        for column, values in columns.items():
            value = row.get(column)
            values.append(_repair_str(value, url=column in url_names)
                          if isinstance(value, str) else value)
        rows += 1
    arrays = {}
    mixed = []
    for name, values in columns.items():
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[name] = pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                                    pa.string())
            mixed.append(name)
    table = pa.table(arrays)
    return _type_by_majority(table, skip=[n for n in table.column_names if n not in mixed])


def _as_text(column: pa.ChunkedArray, url: bool) -> pa.ChunkedArray:
    """The column as valid UTF-8 strings; bad bytes repaired as the module docstring says.

    The fast path (valid text, the normal case even for millions of rows) stays in Arrow; only a
    column that fails validation is repaired value by value in Python.
    """
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            column.validate(full=True)
            return column.cast(pa.string())
        except pa.ArrowInvalid:
            column = column.cast(pa.binary())  # reinterpret the bytes, no validation
    elif pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        try:
            return column.cast(pa.string())
        except pa.ArrowInvalid:
            pass
    else:
        return column.cast(pa.string())
    repaired = [None if v is None else _repair_bytes(v, url) for v in column.to_pylist()]
    return pa.chunked_array([pa.array(repaired, pa.string())])


def _repair_bytes(raw: bytes, url: bool) -> str:
    if not url:
        return raw.decode("utf-8", "replace")
    text = raw.decode("utf-8", "surrogateescape")  # undecodable byte b -> U+DC00 + b
    return _SURROGATE.sub(lambda m: f"%{ord(m.group()) - 0xDC00:02X}", text)


def _repair_str(text: str, url: bool) -> str:
    """A str that may hold lone surrogates (from JSON escapes) as valid Unicode."""
    if not _SURROGATE.search(text):
        return text
    if not url:
        return _SURROGATE.sub("\ufffd", text)
    return _SURROGATE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8", "surrogatepass")), text)
