"""Measured quality of the dedup tiers (issue 25 item 4): precision and recall on real photographs.

    python -m bench.dedup_quality [--config my.toml] [--eps 0.05] [--photos N] [--tiers exact,phash,semantic]
    make bench ARGS="--only dedup-quality"

The originals are every real photograph the project has offline that is not a tiny word crop:
the scene-text photos of ../shared/realdata/scenetext with a short side of 100 px or more (the
same rule as tests/test_dedup.py) and scikit-image's bundled photographs (``skimage.data``; the
synthetic ones, the stereo partner ``motorcycle_right`` and the 25 px faces left out). Each gets
planted copies, made from its decoded pixels as a re-uploader would and stored as new files
(PNG, lossless, so the transform is the only change, except the JPEG one):

- ``identical-bytes``: the same file again (a re-upload under another URL);
- ``jpeg-q50``: re-encoded as JPEG at quality 50;
- ``resize-50`` / ``resize-200``: half and double size;
- ``crop-3`` / ``crop-5``: 3 % and 5 % cut off each side;
- ``mirror``: flipped left to right;
- ``caption``: a few words (white, dark outline) across a box of 5 % of the area in the bottom-right corner.

And one template pair per original: the photo with one large word across the middle and the same
photo with another word of the same length in the same place ("the same template with different
overlaid text"). That pair is NOT a duplicate for CLIP data: the overlaid text is the signal OCR,
the parrot score and the masked CLIP score judge, so two such images are two different samples,
and a tier that merges them would drop one before those stages could tell them apart.

Every file then goes through the download as the pipeline runs it (img2dataset's resizer at the
shipped [download] settings: longest side at most 512 px, JPEG 95) and the pipeline's decode; the
exact tier hashes the file's own bytes (img2dataset's sha256 is of the bytes fetched). Tiers:

- ``exact``: equal sha256;
- ``phash``: :func:`stages.dedup.phash` within ``[dedup] radius`` bits (:func:`stages.dedup.hamming`);
- ``semantic``: image-embedding cosine >= 1 - eps (SemDeDup's rule; eps 0.05 by default), on the
  float16 ``image_embedding`` the clip_score stage keeps, computed by that stage at the [clip]
  config, eps from ``[dedup] semantic_eps``; all pairs (a few hundred images need no k-means).

Pairs (every unordered pair of images): an original with each of its copies is a positive (recall
per transform); two copies of the same original are duplicates too (a link between them is a true
one, counted in precision, not in recall); images of different originals are negatives (reported
apart when both carry a large word: an overlay can dominate a low-contrast photo's pHash), and so
are the two different-text templates of one photo. A template against its own plain photo and the
photo's copies is reported (how often each tier links them) but scored as neither: whether one
large word makes another sample is the different-text question, asked cleanly by the pair above.
Precision is true links / all links over the scored pairs; the false pairs are counted.
Writes bench/results/dedup_quality.json (``make bench``: beside the other results).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import core  # noqa: E402,F401  (keeps albumentations, which img2dataset imports, from phoning home)
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from core.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCENETEXT = ROOT.parent / "shared" / "realdata" / "scenetext"
DEFAULT_JSON = ROOT / "bench" / "results" / "dedup_quality.json"

MIN_PHOTO_SIDE = 100  # below this a scenetext image is a word crop, not a photograph
# scikit-image's bundled real photographs (skimage.data.data_dir); left out: the synthetic ones
# (chessboard, color, phantom, logo, horse, blobs), motorcycle_right (the stereo partner of
# motorcycle_left: a genuine near-duplicate of it) and the 25 px lfw faces.
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)

TIERS = ("exact", "phash", "phash+text", "semantic")  # phash+text: pHash with [dedup] split_by_text (OCR words)
TRANSFORMS = ("identical-bytes", "jpeg-q50", "resize-50", "resize-200", "crop-3", "crop-5", "mirror", "caption")
SEMANTIC_EPS = 0.05  # when the config has no [dedup] semantic_eps: SemDeDup's usual eps (cosine >= 0.95)
CAPTION_AREA = 0.05  # the small caption box: this share of the image, in a corner
# same-length word pairs for the different-text templates (one pair per original, in turn)
TEMPLATE_WORDS = (("SALE", "OPEN"), ("LOVE", "HATE"), ("CATS", "DOGS"), ("STOP", "SLOW"), ("HOME", "WORK"),
                  ("FREE", "PAID"), ("GOLD", "IRON"), ("EAST", "WEST"))
CAPTIONS = ("photo: j. smith", "via example.com", "(c) 2019 studio", "shot on phone", "daily news 24")


# -- the images ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Original:
    """One real photograph as its source file's bytes."""

    name: str
    data: bytes


