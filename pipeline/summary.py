"""The summary printed at the end of a run, computed from the manifests (so resumed work counts)."""

from __future__ import annotations

from manifests.catalog import run_query
from manifests.store import RunLayout
from pipeline.download_runner import DownloadReport


def download_summary(layout: RunLayout, report: DownloadReport, seconds: float) -> str:
    catalog = layout.catalog_path
    _, status = run_query(catalog, "select status, count(*) from download group by 1 order by 1 desc")
    counts = dict(status)
    total = sum(counts.values())
    _, reasons = run_query(
        catalog,
        "select error_kind, count(*) as n, min(url) as url, min(error) as error from download "
        "where status <> 'ok' group by 1 order by n desc, error_kind",
    )
    lines = ["", f"== download: {layout.root}"]
    if report.shards_run == 0 and not report.shards_failed:
        lines.append(
            f"   all {report.shards_total} shards were already downloaded: no download work done (resumed run)"
        )
    else:
        rate = report.samples_run / report.seconds if report.seconds > 0 else 0.0
        lines.append(
            f"   {report.shards_run} shard(s) downloaded now, {report.shards_already_done} already done, "
            f"{report.samples_run} samples in {report.seconds:.1f} s ({rate:.1f} samples/s)"
        )
    if report.duplicates_dropped:
        lines.append(f"   {report.duplicates_dropped} repeated (url, caption) rows of the input planned once")
    lines.append(f"   samples: {total}   ok: {counts.get('ok', 0)}   failed: {total - counts.get('ok', 0)}")
    for kind, n, url, error in reasons:
        lines.append(f"     {kind or '?':20s} {n:6d}   e.g. {url}: {error}")
    for shard, error in sorted(report.shards_failed.items()):
        lines.append(f"   SHARD {shard} FAILED ({error}); rerun the same command to retry it")
    lines.append(f"   total time {seconds:.1f} s")
    lines.append(f"   shards: {layout.shards_dir}   catalog: {catalog}")
    lines.append(f'   try: python -m pipeline query --output {layout.root} "select * from samples limit 5"')
    return "\n".join(lines)
