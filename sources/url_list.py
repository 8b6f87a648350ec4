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

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from core.errors import ConfigError

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


def read_url_list(path: str, url_column: str = "url", caption_column: str = "caption") -> pa.Table:
    """Return a table with exactly the columns ``url`` and ``caption`` (strings, caption never null)."""
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
        try:
            table = _read_table(data, fmt, path, url_column, caption_column, block_size=None)
        except pa.ArrowInvalid as err:
            if fmt == "parquet" or "straddl" not in str(err):
                raise
            table = _read_table(data, fmt, path, url_column, caption_column, block_size=_BIG_BLOCK_SIZE)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as err:
        raise ConfigError(f"URL list {path}: not a readable {fmt} table ({err})") from None
    missing = [c for c in (url_column, caption_column) if c not in table.column_names]
    if missing:
        raise ConfigError(
            f"URL list {path}: missing column(s) {', '.join(map(repr, missing))}; it has "
            f"{', '.join(map(repr, table.column_names)) or 'no columns'} "
            "(set url_column / caption_column in the dataset's config to map other names)"
        )
    if table.num_rows == 0:
        raise ConfigError(f"URL list {path}: the table has no rows")
    urls = _as_text(table.column(url_column), url=True)
    captions = pc.fill_null(_as_text(table.column(caption_column), url=False), "")
    return pa.table({"url": urls, "caption": captions})


def _read_table(data: bytes, fmt: str, path: str, url_column: str, caption_column: str,
                block_size: int | None) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data))
    if fmt in ("csv", "tsv"):
        read_options = pacsv.ReadOptions() if block_size is None else pacsv.ReadOptions(block_size=block_size)
        return pacsv.read_csv(
            io.BytesIO(data),
            read_options=read_options,
            parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
            # bytes, not strings: a CSV with one mis-encoded byte is still read (see _as_text)
            convert_options=pacsv.ConvertOptions(column_types={url_column: pa.binary(), caption_column: pa.binary()}),
        )
    return _read_jsonl(data, path, url_column, caption_column, block_size)


def _read_jsonl(data: bytes, path: str, url_column: str, caption_column: str, block_size: int | None) -> pa.Table:
    """pyarrow's JSON reader; Python's for the rows it refuses (lone surrogates such as "\\ud800")."""
    try:
        read_options = pajson.ReadOptions() if block_size is None else pajson.ReadOptions(block_size=block_size)
        return pajson.read_json(io.BytesIO(data), read_options=read_options)
    except pa.ArrowInvalid as err:
        if "surrogate" not in str(err):
            raise
    columns: dict[str, list[object]] = {url_column: [], caption_column: []}
    for number, line in enumerate(data.decode("utf-8", "surrogateescape").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"URL list {path}: line {number} is not JSON ({err})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"URL list {path}: line {number} is not a JSON object")
        for column, values in columns.items():
            value = row.get(column)
            values.append(_repair_str(value, url=column == url_column) if isinstance(value, str) else value)
    return pa.table({name: pa.array(values) for name, values in columns.items()})


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