@dataclass
class Item:
    """One image of the measured set: what it is, the bytes a crawler fetched, what the stages see."""

    photo: str  # the original it was made from
    kind: str  # "original", a TRANSFORMS name, "template-a" or "template-b"
    data: bytes
    image: np.ndarray | None = None  # after the download's resize and the pipeline's decode


def real_photos(limit: int | None = None) -> list[Original]:
    """The originals: realdata's scene-text photos (short side >= MIN_PHOTO_SIDE), then skimage's."""
    import skimage.data

    found: list[Original] = []
    if SCENETEXT.is_dir():
        for path in sorted(SCENETEXT.glob("*/*")):
            if path.suffix.lower() not in {".jpg", ".jpeg", ".png"}:
                continue
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if image is not None and min(image.shape) >= MIN_PHOTO_SIDE:
                found.append(Original(f"realdata/{path.parent.name}/{path.name}", path.read_bytes()))
    for name in SKIMAGE_PHOTOS:
        path = Path(skimage.data.data_dir) / name
        found.append(Original(f"skimage/{name}", path.read_bytes()))
    return found[:limit] if limit else found


def decode(data: bytes) -> np.ndarray:
    """RGB uint8 pixels of encoded bytes, by the pipeline's own decode (pipeline/sample_runner.py)."""
    from pipeline.sample_runner import decode_batch

    out = decode_batch({"jpg": [data]})
    if out["decode_error"][0]:
        raise ValueError(out["decode_error"][0])
    return out["image"][0]


def encode(image: np.ndarray, fmt: str = ".png", quality: int = 95) -> bytes:
    """RGB pixels as a new file: PNG (lossless) or JPEG at ``quality``."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buf = cv2.imencode(fmt, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image.shape} as {fmt}")
    return buf.tobytes()


def resize(image: np.ndarray, factor: float) -> np.ndarray:
    h, w = image.shape[:2]
    method = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=method)


def crop(image: np.ndarray, fraction: float) -> np.ndarray:
    """``fraction`` of the height and width cut off each side."""
    h, w = image.shape[:2]
    dy, dx = round(h * fraction), round(w * fraction)
    return image[dy : h - dy, dx : w - dx]


def _fit_scale(text: str, font: int, thickness: int, width: float, height: float) -> float:
    """The cv2 font scale at which ``text`` fits in width x height pixels."""
    (tw, th), base = cv2.getTextSize(text, font, 1.0, thickness)
    return max(0.1, min(width / tw, height / (th + base)))


def overlay_caption(image: np.ndarray, text: str) -> np.ndarray:
    """A few words, white with a thin dark outline, filling a box of CAPTION_AREA of the image in the
    bottom-right corner (a credit line or a watermark; the photo shows through around the letters)."""
    out = image.copy()
    h, w = out.shape[:2]
    bw, bh = round(w * 0.4), round(h * CAPTION_AREA / 0.4)
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, max(1, round(bh / 12))
    scale = _fit_scale(text, font, thickness, bw * 0.95, bh * 0.9)
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    origin = (w - bw + (bw - tw) // 2, h - bh + (bh + th) // 2 - base // 2)
    cv2.putText(out, text, origin, font, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(out, text, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out


def overlay_word(image: np.ndarray, word: str) -> np.ndarray:
    """One large word across the middle (80 % of the width at most), white with a black outline, as memes."""
    out = image.copy()
    h, w = out.shape[:2]
    font, thickness = cv2.FONT_HERSHEY_DUPLEX, max(2, round(min(h, w) / 40))
    scale = _fit_scale(word, font, thickness, w * 0.8, h * 0.4)
    (tw, th), _ = cv2.getTextSize(word, font, scale, thickness)
    origin = ((w - tw) // 2, (h + th) // 2)
    cv2.putText(out, word, origin, font, scale, (0, 0, 0), thickness * 3, cv2.LINE_AA)
    cv2.putText(out, word, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out


def plant(original: Original, index: int) -> list[Item]:
    """The original, its planted copies (TRANSFORMS, in order) and its two different-text templates."""
    pixels = decode(original.data)
    made = {
        "identical-bytes": original.data,
        "jpeg-q50": encode(pixels, ".jpg", 50),
        "resize-50": encode(resize(pixels, 0.5)),
        "resize-200": encode(resize(pixels, 2.0)),
        "crop-3": encode(crop(pixels, 0.03)),
        "crop-5": encode(crop(pixels, 0.05)),
        "mirror": encode(np.ascontiguousarray(pixels[:, ::-1])),
        "caption": encode(overlay_caption(pixels, CAPTIONS[index % len(CAPTIONS)])),
    }
    word_a, word_b = TEMPLATE_WORDS[index % len(TEMPLATE_WORDS)]
    items = [Item(original.name, "original", original.data)]
    items += [Item(original.name, kind, made[kind]) for kind in TRANSFORMS]
    items += [Item(original.name, "template-a", encode(overlay_word(pixels, word_a))),
              Item(original.name, "template-b", encode(overlay_word(pixels, word_b)))]
    return items


def downloaded(items: Sequence[Item], download: Any) -> None:
    """Each item's pixels as the pipeline stores and decodes them: img2dataset's resizer at the
    [download] settings (as stages/download.py builds it), then the pipeline's decode."""
    from img2dataset.resizer import Resizer

    resizer = Resizer(image_size=download.image_size, resize_mode=download.resize_mode, resize_only_if_bigger=True,
                      encode_quality=download.encode_quality, encode_format="jpg")
    for item in items:
        stored, *_, err = resizer(io.BytesIO(item.data))
        if err:
            raise ValueError(f"{item.photo} ({item.kind}): the download's resizer failed: {err}")
        item.image = decode(stored)


