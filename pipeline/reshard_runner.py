"""Runs the reshard stage on Ray: a policy's kept uids -> ``curated/<policy>/`` WebDataset shards.

Decide, then materialise (DataComp). The plan is made on the driver from two small tables, the
selection (kept uids) and the download manifest (uid -> source shard and key); the bytes are moved
by one Ray task per output shard (``pipeline.shard_tasks``, with the CPUs ``ReshardStage``
declares), each streaming its source tars; the first shard that fails cancels the others.

Order, chosen so a selection always gives the same shards:

- kept uids are de-duplicated and sorted by uid (a DataComp subset is a sorted uid list; uids are
  content hashes, so uid order is also a fair shuffle of the pool, and each output shard gets a
  mix of source shards and of download times);
- the sorted list is cut into output shards of ``samples_per_shard`` (``000000``, ``000001``, ...);
- inside an output shard, samples are in uid order too: each source tar is read once,
  sequentially, into a spool (memory up to a bound, then local disk), and written from there in
  uid order (``stages.reshard``). So the curated shards depend only on the selection, not on which
  shards the samples were downloaded into (an appended list, a ``--retry``).

Commit protocol: each task writes its tar and Parquet sibling under temporary names and renames
them; the driver then writes ``manifest.parquet`` (schema CURATED), ``reshard.json`` (the
parameters, the selection's sha256) and finally ``sizes.json`` (open_clip's dataset-size file):
``sizes.json`` is the completion marker. A policy is skipped when its marker exists, its selection
is not newer than the marker, and the recorded selection hash, ``samples_per_shard`` and
``blur_faces`` still match; otherwise (a new selection, a killed run, blurring switched on or off)
the policy's folder is removed and redone whole.

With ``[reshard] blur_faces``, each kept sample's face boxes (the faces step's ``face_bboxes``) go
with its shard's task, which blurs them (``stages.reshard.blur_face_boxes``); ``reshard.json``
records ``blur_faces`` and how many samples had a face blurred.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from manifests.catalog import latest_downloads
from manifests.schemas import CURATED
from manifests.store import (
    SIZES_FILE,
    TMP_PREFIX,
    RunLayout,
    as_path,
    is_remote,
    make_dirs,
    move_into_place,
    mtime_ns,
    read_table,
    remove_tree,
    sha256_of,
    shard_name,
    tmp_sibling,
    write_json_atomic,
    write_table_atomic,
)
from manifests.uids import uids_as_text
from pipeline.shard_tasks import STALL_SECONDS, ShardTask, run_shard_tasks
from stages.base import ShardOutput
from stages.reshard import ReshardStage

MANIFEST = "manifest.parquet"
PARAMS = "reshard.json"
_POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class ReshardReport:
    """One policy's reshard. When ``skipped``, ``kept``/``shards`` describe what is already on disk."""

    policy: str
    kept: int = 0  # distinct kept uids = samples in curated/<policy>
    shards: int = 0  # output shards (written, or present when skipped)
    seconds: float = 0.0
    bytes_written: int = 0  # by this call: tars, Parquet siblings, manifest, sizes.json (0 when skipped)
    skipped: bool = False
    duplicates_dropped: int = 0  # kept selection rows whose uid was already listed

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ShardPlan:
    shard: str
    inputs: list[tuple[str, dict[str, str]]]  # (source tar, {source key: uid}), by source shard
    samples: int
    faces: dict[str, list[list[float]] | None] | None = None  # uid -> face boxes to blur (blur_faces only)


@dataclass
class ReshardPlan:
    policy: str
    samples_per_shard: int
    selection_sha256: str
    kept: int
    duplicates_dropped: int
    shards: list[ShardPlan] = field(default_factory=list)
    blur_faces: bool = False
    faces_blurred: int = 0  # kept samples with at least one face box (blur_faces only)


def _check_policy_name(layout: RunLayout, policy: str) -> Path:
    """The policy's folder; refuse names that could point outside ``curated/`` (we rmtree it)."""
    if not _POLICY_NAME.fullmatch(policy) or ".." in policy:
        raise ValueError(f"policy name {policy!r}: use letters, digits, '.', '_' and '-' only")
    folder = layout.curated_dir(policy)
    if folder.parent != layout.root / "curated":
        raise ValueError(f"policy {policy!r}: curated folder {folder} is not directly under {layout.root / 'curated'}")
    return folder


def _face_boxes(layout: RunLayout, uids: list[str]) -> dict[str, list[list[float]] | None]:
    """Each of ``uids``' face boxes from the faces step's parts (None: its row failed or is absent)."""
    if not layout.stage_dir("faces").is_dir():
        return {}
    table = read_table(layout.stage_dir("faces"), columns=["uid", "face_bboxes"])
    table = table.filter(pc.is_in(table.column("uid"), value_set=pa.array(uids, pa.string())))
    return dict(zip(table.column("uid").to_pylist(), table.column("face_bboxes").to_pylist()))


