"""How well the OCR stage finds and reads the text that the embedded dataset rendered.

Regions: a predicted quad matches a ground-truth quad when their polygon IoU is at least
``iou_threshold`` (0.5, as in ICDAR-style detection scoring); matching is greedy one-to-one by
descending IoU, and precision/recall/F1 are micro-averaged over all regions of all images.
The ground truth has one quad per rendered line (1-3 words), so an engine that boxes words
separately is penalised here even when it reads every word: ``word_recall`` is the measure that
does not care about box granularity.

Words: ground-truth words and recognised words are compared case-insensitively with punctuation
stripped, exact match, per image.

Real photographs (``tests/test_ocr_real.py``) need two more measures. Their annotations are not
line-shaped like ours: WildReceipt boxes one field and writes its text without the spaces the
receipt prints ("THANKYOUFORSHOPPINGWITHUS!"), so ``spaceless_words_found`` accepts a truth word
that equals any run of consecutive recognised words of one region joined without spaces (a
one-letter truth word still needs a one-letter reading: no substring matches). And region IoU
punishes a detector that boxes a whole line where the truth boxes fields, so
``text_area_coverage`` asks the granularity-free question: what share of the annotated text area
do the detected quads cover at all.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa

QuadLike = Sequence[Sequence[float]]

_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)


def normalise_word(word: str) -> str:
    """Casefold, NFKC, and drop punctuation (and underscores, which easyocr emits for noise)."""
    return _PUNCT.sub("", unicodedata.normalize("NFKC", word)).casefold().strip()


def words_of(texts: Iterable[str]) -> list[str]:
    """Normalised words of a list of region texts (split on whitespace), empties dropped."""
    out: list[str] = []
    for text in texts:
        for token in (text or "").split():
            word = normalise_word(token)
            if word:
                out.append(word)
    return out


def _polygon(quad: QuadLike) -> Any:
    from shapely.geometry import Polygon

    poly = Polygon([(float(x), float(y)) for x, y in quad])
    if not poly.is_valid:  # a self-intersecting ("bow-tie") quad from a detector
        poly = poly.buffer(0)
    return poly


def polygon_iou(a: QuadLike, b: QuadLike) -> float:
    """IoU of two quads as polygons (0 when either is degenerate)."""
    pa_, pb = _polygon(a), _polygon(b)
    if pa_.is_empty or pb.is_empty:
        return 0.0
    inter = pa_.intersection(pb).area
    union = pa_.area + pb.area - inter
    return float(inter / union) if union > 0 else 0.0


def match_regions(pred: Sequence[QuadLike], gt: Sequence[QuadLike], iou_threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching by descending IoU; returns (pred index, gt index, iou)."""
    if not pred or not gt:
        return []
    pred_polys = [_polygon(q) for q in pred]
    gt_polys = [_polygon(q) for q in gt]
    pairs: list[tuple[float, int, int]] = []
    for i, p in enumerate(pred_polys):
        for j, g in enumerate(gt_polys):
            if p.is_empty or g.is_empty or not p.intersects(g):
                continue
            inter = p.intersection(g).area
            union = p.area + g.area - inter
            iou = inter / union if union > 0 else 0.0
            if iou >= iou_threshold:
                pairs.append((iou, i, j))
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    used_p: set[int] = set()
    used_g: set[int] = set()
    matches: list[tuple[int, int, float]] = []
    for iou, i, j in pairs:
        if i in used_p or j in used_g:
            continue
        used_p.add(i)
        used_g.add(j)
        matches.append((i, j, float(iou)))
    return matches


def _union(quads: Iterable[QuadLike]) -> Any:
    """One shapely geometry for a set of quads, so that overlapping boxes count once."""
    from shapely.ops import unary_union

    return unary_union([p for p in (_polygon(q) for q in quads) if not p.is_empty])