# -- the tiers -----------------------------------------------------------------------------------


def exact_links(items: Sequence[Item]) -> np.ndarray:
    """n x n bool: the two files have the same sha256."""
    digests = np.array([hashlib.sha256(item.data).hexdigest() for item in items])
    return digests[:, None] == digests[None, :]


def phash_distances(items: Sequence[Item]) -> np.ndarray:
    """n x n pHash Hamming distances (bits) of the stored images."""
    from stages.dedup import hamming, phash

    hashes = [phash(item.image) for item in items]
    n = len(hashes)
    out = np.zeros((n, n), np.int64)
    for i, j in itertools.combinations(range(n), 2):
        out[i, j] = out[j, i] = hamming(hashes[i], hashes[j])
    return out


def same_words(items: Sequence[Item], ocr_config: Any) -> np.ndarray:
    """n x n bool: OCR (the ocr stage at ``ocr_config``) read the same words in both images, as the
    dup_group step compares them with ``split_by_text`` (its own SQL normalisation, ``WORDS_SQL``)."""
    import duckdb
    import pyarrow as pa

    from stages.dedup import WORDS_SQL
    from stages.ocr import OcrStage

    stage = OcrStage(ocr_config)
    stage.setup()
    texts: list[str | None] = []
    for start in range(0, len(items), 16):
        chunk = items[start:start + 16]
        out = stage.process_batch({"uid": [str(i) for i in range(len(chunk))], "image": [item.image for item in chunk]})
        texts += list(out["ocr_text"])
    texts_table = pa.table({"ocr_text": pa.array(texts, pa.string())})  # noqa: F841 - read by DuckDB below
    words = np.array([w for (w,) in duckdb.sql(f"select {WORDS_SQL} from texts_table").fetchall()], dtype=object)
    return words[:, None] == words[None, :]


