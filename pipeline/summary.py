"""The summary printed at the end of a run, computed from the manifests (so resumed work counts)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from manifests.catalog import run_query
from manifests.store import RunLayout
from pipeline.dag import SAMPLE_STEPS, STEPS
from pipeline.download_runner import DownloadReport
from pipeline.sample_runner import SampleReport

if TYPE_CHECKING:
    from pipeline.curate import CurateResult


def download_summary(layout: RunLayout, report: DownloadReport, seconds: float, ran: bool = True) -> str:
    catalog = layout.catalog_path
    if "download" not in layout.stages_present():  # every shard failed: nothing to count yet
        lines = ["", f"== download: {layout.root}", "   no shard finished"]
        for shard, error in sorted(report.shards_failed.items()):
            lines.append(f"   SHARD {shard} FAILED ({error}); rerun the same command to retry it")
        return "\n".join(lines)
    _, status = run_query(layout, "select status, count(*) from download group by 1 order by 1 desc")
    counts = dict(status)
    total = sum(counts.values())
    _, reasons = run_query(
        layout,
        "select error_kind, count(*) as n, min(url) as url, min(error) as error from download "
        "where status <> 'ok' group by 1 order by n desc, error_kind",
    )
    lines = ["", f"== download: {layout.root}"]
    if not ran:
        done = report.shards_already_done
        lines.append(f"   not in --stages: {done} of {report.shards_total} shards downloaded so far"
                     + ("" if done == report.shards_total else " (add 'download' to --stages for the rest)"))
    elif report.shards_run == 0 and not report.shards_failed:
        lines.append(
            f"   all {report.shards_total} shards were already downloaded: no download work done (resumed run)"
        )
    else:
        rate = report.samples_run / report.seconds if report.seconds > 0 else 0.0
        lines.append(
            f"   {report.shards_run} shard(s) downloaded now, {report.shards_already_done} already done, "
            f"{report.samples_run} samples in {report.seconds:.1f} s ({rate:.1f} samples/s)"
        )
    lines += [f"   {line}" for line in report.input_lines()]
    retry = report.retry.entry if report.retry is not None else None
    if retry is not None and ran:  # how the retry went: its shards' rows, at their latest attempt
        shards = ", ".join(f"'{s}'" for s in retry.shard_list())
        _, outcome = run_query(layout, "select coalesce(error_kind, 'ok'), count(*) from download "
                                       f"where shard in ({shards}) group by 1 order by 2 desc, 1")
        lines.append("   retried now: " + ", ".join(f"{kind} {n}" for kind, n in outcome))
    lines.append(f"   samples: {total}   ok: {counts.get('ok', 0)}   failed: {total - counts.get('ok', 0)}")
    for kind, n, url, error in reasons:
        lines.append(f"     {kind or '?':20s} {n:6d}   e.g. {url}: {error}")
    for shard, error in sorted(report.shards_failed.items()):
        lines.append(f"   SHARD {shard} FAILED ({error}); rerun the same command to retry it")
    lines.append(f"   shards: {layout.shards_dir}   catalog: {catalog}   (run took {seconds:.1f} s)")
    lines.append(f'   try: python -m pipeline query --output {layout.root} "select * from samples limit 5"')
    return "\n".join(lines)


def samples_summary(layout: RunLayout, report: SampleReport, stages: list[str]) -> str:
    """Per-stage work of this run, what the manifests hold, and OCR accuracy where ground truth exists."""
    lines = []
    rate = report.samples / report.seconds if report.seconds > 0 else 0.0
    if report.samples:
        decoded = f"{report.images_decoded} decoded" if report.images_decoded else "none decoded: text-only stages"
        lines.append(
            f"== per-sample stages: {report.samples} samples in {report.seconds:.1f} s ({rate:.2f} samples/s; "
            f"images {decoded})"
        )
        steady = report.steady_images_per_s
        if report.first_image_s is not None:
            lines.append(f"   the first {report.first_rows} came out after {report.first_image_s:.1f} s (start-up: "
                         "Ray Data, actor processes, model loads, the first batches)"
                         + (f", then {steady:.2f} samples/s" if steady is not None else ""))
    if report.clip_imported:
        lines.append(f"== clip_score: {report.clip_imported} samples scored from the pool's own embeddings "
                     "(no model, no image decoded; catalog view `embeddings`)")
    if not report.samples and not report.clip_imported:
        lines.append("== per-sample stages: no shard had the inputs of the steps asked for" if report.waiting
                     else "== per-sample stages: every shard already done (resumed run)")
    for name in stages:
        st = report.stages.get(name)
        if st is not None and st.shards_run:
            lines.append(
                f"   {name:10s} {st.shards_run} shard(s) now, {st.shards_already_done} already done, "
                f"{st.samples} samples, {st.failed} failed"
            )
    for why in report.refits:
        lines.append(f"   {why}: the actor pools were sized again and went on with the unfinished shards")
    for shard, why in sorted(report.incomplete_shards.items()):
        lines.append(f"   SHARD {shard} INCOMPLETE ({why}); rerun the same command to retry it")
    waiting: dict[str, list[str]] = {}
    for shard, why in sorted(report.waiting.items()):
        waiting.setdefault(why, []).append(shard)
    for why, shards in waiting.items():
        named = ", ".join(shards[:5]) + (", ..." if len(shards) > 5 else "")
        lines.append(f"   WAITING: {why}: {len(shards)} shard(s) ({named}); add that step to --stages")
    if "ocr" in layout.stages_present():
        _, rows = run_query(
            layout,
            "select count(*), count(*) filter (where n_regions > 0), avg(text_area_ratio), "
            "count(*) filter (where ocr_status <> 'ok'), any_value(ocr_engine), any_value(ocr_device), "
            "any_value(ocr_precision) from ocr",
        )
        n, with_text, area, failed, engine, device, precision = rows[0]
        if n:
            lines.append(
                f"   ocr: {with_text}/{n} images with text ({100 * with_text / n:.1f}%), mean text area "
                f"{100 * (area or 0):.1f}%, {failed} failed; {engine} on {device} ({precision})"
            )
        accuracy = ocr_accuracy_lines(layout)
        if accuracy:
            lines.append("   ocr accuracy vs ground truth: " + accuracy)
    if "parrot" in layout.stages_present():
        from pipeline.stats import parrot_stats

        lines.append(parrot_stats(layout).format())
    if "dup_group" in layout.stages_present():
        lines += dedup_lines(layout)
    lines += decontaminate_lines(layout)
    return "\n".join(lines)


DEDUP_TIERS = (("exact", "dup_exact_group", "dup_exact_size", "dup_exact_keeper", "same bytes"),
               ("pHash", "dup_group", "dup_group_size", "dup_keeper", "pHash within dedup.radius"),
               ("semantic", "dup_semantic_group", "dup_semantic_size", "dup_semantic_keeper", "embedding cosine >= 1 - eps"))


def dedup_lines(layout: RunLayout) -> list[str]:
    """Per tier: the samples it compared, those in a group of two or more, the groups, and what a
    dedup keeping one per group drops; a tier that compared nothing says so."""
    parts = []
    for name, group, size, keeper, what in DEDUP_TIERS:
        parts.append(f"count({group}), count(*) filter (where {size} > 1), "
                     f"count(distinct {group}) filter (where {size} > 1), count(*) filter (where not {keeper})")
    _, rows = run_query(layout, f"select count(*), {', '.join(parts)} from dup_group")
    total, *values = rows[0]
    lines = []
    for index, (name, _, _, _, what) in enumerate(DEDUP_TIERS):
        compared, members, groups, dropped = values[4 * index: 4 * index + 4]
        if not compared:
            why = (" (no embeddings of a trained model: pretrained CLIP weights, or a pool's own vectors)"
                   if name == "semantic" else "")
            lines.append(f"   dedup {name}: compared nothing{why}")
            continue
        lines.append(f"   dedup {name} ({what}): {members}/{compared} samples in {groups} group(s) of 2+; "
                     f"one kept per group, {dropped} dropped")
    return lines


def decontaminate_lines(layout: RunLayout) -> list[str]:
    """How many samples copy an evaluation image, by tier and set, and why a tier did not run."""
    if "decontaminate" not in layout.stages_present():
        return []
    from manifests.catalog import connect
    from stages.decontaminate import semantic_tier

    con = connect(layout.catalog_path, layout)
    try:
        n, exact, phash, semantic = con.execute(
            "select count(eval_match), count(*) filter (where eval_match.tier = 'exact'), "
            "count(*) filter (where eval_match.tier = 'phash'), count(*) filter (where eval_match.tier = 'semantic') "
            "from decontaminate").fetchone()
        sets = [s for (s,) in con.execute("select distinct eval_match.set from decontaminate "
                                          "where eval_match is not null order by 1").fetchall()]
        note = semantic_tier(con, None)
    finally:
        con.close()
    where = f" in set(s) {', '.join(sets)}" if sets else ""
    lines = [f"   decontaminate: {n} sample(s) match an evaluation image (exact {exact}, phash {phash}, "
             f"semantic {semantic}){where}; policy no-eval-dups drops them"]
    if note:
        lines.append(f"     note: {note}")
    return lines


def ocr_accuracy_lines(layout: RunLayout) -> str | None:
    """OCR accuracy against the embedded dataset's ground truth, or None where there is none."""
    from sources import ground_truth_path

    gt_path = ground_truth_path(layout.root)
    if not gt_path.exists() or "ocr" not in layout.stages_present():
        return None
    from manifests.store import read_table
    from pipeline.ocr_accuracy import score_ocr

    accuracy = score_ocr(read_table(layout.stage_dir("ocr")), read_table(layout.stage_dir("download")), read_table(gt_path))
    return accuracy.format().replace("\n", "; ")


