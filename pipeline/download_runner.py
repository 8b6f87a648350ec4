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
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from core.errors import ConfigError
from manifests.schemas import INPUT
from manifests.store import (
    RunLayout,
    make_dirs,
    move_into_place,
    read_table,
    remove_stale_temporaries,
    shard_name,
    tar_key,
    write_json_atomic,
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


def plan_shards(urls: pa.Table, shard_size: int) -> tuple[pa.Table, int]:
    """Assign uids and shards in input order; exact (url, caption) repeats are planned once.

    Returns the plan (schema INPUT) and how many repeated rows were left out.
    """
    uids: list[str] = []
    rows: list[int] = []
    seen: set[str] = set()
    for i, (url, caption) in enumerate(zip(urls.column("url").to_pylist(), urls.column("caption").to_pylist())):
        uid = make_uid(url or "", caption or "")
        if uid in seen:
            continue
        seen.add(uid)
        uids.append(uid)
        rows.append(i)
    kept = urls.take(pa.array(rows, pa.int64()))
    shards = [shard_name(j // shard_size) for j in range(len(rows))]
    plan = pa.table(
        {"uid": uids, "url": kept.column("url"), "caption": kept.column("caption"), "shard": shards, "input_row": rows},
        schema=INPUT,
    )
    return plan, urls.num_rows - len(rows)


@dataclass
class DownloadReport:
    shards_total: int = 0
    shards_already_done: int = 0
    shards_run: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    samples_run: int = 0
    duplicates_dropped: int = 0
    seconds: float = 0.0


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


def _download_shard_task(config: DownloadConfig, shard: str, rows: pa.Table, root: str) -> ShardOutput:
    """Body of one Ray task: download, move the files into place, return the manifest and where
    the files went.

    The caller (the driver) writes the manifest as the shard's part: see the module docstring.
    """
    layout = RunLayout(root)
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


def freeze_input(source: DatasetSource, layout: RunLayout, shard_size: int) -> tuple[pa.Table, int]:
    """The run's plan: made once and stored, then reused so that reruns see the same shards."""
    meta_path = layout.input_path.with_name("dataset.json")
    fingerprint = source.fingerprint()
    if layout.input_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["fingerprint"] != fingerprint:
            raise ConfigError(
                f"output {layout.root} already holds a run of another input ({meta['dataset']}, "
                f"{meta['fingerprint']}); choose another OUTPUT/--output or delete that folder"
            )
        return read_table(layout.input_path), int(meta.get("duplicates_dropped", 0))
    plan, duplicates = plan_shards(source.load_urls(), shard_size)
    write_table_atomic(plan, layout.input_path)
    gt = source.ground_truth()
    if gt is not None:
        write_table_atomic(gt, ground_truth_path(layout.root))
    meta = {
        "dataset": source.config.name,
        "fingerprint": fingerprint,
        "shard_size": shard_size,
        "samples": plan.num_rows,
        "duplicates_dropped": duplicates,
    }
    write_json_atomic(meta, meta_path)
    return plan, duplicates


@dataclass
class DownloadPlan:
    plan: pa.Table
    todo: list[str]
    report: DownloadReport


def plan_download(source: DatasetSource, layout: RunLayout, config: DownloadConfig) -> DownloadPlan:
    """Freeze the input and find the shards that still need downloading (no Ray needed)."""
    make_dirs(layout.shards_dir)
    remove_stale_temporaries(layout.shards_dir)
    plan, duplicates = freeze_input(source, layout, config.shard_size)
    shards = sorted(set(plan.column("shard").to_pylist()))
    done = layout.done_shards("download")
    todo = [s for s in shards if s not in done]
    report = DownloadReport(
        shards_total=len(shards), shards_already_done=len(shards) - len(todo), duplicates_dropped=duplicates
    )
    return DownloadPlan(plan=plan, todo=todo, report=report)


def run_download(
    source: DatasetSource, layout: RunLayout, config: DownloadConfig, work: DownloadPlan, progress: bool = True
) -> DownloadReport:
    """Download every shard of ``work.todo`` on Ray (which must be up), one task per shard."""
    started = time.monotonic()
    plan, todo, report = work.plan, work.todo, work.report
    if not todo:
        return report

    def commit(shard: str, output: ShardOutput) -> None:
        """On the driver: the part, last (see the module docstring)."""
        write_table_atomic(output.manifest, layout.part_path("download", shard))
        report.shards_run += 1
        report.samples_run += output.manifest.num_rows

    tasks = []
    for shard in todo:
        rows = plan.filter(pc.equal(plan.column("shard"), shard))
        tasks.append(ShardTask(shard, (config, shard, rows, str(layout.root)), rows.num_rows))
    with source.serve():
        failed = run_shard_tasks(
            DownloadStage(config), _download_shard_task, tasks, on_done=commit, failure="continue", progress=progress
        )
    report.shards_failed.update(failed)
    report.seconds = time.monotonic() - started
    return report