def semantic_cosines(items: Sequence[Item], clip_config: Any) -> tuple[np.ndarray, str, bool]:
    """n x n cosine of the image embeddings the clip_score stage keeps (float16 unit vectors), with
    the model's description and whether its weights are meaningful (trained)."""
    from stages.clip_score import ClipScoreStage

    stage = ClipScoreStage(dataclasses.replace(clip_config, keep_embeddings=True))
    stage.setup()
    assert stage.clip is not None
    vectors = []
    size = clip_config.batch_for("cpu")
    for start in range(0, len(items), size):
        part = items[start : start + size]
        out = stage.process_batch({"uid": [f"{start + k}" for k in range(len(part))],
                                   "image": [item.image for item in part], "caption": [""] * len(part)})
        failed = [e for s, e in zip(out["clip_status"], out["clip_error"]) if s != "ok"]
        if failed:
            raise RuntimeError(f"clip_score failed on {len(failed)} image(s): {failed[0]}")
        vectors += [np.asarray(v, np.float32) for v in out["image_embedding"]]
    emb = np.stack(vectors)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return np.clip(emb @ emb.T, -1.0, 1.0), stage.clip.description, stage.clip.meaningful


# -- pairs and scores ----------------------------------------------------------------------------


def pair_class(a: Item, b: Item) -> str:
    """What a pair is: a TRANSFORMS name (original + that copy), "copy-copy", "different-photo",
    "different-photo-words" (two different photos, each with a large word), "different-text" (the
    two templates of one photo) or "text-added" (a template and its plain photo or a copy of it)."""
    templates = {a.kind, b.kind} & {"template-a", "template-b"}
    if a.photo != b.photo:
        both = a.kind.startswith("template") and b.kind.startswith("template")
        return "different-photo-words" if both else "different-photo"
    if len(templates) == 2:
        return "different-text"
    if templates:
        return "text-added"
    if "original" in (a.kind, b.kind):
        return b.kind if a.kind == "original" else a.kind
    return "copy-copy"


POSITIVE = (*TRANSFORMS, "copy-copy")
NEGATIVE = ("different-photo", "different-photo-words", "different-text")


@dataclass
class TierScore:
    """One tier's outcome over every pair."""

    tier: str
    rule: str
    recall: dict[str, float]  # per transform: planted copies linked to their original / planted
    linked: dict[str, int]  # per pair class: pairs linked
    pairs: dict[str, int]  # per pair class: pairs
    precision: float | None  # true links / links over the scored pairs (None: no link at all)
    false_pairs: int
    false_examples: list[str] = field(default_factory=list)
    distances: dict[str, dict[str, float]] = field(default_factory=dict)  # per pair class: min / median / max


