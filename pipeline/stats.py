"""Parrot statistics of a run, in DuckDB SQL over the catalog, as the Parrot Captions paper
measured LAION-2B: share of images with embedded text, co-emb. text rate (CoTR, exact and fuzzy)
over all captions and over captions of images with text, the parrot-score distribution, and how
CLIP score relates to it. With ground truth (embedded dataset): mean score per caption kind and
the AUC of parrot vs descriptive captions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from manifests.catalog import connect
from manifests.store import RunLayout

PAPER_LAION = {"text_share": 0.546, "cotr_all": 0.1542, "cotr_text": 0.2824, "fuzzy_all": 0.3046, "fuzzy_text": 0.5579}

BUCKETS = "case when parrot_score = 0 then '0' when parrot_score < 0.25 then '(0,0.25)' " \
    "when parrot_score < 0.5 then '[0.25,0.5)' when parrot_score < 1 then '[0.5,1)' else '1' end"


@dataclass
class ParrotStats:
    samples: int = 0
    text_share: float = 0.0
    cotr_all: float = 0.0
    cotr_text: float = 0.0
    fuzzy_all: float = 0.0
    fuzzy_text: float = 0.0
    parroting_share: float = 0.0  # captions with at least one spelled word (CoTR > 0)
    is_parrot_share: float = 0.0
    histogram: list[tuple[str, int]] = field(default_factory=list)
    clip_by_bucket: list[tuple[str, int, float | None, float | None]] = field(default_factory=list)
    clip_parrot_corr: float | None = None
    by_kind: list[tuple[str, int, float]] = field(default_factory=list)
    auc_parrot_vs_descriptive: float | None = None

    def format(self) -> str:
        pct = lambda x: f"{100 * (x or 0):5.1f}%"  # noqa: E731
        lines = [
            f"== parrot statistics ({self.samples} scored samples; LAION-2B per the Parrot Captions paper in brackets)",
            f"   images with embedded text       {pct(self.text_share)}   [{pct(PAPER_LAION['text_share'])}]",
            f"   CoTR, all captions              {pct(self.cotr_all)}   [{pct(PAPER_LAION['cotr_all'])}]",
            f"   CoTR, captions of text images   {pct(self.cotr_text)}   [{pct(PAPER_LAION['cotr_text'])}]",
            f"   fuzzy CoTR, all captions        {pct(self.fuzzy_all)}   [{pct(PAPER_LAION['fuzzy_all'])}]",
            f"   fuzzy CoTR, text images         {pct(self.fuzzy_text)}   [{pct(PAPER_LAION['fuzzy_text'])}]",
            f"   captions spelling >= 1 word     {pct(self.parroting_share)}",
            f"   captions flagged is_parrot      {pct(self.is_parrot_share)}",
            "   parrot_score histogram: " + ", ".join(f"{b}: {n}" for b, n in self.histogram),
        ]
        if self.clip_by_bucket:
            lines.append("   clip_score by parrot_score bucket (mean clip_score, mean drop when text is masked):")
            for bucket, n, clip, drop in self.clip_by_bucket:
                clip_s = "n/a" if clip is None else f"{clip:+.4f}"
                drop_s = "n/a" if drop is None else f"{drop:+.4f}"
                lines.append(f"     {bucket:11s} n={n:5d}  clip_score {clip_s}  drop {drop_s}")
            corr = "n/a" if self.clip_parrot_corr is None else f"{self.clip_parrot_corr:+.3f}"
            lines.append(f"   corr(clip_score, parrot_score) = {corr}")
        if self.by_kind:
            kinds = ", ".join(f"{k} {m:.3f} (n={n})" for k, n, m in self.by_kind)
            lines.append(f"   mean parrot_score by true caption kind: {kinds}")
            if self.auc_parrot_vs_descriptive is not None:
                lines.append(f"   AUC parrot vs descriptive captions: {self.auc_parrot_vs_descriptive:.3f}")
        return "\n".join(lines)


def _auc(positives: list[float], negatives: list[float]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not positives or not negatives:
        return None
    wins = 0.0
    for p in positives:
        for n in negatives:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(positives) * len(negatives))


def parrot_stats(layout: RunLayout) -> ParrotStats:
    """Compute the statistics from the run's catalog (needs the ocr and parrot stages)."""
    con = connect(layout.catalog_path, layout)
    try:
        return _compute(con, layout.root)
    finally:
        con.close()


def _one(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[Any, ...]:
    return con.execute(sql).fetchone()


def _compute(con: duckdb.DuckDBPyConnection, root: Path) -> ParrotStats:
    scored = "from samples where status = 'ok' and parrot_status = 'ok' and ocr_status = 'ok'"
    n, text_share, cotr_all, fuzzy_all, parroting, flagged = _one(
        con,
        "select count(*), avg((n_regions > 0)::int), avg(parrot_score_exact), avg(parrot_score), "
        f"avg((parrot_score > 0)::int), avg(is_parrot::int) {scored}",
    )
    stats = ParrotStats(samples=n or 0)
    if not n:
        return stats
    cotr_text, fuzzy_text = _one(con, f"select avg(parrot_score_exact), avg(parrot_score) {scored} and n_regions > 0")
    stats.text_share, stats.cotr_all, stats.fuzzy_all = text_share, cotr_all, fuzzy_all
    stats.cotr_text, stats.fuzzy_text = cotr_text or 0.0, fuzzy_text or 0.0
    stats.parroting_share, stats.is_parrot_share = parroting, flagged
    stats.histogram = con.execute(f"select {BUCKETS} as b, count(*) {scored} group by b order by min(parrot_score)").fetchall()
    has_clip = "clip_score" in [r[0] for r in con.execute("select column_name from (describe samples)").fetchall()]
    if has_clip:
        stats.clip_by_bucket = con.execute(
            f"select {BUCKETS} as b, count(*), avg(clip_score), avg(clip_score - clip_score_masked) "
            f"{scored} and clip_status = 'ok' group by b order by min(parrot_score)"
        ).fetchall()
        stats.clip_parrot_corr = _one(con, f"select corr(clip_score, parrot_score) {scored} and clip_status = 'ok'")[0]
    gt = root / "ground_truth.parquet"
    if gt.exists():
        path = str(gt).replace("'", "''")
        rows = con.execute(
            f"select g.caption_kind, s.parrot_score from samples s join read_parquet('{path}') g on g.url = s.url "
            "where s.status = 'ok' and s.parrot_status = 'ok'"
        ).fetchall()
        kinds: dict[str, list[float]] = {}
        for kind, score in rows:
            kinds.setdefault(kind, []).append(score)
        stats.by_kind = [(k, len(v), sum(v) / len(v)) for k, v in sorted(kinds.items())]
        stats.auc_parrot_vs_descriptive = _auc(kinds.get("parrot", []), kinds.get("descriptive", []))
    return stats