def plan_reshard(layout: RunLayout, policy: str, samples_per_shard: int, blur_faces: bool = False) -> ReshardPlan:
    """Which source samples go into which output shard (no Ray, no tar is opened).

    A uid is kept when any of its selection rows says kept, and is planned once. Every kept uid
    must be an ok row of the download manifest at its latest attempt (``curate --retry``): a
    selection from another run is refused here, before anything on disk is touched.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    selection_path = layout.selection_path(policy)
    digest = sha256_of(selection_path)
    selection = read_table(selection_path, columns=["uid", "kept"])
    kept_rows = uids_as_text(selection.filter(pc.equal(selection.column("kept"), True)).column("uid"))
    kept = pc.unique(kept_rows.combine_chunks())
    duplicates = len(kept_rows) - len(kept)

    # each uid's latest attempt only: a retried uid's earlier (failed) rows are history
    download = latest_downloads(layout, ["uid", "status", "shard", "key"])
    download = download.filter(pc.and_(pc.equal(download.column("status"), "ok"), pc.is_valid(download.column("key"))))
    joined = pa.table({"uid": kept}).join(download.select(["uid", "shard", "key"]), "uid", join_type="left outer")
    if joined.num_rows != len(kept):
        raise ValueError(f"download manifest of {layout.root} lists some kept uid more than once as ok")
    missing = joined.filter(pc.is_null(joined.column("shard")))
    if missing.num_rows:
        examples = ", ".join(sorted(missing.column("uid").to_pylist())[:3])
        raise ValueError(
            f"selection {policy}: {missing.num_rows} kept uid(s) have no downloaded sample (e.g. {examples}); "
            "is the selection from another run?"
        )
    joined = joined.sort_by("uid")  # byte-wise order of the uid strings: the same everywhere

    uids = joined.column("uid").to_pylist()
    source_shards = joined.column("shard").to_pylist()
    source_keys = joined.column("key").to_pylist()
    plan = ReshardPlan(policy, samples_per_shard, digest, len(uids), duplicates, blur_faces=blur_faces)
    boxes = _face_boxes(layout, uids) if blur_faces else {}
    plan.faces_blurred = sum(1 for u in uids if boxes.get(u))
    for index, start in enumerate(range(0, len(uids), samples_per_shard)):
        by_source: dict[str, dict[str, str]] = {}
        for i in range(start, min(start + samples_per_shard, len(uids))):
            by_source.setdefault(source_shards[i], {})[source_keys[i]] = uids[i]
        inputs = [
            (str(layout.shards_dir / f"{s}.tar"), dict(sorted(by_source[s].items()))) for s in sorted(by_source)
        ]
        faces = {u: boxes.get(u) for u in uids[start:start + samples_per_shard]} if blur_faces else None
        plan.shards.append(ShardPlan(shard_name(index), inputs, sum(len(k) for _, k in inputs), faces))
    return plan


def is_up_to_date(layout: RunLayout, policy: str, samples_per_shard: int, blur_faces: bool = False) -> bool:
    """Whether ``curated/<policy>`` is complete and was made from the current selection.

    The mtime rule (selection not newer than ``sizes.json``) is what ``curate`` checks; the
    recorded sha256 also catches a selection restored with an old mtime, and a changed
    ``samples_per_shard`` means other shards, a changed ``blur_faces`` other images.
    """
    folder = layout.curated_dir(policy)
    marker, params_path, selection = folder / SIZES_FILE, folder / PARAMS, layout.selection_path(policy)
    if not (marker.is_file() and params_path.is_file() and selection.is_file()):
        return False
    if mtime_ns(selection) > mtime_ns(marker):  # whole seconds on object stores: the hash below decides
        return False
    try:
        params = json.loads(params_path.read_text())
    except ValueError:
        return False
    return (params.get("samples_per_shard") == samples_per_shard and bool(params.get("blur_faces")) == blur_faces
            and params.get("selection_sha256") == sha256_of(selection))


def _remove_policy_dir(layout: RunLayout, policy: str) -> None:
    """Remove ``curated/<policy>`` so that no moment looks complete or half-present to a reader.

    The completion marker goes first, then the manifest (the catalog's ``curated`` view globs
    ``curated/*/manifest.parquet``), then the folder is renamed to a temporary name and deleted.
    A symlink is unlinked, never followed.
    """
    folder = _check_policy_name(layout, policy)
    if layout.remote:  # no rename on an object store: marker, manifest, then every object under the prefix
        for name in (SIZES_FILE, MANIFEST):
            if (folder / name).exists():
                (folder / name).unlink()
        remove_tree(folder)
        return
    curated_root = folder.parent
    stale = re.compile(re.escape(f"{TMP_PREFIX}{policy}.") + r"[0-9a-f]{12}")
    if curated_root.is_dir():  # what an earlier, killed removal left
        for entry in curated_root.iterdir():
            if stale.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        folder.unlink()
        return
    if not folder.exists():
        return
    (folder / SIZES_FILE).unlink(missing_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    trash = tmp_sibling(folder)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def _reshard_shard_task(
    policy: str, samples_per_shard: int, shard: str, inputs: list[tuple[str, dict[str, str]]], out_dir: str,
    faces: dict[str, list[list[float]] | None] | None = None,
) -> ShardOutput:
    """Body of one Ray task: one output shard, committed by rename inside the stage.

    For an object-store root the shard is written to a local temporary folder, then its tar and
    Parquet sibling are uploaded whole (a PUT is atomic) before the task returns.
    """
    stage = ReshardStage(policy, samples_per_shard, blur_faces=faces is not None)
    target = as_path(out_dir)
    if not is_remote(target):
        return stage.process_shard(shard, inputs, Path(out_dir), faces=faces)
    with tempfile.TemporaryDirectory(prefix=f"reshard-{shard}-") as work:
        result = stage.process_shard(shard, inputs, Path(work), faces=faces)
        committed = {role: target / path.name for role, path in result.files.items()}
        for role, path in result.files.items():
            move_into_place(path, committed[role])
    return ShardOutput(result.manifest, files=committed, bytes_written=result.bytes_written)


def reshard_policy(layout: RunLayout, policy: str, samples_per_shard: int, progress: bool = True,
                   stall_seconds: float = STALL_SECONDS, blur_faces: bool = False) -> ReshardReport:
    """Materialise ``selections/<policy>.parquet`` as ``curated/<policy>/`` (Ray must be up).

    Skips a policy that is up to date (see :func:`is_up_to_date`); otherwise removes the policy's
    old folder and writes every shard again, in parallel, one Ray task each.
    """
    started = time.monotonic()
    folder = _check_policy_name(layout, policy)
    if is_up_to_date(layout, policy, samples_per_shard, blur_faces):
        sizes = json.loads((folder / SIZES_FILE).read_text())
        params = json.loads((folder / PARAMS).read_text())
        return ReshardReport(
            policy,
            kept=sum(sizes.values()),
            shards=len(sizes),
            seconds=time.monotonic() - started,
            skipped=True,
            duplicates_dropped=int(params.get("duplicates_dropped", 0)),
        )

    plan = plan_reshard(layout, policy, samples_per_shard, blur_faces)
    _remove_policy_dir(layout, policy)
    make_dirs(folder)
    manifests = _run_shards(plan, folder, progress, stall_seconds)

    manifest = pa.concat_tables(manifests) if manifests else CURATED.empty_table()
    write_table_atomic(manifest.cast(CURATED), folder / MANIFEST)
    params = {
        "policy": policy,
        "samples_per_shard": samples_per_shard,
        "selection_sha256": plan.selection_sha256,
        "kept": plan.kept,
        "shards": len(plan.shards),
        "duplicates_dropped": plan.duplicates_dropped,
        "order": "uid-sorted, cut every samples_per_shard; inside a shard, uid order too",
        "blur_faces": plan.blur_faces,
    }
    if plan.blur_faces:
        params["faces_blurred"] = plan.faces_blurred  # kept samples with at least one face box blurred
    write_json_atomic(params, folder / PARAMS)
    write_json_atomic({f"{s.shard}.tar": s.samples for s in plan.shards}, folder / SIZES_FILE)  # last: the marker
    return ReshardReport(
        policy,
        kept=plan.kept,
        shards=len(plan.shards),
        seconds=time.monotonic() - started,
        bytes_written=sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        duplicates_dropped=plan.duplicates_dropped,
    )


def _run_shards(plan: ReshardPlan, folder: Path, progress: bool, stall_seconds: float = STALL_SECONDS) -> list[pa.Table]:
    """One Ray task per output shard; the manifests in shard order. The first failure stops all."""
    if not plan.shards:
        return []
    planned = {s.shard: s.samples for s in plan.shards}
    done: dict[str, pa.Table] = {}

    def collect(shard: str, output: ShardOutput) -> None:
        if output.manifest.num_rows != planned[shard]:
            raise RuntimeError(f"wrote {output.manifest.num_rows} of {planned[shard]} samples")
        done[shard] = output.manifest

    tasks = [
        ShardTask(s.shard, (plan.policy, plan.samples_per_shard, s.shard, s.inputs, str(folder), s.faces), s.samples)
        for s in plan.shards
    ]
    run_shard_tasks(
        ReshardStage(plan.policy, plan.samples_per_shard, plan.blur_faces), _reshard_shard_task, tasks,
        on_done=collect, failure="stop", label=f"reshard {plan.policy}", progress=progress, stall_seconds=stall_seconds,
    )
    return [done[s.shard] for s in plan.shards]