def union_area(quads: Sequence[QuadLike]) -> float:
    """Area of the union of ``quads`` (overlaps counted once): the weight of an image's coverage
    when pooling several images."""
    return float(_union(quads).area) if quads else 0.0


def text_area_coverage(pred: Sequence[QuadLike], gt: Sequence[QuadLike]) -> float:
    """Share of the annotated text area (union of ``gt``) that the union of ``pred`` covers.

    Unions on both sides, so overlapping boxes count once; 1.0 when there is no annotated text
    (nothing to miss). Blind to box granularity: one line box over three field boxes covers all
    three, which region IoU would call three misses.
    """
    truth = _union(gt)
    if truth.is_empty or truth.area <= 0:
        return 1.0
    found = _union(pred)
    if found.is_empty:
        return 0.0
    return float(found.intersection(truth).area / truth.area)


# Longest run of consecutive recognised words joined when looking for a spaceless truth word:
# a receipt field holds up to ~6 printed words; more only makes the candidate set grow.
MAX_JOINED_WORDS = 8


def joined_runs(texts: Iterable[str], max_words: int = MAX_JOINED_WORDS) -> set[str]:
    """Every run of up to ``max_words`` consecutive normalised words within one region's text,
    joined without spaces ("THANK YOU" -> {"thank", "you", "thankyou"})."""
    runs: set[str] = set()
    for text in texts:
        words = words_of([text])
        for start in range(len(words)):
            for stop in range(start + 1, min(len(words), start + max_words) + 1):
                runs.add("".join(words[start:stop]))
    return runs


def spaceless_words_found(pred_texts: Sequence[str], truth_words: Sequence[str]) -> tuple[int, int]:
    """(found, total) truth words of one image, each compared without its spaces and punctuation
    to ``joined_runs`` of the recognised texts; empty truth words (unreadable boxes) not counted."""
    truth = [w for w in (normalise_word(t.replace(" ", "")) for t in truth_words) if w]
    runs = joined_runs(pred_texts)
    return sum(1 for w in truth if w in runs), len(truth)


def _ratio(num: int, den: int, empty: float) -> float:
    return num / den if den else empty


@dataclass(frozen=True)
class OcrAccuracy:
    """Region P/R/F1 (micro), has-text accuracy and word recall over ``n_images`` images."""

    n_images: int
    n_gt_regions: int
    n_pred_regions: int
    n_matched: int
    precision: float
    recall: float
    f1: float
    has_text_accuracy: float
    word_recall: float
    word_precision: float
    n_gt_words: int
    n_failed: int = 0  # images whose OCR row was "failed" (scored as predicting nothing)
    iou_threshold: float = 0.5

    def format(self) -> str:
        """A few readable lines for logs and the benchmark."""
        return "\n".join(
            [
                f"OCR accuracy on {self.n_images} images (IoU >= {self.iou_threshold:g}, greedy one-to-one):",
                f"  regions   precision {self.precision:.3f}  recall {self.recall:.3f}  F1 {self.f1:.3f}"
                f"  (matched {self.n_matched} of {self.n_pred_regions} predicted, {self.n_gt_regions} true)",
                f"  has-text  accuracy {self.has_text_accuracy:.3f}",
                f"  words     recall {self.word_recall:.3f} of {self.n_gt_words}  precision {self.word_precision:.3f}",
            ]
            + ([f"  failed    {self.n_failed} OCR rows failed (counted as no text found)"] if self.n_failed else [])
        )


