"""Parrot statistics of a run, in DuckDB SQL over the catalog, as the Parrot Captions paper
measured LAION-2B: share of images with embedded text, co-emb. text rate (CoTR, exact and fuzzy)
over all captions and over captions of images with text, the parrot-score distribution, and how
CLIP score relates to it. With ground truth (embedded dataset): mean score per caption kind and
the AUC of parrot vs descriptive captions.

Like with like: the paper's figures are set against the ``cotr`` / ``cotr_fuzzy`` columns (every
caption word counted, as the paper does), never against ``parrot_score``, whose stop-word removal
changes the scale ("to be or not to be" with "NOT" is 1.0 there, 0.25 as CoTR). Each line names
the column it averages. A run scored before those columns existed shows n/a there.
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
    cotr_all: float | None = None  # mean cotr (None: the run has no cotr column)
    cotr_text: float | None = None
    fuzzy_all: float | None = None  # mean cotr_fuzzy
    fuzzy_text: float | None = None
    score_exact_all: float = 0.0  # mean parrot_score_exact: the project's scale, no paper figure
    score_all: float = 0.0  # mean parrot_score
    parroting_share: float | None = None  # the paper's parrots: cotr > 0
    is_parrot_share: float = 0.0
    histogram: list[tuple[str, int]] = field(default_factory=list)
    clip_by_bucket: list[tuple[str, int, float | None, float | None]] = field(default_factory=list)
    clip_parrot_corr: float | None = None
    by_kind: list[tuple[str, int, float]] = field(default_factory=list)
    auc_parrot_vs_descriptive: float | None = None

    def format(self) -> str:
        pct = lambda x: "  n/a " if x is None else f"{100 * x:5.1f}%"  # noqa: E731
        paper = lambda key: f"[{pct(PAPER_LAION[key])}]"  # noqa: E731
        lines = [
            f"== parrot statistics ({self.samples} scored samples; LAION-2B per the Parrot Captions paper in brackets)",
            "   like with like: the paper's CoTR counts every caption word (columns cotr, cotr_fuzzy)",
            f"   images with embedded text       {pct(self.text_share)}   {paper('text_share')}   n_regions > 0",
            f"   CoTR, all captions              {pct(self.cotr_all)}   {paper('cotr_all')}   mean cotr",
            f"   CoTR, captions of text images   {pct(self.cotr_text)}   {paper('cotr_text')}   mean cotr",
            f"   fuzzy CoTR, all captions        {pct(self.fuzzy_all)}   {paper('fuzzy_all')}   mean cotr_fuzzy",
            f"   fuzzy CoTR, text images         {pct(self.fuzzy_text)}   {paper('fuzzy_text')}   mean cotr_fuzzy",
            "     (fuzzy: our matcher, one edit on non-words and merged words; the paper's edit threshold is not given)",
            f"   captions spelling >= 1 word     {pct(self.parroting_share)}              cotr > 0 (the paper's parrots)",
            "   this project's score (stop words removed per [parrot]; a different scale, no paper figure):",
            f"   parrot_score_exact, all         {pct(self.score_exact_all)}              mean parrot_score_exact",
            f"   parrot_score, all               {pct(self.score_all)}              mean parrot_score",
            f"   captions flagged is_parrot      {pct(self.is_parrot_share)}              parrot_score >= parrot.parrot_threshold",
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
    columns = {r[0] for r in con.execute("select column_name from (describe samples)").fetchall()}
    n, text_share, score_exact_all, score_all, flagged = _one(
        con,
        "select count(*), avg((n_regions > 0)::int), avg(parrot_score_exact), avg(parrot_score), "
        f"avg(is_parrot::int) {scored}",
    )
    stats = ParrotStats(samples=n or 0)
    if not n:
        return stats
    stats.text_share, stats.score_exact_all, stats.score_all, stats.is_parrot_share = (
        text_share, score_exact_all, score_all, flagged)
    if {"cotr", "cotr_fuzzy"} <= columns:  # absent in runs scored before the paper's CoTR columns
        stats.cotr_all, stats.fuzzy_all, stats.parroting_share = _one(
            con, f"select avg(cotr), avg(cotr_fuzzy), avg((cotr > 0)::int) {scored}")
        cotr_text, fuzzy_text = _one(con, f"select avg(cotr), avg(cotr_fuzzy) {scored} and n_regions > 0")
        stats.cotr_text, stats.fuzzy_text = cotr_text or 0.0, fuzzy_text or 0.0
    stats.histogram = con.execute(f"select {BUCKETS} as b, count(*) {scored} group by b order by min(parrot_score)").fetchall()
    if "clip_score" in columns:
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
