"""Where a run's files live, and how they are written so that an existing file is a complete one.

A manifest part is written under a temporary name in the same folder and renamed into place: a
part that exists is done. That single rule makes every stage resumable per shard.

The output root may be a local folder or an fsspec URL (``s3://bucket/prefix``, ``gs://...``):
every path here is a ``UPath``, which is a plain ``pathlib.Path`` for a local folder. An object
store has no rename, but a PUT is atomic (an object is visible whole or not at all), so remote
files are built in memory or in a local temporary file and uploaded in one request; the same
rule holds: an object that exists is complete. Endpoint and credentials come from the store's
usual environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so Ray workers on other
nodes find the same store with no extra arguments.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

TMP_PREFIX = ".tmp-"
LOCAL_PROTOCOLS = ("", "file", "local")
SIZES_FILE = "sizes.json"  # {"<shard>.tar": n} beside WebDataset shards: open_clip reads it; our completion marker


def shard_name(index: int) -> str:
    """The name of the ``index``-th shard of a folder (downloaded or curated): ``000042``."""
    return f"{index:06d}"


_TAR_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext


def tar_key(member_name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member, as WebDataset groups them: the key is the name up
    to the first dot of its last path part (``dir/000012.jpg`` -> ``dir/000012``, ``jpg``).

    Every reader of our tars uses this one rule, webdataset's ``base_plus_ext`` (its regex, here so
    that a download worker need not import webdataset, and with it torch, to sort a tar).
    """
    match = _TAR_KEY.match(member_name)
    if match is None:
        return member_name, ""
    return match.group(1), match.group(2)


def as_path(location: str | os.PathLike[str]) -> UPath:
    """A local path (made absolute) or an fsspec URL, as one Path-like type."""
    if isinstance(location, UPath) and is_remote(location):
        return location
    text = os.fspath(location)
    if "://" in text and not text.startswith("file://"):
        return UPath(text)
    return UPath(Path(text.removeprefix("file://")).expanduser().absolute())


def is_remote(path: Any) -> bool:
    """Whether ``path`` lives in an object store (or any non-local fsspec filesystem)."""
    return getattr(path, "protocol", "") not in LOCAL_PROTOCOLS


def local_cache_dir(url: str) -> Path:
    """A local folder for what cannot live in an object store (the DuckDB catalog, the report).

    ``$CURATION_CACHE`` (default ``~/.cache/clip-curation``) / a readable name of the URL + a hash.
    """
    base = Path(os.environ.get("CURATION_CACHE", "~/.cache/clip-curation")).expanduser()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url)[-80:].strip("_")
    return base / f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class RunLayout:
    """The folders of one run (one dataset in one output root)."""

    root: UPath  # a local path or an fsspec URL; given as str or Path, made a UPath

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", as_path(self.root))

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    @property
    def local_dir(self) -> Path:
        """Where this run keeps local-only files: the root itself, or a cache for a remote root."""
        return Path(self.root) if not self.remote else local_cache_dir(str(self.root))

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def input_dir(self) -> Path:
        """The run's frozen input: one plan file per URL list, and ``dataset.json`` naming them in order."""
        return self.root / "input"

    @property
    def input_path(self) -> Path:
        """The plan of the run's first URL list (the only one unless more were appended)."""
        return self.input_list_path(0)

    def input_list_path(self, index: int) -> Path:
        """The plan of the ``index``-th URL list of the run (0: the first, 1: the first appended, ...)."""
        return self.input_dir / ("urls.parquet" if index == 0 else f"urls-{index:06d}.parquet")

    @property
    def input_meta_path(self) -> Path:
        return self.input_dir / "dataset.json"

    @property
    def catalog_path(self) -> Path:
        """Always local: DuckDB writes its database file itself (views only, rebuilt each run)."""
        return self.local_dir / "catalog.duckdb"

    @property
    def selections_dir(self) -> Path:
        return self.root / "selections"

    def selection_path(self, policy: str) -> Path:
        return self.selections_dir / f"{policy}.parquet"

    def curated_dir(self, policy: str) -> Path:
        return self.root / "curated" / policy

    @property
    def report_dir(self) -> Path:
        """Local (written by the driver); for a remote root it is also uploaded beside the run."""
        return self.local_dir / "report"

    def stage_dir(self, stage: str) -> Path:
        return self.root / "manifests" / stage

    def part_path(self, stage: str, shard: str) -> Path:
        return self.stage_dir(stage) / f"part-{shard}.parquet"

    def done_shards(self, stage: str) -> set[str]:
        """Shards whose manifest part for ``stage`` exists (and so is complete): one listing."""
        names = list_names(self.stage_dir(stage))
        return {n[len("part-") : -len(".parquet")] for n in names if n.startswith("part-") and n.endswith(".parquet")}

    def stages_present(self) -> list[str]:
        """Stages with at least one manifest part: one listing of ``manifests/`` (recursive on an
        object store, so one paged request instead of one per stage folder)."""
        folder = self.root / "manifests"
        if is_remote(folder):
            fs, key = _fs_path(folder)
            try:
                found = fs.find(key)
            except FileNotFoundError:
                return []
            prefix = key.rstrip("/") + "/"
            stages = set()
            for path in found:
                stage, _, name = path[len(prefix) :].partition("/")
                if "/" not in name and name.startswith("part-") and name.endswith(".parquet"):
                    stages.add(stage)
            return sorted(stages)
        if not folder.is_dir():
            return []
        return sorted(
            entry.name for entry in os.scandir(folder)
            if entry.is_dir() and any(n.startswith("part-") and n.endswith(".parquet") for n in list_names(Path(entry.path)))
        )