def score_ocr_rows(
    pred_quads: Sequence[Sequence[QuadLike]],
    pred_texts: Sequence[Sequence[str]],
    gt_rows: Sequence[Mapping[str, Any]],
    iou_threshold: float = 0.5,
    n_failed: int = 0,
) -> OcrAccuracy:
    """Score predictions against ground truth, image by image, without manifests.

    ``gt_rows[i]`` needs ``boxes`` (quads) and ``words``; ``has_text`` defaults to
    ``bool(boxes)``. Works with ``ground_truth_table(...).to_pylist()`` rows and with
    ``dataclasses.asdict(EmbeddedSample)``.
    """
    if not (len(pred_quads) == len(pred_texts) == len(gt_rows)):
        raise ValueError(
            f"length mismatch: {len(pred_quads)} predicted quads, {len(pred_texts)} texts, {len(gt_rows)} truths"
        )
    n_gt = n_pred = n_matched = 0
    has_text_right = 0
    gt_words_total = gt_words_found = 0
    pred_words_total = pred_words_right = 0
    for quads, texts, gt in zip(pred_quads, pred_texts, gt_rows):
        gt_boxes = list(gt.get("boxes") or [])
        has_text = bool(gt.get("has_text", bool(gt_boxes)))
        quads = list(quads or [])
        n_gt += len(gt_boxes)
        n_pred += len(quads)
        n_matched += len(match_regions(quads, gt_boxes, iou_threshold))
        has_text_right += int((len(quads) > 0) == has_text)
        truth = words_of(gt.get("words") or [])
        seen = set(words_of(texts or []))
        gt_words_total += len(truth)
        gt_words_found += sum(1 for w in truth if w in seen)
        truth_set = set(truth)
        pred_words = words_of(texts or [])
        pred_words_total += len(pred_words)
        pred_words_right += sum(1 for w in pred_words if w in truth_set)
    precision = _ratio(n_matched, n_pred, 1.0 if n_gt == 0 else 0.0)
    recall = _ratio(n_matched, n_gt, 1.0 if n_pred == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return OcrAccuracy(
        n_images=len(gt_rows),
        n_gt_regions=n_gt,
        n_pred_regions=n_pred,
        n_matched=n_matched,
        precision=precision,
        recall=recall,
        f1=f1,
        has_text_accuracy=_ratio(has_text_right, len(gt_rows), 1.0),
        word_recall=_ratio(gt_words_found, gt_words_total, 1.0),
        word_precision=_ratio(pred_words_right, pred_words_total, 1.0),
        n_gt_words=gt_words_total,
        n_failed=n_failed,
        iou_threshold=iou_threshold,
    )


def score_ocr(ocr: pa.Table, download: pa.Table, ground_truth: pa.Table, iou_threshold: float = 0.5) -> OcrAccuracy:
    """Score an OCR manifest: ground truth (by url) -> download (url -> uid, status ok) -> ocr (uid).

    Images whose download failed are not scored (OCR never saw them); an ok download with no OCR
    row, or a failed OCR row, counts as "no text found".
    """
    uid_by_url: dict[str, str] = {}
    for row in download.select(["uid", "url", "status"]).to_pylist():
        if row["status"] == "ok" and row["url"] is not None:
            uid_by_url.setdefault(row["url"], row["uid"])
    ocr_by_uid = {
        row["uid"]: row for row in ocr.select(["uid", "ocr_status", "quads", "texts"]).to_pylist()
    }
    quads: list[list[QuadLike]] = []
    texts: list[list[str]] = []
    truths: list[Mapping[str, Any]] = []
    failed = 0
    for gt in ground_truth.select(["url", "has_text", "words", "boxes"]).to_pylist():
        uid = uid_by_url.get(gt["url"])
        if uid is None:
            continue
        row = ocr_by_uid.get(uid)
        if row is None or row["ocr_status"] != "ok":
            failed += 1
            quads.append([])
            texts.append([])
        else:
            quads.append(row["quads"] or [])
            texts.append(row["texts"] or [])
        truths.append(gt)
    return score_ocr_rows(quads, texts, truths, iou_threshold=iou_threshold, n_failed=failed)


__all__ = [
    "MAX_JOINED_WORDS",
    "OcrAccuracy",
    "joined_runs",
    "match_regions",
    "normalise_word",
    "polygon_iou",
    "score_ocr",
    "score_ocr_rows",
    "spaceless_words_found",
    "text_area_coverage",
    "union_area",
    "words_of",
]