def score(tier: str, rule: str, links: np.ndarray, items: Sequence[Item], value: np.ndarray | None = None) -> TierScore:
    """Recall per transform, precision and false pairs of one tier's n x n ``links``."""
    classes: dict[str, list[tuple[int, int]]] = {}
    for i, j in itertools.combinations(range(len(items)), 2):
        classes.setdefault(pair_class(items[i], items[j]), []).append((i, j))
    linked = {c: sum(bool(links[i, j]) for i, j in pairs) for c, pairs in classes.items()}
    counts = {c: len(pairs) for c, pairs in classes.items()}
    true = sum(linked.get(c, 0) for c in POSITIVE)
    false = sum(linked.get(c, 0) for c in NEGATIVE)
    examples = [f"{items[i].photo} {items[i].kind} ~ {items[j].photo} {items[j].kind}"
                + (f" ({value[i, j]:.3g})" if value is not None else "")
                for c in NEGATIVE for i, j in classes.get(c, []) if links[i, j]]
    distances = {}
    if value is not None:
        for c, pairs in classes.items():
            v = np.array([value[i, j] for i, j in pairs], np.float64)
            distances[c] = {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
    return TierScore(
        tier=tier, rule=rule,
        recall={t: linked.get(t, 0) / counts[t] for t in TRANSFORMS if counts.get(t)},
        linked=linked, pairs=counts,
        precision=true / (true + false) if true + false else None,
        false_pairs=false, false_examples=examples[:20], distances=distances,
    )


@dataclass
class Report:
    """The whole measurement: the set, each tier's score, and the settings."""

    photos: list[str]
    n_images: int
    n_pairs: int
    radius: int
    eps: float
    clip_model: str | None
    clip_meaningful: bool | None
    tiers: dict[str, TierScore]


def measure(
    originals: Sequence[Original],
    tiers: Sequence[str] = TIERS,
    config: Any = None,
    eps: float | None = None,
) -> Report:
    """Plant the copies of ``originals``, download them as the pipeline does and score each tier
    (``eps``: None takes [dedup] semantic_eps, the dup_group step's own threshold)."""
    from pipeline.config import load_config

    config = config or load_config()
    eps = getattr(config.dedup, "semantic_eps", SEMANTIC_EPS) if eps is None else eps
    check_settings(tiers, eps, len(originals))
    items = [item for k, original in enumerate(originals) for item in plant(original, k)]
    downloaded(items, config.download)
    scores: dict[str, TierScore] = {}
    clip_model, meaningful = None, None
    if "exact" in tiers:
        scores["exact"] = score("exact", "same sha256 of the fetched bytes", exact_links(items), items)
    if "phash" in tiers:
        dist = phash_distances(items)
        scores["phash"] = score("phash", f"pHash within {config.dedup.radius} bits", dist <= config.dedup.radius,
                                items, dist)
    if "phash+text" in tiers:
        dist = phash_distances(items) if "phash" not in tiers else dist
        scores["phash+text"] = score("phash+text", f"pHash within {config.dedup.radius} bits and the same OCR words",
                                     (dist <= config.dedup.radius) & same_words(items, config.ocr), items, dist)
    if "semantic" in tiers:
        cos, clip_model, meaningful = semantic_cosines(items, config.clip)
        scores["semantic"] = score("semantic", f"cosine >= {1 - eps:g}", cos >= 1 - eps - 1e-6, items, cos)
    n = len(items)
    return Report(photos=[o.name for o in originals], n_images=n, n_pairs=n * (n - 1) // 2,
                  radius=config.dedup.radius, eps=eps, clip_model=clip_model, clip_meaningful=meaningful,
                  tiers=scores)


def check_settings(tiers: Sequence[str], eps: float, n_photos: int) -> None:
    """One ConfigError naming the first bad setting."""
    unknown = [t for t in tiers if t not in TIERS]
    if unknown or not tiers:
        raise ConfigError(f"--tiers: {', '.join(unknown) or 'none given'} not among {', '.join(TIERS)}")
    if not 0 < eps < 2:
        raise ConfigError(f"--eps must be within (0, 2) (a cosine distance), got {eps!r}")
    if n_photos < 2:
        raise ConfigError(f"need at least 2 photos to have negatives, got {n_photos}")


# -- the report ----------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def markdown(report: Report) -> str:
    """The tier x transform recall table, precision and false pairs, then each tier's distances."""
    head = ["tier", "rule", *TRANSFORMS, "precision", "false pairs", "different photos",
            "different photos, both with a word", "different-text templates merged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for s in report.tiers.values():
        negatives = sum(s.pairs.get(c, 0) for c in NEGATIVE)
        lines.append(
            f"| {s.tier} | {s.rule} | " + " | ".join(_pct(s.recall.get(t)) for t in TRANSFORMS)
            + f" | {_pct(s.precision)} | {s.false_pairs} of {negatives} | "
            + " | ".join(f"{s.linked.get(c, 0)} of {s.pairs.get(c, 0)}" for c in NEGATIVE) + " |"
        )
    lines += [
        "",
        f"{len(report.photos)} real photographs, {report.n_images} images (each original, its "
        f"{len(TRANSFORMS)} planted copies and 2 different-text templates), {report.n_pairs} pairs. Recall: planted "
        "copies linked to their original. Precision: true links / all links over the scored pairs (original-copy, "
        "copy-copy, different photos, different-text templates). False pairs: links between different photos "
        "(split: plain, and both carrying a large word) or between the two different-text templates of one photo.",
    ]
    graded = [s for s in report.tiers.values() if s.distances]
    if graded:
        lines += ["", "| tier | measure | " + " | ".join(TRANSFORMS) + " | different text | text added | "
                  "closest different photos | closest, both with a word |",
                  "|---|---|" + "---:|" * (len(TRANSFORMS) + 4)]
        for s in graded:
            phash = s.tier == "phash"
            key = "max" if phash else "min"  # the worst positive: farthest bits, lowest cosine

            def cell(c: str, k: str) -> str:
                d = s.distances.get(c)
                if d is None:
                    return "—"
                return f"{d['median']:.0f} / {d[k]:.0f}" if phash else f"{d['median']:.3f} / {d[k]:.3f}"

            def closest(c: str) -> str:
                d = s.distances.get(c)
                return "—" if d is None else (f"{d['min']:.0f} bits" if phash else f"{d['max']:.3f}")

            lines.append(f"| {s.tier} | {'bits: median / max' if phash else 'cosine: median / min'} | "
                         + " | ".join(cell(t, key) for t in TRANSFORMS)
                         + f" | {cell('different-text', key)} | {cell('text-added', key)} | "
                         + f"{closest('different-photo')} | {closest('different-photo-words')} |")
    if report.clip_model is not None:
        lines += ["", f"Semantic tier: `{report.clip_model}` (the [clip] config"
                  + ("" if report.clip_meaningful else ": random weights, no pretrained checkpoint offline") + ")."]
    return "\n".join(lines)


def as_json(report: Report) -> dict[str, Any]:
    return dataclasses.asdict(report)


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(as_json(report), indent=2))
    tmp.replace(path)


# -- make bench and the command line -------------------------------------------------------------


def run(ctx: Any) -> Any:
    """``bench/run_all.py --only dedup-quality``: the table in BENCHMARKS.md, rows per tier, the JSON."""
    from bench.common import BenchResult, Ratio

    report = measure(real_photos(limit=8 if ctx.quick else None))
    write_json(report, Path(ctx.results_dir) / "dedup_quality.json")
    result = BenchResult("dedup-quality", "precision and recall of the dedup tiers on real photographs")
    for s in report.tiers.values():
        split = ", ".join(f"{c} {s.linked.get(c, 0)}" for c in NEGATIVE)
        result.rows.append(Ratio("dedup-quality", f"{s.tier}: precision over all pairs ({s.rule})", s.precision, "",
                                 "", None, f"{s.false_pairs} false pairs: {split}"))
        result.rows.append(Ratio("dedup-quality", f"{s.tier}: mean recall over the planted transforms",
                                 float(np.mean(list(s.recall.values()))), "", "", None,
                                 ", ".join(f"{t} {v:.2f}" for t, v in s.recall.items())))
    for tier in ("exact", "phash"):  # what a working hash must do on real photos, whatever the weights
        if tier in report.tiers:
            s = report.tiers[tier]
            wrong = s.linked.get("different-photo", 0)
            result.rows.append(Ratio("dedup-quality", f"{tier}: pairs of different plain photos linked", wrong,
                                     "pairs", "= 0", wrong == 0))
    if "exact" in report.tiers:
        got = report.tiers["exact"].recall["identical-bytes"]
        result.rows.append(Ratio("dedup-quality", "exact: recall on identical bytes", got, "", "= 1", got == 1.0))
    if "phash" in report.tiers:
        r = report.tiers["phash"].recall
        kept = min(r["jpeg-q50"], r["resize-50"], r["resize-200"])
        result.rows.append(Ratio("dedup-quality", "phash: recall on JPEG q50 and resize 50/200 %", kept, "", "= 1",
                                 kept == 1.0))
    result.markdown = markdown(report)
    result.data = as_json(report)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.dedup_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="TOML merged over pipeline/default.toml: [dedup] radius, [clip] model / pretrained "
                             "(a trained checkpoint), [download] image_size")
    parser.add_argument("--eps", type=float, default=None,
                        help="semantic tier: cosine >= 1 - eps (default: [dedup] semantic_eps, 0.05)")
    parser.add_argument("--tiers", default=",".join(TIERS), help=f"comma-separated, of {', '.join(TIERS)}")
    parser.add_argument("--photos", type=int, default=None, help="use only the first N originals (default: all)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"where to write the JSON (default {DEFAULT_JSON})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from pipeline.config import load_config

        if args.photos is not None and args.photos < 2:
            raise ConfigError(f"--photos must be at least 2, got {args.photos}")
        tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
        check_settings(tiers, SEMANTIC_EPS if args.eps is None else args.eps, 2)
        report = measure(real_photos(args.photos), tiers, load_config(args.config), args.eps)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json(report, args.json)
    print(markdown(report))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