def list_names(folder: Path) -> list[str]:
    """Names of the entries of ``folder`` (none when it does not exist): one ``scandir`` locally,
    one (paged) LIST request on an object store, whatever the number of entries."""
    if is_remote(folder):
        fs, key = _fs_path(folder)
        try:
            return [path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(key, detail=False)]
        except FileNotFoundError:
            return []
    try:
        return [entry.name for entry in os.scandir(folder)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def check_writable(root: Path) -> None:
    """Write and delete a small probe under ``root``; raise OSError naming the root if that fails.

    Run before any work, so an unwritable output (a file in the way, a read-only mount, a missing
    bucket, no credentials) is one clear message instead of a failure halfway through.
    """
    probe = root / f"{TMP_PREFIX}write-probe-{uuid.uuid4().hex[:12]}"
    try:
        write_bytes_atomic(b"probe", probe)
        probe.unlink()
    except Exception as err:  # noqa: BLE001 - any backend's error becomes one OSError
        raise OSError(f"output root {root} is not writable: {type(err).__name__}: {err}") from err


def tmp_sibling(path: Path) -> Path:
    """A unique temporary name next to ``path`` (same filesystem, so rename is atomic)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:12]}")


def _fs_path(path: UPath) -> tuple[Any, str]:
    return path.fs, path.path


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Bytes to ``path`` so that a reader sees all of them or no file: rename locally, one PUT remotely."""
    if is_remote(path):
        fs, key = _fs_path(path)
        fs.pipe_file(key, data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def dictionary_columns(schema: pa.Schema) -> list[str] | bool:
    """The columns worth dictionary encoding: all (True) but float16 vectors (clip_score's
    embeddings), whose values hardly repeat, so the dictionary fills up and is dropped: 2137 B a
    384-d pair instead of 1544 without one (DuckDB cannot read float16 BYTE_STREAM_SPLIT)."""
    def vector(t: pa.DataType) -> bool:
        return (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)) and pa.types.is_float16(t.value_type)
    names = [f.name for f in schema if not vector(f.type)]
    return True if len(names) == len(schema) else names


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """A Parquet file (zstd) written whole: temporary name + fsync + rename, or one PUT remotely."""
    options = {"compression": "zstd", "use_dictionary": dictionary_columns(table.schema)}
    if is_remote(path):
        buffer = io.BytesIO()
        pq.write_table(table, buffer, **options)
        write_bytes_atomic(buffer.getvalue(), path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        pq.write_table(table, tmp, **options)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(data: object, path: Path) -> None:
    """JSON written whole (see :func:`write_bytes_atomic`): a marker file that exists is complete."""
    write_bytes_atomic(json.dumps(data, indent=2).encode("utf-8"), path)


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file, or every Parquet file of a folder (hidden temporaries are skipped)."""
    if is_remote(path):
        fs, key = _fs_path(path)
        return pq.read_table(key, columns=columns, filesystem=fs)
    return pq.read_table(path, columns=columns)


def write_row_groups_atomic(groups: Iterable[pa.Table], schema: pa.Schema, path: Path) -> int:
    """A Parquet file (zstd) of one row group per table of ``groups``, written whole (temporary name +
    fsync + rename, or one upload) while only one group is in memory; returns the rows written.

    Row groups are the unit a reader can fetch alone (:func:`read_row_groups`), so a writer that
    makes them match what readers ask for (a shard's rows) lets each read only its own rows.
    """
    if is_remote(path):  # built locally, then uploaded in one request
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".parquet")
        os.close(fd)
        local = Path(name)
    else:
        local = tmp_sibling(Path(path))
        local.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    try:
        with pq.ParquetWriter(local, schema, compression="zstd") as writer:
            for table in groups:
                writer.write_table(table, row_group_size=max(1, table.num_rows))
                rows += table.num_rows
        with open(local, "rb") as f:
            os.fsync(f.fileno())
        move_into_place(local, path)
    finally:
        local.unlink(missing_ok=True)
    return rows


@contextlib.contextmanager
def _parquet_file(path: Path) -> Iterator[pq.ParquetFile]:
    """A Parquet file opened for random access: local, or ranged reads of one object."""
    if is_remote(path):
        fs, key = _fs_path(path)
        with fs.open(key, "rb") as raw:
            yield pq.ParquetFile(raw)
        return
    with pq.ParquetFile(path) as f:
        yield f


def read_schema(path: Path) -> pa.Schema:
    """A Parquet file's Arrow schema, footer metadata included (no data read)."""
    with _parquet_file(path) as f:
        return f.schema_arrow


def read_row_groups(path: Path, groups: Sequence[int], columns: list[str] | None = None) -> pa.Table:
    """Only the given row groups of a Parquet file (its footer and those byte ranges are read)."""
    with _parquet_file(path) as f:
        return f.read_row_groups(list(groups), columns=columns)


def row_group_ranges(path: Path, column: str) -> list[tuple[Any, Any] | None]:
    """(min, max) of ``column`` in each row group of a Parquet file, from its footer alone (no data
    read); None for a group whose statistics are missing."""
    with _parquet_file(path) as f:
        meta = f.metadata
        index = f.schema_arrow.get_field_index(column)
        ranges: list[tuple[Any, Any] | None] = []
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(index).statistics
            ranges.append((stats.min, stats.max) if stats is not None and stats.has_min_max else None)
        return ranges


def read_bytes(location: str | Path) -> bytes:
    """The whole content of a local file or an object (one GET)."""
    with fsspec.open(str(location), "rb") as f:
        return f.read()


def sha256_of(path: Path) -> str:
    with fsspec.open(str(path), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def mtime_ns(path: Path) -> int:
    """Modification time in ns (object stores give seconds: compare with care)."""
    if is_remote(path):
        return int(path.stat().st_mtime * 1e9)
    return Path(path).stat().st_mtime_ns


def move_into_place(src: Path, dst: Path) -> None:
    """Move local file ``src`` to ``dst``: a rename on one filesystem, else one upload, then delete."""
    if is_remote(dst):
        fs, key = _fs_path(dst)
        fs.put_file(str(src), key)
        Path(src).unlink()
        return
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError as err:
        if err.errno != 18:  # EXDEV: a temporary folder on another filesystem
            raise
        tmp = tmp_sibling(dst)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        Path(src).unlink()


def make_dirs(path: Path) -> None:
    """``mkdir -p`` locally; nothing for an object store (prefixes exist when objects do)."""
    if not is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def remove_tree(path: Path) -> None:
    """Delete a folder (local) or every object under a prefix (remote)."""
    if is_remote(path):
        fs, key = _fs_path(path)
        if fs.exists(key):
            fs.rm(key, recursive=True)
        return
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(folder: Path) -> int:
    """Delete what a killed run left under temporary names; returns how many entries went.

    Only local folders have temporaries: nothing is ever written to an object store under a
    temporary name.
    """
    if is_remote(folder) or not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.glob(f"{TMP_PREFIX}*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed
