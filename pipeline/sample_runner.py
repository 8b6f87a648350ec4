"""Runs the per-sample stages (decode -> ocr -> ...) as one streaming Ray Data pipeline.

Each downloaded shard is read once and each image decoded once; model stages run as actor pools
(``map_batches`` with the CPUs, GPUs, batch size and replicas the stage declares), so a model
loads once per replica. Only small result columns come back to the driver, which writes one
manifest part per shard per stage, atomically, as soon as the shard's last sample arrives. Shards
whose parts exist are skipped; a shard missing only some stages runs only those.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests.schemas import schema_for
from manifests.store import RunLayout, as_path, read_bytes, read_table, write_table_atomic
from pipeline.config import Config
from pipeline.dag import StageSpec

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
    incomplete_shards: dict[str, str] = field(default_factory=dict)


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
    """All samples of one WebDataset tar: uid (from the json), key, caption, encoded image.

    Columns of stages already done for this shard (``item["parts"]``) are joined on uid, so a
    later stage reads them instead of the earlier stage running again.
    """
    samples: dict[str, dict[str, Any]] = defaultdict(dict)
    # one read of the whole shard (one GET from an object store), then members from memory
    with tarfile.open(fileobj=io.BytesIO(read_bytes(item["tar"]))) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            samples[key][ext] = tar.extractfile(member).read()
    done: dict[str, dict[str, Any]] = defaultdict(dict)
    for part in item.get("parts", []):
        for row in read_table(as_path(part)).to_pylist():
            done[row.pop("uid")].update(row)
    rows = []
    for key, parts in samples.items():
        meta = json.loads(parts.get("json", b"{}"))
        rows.append(
            {
                "uid": meta.get("uid"),
                "shard": item["shard"],
                "key": key,
                "caption": parts.get("txt", b"").decode("utf-8", "replace"),
                "jpg": parts.get("jpg", b""),
                **done.get(meta.get("uid"), {}),
            }
        )
    return rows


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
            errors.append(f"decode failed: {type(err).__name__}: {err}")
    out = {k: v for k, v in batch.items() if k != "jpg"}
    out["image"] = images
    out["decode_error"] = errors
    return out


def _plain(values: Any) -> list[Any]:
    """A column as plain Python values: Ray hands list columns back as numpy object arrays of
    arrays, which it would pickle instead of storing as Arrow lists on the way out."""
    return [v.tolist() if isinstance(v, np.ndarray) else v for v in values]


class StageActor:
    """One replica of a stage in a Ray Data actor pool: set up once, then called per batch."""

    def __init__(self, spec: StageSpec, config: Config, keep_image: bool = True) -> None:
        self.stage = spec.make(config)
        self.stage.setup()
        self.keep_image = keep_image  # the last stage drops the pixels: only small columns leave it

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        inputs = {k: list(v) for k, v in batch.items()}
        inputs["image"] = [None if a is None or a.size == 0 else a for a in batch["image"]]
        produced = self.stage.process_batch(inputs)
        out: dict[str, Any] = {
            k: (v if k == "image" or v.dtype != object else _plain(v))
            for k, v in batch.items()
            if k != "image" or self.keep_image
        }
        for column, values in produced.items():
            if column != "uid":
                out[column] = values
        return out


READ_CPUS = 0.25  # reading a tar and decoding JPEGs is light next to the model stages


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
    logging.getLogger(__name__).warning(
        "stages declare %.2f CPUs but the cluster has %.0f: scaling requests by %.2f so all stages run", wanted,
        cluster_cpus, scale,
    )
    return scale


def _typed(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    """Cast a column to its schema type. Ray turns an integer column with missing values into
    floats with NaN; those NaNs are the missing values, so they become nulls, not a cast error."""
    if pa.types.is_floating(column.type) and pa.types.is_integer(target):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    return column.cast(target)


def _stage_table(batch: pa.Table, stage: str) -> pa.Table:
    schema = schema_for(stage)
    columns = [_typed(batch.column(f.name), f.type) if f.name in batch.column_names else pa.nulls(batch.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def run_per_sample(
    layout: RunLayout, config: Config, specs: tuple[StageSpec, ...], progress: bool = True
) -> SampleReport:
    """Run every per-sample stage on every shard that lacks its part. Ray must be up."""
    import ray

    started = time.monotonic()
    report = SampleReport(stages={s.name: StageReport() for s in specs})
    counts = ok_counts(layout)
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    done = {s.name: layout.done_shards(s.name) for s in specs}  # one listing per stage, not a probe per part
    for shard in sorted(counts):
        missing = tuple(s.name for s in specs if shard not in done[s.name])
        for s in specs:
            if s.name not in missing:
                report.stages[s.name].shards_already_done += 1
        if missing:
            groups[missing].append(shard)

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.issue_detectors_config.detectors = []  # its memory hints are for large clusters, noise here
    gpus_available = ray.cluster_resources().get("GPU", 0) > 0
    cluster_cpus = ray.cluster_resources().get("CPU", 1)

    logging.disable(logging.INFO)  # Ray Data re-configures its loggers per execution; its INFO lines are noise here
    try:
        for missing, shards in groups.items():
            _run_group(layout, config, specs, missing, shards, counts, report, gpus_available, cluster_cpus, progress)
    finally:
        logging.disable(logging.NOTSET)
    report.seconds = time.monotonic() - started
    return report


def _run_group(
    layout: RunLayout,
    config: Config,
    specs: tuple[StageSpec, ...],
    missing: tuple[str, ...],
    shards: list[str],
    counts: dict[str, int],
    report: SampleReport,
    gpus_available: bool,
    cluster_cpus: float,
    progress: bool,
) -> None:
    """One streaming pipeline over the shards that miss the same set of stages."""
    import ray
    from tqdm import tqdm

    from stages.base import Resources


    run_specs = [s for s in specs if s.name in missing]
    empty = [s for s in shards if counts[s] == 0]
    for shard in empty:  # nothing downloaded: an empty part says "done" all the same
        for spec in run_specs:
            write_table_atomic(schema_for(spec.name).empty_table(), layout.part_path(spec.name, shard))
            report.stages[spec.name].shards_run += 1
    shards = [s for s in shards if counts[s] > 0]
    if not shards:
        return
    done_before = [s.name for s in specs if s.name not in missing]
    items = [
        {
            "shard": s,
            "tar": str(layout.shards_dir / f"{s}.tar"),
            "parts": [str(layout.part_path(name, s)) for name in done_before],
        }
        for s in shards
    ]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(read_shard, num_cpus=READ_CPUS)
    ds = ds.map_batches(decode_batch, batch_size=16, batch_format="numpy", num_cpus=READ_CPUS)
    declared = {spec.name: spec.make(config).resources(gpus_available) for spec in run_specs}
    scale = fit_to_cluster(declared, cluster_cpus)
    for spec in run_specs:
        res: Resources = declared[spec.name]
        ds = ds.map_batches(
            StageActor,
            fn_constructor_args=(spec, config, spec is not run_specs[-1]),
            batch_size=res.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=res.replicas),
            num_cpus=res.cpus * scale,
            num_gpus=res.gpus or None,
        )
    # No drop_columns step here: a task operator after the actor pools would need a CPU that the
    # pools hold, and Ray Data would buffer every result until the pools finish (not streaming).

    expected = {s: counts[s] for s in shards}
    pending: dict[str, list[pa.Table]] = defaultdict(list)
    arrived: dict[str, int] = defaultdict(int)
    bar = tqdm(total=sum(expected.values()), unit="img", desc="+".join(missing), disable=not progress)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for shard in batch.column("shard").unique().to_pylist():
            rows = batch.filter(pc.equal(batch.column("shard"), shard))
            pending[shard].append(rows)
            arrived[shard] += rows.num_rows
            bar.update(rows.num_rows)
            if arrived[shard] == expected[shard]:
                whole = pa.concat_tables(pending.pop(shard), promote_options="permissive")
                for spec in run_specs:
                    table = _stage_table(whole, spec.name)
                    write_table_atomic(table, layout.part_path(spec.name, shard))
                    stage_report = report.stages[spec.name]
                    stage_report.shards_run += 1
                    stage_report.samples += table.num_rows
                    status_col = next(c for c in table.column_names if c.endswith("_status"))
                    stage_report.failed += int(pc.sum(pc.not_equal(table.column(status_col), "ok")).as_py() or 0)
                report.samples += whole.num_rows
    bar.close()
    for shard, want in expected.items():
        if arrived.get(shard, 0) != want:
            report.incomplete_shards[shard] = f"expected {want} samples, the tar gave {arrived.get(shard, 0)}"


def shards_missing(layout: RunLayout, specs: tuple[StageSpec, ...]) -> list[str]:
    """Downloaded shards that lack a part of at least one of ``specs`` (cheap: no Ray)."""
    done = {x.name: layout.done_shards(x.name) for x in specs}
    return [s for s in ok_counts(layout) if any(s not in done[x.name] for x in specs)]

