"""One curation run: walk ``pipeline.dag.STEPS`` in order, each step skipping the work already on
disk. Ray is started only when a step has work (a rerun of a finished run takes seconds and says
it did nothing). Consecutive per-sample steps run together as one streaming pipeline.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError
from manifests.catalog import build_catalog
from manifests.store import RunLayout, check_writable
from pipeline.config import Config
from pipeline.dag import POLICY, POOL, RUN, SAMPLE, SHARD, STAGE_ORDER, STEPS, Step, check_reads
from pipeline.download_runner import DownloadReport, plan_download, run_download
from pipeline.policy_runner import SelectionReport, run_pool_step, select_policies
from pipeline.ray_runtime import ray_session
from pipeline.sample_runner import SampleReport, run_per_sample, shards_missing
from sources import DatasetSource
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

    @property
    def ok(self) -> bool:
        return not self.download.shards_failed and not self.samples.incomplete_shards


def curate(
    source: DatasetSource,
    layout: RunLayout,
    config: Config,
    download: DownloadConfig,
    policies: tuple[str, ...],
    address: str | None = None,
    progress: bool = True,
) -> CurateResult:
    from pipeline.report import write_report
    from pipeline.reshard_runner import is_up_to_date, reshard_policy

    started = time.monotonic()
    check_reads(config, policies)
    try:
        check_writable(layout.root)
    except OSError as err:
        raise ConfigError(str(err)) from None
    download = source.download_config(download)  # e.g. the embedded dataset allows its own 127.0.0.1 server
    work = plan_download(source, layout, download)
    result = CurateResult(layout=layout, download=work.report)

    def catalog() -> None:
        build_catalog(layout, STAGE_ORDER)

    with contextlib.ExitStack() as stack:
        ray_up = False

        def ensure_ray() -> None:
            nonlocal ray_up
            if not ray_up:
                where = stack.enter_context(ray_session(address))
                print(f"curate {source.config.name} -> {layout.root}  ({where})", file=sys.stderr)
                ray_up = True

        pending_samples: list[Step] = []

        def flush_samples() -> None:
            """Run the per-sample steps collected so far as one streaming pipeline."""
            if pending_samples and shards_missing(layout, tuple(pending_samples)):
                ensure_ray()
                result.samples = run_per_sample(layout, config, tuple(pending_samples), progress=progress)
                catalog()  # the report and summary read the new parts, even when a shard failed
            pending_samples.clear()

        for s in STEPS:
            if s.kind != SAMPLE:
                flush_samples()
            if s.kind == SHARD:  # download
                if work.todo:
                    ensure_ray()
                    result.download = run_download(source, layout, download, work, progress=progress)
                catalog()
            elif s.kind == SAMPLE:
                pending_samples.append(s)
            elif s.kind == RUN:
                continue  # the report: written below, once Ray is down, also for an unfinished run
            elif not result.ok:
                continue  # no selection over a pool with unfinished shards: a rerun resumes them
            elif s.kind == POOL:
                result.pool_steps[s.name] = run_pool_step(layout, s.make(config, None))
                catalog()
            elif s.kind == POLICY and s.name == "filter":
                result.selections = select_policies(layout, config, policies)
                catalog()
            elif s.kind == POLICY:  # reshard
                for policy in policies:
                    if not is_up_to_date(layout, policy, config.reshard.samples_per_shard):
                        ensure_ray()
                        result.reshards.append(
                            reshard_policy(layout, policy, config.reshard.samples_per_shard, progress=progress)
                        )
                catalog()
    result.report_path = write_report(layout)
    result.seconds = time.monotonic() - started
    return result
