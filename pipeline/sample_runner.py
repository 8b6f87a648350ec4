"""Runs the per-sample stages (decode -> ocr -> ...) as one streaming Ray Data pipeline.

Each downloaded shard is read once and each image decoded once; model stages run as actor pools
(``map_batches`` with the CPUs, GPUs, batch size and replicas the stage declares), so a model
loads once per replica. A pool declared ``replicas = "auto"`` is sized from the cluster and what
each stage costs per image (:func:`size_pools`), so that every core works; a stage without a
model (parrot, dedup) runs in the actor of the CPU stage before it (:func:`pools`). Only small result columns come back to the driver, which writes one
manifest part per shard per stage, atomically, as soon as the shard's last sample arrives. Shards
whose parts exist are skipped; a shard missing only some stages runs only those.

What a stage ``reads`` decides what is read: the sample rows come from the shard's download part
(uid, key, caption), earlier stages' columns from their parts, and the tar is opened and images
decoded only when a stage that runs reads ``image``. A rerun that lacks only text stages' parts
(parrot) touches no tar and decodes nothing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import sys
import tarfile
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core import timeline
from core.errors import Stalled
from manifests.store import RunLayout, as_path, read_bytes, read_table, tar_key, write_table_atomic
from pipeline.config import Config
from pipeline.dag import Step
from pipeline.watchdog import ClusterShrank, ProgressWatchdog, cluster_shrank, resources_line, first_shards, unplaceable
from stages.base import IMAGE, Resources, Stage, StageContractError

_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)  # Ray Data columns cannot hold None among arrays


@dataclass
class StageReport:
    shards_run: int = 0
    shards_already_done: int = 0
    samples: int = 0
    failed: int = 0


@dataclass
class SampleReport:
    stages: dict[str, StageReport] = field(default_factory=dict)
    seconds: float = 0.0
    samples: int = 0
    first_image_s: float | None = None  # from the start of the step to the first images through every stage
    first_rows: int = 0  # how many came out together then

    @property
    def steady_images_per_s(self) -> float | None:
        """The rate after the first images: start-up (Ray Data, actors, model loads) left out."""
        if self.first_image_s is None or self.samples <= self.first_rows or self.seconds - self.first_image_s < 1.0:
            return None  # everything came out at once (a small run): no rate after the start
        return (self.samples - self.first_rows) / (self.seconds - self.first_image_s)
    images_decoded: int = 0  # rows that went through the decoder (0 when no stage that ran reads image)
    imported: dict[str, int] = field(default_factory=dict)  # step -> samples its part took from the pool's own values

    @property
    def clip_imported(self) -> int:
        """Samples whose CLIP score came from the pool's own embeddings (pipeline/clip_import.py)."""
        return self.imported.get("clip_score", 0)
    incomplete_shards: dict[str, str] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)  # shard -> why a step could not run on it yet
    refits: list[str] = field(default_factory=list)  # each time nodes left and the pools were sized again


def ok_counts(layout: RunLayout) -> dict[str, int]:
    """Samples per shard that were downloaded (so are in the tar): what each stage must cover."""
    folder = layout.stage_dir("download")
    if not folder.is_dir():
        return {}
    table = read_table(folder, columns=["shard", "status"])
    counts = {s: 0 for s in table.column("shard").unique().to_pylist()}
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    for shard, n in zip(*[c.to_pylist() for c in ok.group_by("shard").aggregate([("status", "count")]).columns]):
        counts[shard] = n
    return counts


