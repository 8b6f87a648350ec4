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
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.errors import ConfigError
from manifests.schemas import INPUT
from manifests.store import (
    RunLayout,
    make_dirs,
    move_into_place,
    read_bytes,
    read_row_groups,
    read_table,
    remove_stale_temporaries,
    row_group_ranges,
    shard_name,
    tar_key,
    write_json_atomic,
    write_row_groups_atomic,
    write_table_atomic,
)
from pipeline.shard_tasks import ShardTask, run_shard_tasks
from sources import DatasetSource, ground_truth_path
from stages.base import ShardOutput
from stages.download import DownloadConfig, DownloadStage
from stages.reshard import TAR_MODE, TAR_MTIME, TAR_OWNER


def make_uid(url: str, caption: str) -> str:
    """Stable, content-derived sample id: first 128 bits of sha256(url, caption), hex."""
    return hashlib.sha256(f"{url}\n{caption}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


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


def plan_row_groups(
    urls: pa.Table, uids: pa.ChunkedArray, rows: np.ndarray, shard_size: int, first_shard: int, first_input_row: int
) -> Iterator[pa.Table]:
    """The plan (schema INPUT) of the selected ``rows``, shard by shard in input order, as row groups
    of whole shards: a download task reads its shard's group, not the plan."""
    per_group = shard_size * max(1, -(-PLAN_GROUP_ROWS // shard_size))
    columns = urls.select(["url", "caption"]).append_column("uid", uids)
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
            },
            schema=INPUT,
        )


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

    @property
    def kind(self) -> str:
        """What made the input: "embedded" or "url_list" (the fingerprint's prefix)."""
        return self.fingerprint.split(":", 1)[0]

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
        return sum(i.samples for i in self.lists)


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
        return lines


def canonical_tar(src: Path, dst: Path) -> None:
    """Rewrite img2dataset's tar with members in key order and fixed header fields.

    img2dataset writes samples in the order its threads finish, with the current time in every
    header, so two downloads of the same URLs give different tars. Sorted and with fixed headers,
    a shard is a function of its samples: reruns, resumed runs and cluster runs write identical
    bytes, and so does everything made from them (the curated shards). Members are copied one at a
    time (random access into the local tar), so memory stays at one member.
    """
    with tarfile.open(src, "r:") as source, open(dst, "wb") as out, tarfile.open(fileobj=out, mode="w:", format=tarfile.USTAR_FORMAT) as target:
        members = [m for m in source.getmembers() if m.isfile()]
        members.sort(key=lambda m: (tar_key(m.name)[0], m.name))
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime, info.mode = member.size, TAR_MTIME, TAR_MODE  # the curated shards' header fields
            info.uid = info.gid = 0
            info.uname = info.gname = TAR_OWNER
            target.addfile(info, source.extractfile(member))


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
        canonical_tar(result.files["tar"], canonical)
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
    return tuple(InputList(**entry) for entry in meta["inputs"])


def _write_input_lists(layout: RunLayout, lists: tuple[InputList, ...]) -> None:
    """``dataset.json``: the lists in order, and the first list's keys and the totals as before."""
    first = lists[0]
    meta = {
        "dataset": first.dataset,
        "fingerprint": first.fingerprint,
        "shard_size": first.shard_size,
        "samples": sum(i.samples for i in lists),
        "duplicates_dropped": sum(i.duplicates_dropped for i in lists),
        "already_present": sum(i.already_present for i in lists),
        "inputs": [dataclasses.asdict(i) for i in lists],
    }
    write_json_atomic(meta, layout.input_meta_path)


def _known_uids(layout: RunLayout, lists: tuple[InputList, ...]) -> pa.Array | None:
    """Every uid the run has planned (the uid column of each plan file), for an appended list."""
    columns = [read_table(layout.input_dir / i.file, columns=["uid"]).column("uid") for i in lists if i.file]
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
    first_shard = max((i.first_shard + i.shards for i in earlier), default=0)
    first_input_row = sum(i.rows for i in earlier)
    path = layout.input_list_path(index)
    if len(rows):
        write_row_groups_atomic(plan_row_groups(urls, uids, rows, shard_size, first_shard, first_input_row), INPUT, path)
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
    )


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


@dataclass
class DownloadPlan:
    inputs: RunInputs
    todo: list[str]  # shards to download, in order
    shards: list[PlannedShard]  # the same shards, with where their rows are
    report: DownloadReport


def plan_download(source: DatasetSource, layout: RunLayout, config: DownloadConfig) -> DownloadPlan:
    """Freeze the input and find the shards that still need downloading (no Ray needed).

    Costs no read of the plan's rows: the shards follow from dataset.json, the done ones from one
    listing of the download manifests, and where the missing ones are from their plans' footers.
    """
    make_dirs(layout.shards_dir)
    remove_stale_temporaries(layout.shards_dir)
    inputs = freeze_input(source, layout, config.shard_size)
    done = layout.done_shards("download")
    total = sum(i.shards for i in inputs.lists)
    missing = {n for i in inputs.lists for n in i.shard_list() if n not in done}
    shards = [s for i in inputs.lists for s in plan_locations(layout, i, missing)]
    report = DownloadReport(
        shards_total=total,
        shards_already_done=total - len(shards),
        duplicates_dropped=inputs.current.duplicates_dropped,
        lists=len(inputs.lists),
        current=inputs.current,
        planned_now=inputs.planned_now,
    )
    return DownloadPlan(inputs=inputs, todo=[s.shard for s in shards], shards=shards, report=report)


def run_download(
    source: DatasetSource, layout: RunLayout, config: DownloadConfig, work: DownloadPlan, progress: bool = True
) -> DownloadReport:
    """Download every shard of ``work.todo`` on Ray (which must be up), one task per shard."""
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
            DownloadStage(config), _download_shard_task, tasks, on_done=commit, failure="continue", progress=progress
        )
    report.shards_failed.update(failed)
    report.seconds = time.monotonic() - started
    return report
