"""One curation run: walk ``pipeline.dag.STEPS`` in order, each step skipping the work already on
disk. Ray is started only when a step has work (a rerun of a finished run takes seconds and says
it did nothing). Consecutive per-sample steps run together as one streaming pipeline.

A run may do only some steps (``curate --stages download``, then ``--stages ocr,parrot,clip_score``
on other nodes, then the rest): each step then works on what the earlier steps left on disk. A
per-sample step runs on the shards its inputs are done for; a pool or policy step, which sees the
whole pool, runs only when every shard is through the steps it reads, else it waits (named in the
summary, exit 1) rather than decide over part of the pool. Pool steps (dup_group) are cheap and
derived, so a step that reads them brings them along.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError
from manifests.catalog import build_catalog, source_plans
from manifests.store import RunLayout, check_writable
from pipeline.config import Config
from pipeline.dag import (
    POLICY,
    POOL,
    RUN,
    SAMPLE,
    SAMPLE_STEPS,
    SHARD,
    STAGE_ORDER,
    STEPS,
    Step,
    active_steps,
    builtin_eval_sets,
    check_reads,
    depends_on,
    step,
)
from pipeline.download_runner import DownloadReport, plan_download, run_download
from pipeline.policy_runner import POOL_PART, SelectionReport, run_pool_step, select_policies
from pipeline.ray_runtime import RayStart, ray_session
from pipeline.sample_runner import SampleReport, run_per_sample, shards_missing
from sources import DatasetSource
from stages.decontaminate import check_eval_sets
from stages.download import DownloadConfig


@dataclass
class CurateResult:
    layout: RunLayout
    download: DownloadReport
    samples: SampleReport = field(default_factory=SampleReport)
    pool_steps: dict[str, bool] = field(default_factory=dict)  # step -> whether its output changed
    selections: list[SelectionReport] = field(default_factory=list)
    reshards: list = field(default_factory=list)
    report_path: Path | None = None
    seconds: float = 0.0
    stages: tuple[str, ...] = tuple(s.name for s in STEPS)  # the steps this run was asked to do
    waiting: dict[str, str] = field(default_factory=dict)  # step -> why it could not run yet

    @property
    def ok(self) -> bool:
        return (not self.download.shards_failed and not self.samples.incomplete_shards and not self.samples.waiting
                and not self.waiting)


def source_column_names(source: DatasetSource, layout: RunLayout) -> set[str]:
    """The source columns the run's samples have: this list's, and those of lists planned before."""
    return set(source.source_columns()).union(*source_plans(layout).values())


def with_pool_steps(stages: tuple[str, ...], config: Config, policies: tuple[str, ...]) -> tuple[str, ...]:
    """``stages`` plus the pool steps that a chosen step reads (recomputed on every run anyway)."""
    chosen = set(stages)
    for s in reversed(STEPS):
        if s.name in chosen:
            chosen |= {d for d in depends_on(s, config, policies) if step(d).kind == POOL}
    return tuple(s.name for s in STEPS if s.name in chosen)


def curate(
    source: DatasetSource,
    layout: RunLayout,
    config: Config,
    download: DownloadConfig,
    policies: tuple[str, ...],
    address: str | None = None,
    progress: bool = True,
    stages: tuple[str, ...] | None = None,
    retry: str | None = None,
) -> CurateResult:
    """Run the DAG's steps (``stages``: some of them, see the module docstring; None: all)."""
    from pipeline.report import write_report
    from pipeline.reshard_runner import is_up_to_date, reshard_policy

    started = time.monotonic()
    check_reads(config, policies, source_columns=source_column_names(source, layout))
    active_steps(stages, config)  # a switched-off step named in --stages: one line, before anything is written
    if "decontaminate" in with_pool_steps(stages or tuple(s.name for s in STEPS), config, policies):
        # an eval set that cannot be read (missing, no images, a URL that does not fetch): one line, before any work
        check_eval_sets(config.decontaminate, builtin_eval_sets(config))
    try:
        check_writable(layout.root)
    except OSError as err:
        raise ConfigError(str(err)) from None
    download = source.download_config(download)  # e.g. the embedded dataset allows its own 127.0.0.1 server
    work = plan_download(source, layout, download, retry=retry)  # retry: --retry's reasons (failed rows, new shards)
    chosen = with_pool_steps(stages or tuple(s.name for s in STEPS), config, policies)
    result = CurateResult(layout=layout, download=work.report, stages=chosen)

    def catalog() -> None:
        build_catalog(layout, STAGE_ORDER)

    def not_ready(s: Step) -> str | None:
        """Why a pool or policy step cannot run over the whole pool yet (None: it can)."""
        for dep in depends_on(s, config, policies):
            kind = step(dep).kind
            if dep in result.waiting:
                return f"{dep} is waiting"
            if kind == SHARD:
                failed = len(result.download.shards_failed)
                undone = len(work.todo) if dep not in chosen else failed
                if undone:
                    return (f"{undone} of {work.report.shards_total} shard(s) are not downloaded"
                            + (" (failed: rerun to retry)" if dep in chosen else " (add 'download' to --stages)"))
            elif kind == SAMPLE:
                missing = shards_missing(layout, (step(dep),))
                if missing:
                    return (f"{len(missing)} downloaded shard(s) have no {dep} part yet"
                            + ("" if dep in chosen else f" (add '{dep}' to --stages)"))
            elif kind == POOL and not layout.part_path(dep, POOL_PART).exists():
                return f"{dep} has not run"
            elif kind == POLICY:
                absent = [p for p in policies if not layout.selection_path(p).exists()]
                if absent:
                    return f"no selection yet for {', '.join(absent)}" + ("" if dep in chosen else " (add 'filter' to --stages)")
        return None

    with contextlib.ExitStack() as stack:
        ray_up = False
        starting: RayStart | None = None
        sample_steps = tuple(s for s in SAMPLE_STEPS if s.name in chosen and s.enabled(config))
        streaming = bool(sample_steps) and bool(work.todo or shards_missing(layout, sample_steps))
        if work.todo or streaming:
            # work that needs Ray: start it now, under the rest of the planning (RayStart)
            starting = RayStart(address, preload=("ray.data",) if streaming else ())
            stack.callback(starting.abandon)

        def ensure_ray() -> None:
            nonlocal ray_up
            if not ray_up:
                where = stack.enter_context(ray_session(address, started=starting))
                print(f"curate {source.config.name} -> {layout.root}  ({where})", file=sys.stderr)
                ray_up = True

        pending_samples: list[Step] = []

        def flush_samples() -> None:
            """Run the per-sample steps collected so far as one streaming pipeline."""
            if pending_samples and shards_missing(layout, tuple(pending_samples)):
                ensure_ray()
                result.samples = run_per_sample(layout, config, tuple(pending_samples), progress=progress,
                                                context=SAMPLE_STEPS)
                catalog()  # the report and summary read the new parts, even when a shard failed
            pending_samples.clear()

        for s in STEPS:
            if s.kind != SAMPLE:
                flush_samples()
            if s.name not in chosen or not s.enabled(config):  # an optional step switched off ([faces] enabled)
                continue
            if s.kind in (POOL, POLICY):
                why = not_ready(s)
                if why:
                    result.waiting[s.name] = why
                    continue
            if s.kind == SHARD:  # download
                if work.todo:
                    ensure_ray()
                    result.download = run_download(source, layout, download, work, progress=progress,
                                                   stall_seconds=config.watchdog.stall_timeout_s)
                catalog()
            elif s.kind == SAMPLE:
                pending_samples.append(s)
            elif s.kind == RUN:
                continue  # the report: written below, once Ray is down, also for an unfinished run
            elif s.kind == POOL:
                result.pool_steps[s.name] = run_pool_step(layout, s.make(config, None))
                catalog()
            elif s.kind == POLICY and s.name == "filter":
                result.selections = select_policies(layout, config, policies)
                catalog()
            elif s.kind == POLICY:  # reshard
                for policy in policies:
                    if not is_up_to_date(layout, policy, config.reshard.samples_per_shard, config.reshard.blur_faces):
                        ensure_ray()
                        result.reshards.append(
                            reshard_policy(layout, policy, config.reshard.samples_per_shard, progress=progress,
                                           stall_seconds=config.watchdog.stall_timeout_s,
                                           blur_faces=config.reshard.blur_faces)
                        )
                catalog()
    if "report" in chosen:
        result.report_path = write_report(layout)
    result.seconds = time.monotonic() - started
    return result
