"""One curation run: download -> ocr -> parrot -> clip_score -> filter -> reshard -> report.

Every step skips the work that is already on disk, and Ray is started only when a step has work
(a rerun of a finished run takes a second and says it did nothing).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from manifests.catalog import build_catalog
from manifests.store import RunLayout, check_writable
from pipeline.config import Config, ConfigError, DownloadConfig
from pipeline.dag import PER_SAMPLE_STAGES
from pipeline.datasets import DatasetSource
from pipeline.download_runner import DownloadReport, plan_download, run_download
from pipeline.policy_runner import SelectionReport, select_policies
from pipeline.ray_runtime import ray_session
from pipeline.sample_runner import SampleReport, run_per_sample, shards_missing


@dataclass
class CurateResult:
    layout: RunLayout
    download: DownloadReport
    samples: SampleReport = field(default_factory=SampleReport)
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
    from pipeline.reshard_runner import is_up_to_date, reshard_policy
    from pipeline.report import write_report

    started = time.monotonic()
    try:
        check_writable(layout.root)
    except OSError as err:
        raise ConfigError(str(err)) from None
    download = source.download_config(download)  # e.g. the embedded dataset allows its own 127.0.0.1 server
    work = plan_download(source, layout, download)
    result = CurateResult(layout=layout, download=work.report)
    with contextlib.ExitStack() as stack:
        ray_up = False

        def ensure_ray() -> None:
            nonlocal ray_up
            if not ray_up:
                where = stack.enter_context(ray_session(address))
                print(f"curate {source.config.name} -> {layout.root}  ({where})", file=sys.stderr)
                ray_up = True

        if work.todo:
            ensure_ray()
            result.download = run_download(source, layout, download, work, progress=progress)
        build_catalog(layout)
        if shards_missing(layout, PER_SAMPLE_STAGES):
            ensure_ray()
            result.samples = run_per_sample(layout, config, PER_SAMPLE_STAGES, progress=progress)
            build_catalog(layout)  # the report and summary read the new parts, even when a shard failed
        if result.ok:
            result.selections = select_policies(layout, config, policies)
            for policy in policies:
                if not is_up_to_date(layout, policy, config.reshard.samples_per_shard):
                    ensure_ray()
                    result.reshards.append(
                        reshard_policy(layout, policy, config.reshard.samples_per_shard, progress=progress)
                    )
            build_catalog(layout)
    result.report_path = write_report(layout)
    result.seconds = time.monotonic() - started
    return result
