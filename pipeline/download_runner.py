"""Runs the download stage on Ray: plan shards, skip the done ones, commit each shard atomically.

A shard is downloaded by one Ray task (``pipeline.shard_tasks``: declared CPUs, retried if its
worker dies, a failed shard recorded while the others go on) into a private temporary folder;
the task then renames the tar and img2dataset's sidecar files into ``shards/`` and hands the
shard's manifest back to the driver, which writes it as the part last.
The part is the completion marker: a killed run leaves at most temporaries and a tar without a
part, and the rerun redoes exactly those shards.

Why the driver writes the part: when the driver is killed, a task already running on a worker
can outlive it by a moment. For the embedded dataset the HTTP server died with the driver, so
such a task would see "connection reset" on good URLs and, had it written the part itself, mark
those samples failed for good. A part only the live driver writes cannot record its own death.

The plan (``input/``) is written once per URL list and never rewritten: a second list into the
same output is appended (its new uids only, in new shards; see :class:`InputList`). The driver
holds no row of it: shard names and sizes follow from ``dataset.json``, and each task reads its
own shard's rows from the plan's row groups (:class:`PlannedShard`), so a million-row run costs
the driver what a thousand-row run does, once planned.

A retry (``curate --retry REASONS``) is planned the same way, as a list of its own: the rows whose
latest attempt failed with one of the reasons, in new shards after every earlier one, each row
with its attempt number (:func:`plan_retry`). The earlier attempt's row stays in its part, as
history; the catalog shows each uid's latest attempt.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import hashlib
import json
import re
import shutil
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.errors import ConfigError
from manifests.catalog import bound_memory, connect, download_relations, sql_string
from manifests.schemas import INPUT, RETRY_INPUT, SOURCE_COLUMNS_KEY, SOURCE_UID
from manifests.store import (
    RunLayout,
    make_dirs,
    move_into_place,
    read_bytes,
    read_row_groups,
    read_schema,
    read_table,
    remove_stale_temporaries,
    row_group_ranges,
    shard_name,
    tar_key,
    write_json_atomic,
    write_row_groups_atomic,
    write_table_atomic,
)
from pipeline.shard_tasks import STALL_SECONDS, ShardTask, run_shard_tasks
from sources import DatasetSource, ground_truth_path
from sources.pool_embeddings import EMBEDDINGS_KEY, IMAGE_EMBEDDING, TEXT_EMBEDDING
from stages.base import ShardOutput
from stages.download import ERROR_KINDS, DownloadConfig, DownloadStage
from stages.reshard import TAR_MODE, TAR_MTIME, TAR_OWNER


def make_uid(url: str, caption: str) -> str:
    """Stable, content-derived sample id: first 128 bits of sha256(url, caption), hex."""
    return hashlib.sha256(f"{url}\n{caption}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


RETRY_KIND = "retry"  # the fingerprint prefix of a retry's entry in dataset.json
UID_BATCH_ROWS = 65_536  # rows hashed per batch: the Python strings of one batch are alive at a time
PLAN_GROUP_ROWS = 8_192  # a plan file's row groups hold whole shards and at least this many rows


def uids_of(urls: pa.Table) -> pa.ChunkedArray:
    """:func:`make_uid` of every row (url, caption), in order, as Arrow strings (36 bytes a row)."""
    chunks = []
    for batch in urls.select(["url", "caption"]).to_batches(max_chunksize=UID_BATCH_ROWS):
        pairs = zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
        chunks.append(pa.array([make_uid(url or "", caption or "") for url, caption in pairs], pa.string()))
    return pa.chunked_array(chunks, pa.string())


def select_new_rows(uids: pa.ChunkedArray, known: pa.Array | None) -> tuple[np.ndarray, int, int]:
    """The rows to plan, in order: the first row of each uid the run does not hold yet.

    Returns (their indices, rows repeating an earlier row of the list, rows whose uid ``known``
    holds). Both tests are hash tables in Arrow, not Python sets: memory stays at a few bytes a row.
    """
    n = len(uids)
    if known is not None and len(known):
        present = pc.is_in(uids, value_set=known).to_numpy(zero_copy_only=False)
    else:
        present = np.zeros(n, dtype=bool)
    rows = pa.table({"uid": uids, "row": pa.array(np.arange(n, dtype=np.int64))})
    firsts = rows.group_by("uid").aggregate([("row", "min")]).column("row_min").to_numpy()
    first = np.zeros(n, dtype=bool)
    first[firsts] = True
    keep = first & ~present
    return np.flatnonzero(keep), int(np.count_nonzero(~first & ~present)), int(np.count_nonzero(present))


def plan_schema(urls: pa.Table) -> pa.Schema:
    """The plan's schema: INPUT, then the list's source columns as typed (named in the footer, so
    the catalog's ``source`` view finds the plans that have any without reading a row), then the
    pool's embeddings when it shipped them (their origin in the footer: the CLIP step imports them)."""
    extra = [urls.schema.field(n) for n in urls.column_names[2:]]
    embedded = (IMAGE_EMBEDDING, TEXT_EMBEDDING)
    meta = {SOURCE_COLUMNS_KEY: json.dumps([f.name for f in extra if f.name not in embedded])}
    origin = (urls.schema.metadata or {}).get(EMBEDDINGS_KEY.encode())
    if origin:
        meta[EMBEDDINGS_KEY] = origin.decode()
    return pa.schema([*INPUT, *extra], metadata=meta)


def plan_row_groups(
    urls: pa.Table, uids: pa.ChunkedArray, rows: np.ndarray, shard_size: int, first_shard: int, first_input_row: int
) -> Iterator[pa.Table]:
    """The plan (:func:`plan_schema`) of the selected ``rows``, shard by shard in input order, as row
    groups of whole shards: a download task reads its shard's group, not the plan."""
    per_group = shard_size * max(1, -(-PLAN_GROUP_ROWS // shard_size))
    schema = plan_schema(urls)
    columns = urls.append_column("uid", uids)
    for start in range(0, len(rows), per_group):
        picked = rows[start : start + per_group]
        low = int(picked[0])  # rows are increasing: take from the slice they span, not the whole list
        group = columns.slice(low, int(picked[-1]) - low + 1).take(pa.array(picked - low, pa.int64()))
        shard_index = first_shard + np.arange(start, start + len(picked)) // shard_size
        indices, counts = np.unique(shard_index, return_counts=True)
        names = np.repeat(np.array([shard_name(int(i)) for i in indices]), counts)
        yield pa.table(
            {
                "uid": group.column("uid"),
                "url": group.column("url"),
                "caption": group.column("caption"),
                "shard": pa.array(names, pa.string()),
                "input_row": pa.array(first_input_row + picked, pa.int64()),
                **{name: group.column(name) for name in urls.column_names[2:]},
            },
            schema=schema,
        )


def drop_repeated_source_uids(urls: pa.Table, rows: np.ndarray, known: pa.Array | None) -> tuple[np.ndarray, int]:
    """``rows`` without those whose ``source_uid`` an earlier row (of the list or of the run) has:
    the pool's id names one sample, and exports key by it. Returns (rows kept, rows dropped)."""
    if SOURCE_UID not in urls.column_names or not len(rows):
        return rows, 0
    ids = urls.column(SOURCE_UID).take(pa.array(rows, pa.int64()))
    position = pa.array(np.arange(len(rows), dtype=np.int64))
    firsts = pa.table({"id": ids, "at": position}).group_by("id").aggregate([("at", "min")]).column("at_min")
    first = np.zeros(len(rows), dtype=bool)
    first[firsts.to_numpy()] = True
    first |= pc.is_null(ids).to_numpy(zero_copy_only=False)  # no id: nothing to repeat
    if known is not None and len(known):
        first &= ~pc.fill_null(pc.is_in(ids, value_set=known), False).to_numpy(zero_copy_only=False)
    return rows[first], int(np.count_nonzero(~first))


@dataclass(frozen=True)
class InputList:
    """One URL list of a run, as ``input/dataset.json`` records it (in the order they came).

    Its samples are the uids no earlier list of the run planned, in shards numbered after the
    earlier lists' shards: appending never touches a planned shard, so a finished shard stays
    finished. Shard sizes and counts follow from these numbers alone (every shard full but the
    last), so the driver knows the run's shards without reading a row of the plan.
    """

    file: str | None  # its plan in input/ (None when it added no sample)
    dataset: str
    fingerprint: str
    rows: int  # rows of the list
    samples: int  # distinct new uids, planned
    duplicates_dropped: int  # rows repeating an earlier row of the same list
    already_present: int  # rows whose uid an earlier list of the run holds: not fetched again
    first_shard: int
    shards: int
    shard_size: int
    first_input_row: int  # input_row of its first row: the rows of the lists before it
    reasons: tuple[str, ...] = ()  # a retry's reasons, as given to --retry (empty for a list)
    source_uid_repeats: int = 0  # rows whose source_uid an earlier row has (the list's or the run's): planned once

    @property
    def kind(self) -> str:
        """What made the input: "embedded", "url_list" or "retry" (the fingerprint's prefix)."""
        return self.fingerprint.split(":", 1)[0]

    @property
    def is_retry(self) -> bool:
        """A retry's failed rows, planned again (:func:`plan_retry`), not a list of new samples."""
        return self.kind == RETRY_KIND

    @classmethod
    def from_json(cls, entry: dict) -> "InputList":
        return cls(**{**entry, "reasons": tuple(entry.get("reasons", ()))})

    def to_json(self) -> dict:
        entry = dataclasses.asdict(self)
        if not self.reasons:
            del entry["reasons"]  # a list's entry reads as before retries existed
        if not self.source_uid_repeats:
            del entry["source_uid_repeats"]
        return entry

    def shard_list(self) -> list[str]:
        return [shard_name(self.first_shard + i) for i in range(self.shards)]

    def shard_samples(self, index: int) -> int:
        """Samples in this list's ``index``-th shard."""
        return min(self.shard_size, self.samples - index * self.shard_size)

    @classmethod
    def from_legacy(cls, meta: dict) -> "InputList":
        """The one list of a ``dataset.json`` written before lists could be appended."""
        samples, size, duplicates = int(meta["samples"]), int(meta["shard_size"]), int(meta.get("duplicates_dropped", 0))
        return cls(file="urls.parquet", dataset=meta["dataset"], fingerprint=meta["fingerprint"],
                   rows=samples + duplicates, samples=samples, duplicates_dropped=duplicates, already_present=0,
                   first_shard=0, shards=-(-samples // size), shard_size=size, first_input_row=0)


@dataclass(frozen=True)
class RunInputs:
    """Every list of a run, and the one this command named."""

    lists: tuple[InputList, ...]
    current: InputList
    planned_now: bool  # the current list was planned by this command (first run, or appended now)

    @property
    def samples(self) -> int:
        """Distinct samples: a retry plans known samples again."""
        return sum(i.samples for i in self.lists if not i.is_retry)


@dataclass(frozen=True)
class PlannedShard:
    """A shard to download and where its rows are: the task reads them itself, so the driver
    holds no row of the plan and the object store carries none."""

    shard: str
    samples: int
    plan: str  # plan file name in input/
    row_groups: tuple[int, ...]  # the plan's row groups holding the shard's rows

    def read(self, layout: RunLayout) -> pa.Table:
        rows = read_row_groups(layout.input_dir / self.plan, self.row_groups)
        rows = rows.select([n for n in rows.column_names if n in RETRY_INPUT.names])  # not the source columns
        return rows.filter(pc.equal(rows.column("shard"), self.shard))

    def read_columns(self, layout: RunLayout, columns: list[str]) -> pa.Table:
        """``columns`` of the shard's rows (``shard`` among them), e.g. the pool's embeddings."""
        rows = read_row_groups(layout.input_dir / self.plan, self.row_groups, columns=columns)
        return rows.filter(pc.equal(rows.column("shard"), self.shard))


def plan_locations(layout: RunLayout, entry: InputList, wanted: set[str]) -> list[PlannedShard]:
    """The ``wanted`` shards of one list with the row groups that hold them, from its plan's
    footer (statistics of the shard column; a group without them is read by every shard)."""
    names = [n for n in entry.shard_list() if n in wanted]
    if not names or entry.file is None:
        return []
    ranges = row_group_ranges(layout.input_dir / entry.file, "shard")
    everywhere = [g for g, r in enumerate(ranges) if r is None]
    bounded = [(r[1], r[0], g) for g, r in enumerate(ranges) if r is not None]  # plans are in shard order
    maxima = [b[0] for b in bounded]
    out = []
    for name in names:
        groups = set(everywhere)
        for high, low, g in bounded[bisect.bisect_left(maxima, name) :]:
            if low > name:
                break
            groups.add(g)
        index = int(name) - entry.first_shard
        out.append(PlannedShard(name, entry.shard_samples(index), entry.file, tuple(sorted(groups))))
    return out


@dataclass
class DownloadReport:
    shards_total: int = 0
    shards_already_done: int = 0
    shards_run: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    samples_run: int = 0
    duplicates_dropped: int = 0  # of the list this command named
    seconds: float = 0.0
    lists: int = 1  # URL lists the output holds (more than one once a list was appended)
    current: InputList | None = None  # the list this command named
    planned_now: bool = False
    retry: "RetryOutcome | None" = None  # what ``--retry`` planned (None: not asked)

    @property
    def already_present(self) -> int:
        """Rows of this command's list whose uid the run held already (not fetched again)."""
        return self.current.already_present if self.current is not None else 0

    def input_lines(self) -> list[str]:
        """What the run's input is, for the summary: appended lists, known and repeated rows."""
        lines = []
        entry = self.current
        if entry is not None and self.lists > 1:
            when = "appended now" if self.planned_now else "planned before"
            where = (f"in shard(s) {shard_name(entry.first_shard)}..{shard_name(entry.first_shard + entry.shards - 1)}"
                     if entry.shards else "(no shard of its own)")
            lines.append(f"{self.lists} URL lists in this output; this list ({entry.rows} rows) was {when}: "
                         f"{entry.samples} sample(s) of its own {where}")
        if entry is not None and entry.already_present:
            lines.append(f"{entry.already_present} row(s) of this list already in the run (an earlier list's): "
                         "not fetched again")
        if self.duplicates_dropped:
            lines.append(f"{self.duplicates_dropped} repeated (url, caption) rows of the input planned once")
        if entry is not None and entry.source_uid_repeats:
            lines.append(f"{entry.source_uid_repeats} row(s) repeating an earlier row's source_uid (the list's uid "
                         "column) planned once: the first row of each id is kept")
        if self.retry is not None:
            lines += self.retry.lines()
        return lines


def canonical_tar(src: Path, dst: Path, expected_uids: Collection[str]) -> None:
    """Rewrite img2dataset's tar with members in key order and fixed header fields, after checking
    that it holds exactly the samples its manifest calls ok.

    img2dataset writes samples in the order its threads finish, with the current time in every
    header, so two downloads of the same URLs give different tars. Sorted and with fixed headers,
    a shard is a function of its samples: reruns, resumed runs and cluster runs write identical
    bytes, and so does everything made from them (the curated shards). Members are copied one at a
    time (random access into the local tar), so memory stays at one member.

    The check is the last guard before the shard is committed: a local write that failed part-way
    (a full disk: the buffered file can keep half a member and write it again later) leaves a tar
    that still parses but holds a sample twice and others not at all. It raises ``OSError`` then.
    """
    with tarfile.open(src, "r:") as source:
        members = [m for m in source.getmembers() if m.isfile()]
        members.sort(key=lambda m: (tar_key(m.name)[0], m.name))
        _check_tar_members(source, members, expected_uids, src.name)
        with open(dst, "wb") as out, tarfile.open(fileobj=out, mode="w:", format=tarfile.USTAR_FORMAT) as target:
            for member in members:
                info = tarfile.TarInfo(member.name)
                info.size, info.mtime, info.mode = member.size, TAR_MTIME, TAR_MODE  # the curated shards' header fields
                info.uid = info.gid = 0
                info.uname = info.gname = TAR_OWNER
                target.addfile(info, source.extractfile(member))


def _check_tar_members(
    source: tarfile.TarFile, members: list[tarfile.TarInfo], expected_uids: Collection[str], name: str
) -> None:
    """Every member name once, every key with its image, caption and json, and the jsons' uids
    exactly ``expected_uids``; else ``OSError`` naming the first difference."""
    names = [m.name for m in members]
    if len(names) != len(set(names)):
        repeated = sorted(n for n, count in Counter(names).items() if count > 1)
        raise OSError(errno.EIO, f"{name}: members written twice ({', '.join(repeated[:3])}): a local write failed part-way")
    by_key: dict[str, set[str]] = {}
    uids: list[str] = []
    for member in members:
        key, ext = tar_key(member.name)
        by_key.setdefault(key, set()).add(ext)
        if ext == "json":
            try:
                uids.append(json.loads(source.extractfile(member).read())["uid"])
            except (ValueError, KeyError, TypeError) as err:
                raise OSError(errno.EIO, f"{name}: {member.name} is not whole ({err}): a local write failed part-way") from err
    partial = sorted(key for key, exts in by_key.items() if not {"jpg", "txt", "json"} <= exts)
    expected = set(expected_uids)
    if partial or len(uids) != len(set(uids)) or set(uids) != expected:
        missing, extra = len(expected - set(uids)), len(uids) - len(set(uids) & expected)
        raise OSError(
            errno.EIO,
            f"{name}: holds {len(uids)} samples, its manifest {len(expected)} ok ({missing} missing, {extra} "
            f"repeated or unknown, {len(partial)} keys without image, caption and json): a local write failed part-way",
        )


LOCAL_WRITE_FAILURES = ("no space left on device", "file too large", "disk quota exceeded", "read-only file system")


def _refuse_local_write_failures(manifest: pa.Table, shard: str) -> None:
    """img2dataset records a sample it could not write to its tar as that sample's failure; a full
    disk is not the URL's fault, so the shard fails whole instead (and the rerun retries it)."""
    for error in manifest.column("error").to_pylist():
        if error and any(needle in error.lower() for needle in LOCAL_WRITE_FAILURES):
            raise OSError(28, f"shard {shard}: a sample could not be written locally ({error[:200]}); not committed")


def _download_shard_task(config: DownloadConfig, planned: PlannedShard, root: str) -> ShardOutput:
    """Body of one Ray task: read the shard's rows from the plan, download, move the files into
    place, return the manifest and where the files went.

    The caller (the driver) writes the manifest as the shard's part: see the module docstring.
    """
    layout = RunLayout(root)
    shard = planned.shard
    rows = planned.read(layout)
    if layout.remote:  # img2dataset writes local files; they are uploaded whole when complete
        work = Path(tempfile.mkdtemp(prefix=f"curation-{shard}-"))
    else:  # same filesystem as the shards: the move is a rename
        work = layout.shards_dir / f".tmp-{shard}-{uuid.uuid4().hex[:8]}"
    try:
        result = DownloadStage(config).process_shard(shard, rows, work)
        _refuse_local_write_failures(result.manifest, shard)
        canonical = work / f"canonical-{shard}.tar"
        ok = pc.equal(result.manifest.column("status"), "ok")
        canonical_tar(result.files["tar"], canonical, result.manifest.column("uid").filter(ok).to_pylist())
        committed = {role: layout.shards_dir / path.name for role, path in result.files.items()}
        move_into_place(canonical, committed["tar"])
        move_into_place(result.files["parquet"], committed["parquet"])
        move_into_place(result.files["stats"], committed["stats"])
        return ShardOutput(result.manifest, files=committed, bytes_written=result.bytes_written)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_input_lists(layout: RunLayout) -> tuple[InputList, ...]:
    """The lists recorded in ``input/dataset.json`` (none before the first plan): one read."""
    try:
        meta = json.loads(read_bytes(layout.input_meta_path))
    except FileNotFoundError:
        return ()
    if "inputs" not in meta:
        return (InputList.from_legacy(meta),)
    return tuple(InputList.from_json(entry) for entry in meta["inputs"])


def _write_input_lists(layout: RunLayout, lists: tuple[InputList, ...]) -> None:
    """``dataset.json``: the lists (and retries) in order, and the first list's keys and the totals as before."""
    first = lists[0]
    meta = {
        "dataset": first.dataset,
        "fingerprint": first.fingerprint,
        "shard_size": first.shard_size,
        "samples": sum(i.samples for i in lists if not i.is_retry),
        "duplicates_dropped": sum(i.duplicates_dropped for i in lists),
        "already_present": sum(i.already_present for i in lists),
        "inputs": [i.to_json() for i in lists],
    }
    write_json_atomic(meta, layout.input_meta_path)


def _known_uids(layout: RunLayout, lists: tuple[InputList, ...], column: str = "uid") -> pa.Array | None:
    """Every uid (or ``source_uid``) the run has planned, from each plan file, for an appended list."""
    files = [layout.input_dir / i.file for i in lists if i.file and not i.is_retry]
    if column != "uid":
        files = [f for f in files if column in read_schema(f).names]
    columns = [read_table(f, columns=[column]).column(column) for f in files]
    if not columns:
        return None
    return pa.chunked_array([c for col in columns for c in col.chunks], pa.string()).combine_chunks()


def _plan_list(
    source: DatasetSource, layout: RunLayout, index: int, shard_size: int, earlier: tuple[InputList, ...]
) -> InputList:
    """Plan the source's list as the run's ``index``-th: its uids that ``earlier`` lists do not hold,
    in new shards after theirs; the plan file is written whole (dataset.json, written after it by
    the caller, is what makes it part of the run)."""
    urls = source.load_urls()
    uids = uids_of(urls)
    rows, duplicates, present = select_new_rows(uids, _known_uids(layout, earlier))
    rows, repeats = drop_repeated_source_uids(urls, rows, _known_uids(layout, earlier, SOURCE_UID)
                                              if SOURCE_UID in urls.column_names else None)
    first_shard = next_shard(earlier)
    first_input_row = sum(i.rows for i in earlier if not i.is_retry)  # a retry's rows are earlier lists' rows
    path = layout.input_list_path(index)
    if len(rows):
        write_row_groups_atomic(plan_row_groups(urls, uids, rows, shard_size, first_shard, first_input_row),
                                plan_schema(urls), path)
    return InputList(
        file=path.name if len(rows) else None,
        dataset=source.config.name,
        fingerprint=source.fingerprint(),
        rows=urls.num_rows,
        samples=len(rows),
        duplicates_dropped=duplicates,
        already_present=present,
        first_shard=first_shard,
        shards=-(-len(rows) // shard_size),
        shard_size=shard_size,
        first_input_row=first_input_row,
        source_uid_repeats=repeats,
    )


def next_shard(lists: tuple[InputList, ...]) -> int:
    """The number of the first shard after every planned one (a new list's or a retry's first)."""
    return max((i.first_shard + i.shards for i in lists), default=0)


def _check_appendable(layout: RunLayout, lists: tuple[InputList, ...], source: DatasetSource) -> None:
    """Only a URL list can be appended, and only to a run of URL lists."""
    first, kind = lists[0], source.fingerprint().split(":", 1)[0]
    if first.kind != kind:
        raise ConfigError(
            f"output {layout.root} holds a run of {'the embedded dataset' if first.kind == 'embedded' else 'URL lists'} "
            f"({first.dataset}); {'the embedded dataset' if kind == 'embedded' else 'a URL list'} cannot be added to it: "
            "choose another OUTPUT/--output"
        )
    if kind != "url_list":
        raise ConfigError(
            f"output {layout.root} already holds a run of another input ({first.dataset}, {first.fingerprint}); "
            "choose another OUTPUT/--output or delete that folder"
        )


def freeze_input(source: DatasetSource, layout: RunLayout, shard_size: int) -> RunInputs:
    """The run's plan: made once per URL list and stored, then reused so that reruns see the same shards.

    A list the output already holds (this command's, or any list appended since) plans nothing;
    another URL list is appended (see :class:`InputList`). The driver keeps no row: the list is
    released once planned, and the plan stays on disk for the download tasks to read.
    """
    try:
        lists = read_input_lists(layout)
        for entry in lists:
            if entry.fingerprint == source.fingerprint():
                return RunInputs(lists, entry, planned_now=False)
        if lists:
            _check_appendable(layout, lists, source)
        entry = _plan_list(source, layout, len(lists), shard_size, lists)
        if not lists:
            gt = source.ground_truth()
            if gt is not None:
                write_table_atomic(gt, ground_truth_path(layout.root))
        lists += (entry,)
        _write_input_lists(layout, lists)
        return RunInputs(lists, entry, planned_now=True)
    finally:
        source.release_urls()
        pa.default_memory_pool().release_unused()  # hand the list's pages back to the OS, not just to the pool


# -- retry by reason (``curate --retry``) ---------------------------------------------------------

ALL_TRANSIENT = "all-transient"
# Failures that say nothing about the URL, only about the moment: the network, the server's load,
# a resolver that was busy. The same request later may well succeed. Never: what the bytes were
# (not_an_image, corrupt_image, bombs, sizes), what the server said of the URL (404, 403, 410, ...),
# and what the guard refused (blocked_address, invalid_url, unsupported_scheme).
TRANSIENT_ERROR_KINDS: tuple[str, ...] = (
    "timeout", "deadline_exceeded", "connection_error", "connection_refused", "dns_error", "truncated_body",
    "dropped", "http_408", "http_425", "http_429", "http_5xx",
)
_HTTP_STATUS = re.compile(r"http_([1-5])(\d\d|xx)")  # http_503, or a class: http_5xx


@dataclass(frozen=True)
class RetryReasons:
    """The failure reasons a retry re-fetches: ``error_kind`` names as the manifest writes them
    (``timeout``, ``http_503``), a class of HTTP statuses (``http_5xx``), or ``all-transient``."""

    given: tuple[str, ...]  # as written on the command line, for dataset.json and the summary

    @classmethod
    def parse(cls, text: str) -> "RetryReasons":
        """``--retry``'s value; an unknown name is one ConfigError listing the known ones."""
        given = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
        unknown = [n for n in given if not (n == ALL_TRANSIENT or n in ERROR_KINDS or _HTTP_STATUS.fullmatch(n))]
        if unknown or not given:
            what = (f"--retry names {', '.join(repr(n) for n in unknown)}, which is not a download failure reason"
                    if unknown else "--retry needs at least one failure reason")
            raise ConfigError(f"{what}; known: {ALL_TRANSIENT} ({', '.join(TRANSIENT_ERROR_KINDS)}), http_NNN (one "
                              f"HTTP status, e.g. http_503), http_4xx, http_5xx, {', '.join(ERROR_KINDS)}")
        return cls(given)

    def names(self) -> tuple[str, ...]:
        """The reasons with ``all-transient`` spelled out."""
        out = [n for g in self.given for n in (TRANSIENT_ERROR_KINDS if g == ALL_TRANSIENT else (g,))]
        return tuple(dict.fromkeys(out))

    def matches(self, kind: str | None) -> bool:
        """Whether a failure of ``kind`` is to be retried."""
        if kind is None:
            return False
        for name in self.names():
            if name == kind:
                return True
            wanted, got = _HTTP_STATUS.fullmatch(name), _HTTP_STATUS.fullmatch(kind)
            if wanted and got and wanted.group(2) == "xx" and wanted.group(1) == got.group(1):
                return True
        return False

    def __str__(self) -> str:
        return ", ".join(self.given)


@dataclass(frozen=True)
class RetryOutcome:
    """What a ``--retry`` planned, for the summary."""

    reasons: RetryReasons
    entry: InputList | None  # the retry's list (None: nothing to retry)
    by_kind: dict[str, int]  # rows re-planned, by the reason their latest attempt failed
    unfinished: int  # matching rows already in an earlier retry's shards not downloaded yet

    def lines(self) -> list[str]:
        lines = []
        if self.entry is None:
            lines.append(f"retry ({self.reasons}): no sample's latest attempt failed with these reasons: "
                         "nothing to retry")
        else:
            first, last = shard_name(self.entry.first_shard), shard_name(self.entry.first_shard + self.entry.shards - 1)
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.by_kind.items()))
            lines.append(f"retry ({self.reasons}): {self.entry.samples} sample(s) whose latest attempt failed so "
                         f"({kinds}) re-fetched in new shard(s) {first}..{last}")
        if self.unfinished:
            lines.append(f"{self.unfinished} failed sample(s) already planned for retry in shards not downloaded "
                         "yet (an interrupted retry): those shards are fetched, the samples are not planned again")
        return lines


def _retry_rows(layout: RunLayout, lists: tuple[InputList, ...], reasons: RetryReasons,
                missing: list[str]) -> tuple[pa.Table, dict[str, int], int]:
    """The rows to fetch again, in input order: uid, url, caption, input_row (from the plans) and
    the attempt they will be (from the manifests). A row whose latest attempt sits in a planned
    shard not downloaded yet (an earlier, unfinished retry) is left to that shard.

    Returns (the rows, their count by error_kind, rows left to unfinished shards).
    """
    empty = pa.table({n: pa.array([], f.type) for n, f in zip(RETRY_INPUT.names, RETRY_INPUT) if n != "shard"})
    if not layout.done_shards("download"):
        return empty, {}, 0
    con = connect(Path(":memory:"), layout, read_only=False)
    try:
        bound_memory(con, layout)
        _, latest = download_relations(con, layout)
        con.execute(f"create temp table failed as select uid, error_kind, attempt from {latest} where status <> 'ok'")
        kinds = [k for (k,) in con.execute("select distinct error_kind from failed").fetchall() if reasons.matches(k)]
        if not kinds:
            return empty, {}, 0
        con.execute("create temp table wanted as select * from failed where error_kind in "
                    f"({', '.join(sql_string(k) for k in kinds)})")
        unfinished = 0
        planned = [layout.input_dir / i.file for i in lists if i.file and set(i.shard_list()) & set(missing)]
        if planned:
            plans = f"read_parquet([{', '.join(sql_string(p) for p in planned)}], union_by_name=true)"
            shards = ", ".join(sql_string(m) for m in missing)
            in_unfinished = f"select uid from {plans} where shard in ({shards})"
            unfinished = con.execute(f"delete from wanted where uid in ({in_unfinished})").fetchone()[0]
        sources = ", ".join(sql_string(layout.input_dir / i.file) for i in lists if i.file and not i.is_retry)
        rows = con.execute(
            f"select p.uid, p.url, p.caption, p.input_row, (w.attempt + 1)::integer as attempt, w.error_kind "
            f"from wanted w join read_parquet([{sources}], union_by_name=true) p using (uid) order by p.input_row"
        ).to_arrow_table()
    finally:
        con.close()
    counts = rows.group_by("error_kind").aggregate([("uid", "count")])
    by_kind = dict(zip(counts.column("error_kind").to_pylist(), counts.column("uid_count").to_pylist()))
    return rows.drop_columns(["error_kind"]), by_kind, int(unfinished)


def _retry_row_groups(rows: pa.Table, shard_size: int, first_shard: int) -> Iterator[pa.Table]:
    """The retry's plan (schema RETRY_INPUT), in row groups of whole shards like a list's plan."""
    per_group = shard_size * max(1, -(-PLAN_GROUP_ROWS // shard_size))
    for start in range(0, rows.num_rows, per_group):
        group = rows.slice(start, per_group)
        index = first_shard + np.arange(start, start + group.num_rows) // shard_size
        names = pa.array([shard_name(int(i)) for i in index], pa.string())
        yield pa.table({"uid": group.column("uid"), "url": group.column("url"), "caption": group.column("caption"),
                        "shard": names, "input_row": group.column("input_row"), "attempt": group.column("attempt")},
                       schema=RETRY_INPUT)


def plan_retry(layout: RunLayout, inputs: RunInputs, reasons: RetryReasons, shard_size: int,
               missing: list[str]) -> tuple[RunInputs, RetryOutcome]:
    """Plan the rows whose latest attempt failed with one of ``reasons`` again, as a list of its own
    (kind "retry" in dataset.json, with the reasons): new shards numbered after every planned one,
    so no finished shard is touched, and every later step sees new shards to do, as after an
    appended list. ``missing``: the planned shards not downloaded yet."""
    rows, by_kind, unfinished = _retry_rows(layout, inputs.lists, reasons, missing)
    if not rows.num_rows:
        return inputs, RetryOutcome(reasons, None, {}, unfinished)
    first_shard = next_shard(inputs.lists)
    path = layout.input_list_path(len(inputs.lists))
    write_row_groups_atomic(_retry_row_groups(rows, shard_size, first_shard), RETRY_INPUT, path)
    entry = InputList(
        file=path.name, dataset=inputs.lists[0].dataset,
        fingerprint=f"{RETRY_KIND}:{shard_name(first_shard)}:{','.join(reasons.given)}",
        rows=rows.num_rows, samples=rows.num_rows, duplicates_dropped=0, already_present=0,
        first_shard=first_shard, shards=-(-rows.num_rows // shard_size), shard_size=shard_size, first_input_row=0,
        reasons=reasons.given,
    )
    lists = inputs.lists + (entry,)
    _write_input_lists(layout, lists)  # the retry is part of the run from here: a rerun downloads its shards
    return RunInputs(lists, inputs.current, inputs.planned_now), RetryOutcome(reasons, entry, by_kind, unfinished)


@dataclass
class DownloadPlan:
    inputs: RunInputs
    todo: list[str]  # shards to download, in order
    shards: list[PlannedShard]  # the same shards, with where their rows are
    report: DownloadReport


def plan_download(
    source: DatasetSource, layout: RunLayout, config: DownloadConfig, retry: str | None = None
) -> DownloadPlan:
    """Freeze the input and find the shards that still need downloading (no Ray needed); with
    ``retry`` (``--retry``'s comma-separated reasons), first plan the failed rows again (:func:`plan_retry`).

    Costs no read of the plan's rows: the shards follow from dataset.json, the done ones from one
    listing of the download manifests, and where the missing ones are from their plans' footers.
    """
    reasons = RetryReasons.parse(retry) if retry is not None else None  # a bad name fails before any write
    make_dirs(layout.shards_dir)
    remove_stale_temporaries(layout.shards_dir)
    inputs = freeze_input(source, layout, config.shard_size)
    done = layout.done_shards("download")
    retried = None
    if reasons is not None:
        unfinished = sorted(n for i in inputs.lists for n in i.shard_list() if n not in done)
        inputs, retried = plan_retry(layout, inputs, reasons, config.shard_size, unfinished)
    total = sum(i.shards for i in inputs.lists)
    missing = {n for i in inputs.lists for n in i.shard_list() if n not in done}
    shards = [s for i in inputs.lists for s in plan_locations(layout, i, missing)]
    report = DownloadReport(
        shards_total=total,
        shards_already_done=total - len(shards),
        duplicates_dropped=inputs.current.duplicates_dropped,
        lists=sum(1 for i in inputs.lists if not i.is_retry),
        current=inputs.current,
        planned_now=inputs.planned_now,
        retry=retried,
    )
    return DownloadPlan(inputs=inputs, todo=[s.shard for s in shards], shards=shards, report=report)


def run_download(
    source: DatasetSource, layout: RunLayout, config: DownloadConfig, work: DownloadPlan, progress: bool = True,
    stall_seconds: float = STALL_SECONDS,
) -> DownloadReport:
    """Download every shard of ``work.todo`` on Ray (which must be up), one task per shard; no
    shard finishing for ``stall_seconds`` ends the run (``core.errors.Stalled``)."""
    started = time.monotonic()
    report = work.report
    if not work.shards:
        return report

    def commit(shard: str, output: ShardOutput) -> None:
        """On the driver: the part, last (see the module docstring)."""
        write_table_atomic(output.manifest, layout.part_path("download", shard))
        report.shards_run += 1
        report.samples_run += output.manifest.num_rows

    tasks = [ShardTask(s.shard, (config, s, str(layout.root)), s.samples) for s in work.shards]
    with source.serve():
        failed = run_shard_tasks(
            DownloadStage(config), _download_shard_task, tasks, on_done=commit, failure="continue", progress=progress,
            stall_seconds=stall_seconds,
        )
    report.shards_failed.update(failed)
    report.seconds = time.monotonic() - started
    return report