def run_summary(result: "CurateResult") -> str:
    """Everything a run did, from the manifests: download, per-sample stages, policies, output."""
    layout = result.layout
    lines = [download_summary(layout, result.download, result.seconds, ran="download" in result.stages)]
    if len(result.stages) < len(STEPS):
        lines.append(f"== steps run (--stages): {', '.join(result.stages)}")
    if "ocr" in layout.stages_present() or result.samples.samples or result.samples.waiting or result.samples.clip_imported:
        lines.append(samples_summary(layout, result.samples, [s.name for s in SAMPLE_STEPS]))
    if result.selections:
        lines.append("== policies (kept / downloaded samples)")
        resharded = {r.policy: r for r in result.reshards}
        for sel in result.selections:
            done = resharded.get(sel.policy)
            how = f"resharded into {done.shards} shard(s)" if done is not None else "curated shards up to date"
            lines.append(f"   {sel.policy:16s} {sel.kept:6d} / {sel.total:<6d} {how}   ({sel.description})")
        lines.append(f"   curated shards: {layout.root / 'curated'}/<policy>/  (sizes.json, manifest.parquet)")
    for name, why in result.waiting.items():
        lines.append(f"== {name} WAITING: {why}; it runs once its inputs are complete (same command)")
    if result.report_path is not None:
        lines.append(f"== report: {result.report_path}")
    return "\n".join(lines)