def read_shard(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The downloaded samples of one shard: uid, shard, key and caption from its download part,
    the encoded image (``jpg``) from its tar only when ``item["tar"]`` is set, and the columns
    of stages already done (``item["parts"]``: path and the columns wanted), joined on uid.
    """
    manifest = read_table(as_path(item["download_part"]), columns=["uid", "key", "caption", "status"])
    ok = manifest.filter(pc.and_(pc.equal(manifest.column("status"), "ok"), pc.is_valid(manifest.column("key"))))
    rows = {
        uid: {"uid": uid, "shard": item["shard"], "key": key, "caption": caption or ""}
        for uid, key, caption in zip(*(ok.column(c).to_pylist() for c in ("uid", "key", "caption")))
    }
    if item.get("tar"):
        images: dict[str, bytes] = {}
        # one read of the whole shard (one GET from an object store), then members from memory
        with tarfile.open(fileobj=io.BytesIO(read_bytes(item["tar"]))) as tar:
            for member in tar:
                key, ext = tar_key(member.name)
                if member.isfile() and ext == "jpg":
                    images[key] = tar.extractfile(member).read()
        for row in rows.values():
            row["jpg"] = images.get(row["key"], b"")
    for path, columns in item.get("parts", []):
        table = read_table(as_path(path), columns=["uid", *columns])
        for values in table.to_pylist():
            row = rows.get(values.pop("uid"))
            if row is not None:
                row.update(values)
    return sorted(rows.values(), key=lambda r: r["key"])  # the tar's order: batches as before


def read_shards(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    """Each shard item of the batch (JSON, :func:`read_shard`'s ``item``): its rows, ``DECODE_BATCH``
    at a time, images decoded when it has a tar. One operator, so one worker process reads and
    decodes (a read operator and a decode operator were two, each a worker that imports Ray Data
    before the first image), and rows go on as they are decoded, not once per shard."""
    for text in batch["item"]:
        item = json.loads(str(text))
        timeline.mark("shard_read_start", shard=item["shard"])
        rows = read_shard(item)
        columns = list(dict.fromkeys(k for row in rows for k in row))  # a uid missing from a part: None there
        for lo in range(0, len(rows), DECODE_BATCH):
            chunk = {k: [row.get(k) for row in rows[lo:lo + DECODE_BATCH]] for k in columns}
            yield decode_batch(chunk) if item.get("tar") else chunk
        timeline.mark("shard_read_end", shard=item["shard"])


OBJECT_AT = re.compile(r" object at 0x[0-9a-fA-F]+>")


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Decode each image once, to RGB uint8; a failure is a row with a reason, not an exception."""
    from PIL import Image

    images, errors = [], []
    for data in batch["jpg"]:
        try:
            with Image.open(io.BytesIO(data)) as image:
                images.append(np.asarray(image.convert("RGB")))
            errors.append(None)
        except Exception as err:  # noqa: BLE001 - any decode failure is recorded per row
            images.append(_NO_IMAGE)
            # without the object's address PIL names (<_io.BytesIO object at 0x...>): the same bytes, the same reason
            errors.append(f"decode failed: {type(err).__name__}: {OBJECT_AT.sub('>', str(err))}")
    out = {k: v for k, v in batch.items() if k != "jpg"}
    out["image"] = images
    out["decode_error"] = errors
    return out


def _plain(values: Any) -> list[Any]:
    """A column as plain Python values: Ray hands list columns back as numpy object arrays of
    arrays, which it would pickle instead of storing as Arrow lists on the way out."""
    return [v.tolist() if isinstance(v, np.ndarray) else v for v in values]


def _from_ray(values: np.ndarray) -> Any:
    """A column as the stage wrote it. Ray hands a column that was all None in its block (Arrow's
    null type) to the next actor as float32 NaNs: a stage would read NaN (truthy) for "no decode
    error", and passed on as floats it no longer merges with a block where the same column holds
    text (ArrowConversionError, whole run lost). All-NaN float32 is that null column: None again."""
    if values.dtype == np.float32 and values.size and np.isnan(values).all():
        return np.full(len(values), None, dtype=object)
    return values


HANG_HOOK = "CURATION_TEST_HANG_STAGE"  # tests only: this stage's batches never return (the stall watchdog's test)
BROKEN_NODE_HOOK = "CURATION_TEST_BROKEN_NODE"  # tests only: set on a node, its actors fail to construct
ACTOR_INIT_DEATHS_TOLERATED = 4


class StageActor:
    """One replica of a Ray Data actor pool: its stage, and the light stages that ride along after
    it (:func:`pools`), each set up once, then called per batch in order.

    A stage gets ``uid`` and every column before it (what it declares it reads among them); what
    it returns must be exactly its output schema's columns (checked on every batch: a missing
    column is named, never filled in). Within one actor a stage's output goes to the next as the
    stage wrote it, without Ray's conversions in between.
    """

    def __init__(self, steps: Step | tuple[Step, ...], config: Config, keep_image: bool = True) -> None:
        steps = (steps,) if isinstance(steps, Step) else tuple(steps)
        for step in steps:
            timeline.mark("actor_start", stage=step.name)  # the worker process is up and has imported this module
        if os.environ.get(BROKEN_NODE_HOOK):
            raise RuntimeError(f"{steps[0].name}: cannot set up on this node ({BROKEN_NODE_HOOK} is set: a test's broken node)")
        self.stages: list[Stage] = []
        for step in steps:
            stage = step.make(config, None)
            with warnings.catch_warnings():  # the driver said these once (run_per_sample); not once per replica
                for category in stage.announced_warnings:
                    warnings.simplefilter("ignore", category)
                stage.setup()
            timeline.mark("model_loaded", stage=step.name)
            self.stages.append(stage)
        self.keep_image = keep_image  # the last stage that reads pixels drops them: only small columns go on
        self.batches = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        columns: dict[str, Any] = {k: (v if k == IMAGE else _from_ray(v)) for k, v in batch.items()}
        for stage in self.stages:
            if os.environ.get(HANG_HOOK) == stage.name:  # tests only: a model call that never returns
                threading.Event().wait()
            inputs = {k: list(v) for k, v in columns.items() if k != IMAGE}
            if IMAGE in columns:
                inputs[IMAGE] = [None if a is None or a.size == 0 else a for a in columns[IMAGE]]
            produced = stage.process_batch(inputs)
            stage.check_output(produced)
            if not self.batches:
                timeline.mark("first_batch_done", stage=stage.name, rows=len(inputs["uid"]))
            columns.update((column, values) for column, values in produced.items() if column != "uid")
        self.batches += 1
        out = {k: _outgoing(v) for k, v in columns.items() if k != IMAGE}
        if IMAGE in columns and self.keep_image:
            out[IMAGE] = columns[IMAGE]  # as Ray gave it: one array per image
        return out


def _outgoing(values: Any) -> Any:
    """A column as it leaves the actor. Ray's numpy columns go back as they came, save object
    columns as plain values; a stage's list goes as it is, save one holding vectors (CLIP's
    embeddings): as plain lists, since Ray makes a block whose vectors are all present a tensor
    column and one with a None (a failed row) an object column, and a later operator cannot
    concatenate the two (ArrowConversionError, found when batches of 8 put a failed row in a block
    of its own)."""
    if isinstance(values, np.ndarray):
        return values if values.dtype != object else _plain(values)
    return _plain(values) if any(isinstance(v, np.ndarray) for v in values) else values


def pools(steps: list[Step], declared: dict[str, Resources]) -> list[tuple[Step, ...]]:
    """The actor pools of one streaming pipeline, each the stages its actors run, in order.

    A stage that ``rides_along`` (no model, ~ms a sample: parrot, dedup) runs in the actor of the
    stage before it when that stage runs on CPU only, as Ray Data fuses its own operators: a
    worker process fewer to start (~1.5 CPU-s each: Ray, Ray Data and our modules imported), and
    no hop through the object store. After a GPU stage it keeps a pool of its own, so that the
    GPU actor's loop stays the model's. Every other stage is a pool of its own.
    """
    chains: list[list[Step]] = []
    for step in steps:
        host = chains[-1][0] if chains else None
        if (host is not None and step.stage.rides_along and declared[step.name].gpus == 0
                and declared[host.name].gpus == 0):
            chains[-1].append(step)
        else:
            chains.append([step])
    return [tuple(chain) for chain in chains]


READ_CPUS = 0.25  # reading a tar and decoding JPEGs is light next to the model stages
DECODE_BATCH = 16  # images a read task decodes before it hands them on
AUTO = "auto"  # a stage's ``replicas`` when the runner is to size its pool (size_pools)
MAX_REFITS = 3  # times one stage's pools are sized again after nodes left, before the run gives up
READ_COST = 0.01  # CPU-s per image of reading the tar and decoding the JPEG (512 px)
# Ray Data cuts an operator's output into blocks of this many bytes (default 128 MiB: a whole
# shard of decoded images). Small blocks let every replica of a pool take a few images at a time,
# rather than one shard each with the others idle at the end, and let results (and the progress
# bar) come back as images finish, not once per shard. 2 MiB is ~3 decoded 512-px images.
STREAM_BLOCK_BYTES = 2 * 1024 * 1024


def size_pools(declared: dict[str, Resources], costs: dict[str, float], cluster_cpus: float,
               cluster_gpus: float) -> dict[str, Resources]:
    """The stages' resources with every ``replicas = "auto"`` replaced by a count.

    A streaming pipeline runs at its slowest stage's rate, and a stage's rate is its replicas over
    its cost per image, so the pools are sized in proportion to what the stages cost:

    - on CPU, an auto stage gets its share of the cluster's cores, cores x cost / (the costs of
      every stage on CPU, reading and decoding included), in replicas of ``cpus`` (at least one
      core: a replica runs at least one thread), rounded: an idle core is lost for good, a core
      shared by a bit more than one replica is not; at least one replica. On 2 cores with easyocr that is 2 OCR replicas and 1 CLIP (easyocr with CRAFT in int8 costs ~8x CLIP), with the shipped ppocr-v6 1 and 1 (~3x CLIP); on
      64 cores, 55 OCR and 7 CLIP.
    - on GPU, each GPU stage starts with one replica, then the GPU left goes, one replica at a
      time, to the stage whose replicas have the most to do (highest cost / replicas), while its
      ``gpus`` fits: the devices fill up, and no pool asks for more than exists (it would wait
      forever).

    A stage with a fixed count keeps it. Threads per replica stay the stage's own (``cpus``).
    """
    replicas = {n: 1 if r.replicas == AUTO else int(r.replicas) for n, r in declared.items()}
    gpu_left = cluster_gpus - sum(r.gpus * replicas[n] for n, r in declared.items())
    on_gpu = [n for n, r in declared.items() if r.replicas == AUTO and r.gpus > 0]
    while True:
        fits = [n for n in on_gpu if declared[n].gpus <= gpu_left + 1e-9]
        if not fits:
            break
        grow = max(fits, key=lambda n: costs[n] / replicas[n])
        replicas[grow] += 1
        gpu_left -= declared[grow].gpus
    cpu_cost = READ_COST + sum(costs[n] for n, r in declared.items() if r.gpus == 0)
    for n, r in declared.items():
        if r.replicas == AUTO and r.gpus == 0:
            share = cluster_cpus * costs[n] / cpu_cost
            replicas[n] = max(1, round(share / max(1.0, r.cpus)))  # a busy replica runs >= 1 thread
    return {n: dataclasses.replace(r, replicas=replicas[n]) for n, r in declared.items()}


def pool_sizes(config: Config, steps: list[Step], cluster: dict[str, float]) -> dict[str, Resources]:
    """Each step's resources on this cluster (``ray.cluster_resources()``), auto pools sized."""
    gpus = cluster.get("GPU", 0)
    stages = _enabled_stages(config, steps)  # a switched-off step has no pool
    declared = {name: stage.resources(gpus > 0) for name, stage in stages.items()}
    costs = {name: stage.cost_per_image() for name, stage in stages.items()}
    return size_pools(declared, costs, cluster.get("CPU", 1), gpus)


def _enabled_stages(config: Config, steps: list[Step]) -> dict[str, Any]:
    """Each enabled step's stage object, made without a model (its declarations only)."""
    return {s.name: s.make(config, None) for s in steps if s.enabled(config)}


def stage_costs(config: Config, steps: list[Step]) -> dict[str, float]:
    """Each enabled step's CPU-seconds per sample (``cost_per_image``): what the pools are sized by."""
    return {name: stage.cost_per_image() for name, stage in _enabled_stages(config, steps).items()}


def read_tasks(config: Config, steps: list[Step], sized: dict[str, Resources]) -> int | None:
    """How many read tasks may run at once: twice what reading and decoding need (``READ_COST`` a
    sample) at the pace of the slowest pool (its replicas over the cost per sample of the stages it
    runs), in whole tasks, at least one: 1 on 2 cores, where each task more is a worker process
    that imports Ray Data (~1.4 CPU-s) while the models load; 7 on 64. None (Ray Data's own
    limit) with a pool on GPUs, whose pace the CPU costs do not give."""
    chains = pools(steps, sized)
    if any(sized[chain[0].name].gpus for chain in chains):
        return None
    each = stage_costs(config, steps)
    pace = min(sized[chain[0].name].replicas * max(1.0, sized[chain[0].name].cpus)
               / max(sum(each[s.name] for s in chain), 1e-6) for chain in chains)
    return max(1, math.ceil(2 * pace * READ_COST))


def fit_to_cluster(declared: dict[str, Any], cluster_cpus: float) -> float:
    """Factor applied to every stage's CPU request so that all actor pools fit at once.

    Every actor of a streaming pipeline must be placed for data to flow; on a small machine (2
    cores, the CI box) the declared CPUs of OCR + CLIP + parrot exceed what exists and the pipeline
    would wait forever. Requests are scheduling tokens (threads are set by each stage), so scaling
    them down keeps the stages' proportions and lets them share the cores. On a cluster with room,
    the factor is 1.
    """
    wanted = sum(r.cpus * r.replicas for r in declared.values()) + 2 * READ_CPUS
    if wanted <= cluster_cpus:
        return 1.0
    scale = max(cluster_cpus - 2 * READ_CPUS, 0.1) / (wanted - 2 * READ_CPUS)
    logging.getLogger(__name__).info(
        "stages declare %.2f CPUs but the cluster has %.0f: scaling requests by %.2f so all stages run", wanted,
        cluster_cpus, scale,
    )
    return scale


def _typed(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    """Cast a column to its schema type. Ray turns a column with missing values into floats with
    NaN on its way through a later actor (all-null strings too, which would cast to the text
    "nan"). No stage writes NaN, so every NaN is a missing value: a null, also where the schema
    says float (a failed row's clip_score, which came out NaN when dedup's actor followed CLIP's;
    DuckDB sorts NaN above every number, so ``clip_score >= 0.3`` kept it)."""
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    return column.cast(target)


def _vectors_as_lists(batch: pa.Table) -> pa.Table:
    """Ray hands back a column of same-length vectors (clip_score's embeddings) as its own tensor
    extension type, but the same column with a null in it as a plain list: the two do not
    concatenate into one shard's part. Every 1-d tensor column becomes the plain list."""
    for k, f in enumerate(batch.schema):
        if isinstance(f.type, pa.ExtensionType) and len(getattr(f.type, "shape", ())) == 1:
            item = f.type.storage_type.value_type
            batch = batch.set_column(k, f.name, batch.column(k).cast(pa.list_(item)))
    return batch


def _stage_table(batch: pa.Table, stage: type[Stage]) -> pa.Table:
    """The stage's part: exactly its schema's columns, typed; a missing one is a contract error."""
    schema = stage.output_schema
    missing = [f.name for f in schema if f.name not in batch.column_names]
    if missing:
        raise StageContractError(f"stage {stage.name!r} produced no column(s) {', '.join(missing)}")
    return pa.Table.from_arrays([_typed(batch.column(f.name), f.type) for f in schema], schema=schema)


def run_per_sample(
    layout: RunLayout,
    config: Config,
    steps: tuple[Step, ...],
    progress: bool = True,
    context: tuple[Step, ...] | None = None,
) -> SampleReport:
    """Run every per-sample step of ``steps`` on every shard that lacks its part. Ray must be up.

    ``context``: every per-sample step of the DAG (default: ``steps``). A step that runs reads
    the columns of earlier steps from their parts; when the step that writes them is not among
    ``steps`` (``curate --stages clip_score``), its part must already be on disk, and a shard
    without it waits (``report.waiting``) instead of running without its inputs.
    """
    import ray

    started = time.monotonic()
    timeline.mark("pipeline_start")
    context = tuple(s for s in (context or steps) if s.enabled(config))  # an optional step switched off: not run
    steps = tuple(s for s in steps if s.enabled(config))
    report = SampleReport(stages={s.name: StageReport() for s in steps})
    counts = ok_counts(layout)
    imported = _import_pool_parts(layout, config, steps, counts, report)
    groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = defaultdict(list)
    done = {s.name: layout.done_shards(s.name) for s in {*steps, *context}}  # one listing per stage
    for shard in sorted(counts):
        missing = tuple(s.name for s in steps if shard not in done[s.name])
        for s in steps:
            if s.name not in missing and shard not in imported.get(s.name, ()):
                report.stages[s.name].shards_already_done += 1
        if not missing:
            continue
        have = tuple(s.name for s in context if shard in done[s.name] and s.name not in missing)
        lacking = _inputs_lacking([s for s in steps if s.name in missing], context, set(have) | set(missing))
        if lacking:
            report.waiting[shard] = lacking
            continue
        groups[(missing, have)].append(shard)

    if groups:
        for s in steps:  # once, here, rather than once per replica
            for notice in s.make(config, None).notices():
                print(f"warning: {s.name}: {notice}", file=sys.stderr)

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.issue_detectors_config.detectors = []  # its memory hints are for large clusters, noise here
    ctx.target_max_block_size = STREAM_BLOCK_BYTES
    # an actor that fails in its constructor (a broken node: a bad disk, a GPU gone) is replaced, on
    # another node as the pool spreads its actors, instead of failing the run; a stage broken
    # everywhere still fails after this many deaths in a row
    ctx.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS_TOLERATED

    logging.disable(logging.INFO)  # Ray Data re-configures its loggers per execution; its INFO lines are noise here
    try:
        for (missing, have), shards in groups.items():
            run_steps = [s for s in steps if s.name in missing]
            done_steps = [s for s in context if s.name in have]
            for _ in range(MAX_REFITS + 1):
                try:
                    _run_group(layout, config, run_steps, done_steps, shards, counts, report, ray.cluster_resources(),
                               progress)
                    break
                except ClusterShrank as shrank:  # size the pools again for what is left; go on with the rest
                    parts = [layout.done_shards(s.name) for s in run_steps]
                    shards = [x for x in shards if not all(x in p for p in parts)]
                    report.refits.append(str(shrank))
                    print(f"{shrank}: actor pools sized again; {len(shards)} shard(s) to go", file=sys.stderr)
            else:
                raise Stalled(f"the cluster shrank {MAX_REFITS + 1} times during one stage; last: {report.refits[-1]}")
    finally:
        logging.disable(logging.NOTSET)
    report.seconds = time.monotonic() - started
    if report.first_image_s is not None:
        report.first_image_s -= started
    timeline.mark("pipeline_done", samples=report.samples)
    return report


def _import_pool_parts(layout: RunLayout, config: Config, steps: tuple[Step, ...], counts: dict[str, int],
                       report: SampleReport) -> dict[str, set[str]]:
    """Write, on the driver, the parts a pool's own values give (its embeddings for clip_score,
    its face boxes for faces: ``pipeline/plan_import.py``), so those shards need no image and no
    model; returns the shards written per step."""
    from pipeline.clip_import import import_clip_parts
    from pipeline.face_import import import_face_parts

    importers = {"clip_score": lambda shards: import_clip_parts(layout, config.clip, shards),
                 "faces": lambda shards: import_face_parts(layout, config.faces, shards)}
    written: dict[str, set[str]] = {}
    for s in steps:
        if s.name in importers:
            lacking = [x for x in sorted(set(counts) - layout.done_shards(s.name)) if counts[x]]
            done = importers[s.name](lacking)
            report.stages[s.name].shards_run += len(done)
            report.stages[s.name].samples += sum(done.values())
            report.imported[s.name] = report.imported.get(s.name, 0) + sum(done.values())
            written[s.name] = set(done)
    return written


def _inputs_lacking(run_steps: list[Step], context: tuple[Step, ...], available: set[str]) -> str | None:
    """Why a shard cannot run ``run_steps``: a column they read whose step is neither done on it
    nor running (None when every input is there)."""
    for s in run_steps:
        for earlier in context:
            if earlier is s:
                break
            if earlier.name not in available and set(s.stage.reads) & set(earlier.stage.writes()):
                return f"{s.name} needs {earlier.name}, which has not run on this shard"
    return None


def _earlier_parts(layout: RunLayout, run_steps: list[Step], done_steps: list[Step], shard: str) -> list[tuple[str, list[str]]]:
    """The done stages' parts of a shard, each with only the columns the running stages read."""
    wanted = {c for s in run_steps for c in s.stage.reads}
    parts = []
    for s in done_steps:
        columns = [c for c in s.stage.writes() if c in wanted]
        if columns:
            parts.append((str(layout.part_path(s.name, shard)), columns))
    return parts


def _streaming_dataset(
    layout: RunLayout,
    config: Config,
    run_steps: list[Step],
    done_steps: list[Step],
    shards: list[str],
    read_images: bool,
    cluster: dict[str, float],
) -> tuple[Any, dict[str, dict[str, float]]]:
    """read shard -> (decode) -> one actor pool per stage, as a lazy Ray Data pipeline; and what
    one replica of each pool asks for (CPU, GPU, and the pool's replicas)."""
    import ray

    items = [
        {
            "shard": shard,
            "download_part": str(layout.part_path("download", shard)),
            "tar": str(layout.shards_dir / f"{shard}.tar") if read_images else None,
            "parts": _earlier_parts(layout, run_steps, done_steps, shard),
        }
        for shard in shards
    ]
    sized = pool_sizes(config, run_steps, cluster)
    # one item per shard, as text: Arrow would have to type each shard's list of parts
    shard_items = [{"item": json.dumps(item)} for item in items]
    ds = ray.data.from_items(shard_items, override_num_blocks=len(items)).map_batches(
        read_shards, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS,
        compute=ray.data.TaskPoolStrategy(size=read_tasks(config, run_steps, sized)))
    chains = pools(run_steps, sized)
    declared = {chain[0].name: sized[chain[0].name] for chain in chains}  # riders ask for nothing of their own
    scale = fit_to_cluster(declared, cluster.get("CPU", 1))
    requests: dict[str, dict[str, float]] = {}
    for chain in chains:
        res: Resources = declared[chain[0].name]
        requests[chain[0].name] = {"CPU": res.cpus * scale, "GPU": res.gpus, "replicas": float(res.replicas)}
        later = run_steps[run_steps.index(chain[-1]) + 1:]
        keep_image = any(IMAGE in s.stage.reads for s in later)  # else the pixels stop here
        ds = ds.map_batches(
            StageActor,
            fn_constructor_args=(chain, config, keep_image),
            batch_size=res.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=res.replicas),
            num_cpus=res.cpus * scale,
            num_gpus=res.gpus or None,
        )
    # No drop_columns step here: a task operator after the actor pools would need a CPU that the
    # pools hold, and Ray Data would buffer every result until the pools finish (not streaming).
    return ds, requests


def _run_group(
    layout: RunLayout,
    config: Config,
    run_steps: list[Step],
    done_steps: list[Step],
    shards: list[str],
    counts: dict[str, int],
    report: SampleReport,
    cluster: dict[str, float],
    progress: bool,
) -> None:
    """One streaming pipeline over the shards that miss the same set of stages."""
    from tqdm import tqdm

    for shard in [s for s in shards if counts[s] == 0]:  # nothing downloaded: an empty part says "done" all the same
        for s in run_steps:
            write_table_atomic(s.stage.output_schema.empty_table(), layout.part_path(s.name, shard))
            report.stages[s.name].shards_run += 1
    shards = [s for s in shards if counts[s] > 0]
    if not shards:
        return
    import ray

    image_readers = [s for s in run_steps if IMAGE in s.stage.reads]
    ds, requests = _streaming_dataset(layout, config, run_steps, done_steps, shards, bool(image_readers), cluster)
    why = unplaceable({n: {k: v for k, v in r.items() if k != "replicas"} for n, r in requests.items()},
                      [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    if why:  # Ray would wait for such a node forever
        raise Stalled(why)

    label = "+".join(s.name for s in run_steps)
    expected = {s: counts[s] for s in shards}
    pending: dict[str, list[pa.Table]] = defaultdict(list)
    arrived: dict[str, int] = defaultdict(int)
    bar = tqdm(total=sum(expected.values()), unit="img", desc=label, disable=not progress)

    def stalled(waited: float) -> str:
        """What the pools were waiting on when no image had finished for the bound."""
        in_flight = first_shards([s for s in shards if arrived.get(s, 0) < expected[s]])
        return (f"{label}: no image finished in {waited:.0f} s ({sum(arrived.values())} of {sum(expected.values())} "
                f"done); shards in flight: {in_flight}; {resources_line(requests, ray.available_resources())}")

    def shrank() -> str | None:
        return cluster_shrank(cluster, ray.cluster_resources())

    with ProgressWatchdog(config.watchdog.stall_timeout_s, stalled, restart_when=shrank) as watchdog:
        _consume(ds, watchdog, run_steps, layout, expected, pending, arrived, bar, report, bool(image_readers))
    bar.close()
    for shard, want in expected.items():
        if arrived.get(shard, 0) != want:
            report.incomplete_shards[shard] = f"expected {want} samples, the pipeline gave {arrived.get(shard, 0)}"


def _consume(ds: Any, watchdog: ProgressWatchdog, run_steps: list[Step], layout: RunLayout, expected: dict[str, int],
             pending: dict[str, list[pa.Table]], arrived: dict[str, int], bar: Any, report: SampleReport,
             reads_images: bool) -> None:
    """Take the pipeline's batches as they come; a shard's parts are written once all its rows are in.

    ``prefetch_batches=0``: with Ray's default (1) a batch is handed over only once the next one
    has arrived, which held the first images back by one batch of the slowest stage (18 s on 2
    cores) and every later shard's part by as much.
    """
    timeline.mark("execution_start")
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
        watchdog.beat()
        if report.first_image_s is None:  # made relative to the step's start by run_per_sample
            report.first_image_s = time.monotonic()
            report.first_rows = batch.num_rows
            timeline.mark("first_images_out", rows=batch.num_rows)
        batch = _vectors_as_lists(batch)
        for shard in batch.column("shard").unique().to_pylist():
            rows = batch.filter(pc.equal(batch.column("shard"), shard))
            pending[shard].append(rows)
            arrived[shard] += rows.num_rows
            bar.update(rows.num_rows)
            if arrived[shard] == expected[shard]:
                whole = pa.concat_tables(pending.pop(shard), promote_options="permissive")
                for s in run_steps:
                    table = _stage_table(whole, s.stage)
                    write_table_atomic(table, layout.part_path(s.name, shard))
                    stage_report = report.stages[s.name]
                    stage_report.shards_run += 1
                    stage_report.samples += table.num_rows
                    status = s.stage.status_column
                    if status:
                        stage_report.failed += int(pc.sum(pc.not_equal(table.column(status), "ok")).as_py() or 0)
                report.samples += whole.num_rows
                if reads_images:
                    report.images_decoded += whole.num_rows


def shards_missing(layout: RunLayout, steps: tuple[Step, ...]) -> list[str]:
    """Downloaded shards that lack a part of at least one of ``steps`` (cheap: no Ray)."""
    done = {x.name: layout.done_shards(x.name) for x in steps}
    return [s for s in ok_counts(layout) if any(s not in done[x.name] for x in steps)]
