"""Reading a user's URL list (parquet, csv/tsv, jsonl) from a path or an fsspec URL.

Every way a list can be wrong ends in one ConfigError that names the file and the problem, before
any work starts: a curation run on a mis-read list is worse than no run.
"""

from __future__ import annotations

import io

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.config import ConfigError

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
        if fmt == "parquet":
            table = pq.read_table(io.BytesIO(data))
        elif fmt in ("csv", "tsv"):
            table = pacsv.read_csv(
                io.BytesIO(data),
                parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                convert_options=pacsv.ConvertOptions(
                    column_types={url_column: pa.string(), caption_column: pa.string()}
                ),
            )
        else:
            table = pajson.read_json(io.BytesIO(data))
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
    urls = table.column(url_column).cast(pa.string())
    captions = table.column(caption_column)
    if not (pa.types.is_string(captions.type) or pa.types.is_large_string(captions.type)):
        captions = captions.cast(pa.string())
    captions = pc.fill_null(captions.cast(pa.string()), "")
    return pa.table({"url": urls, "caption": captions})
