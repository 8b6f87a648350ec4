"""The stage contract: what every stage declares as data, so a runner can check and schedule it
without knowing what it does (NeMo Curator's declared inputs and outputs, datatrove's one method).

Three kinds, by the unit of work:

- :class:`BatchStage`, per sample: a batch of columns in, one output row per input row
  (ocr, parrot, clip_score, dedup). Runs as a Ray Data actor pool, streaming.
- :class:`ShardStage`, per shard: one shard's rows or inputs in, files plus manifest rows out
  (download, reshard). Runs as one Ray task per shard.
- :class:`PoolStage`, over the whole pool: a DuckDB connection to the run's catalog in, one table
  out (filter, dup_group). Runs on the driver; SQL does the heavy lifting.

Every stage declares ``name``, the columns it ``reads`` ("image" means the decoded pixels), the
``output_schema`` it writes (``uid`` first), the ``status_column`` that says ok/failed per row
(None when every row is a decision, not an attempt), ``resources`` in one form, and ``setup``
(load models once per worker). Stages know nothing of Ray, paths of a run, or each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal, TypeVar

import pyarrow as pa

IMAGE = "image"  # the decoded pixels (HxWx3 uint8), read from the downloaded shard
T = TypeVar("T")
LIGHT_COST_PER_IMAGE = 0.005  # CPU-s per sample of a stage without a model (see Stage.cost_per_image)


@dataclass(frozen=True)
class Resources:
    """Resources one replica (actor or task) of a stage asks the scheduler for."""

    cpus: float = 1.0
    gpus: float = 0.0  # fractional GPUs allowed: 0.25 packs four replicas on one GPU
    batch_size: int = 1  # rows per process_batch call (batch stages)
    # actors in the pool (batch stages), or "auto": sized by the runner from the cluster and each
    # stage's ``cost_per_image`` (pipeline.sample_runner.size_pools); shard stages run a task per shard
    replicas: int | Literal["auto"] = 1


class StageContractError(RuntimeError):
    """A stage produced other columns than its schema declares: a bug in the stage, named."""


class Stage(ABC):
    """What every stage declares. Construction is cheap (the driver builds stages to plan);
    ``setup`` loads models, once per worker."""

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]]
    output_schema: ClassVar[pa.Schema]
    status_column: ClassVar[str | None] = None
    # No model and ~ms a sample: on CPU the runner runs it in the actor of the stage before it
    # rather than in a pool of its own (pipeline.sample_runner.pools).
    rides_along: ClassVar[bool] = False

    @abstractmethod
    def resources(self, gpus_available: bool) -> Resources:
        """Per-replica request; may depend on whether the cluster has GPUs."""

    def setup(self) -> None:
        """Load what the stage needs, once per worker; a second call is a no-op."""

    # Warnings that ``setup`` may raise which the runner says once, on the driver, from
    # ``notices()``, rather than once per replica: the runner ignores these categories in setup.
    announced_warnings: ClassVar[tuple[type[Warning], ...]] = ()

    def notices(self) -> list[str]:
        """What the user should hear once about this stage's configuration before it runs (e.g.
        scores from randomly initialised weights); said by the runner on the driver."""
        return []

    def cost_per_image(self) -> float:
        """CPU-seconds one replica spends per sample, roughly: what ``replicas = "auto"`` sizes
        the pools by (only the ratios between stages matter). Light by default (~5 ms: parrot,
        dedup); the model stages say what theirs cost."""
        return LIGHT_COST_PER_IMAGE

    @classmethod
    def writes(cls) -> tuple[str, ...]:
        """The columns this stage adds to a sample (its schema without ``uid``)."""
        return tuple(n for n in cls.output_schema.names if n != "uid")

    @classmethod
    def check_output(cls, columns: Any) -> None:
        """Refuse output whose columns differ from the declared schema, naming the difference."""
        got = set(columns)
        want = set(cls.output_schema.names)
        missing = sorted(want - got)
        extra = sorted(got - want)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing column(s) {', '.join(missing)}")
            if extra:
                parts.append(f"undeclared column(s) {', '.join(extra)}")
            raise StageContractError(f"stage {cls.name!r} broke its output schema: {'; '.join(parts)}")


def optional_column(batch: dict[str, Any], name: str, n: int) -> list:
    """A batch column as a list, or ``n`` Nones when the batch lacks it (a stage called on its own,
    e.g. in a test, without an optional earlier stage's columns)."""
    values = batch.get(name)
    return [None] * n if values is None else list(values)


def batch_or_each(call: Callable[[list[Any]], Sequence[T]], items: list[Any]) -> list[T | Exception]:
    """``call`` on the whole batch (one model call); if it raises, or answers for another number of
    items, on each item alone, so a bad one fails by itself: its Exception in its place."""
    try:
        results = call(items)
        if len(results) != len(items):
            raise RuntimeError(f"the model returned {len(results)} results for {len(items)} inputs")
        return list(results)
    except Exception as err:  # noqa: BLE001 - retried per item below
        if len(items) == 1:
            return [err]
    out: list[T | Exception] = []
    for item in items:
        try:
            out.append(call([item])[0])
        except Exception as err:  # noqa: BLE001 - recorded in the row
            out.append(err)
    return out


class BatchStage(Stage):
    """Per-sample: ``process_batch`` maps columns to the output schema's columns, one row per
    input row, in order. A row that fails is a row with a failed status and a reason, never an
    exception for the batch."""

    @abstractmethod
    def process_batch(self, batch: dict[str, list]) -> dict[str, list]:
        """``batch`` holds ``uid`` and the declared ``reads``; returns every schema column."""


@dataclass
class ShardOutput:
    """What one shard's work left behind: the manifest rows and the files it wrote."""

    manifest: pa.Table
    files: dict[str, Path] = field(default_factory=dict)  # by role: "tar", "parquet", "stats"
    bytes_written: int = 0


class ShardStage(Stage):
    """Per-shard: ``process_shard`` does one shard's work into ``work_dir`` (a private folder the
    runner commits from) and returns its manifest rows and files."""

    @abstractmethod
    def process_shard(self, shard: str, inputs: Any, work_dir: Path) -> ShardOutput:
        """``inputs`` is the shard's planned work (rows of a URL list, source samples, ...)."""


def _run_here(fn: Callable[..., T], calls: Sequence[tuple]) -> list[T]:
    return [fn(*call) for call in calls]


@dataclass
class PoolWork:
    """What a pool stage may use beside the catalog, so that no pool-wide step needs the whole pool
    in the driver's memory: a folder for its intermediate files (under the run, so workers on
    other nodes see it, and a killed run finds what its finished tasks wrote), the run's manifest
    parts of a stage (``parts("clip_score")``: a task reads one part, not the whole view), and
    ``map(fn, calls)``, which runs ``fn(*call)`` for every call, on the cluster when Ray is up
    (one CPU each) and here otherwise, and returns the results in order. Results should be small
    (counts, paths): the data travels through ``dir``."""

    dir: Path
    parts: Callable[[str], list[Path]] = lambda stage: []
    map: Callable[[Callable[..., T], Sequence[tuple]], list[T]] = _run_here
    say: Callable[[str], None] = lambda message: None  # a progress line for the console
    cpus: int = 1  # the CPUs ``map`` spreads over: how finely to split the work
    scratch: Path | None = None  # a local folder for the driver's own temporary files (None: the system's)


class PoolStage(Stage):
    """Over the whole pool: ``process_pool`` reads the run's catalog (DuckDB, views ``samples``
    and one per stage) and returns the rows of ``output_schema``: one table, or record batches
    (streamed to the part, so a pool of 10^8 rows never sits in memory)."""

    def inputs_key(self) -> str:
        """What the part depends on beyond the run's manifests and the stage's config (e.g. files
        outside the run): part of the digest by which a rerun knows the part is current."""
        return ""

    @abstractmethod
    def process_pool(self, con: Any, work: PoolWork) -> pa.Table | Iterable[pa.RecordBatch]:
        """``con`` is a read-only DuckDB connection to the run's catalog; ``work`` see :class:`PoolWork`."""
