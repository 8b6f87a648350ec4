"""Duplicates in three tiers: the same bytes, a perceptual hash, and image embeddings (SemDeDup).

Web-scale image-text pools repeat the same picture many times (re-uploads, thumbnails, crops,
re-encodes); a CLIP model trained on them sees those pictures more often than the rest and
memorises them. Each tier has its own group columns in ``manifests/dup_group/part-pool.parquet``
and the ``dedup`` policy names the tiers it uses:

- **exact** (``dup_exact_*``): the same downloaded bytes (``sha256`` of the download manifest).
- **phash** (``dup_group``, ``dup_group_size``, ``dup_keeper``): a 64-bit DCT perceptual hash per
  image, which survives re-encoding, resizing and light cropping; hashes within ``dedup.radius``
  bits are linked and the links chained into groups.
- **semantic** (``dup_semantic_*``): SemDeDup (Abbas et al. 2023, as NeMo Curator ships it):
  k-means over the unit image embeddings the clip_score step keeps (or a pool's own imported
  vectors; no image is decoded), then within each cluster the pairs at cosine >= 1 - eps.
  Embeddings of an untrained (random-init) model are not compared: they say nothing.

One keeper rule for every tier (``[dedup] keeper``): the largest original image, or NeMo's
hard / easy / random. With ``split_by_text`` a pHash or semantic group also needs the same OCR
words, so a template with different overlaid text stays two samples.

Two stages, because the two halves have different units of work:

- :class:`DedupStage` (per sample, streaming) hashes each decoded image. Cheap: ~0.4 ms a
  512 px image (the stored size), so it runs beside the model stages on a quarter of a core.
- :class:`DupGroupStage` (over the pool) builds the groups without holding the pool on the
  driver: DuckDB lists the distinct pHashes and assembles the part out of core; the pHash band
  search (:func:`phash_pairs_task`) and the semantic clustering (:func:`semantic_split_task`,
  :func:`semantic_group_task`) run as tasks on the cluster with bounded memory, their results
  under a work folder where a killed run finds them. Grouping is deterministic: the same pool gives
  the same groups whatever the row order.
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from itertools import combinations
from math import comb
from typing import Any

import cv2
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.images import as_rgb
from core.settings import config_section, require
from manifests.schemas import schema_for
from manifests.catalog import sql_string, write_file_atomic
from manifests.store import list_names, read_bytes, read_table, write_bytes_atomic, write_table_atomic
from stages.base import BatchStage, PoolStage, PoolWork, Resources

HASH_BITS = 64
TIERS = ("exact", "phash", "semantic")
KEEPER_RULES = ("largest", "hard", "easy", "random")
MAX_RADIUS = 16  # beyond this a pHash no longer separates different photos (see DedupConfig)
_HASH_SIDE = 32  # the image is reduced to 32x32 before the DCT ...
_LOW_SIDE = 8  # ... and the top-left 8x8 low frequencies make the 64 bits
_SQRT2 = np.float32(np.sqrt(2.0))

# dup_groups' search plan (band_plan): a pass over the pool costs about as much as this many
# candidate-pair checks per hash (measured on 2 cores: ~70 ns per hash per pass, ~15 ns per
# candidate), and no plan may need more band combinations (sorts) than this.
_PASS_COST = 5.0
_MAX_COMBINATIONS = 20_000


# -- the hash ------------------------------------------------------------------------------------


def _grey(image: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B, as PIL's "L") of an RGB or grey image."""
    image = np.asarray(image)
    if image.ndim == 2 and image.dtype == np.uint8:
        return image
    if image.ndim == 2:
        return np.clip(image, 0, 255).astype(np.uint8)
    return cv2.cvtColor(as_rgb(image), cv2.COLOR_RGB2GRAY)


def phash(image: np.ndarray) -> int:
    """The 64-bit DCT perceptual hash of an HxWx3 RGB (or HxW grey) uint8 image.

    The classic pHash, as ``imagehash.phash``: greyscale, shrink to 32x32, 2-D DCT-II, keep the
    8x8 lowest frequencies, and set a bit where the coefficient exceeds the median of those 64
    (so a hash of a real picture has exactly 32 bits set, and distances between hashes are even).
    Bits are read row-major, the DC coefficient first (most significant bit). The DCT step gives
    the same bits as imagehash's ``scipy.fftpack.dct`` on the same 32x32 pixels; the shrink
    differs (cv2's area interpolation, i.e. the exact mean of each cell, where imagehash uses
    Pillow's Lanczos), so a few bits can differ from imagehash on the same picture and hashes of
    the two must not be mixed. Returned as the signed int64 with the same 64 bits, so an Arrow
    ``int64`` column holds it; :func:`hamming` compares such values.

    Raises ``ValueError`` for an empty or malformed image.
    """
    grey = _grey(image)
    if grey.ndim != 2 or grey.shape[0] == 0 or grey.shape[1] == 0:
        raise ValueError(f"cannot hash an image of shape {np.shape(image)}")
    small = cv2.resize(grey, (_HASH_SIDE, _HASH_SIDE), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small.astype(np.float32))[:_LOW_SIDE, :_LOW_SIDE]
    # cv2's DCT is orthonormal: undo its extra 1/sqrt(2) on the first row and column, so the
    # coefficients are proportional to imagehash's (unnormalised) ones and the bits agree.
    low[0, :] *= _SQRT2
    low[:, 0] *= _SQRT2
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big", signed=True)


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two 64-bit hashes (signed or unsigned ints alike)."""
    return ((a ^ b) & ((1 << HASH_BITS) - 1)).bit_count()


# -- config --------------------------------------------------------------------------------------


@config_section
class DedupConfig:
    """Near-duplicate detection (stages/dedup.py).

    ``radius``: the pHash Hamming distance at or below which two images count as the same
    picture (pHashes of real pictures have 32 bits set, so distances are even: 10 and 11 act
    alike). 10 is measured on the real photos of tests/test_dedup.py (12 photos of 100-1600 px):
    JPEG quality 50 and resizing to 50 % or 200 % move a hash by 0-2 bits; cropping 3 % off each
    side by 4-14 (median 8), 5 % by 6-20 (median 12); two different photos are 22-40 bits apart
    (18 for two 20-px word crops). 10 keeps every re-encode and resize with a margin of 8 and the
    typical light crop, and stays 12 bits below the closest different photos. Larger radii catch
    more crops but groups are transitive: for random pHashes (32 of 64 bits set) a pair falls
    within 10 bits with probability 2e-8, within 12 with 5e-7, within 14 with 7e-6, so a pool of
    10^6 would get ~10^4, ~2*10^5 and ~3*10^6 chance links, the last enough to chain unrelated
    pictures into one giant group (real pHashes cluster more than random ones, so worse).

    ``tiers``: which of ``exact`` (the same downloaded bytes), ``phash`` and ``semantic`` (image
    embeddings, SemDeDup) the dup_group step computes; each has its own group columns and the
    ``dedup`` policy names the ones it uses. ``keeper``: which sample of a group a dedup keeps, one
    rule for every tier (see ``_KEEPER_KEY``). ``semantic_eps``: two embeddings within one k-means
    cluster are duplicates when their cosine is at least 1 - eps (SemDeDup's own threshold; what a
    value removes depends on the model: see docs and bench/dedup_quality.py). ``semantic_cluster_size``: samples per fine
    k-means cluster (the pairs inside a cluster are compared all with all: cost grows with it).
    ``worker_memory_mb``: what one task may hold (the pHash search makes passes over the distinct
    hashes, the semantic tier coarse clusters, to stay within it). ``split_by_text``: a pHash or
    semantic group holds only samples whose OCR read the same words (as a set, lower case). "The
    same template with different overlaid text" looks alike to both tiers (bench/dedup_quality.py:
    pHash merges 5 of 6 such pairs on its test photos), but for CLIP data the text is the signal the
    parrot and masking stages judge, so they are two samples; with the words, 1 of 6. Off by default
    because OCR reads a re-encoded or resized word differently often enough to split real copies
    of photos with text (re-encode recall 1.0 -> 0.67 on the same photos): equal word sets are too
    strict a test, a pair-level overlap of the words would be the better one.
    """

    radius: int = 10
    tiers: tuple[str, ...] = TIERS
    keeper: str = "largest"
    semantic_eps: float = 0.05
    semantic_cluster_size: int = 1000
    worker_memory_mb: int = 512
    seed: int = 0
    split_by_text: bool = False

    def problems(self) -> list[str]:
        tiers = self.tiers if isinstance(self.tiers, (list, tuple)) else ()
        return require(
            (
                isinstance(self.radius, int) and 0 <= self.radius <= MAX_RADIUS,
                f"dedup.radius must be within 0..{MAX_RADIUS} (got {self.radius!r})",
            ),
            (
                isinstance(self.tiers, (list, tuple)) and all(t in TIERS for t in tiers),
                f"dedup.tiers must be a list of {', '.join(TIERS)} (got {self.tiers!r})",
            ),
            (self.keeper in KEEPER_RULES, f"dedup.keeper must be one of {', '.join(KEEPER_RULES)} (got {self.keeper!r})"),
            (
                isinstance(self.semantic_eps, (int, float)) and 0 <= self.semantic_eps < 1,
                f"dedup.semantic_eps must be within 0..1 (got {self.semantic_eps!r})",
            ),
            (
                isinstance(self.semantic_cluster_size, int) and self.semantic_cluster_size >= 2,
                f"dedup.semantic_cluster_size must be an integer >= 2 (got {self.semantic_cluster_size!r})",
            ),
            (
                isinstance(self.worker_memory_mb, int) and self.worker_memory_mb >= 16,
                f"dedup.worker_memory_mb must be an integer >= 16 (got {self.worker_memory_mb!r})",
            ),
        )


# -- per-sample stage ----------------------------------------------------------------------------


class DedupStage(BatchStage):
    """Hashes each decoded image; a sample without pixels is a failed row with the reason."""

    name = "dedup"
    reads = ("image",)
    output_schema = schema_for("dedup")
    status_column = "dedup_status"
    rides_along = True  # runs in the actor before it, on CPU (pipeline.sample_runner.pools)

    def __init__(self, config: DedupConfig) -> None:
        self.config = config

    def resources(self, gpus_available: bool) -> Resources:
        # ~1 ms a row at most: a quarter of a core keeps up with the model stages and never
        # takes a core from them; small batches keep the stream moving (8, as parrot: issue 27).
        return Resources(cpus=0.25, gpus=0.0, batch_size=8, replicas=1)

    def process_batch(self, batch: dict[str, list]) -> dict[str, list]:
        uids = [str(u) for u in batch["uid"]]
        images = list(batch["image"])
        errors = batch.get("decode_error")
        errors = [None] * len(uids) if errors is None else list(errors)
        out: dict[str, list] = {"uid": uids, "dedup_status": [], "dedup_error": [], "phash": []}
        for image, decode_error in zip(images, errors):
            if image is None:
                reason = f"no image: {decode_error}" if decode_error else "no image (not decoded)"
                _append(out, "failed", reason, None)
                continue
            try:
                value = phash(image)
            except Exception as err:  # a malformed array fails its row, never the batch
                _append(out, "failed", f"phash failed: {type(err).__name__}: {err}", None)
                continue
            _append(out, "ok", None, value)
        return out


def _append(out: dict[str, list], status: str, error: str | None, value: int | None) -> None:
    out["dedup_status"].append(status)
    out["dedup_error"].append(error)
    out["phash"].append(value)


# -- grouping ------------------------------------------------------------------------------------


def _bands(n_bands: int) -> list[tuple[int, int]]:
    """Split the 64 bits into ``n_bands`` contiguous bands as even as possible: (shift, width)."""
    edges = [round(i * HASH_BITS / n_bands) for i in range(n_bands + 1)]
    return [(lo, hi - lo) for lo, hi in zip(edges, edges[1:])]


def band_plan(n_hashes: int, radius: int) -> tuple[int, int]:
    """``(bands, must_agree)``: how to split the hash so that close pairs share an exact key.

    Pigeonhole: split the 64 bits into ``bands`` bands; two hashes at most ``radius`` bits apart
    differ in at most ``radius`` bands, so they agree exactly on at least ``bands - radius`` of
    them, i.e. on one of the ``C(bands, bands - radius)`` band combinations; every pair that
    shares such a key is a candidate. ``bands = radius + 1`` (one band must agree) is the
    textbook rule and the cheapest while bands are wide (small radius or pool); at larger radii its
    bands are a few bits wide and a bucket holds a large share of the pool, so we take the plan of
    least estimated work for uniform hashes: per combination, one pass over the pool (~5 candidate
    checks' worth, measured) plus the expected candidates ``n^2 / 2 * 2^-key_bits``.
    """
    if radius == 0:
        return 1, 1
    pairs = n_hashes * (n_hashes - 1) / 2
    best: tuple[float, int, int] | None = None
    for bands in range(radius + 1, HASH_BITS + 1):
        agree = bands - radius
        keys = comb(bands, agree)
        if keys > _MAX_COMBINATIONS:
            break  # C(bands, bands - radius) only grows with bands
        cost = keys * (_PASS_COST * n_hashes + pairs * 2.0 ** (-HASH_BITS * agree / bands))
        if best is None or cost < best[0]:
            best = (cost, bands, agree)
    assert best is not None  # bands = radius + 1 always qualifies
    return best[1], best[2]


def _sorted_by_key(hashes: np.ndarray, combo: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, order)``: the bits of the bands in ``combo`` packed into one key per hash, sorted.

    When key and row index fit in 64 bits together (pools under ~2^40 / 2^key bits), one plain
    ``np.sort`` of ``key << index_bits | index`` replaces ``argsort``: ~5x faster (SIMD sort).
    """
    keys = np.zeros(hashes.size, dtype=np.uint64)
    width = 0
    for shift, bits in combo:
        keys |= ((hashes >> np.uint64(shift)) & np.uint64((1 << bits) - 1)) << np.uint64(width)
        width += bits
    index_bits = max(1, (hashes.size - 1).bit_length())
    if width + index_bits <= HASH_BITS:
        packed = np.sort((keys << np.uint64(index_bits)) | np.arange(hashes.size, dtype=np.uint64))
        return packed >> np.uint64(index_bits), (packed & np.uint64((1 << index_bits) - 1)).astype(np.intp)
    order = np.argsort(keys)
    return keys[order], order


def _close_in_buckets(
    hashes: np.ndarray, combo: Sequence[tuple[int, int]], radius: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of ``hashes`` (indices) that agree exactly on the bands of ``combo`` and are within
    ``radius`` bits.

    Sort by the key, then walk offsets: at offset ``d`` every sorted position at least ``d``
    places from the end of its bucket is compared with the one ``d`` places on. Work is one sort
    plus one vectorised XOR-popcount per candidate pair, memory stays O(n) however big a bucket
    is, and the Python loop runs (largest bucket - 1) times.
    """
    keys, order = _sorted_by_key(hashes, combo)
    values = hashes[order]
    n = keys.size
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], n]
    run_end = np.repeat(ends, ends - starts)
    # Only positions with a later partner in their bucket, with their own hash and bucket end.
    active = np.flatnonzero(run_end - np.arange(n) > 1)
    active_end = run_end[active]
    active_value = values[active]
    found_left, found_right = [], []
    offset = 1
    while active.size:
        partner = active + offset
        close = np.bitwise_count(active_value ^ values[partner]) <= radius
        if close.any():
            found_left.append(order[active[close]])
            found_right.append(order[partner[close]])
        offset += 1
        keep = active_end > active + offset
        active, active_end, active_value = active[keep], active_end[keep], active_value[keep]
    if not found_left:
        empty = np.empty(0, dtype=np.intp)
        return empty, empty
    return np.concatenate(found_left), np.concatenate(found_right)


def close_pairs(hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, i < j, of *distinct* uint64 hashes at most ``radius`` bits apart."""
    empty = np.empty(0, dtype=np.int64)
    if radius <= 0 or hashes.size < 2:
        return empty, empty
    n_bands, agree = band_plan(hashes.size, radius)
    found_i, found_j = [], []
    for combo in combinations(_bands(n_bands), agree):
        left, right = _close_in_buckets(hashes, combo, radius)
        found_i.append(left)
        found_j.append(right)
    if not found_i:
        return empty, empty
    i = np.concatenate(found_i)
    j = np.concatenate(found_j)
    # A close pair agrees on several combinations and is found once per combination: keep one.
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    unique = np.unique(lo.astype(np.uint64) << np.uint64(32) | hi.astype(np.uint64))
    return (unique >> np.uint64(32)).astype(np.int64), (unique & np.uint64(0xFFFFFFFF)).astype(np.int64)


def dup_groups(
    uids: Sequence[str],
    phashes: Sequence[int | None],
    sha256s: Sequence[str | None],
    radius: int,
) -> tuple[list[str | None], list[int | None]]:
    """Per row, its near-duplicate group (smallest uid of the group) and the group's size.

    Two rows are linked when their ``sha256`` (exact bytes) are equal, or both pHashes are known
    and at most ``radius`` bits apart; groups are the connected components (transitive closure,
    so a chain of small edits joins its ends even if they are further apart). A row with neither a
    pHash nor a sha256 gets ``(None, None)``; any other row is at least a group of one, named by its
    own uid. The result depends only on the set of rows, not on their order. ``uids`` are taken to
    be unique.

    Cost: identical pHashes are collapsed first (``np.unique``), then the ``m`` distinct hashes are
    searched by the pigeonhole rule of :func:`band_plan`: per band combination one sort of a packed
    key (O(m log m)), every pair sharing a key is a candidate, checked by a vectorised XOR-popcount
    (~15 ns a candidate); memory stays O(m). Measured on 2 cores, uniform random hashes: 10^6 at
    radius 4 in ~3 s, radius 8 in ~30 s, radius 10 in ~1.5 min (10^5 at radius 10: ~3 s), against
    ~15 min for the 5*10^11 pairs of brute force; candidates, and so time, grow about as
    m^2 * 2^-key_bits, steeply with the radius. It degrades where many *distinct* hashes share
    band bits: a pool full of variants of one picture (a meme in thousands of slightly different
    versions), or low-entropy hashes (plain or near-uniform images), make buckets of size ``s``
    and ``s^2 / 2`` candidates each, time quadratic in ``s`` while memory stays flat. Rows and one
    node per distinct sha256 and pHash form a graph whose components
    ``scipy.sparse.csgraph.connected_components`` finds in linear time. Distinct pHashes must
    number under 2^32.
    """
    if not 0 <= radius < HASH_BITS:
        raise ValueError(f"radius must be within 0..{HASH_BITS - 1}, got {radius}")
    n = len(uids)
    if not (len(phashes) == len(sha256s) == n):
        raise ValueError(f"uids, phashes and sha256s differ in length ({n}, {len(phashes)}, {len(sha256s)})")
    if n == 0:
        return [], []
    uid_arr = np.asarray([str(u) for u in uids], dtype=object)

    # Node ids: rows 0..n-1, then one node per distinct sha256, then one per distinct pHash.
    rows_src: list[np.ndarray] = []
    rows_dst: list[np.ndarray] = []
    has_sha = np.fromiter((s is not None for s in sha256s), dtype=bool, count=n)
    sha_rows = np.flatnonzero(has_sha)
    n_sha = 0
    if sha_rows.size:
        _, sha_ids = np.unique(np.asarray([sha256s[i] for i in sha_rows], dtype=object), return_inverse=True)
        n_sha = int(sha_ids.max()) + 1
        rows_src.append(sha_rows)
        rows_dst.append(n + sha_ids)

    has_hash = np.fromiter((h is not None for h in phashes), dtype=bool, count=n)
    hash_rows = np.flatnonzero(has_hash)
    n_hash = 0
    if hash_rows.size:
        signed = np.fromiter((phashes[i] for i in hash_rows), dtype=np.int64, count=hash_rows.size)
        distinct, hash_ids = np.unique(signed.view(np.uint64), return_inverse=True)
        n_hash = distinct.size
        rows_src.append(hash_rows)
        rows_dst.append(n + n_sha + hash_ids)
        near_i, near_j = close_pairs(distinct, radius)
        rows_src.append(n + n_sha + near_i)
        rows_dst.append(n + n_sha + near_j)

    n_nodes = n + n_sha + n_hash
    src = np.concatenate(rows_src) if rows_src else np.empty(0, dtype=np.int64)
    dst = np.concatenate(rows_dst) if rows_dst else np.empty(0, dtype=np.int64)
    group_of, size_of = name_groups(uid_arr, components(n_nodes, src, dst)[:n])

    known = has_sha | has_hash
    groups = [str(g) if k else None for g, k in zip(group_of, known)]
    sizes = [int(s) if k else None for s, k in zip(size_of, known)]
    return groups, sizes


# -- the pool stage: three tiers -------------------------------------------------------------------

# Each rule as a sort key, best first: a group keeps the sample with the smallest key (``arg_min``).
# Written once, for every tier. largest: the largest original image (ours). hard / easy: NeMo Curator's
# SemDeDup choices, the sample farthest from (hard) or nearest to (easy) its k-means centroid; rows
# without an embedding rank last. random: a hash of the uid and [dedup] seed. Ties, and rows the rule
# cannot rank, go to the larger image, then the smaller uid, so the choice is deterministic.
_LARGEST = "coalesce(-area, 9223372036854775807)"
_KEEPER_KEY = {
    "largest": f"{{'a': {_LARGEST}, 'u': uid}}",
    "hard": f"{{'c': coalesce(centroid_cosine, 9.0), 'a': {_LARGEST}, 'u': uid}}",
    "easy": f"{{'c': coalesce(-centroid_cosine, 9.0), 'a': {_LARGEST}, 'u': uid}}",
    "random": "{'h': hash(uid || '{seed}'), 'u': uid}",
}


def keeper_key(rule: str, seed: int = 0) -> str:
    """``[dedup] keeper`` as a SQL sort key over columns uid, area, centroid_cosine: smallest is kept."""
    return _KEEPER_KEY[rule].replace("{seed}", str(int(seed)))


LOUD_ROWS = 100_000  # a pool at least this large: each tier says on the console what it is doing
BUCKET_ROWS = 2_000_000  # samples per bucket when a tier's groups are joined back to their rows (DuckDB, in memory)
POOL_QUERY = ("select uid, phash, sha256, original_width::bigint * original_height as area, {words} as words "
              "from samples where status = 'ok'")
# The words OCR read, as a set (lower case, 3+ letters or digits, sorted): what split_by_text compares.
WORDS_SQL = ("array_to_string(list_sort(list_distinct(regexp_extract_all(lower(coalesce(ocr_text, '')), "
             "'[a-z0-9]{3,}'))), ' ')")


def _npy_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.npy"


def _save_npy(array: np.ndarray, path: Path) -> None:
    """``np.save`` to a temporary name, then rename: a killed task leaves no half file to trust."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes_atomic(buffer.getvalue(), path)


def _load_npy(path: Path) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def phash_pairs_task(hashes_path: Path, combos: list[tuple[tuple[int, int], ...]], radius: int,
                     passes: int, out_path: Path) -> int:
    """One worker's share of the perceptual tier: the pairs of distinct pHashes (values, uint64) that
    agree on the bands of one of ``combos`` and are at most ``radius`` bits apart, saved to ``out_path``.

    Reads the pool's distinct hashes (one uint64 column) batch by batch. With ``passes`` > 1 each
    combination is done in that many passes, each keeping only the hashes whose band key falls in
    its slice of the key space (a pair shares its key, so never straddles two slices): memory is
    ``16 bytes x distinct hashes / passes`` plus a batch, whatever the pool's size."""
    if out_path.exists():  # done by an earlier, killed run over the same hashes
        return int(_load_npy(out_path).shape[0])
    def read() -> Iterator[np.ndarray]:
        for batch in pq.ParquetFile(hashes_path.open("rb")).iter_batches(batch_size=1 << 20, columns=["phash"]):
            yield batch.column(0).to_numpy(zero_copy_only=False).view(np.uint64)

    everything = np.concatenate(list(read())) if passes == 1 else None  # fits the budget: read once, not per combination
    found: list[np.ndarray] = []
    for combo in combos:
        for slice_ in range(passes):
            if everything is not None:
                hashes = everything
            else:  # this slice of the key space only (a multiplicative hash of the key spreads any key distribution)
                chosen = []
                for values in read():
                    key = np.zeros(values.size, np.uint64)
                    for shift, bits in combo:
                        key ^= (values >> np.uint64(shift)) & np.uint64((1 << bits) - 1)
                    chosen.append(values[(key * np.uint64(0x9E3779B97F4A7C15) >> np.uint64(40)) % np.uint64(passes) == slice_])
                hashes = np.concatenate(chosen) if chosen else np.empty(0, np.uint64)
            if hashes.size < 2:
                continue
            left, right = _close_in_buckets(hashes, combo, radius)
            found.append(np.stack([hashes[left], hashes[right]], axis=1))
    pairs = np.concatenate(found) if found else np.empty((0, 2), np.uint64)
    _save_npy(pairs, out_path)
    return int(pairs.shape[0])


UNTRAINED_MARK = "random-init("  # in clip_model: models.clip names a seeded random init so
UNTRAINED_SQL = f"coalesce(model, '') like '%{UNTRAINED_MARK}%'"


def _embedding_rows(part: Path) -> tuple[np.ndarray, np.ndarray, str | None]:
    """A clip_score part's samples that kept an image embedding of a trained model: (uids, float16
    vectors, model). An untrained model's vectors are left out: a random init maps every photo to
    nearly the same direction (unrelated photos at cosine > 0.95), so they would all be "duplicates"."""
    table = read_table(part, columns=["uid", "image_embedding", "clip_model"])
    untrained = pc.match_substring(table.column("clip_model").fill_null(""), UNTRAINED_MARK)
    table = table.filter(pc.and_(pc.is_valid(table.column("image_embedding")), pc.invert(untrained)))
    if table.num_rows == 0:
        return np.empty(0, object), np.empty((0, 0), np.float16), None
    column = table.column("image_embedding").combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float16, copy=False)
    vectors = flat.reshape(table.num_rows, -1)
    models = pc.unique(table.column("clip_model")).to_pylist()
    return np.asarray(table.column("uid").to_pylist(), object), vectors, "; ".join(sorted(str(m) for m in models))


def semantic_split_task(part: Path, centroids_path: Path, out_prefix: Path) -> int:
    """First half of the semantic tier, one clip_score part: each embedding goes to its nearest
    coarse centroid, and the part's rows are written out per coarse cluster
    (``<out_prefix>-<cluster>.npz``), so that the worker of one cluster reads only its rows."""
    from stages.semantic_dedup import assign, unit

    marker = Path(str(out_prefix) + ".done")
    if marker.exists():
        return 0
    uids, vectors, model = _embedding_rows(part)
    if uids.size:
        centroids = _load_npy(centroids_path)
        labels, _ = assign(unit(vectors), centroids)
        for cluster in np.unique(labels):
            rows = labels == cluster
            buffer = io.BytesIO()
            np.savez(buffer, uids=uids[rows].astype(str), vectors=vectors[rows], model=np.asarray(model or ""))
            write_bytes_atomic(buffer.getvalue(), Path(f"{out_prefix}-{int(cluster)}.npz"))
    write_bytes_atomic(b"", marker)
    return int(uids.size)


def semantic_group_task(inputs: list[Path], cluster_size: int, min_cosine: float, seed: int, out_path: Path) -> int:
    """Second half of the semantic tier, one coarse cluster: fine k-means inside it, the pairs of
    cosine >= ``min_cosine`` within each fine cluster (SemDeDup), and their connected groups, each
    named by its smallest uid. Pairs never cross coarse clusters, so the groups are final here and
    the driver never sees a pair. Writes ``uid, group, size, centroid_cosine, model`` (Parquet)."""
    from stages.semantic_dedup import cluster_pairs

    if out_path.exists():
        return pq.read_metadata(out_path.open("rb")).num_rows
    uids_list, vectors_list, models = [], [], set()
    for path in inputs:
        with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as npz:
            uids_list.append(npz["uids"])
            vectors_list.append(npz["vectors"])
            models.add(str(npz["model"]))
    uids = np.concatenate(uids_list) if uids_list else np.empty(0, str)
    n = uids.size
    if n:
        vectors = np.concatenate(vectors_list)
        left, right, _, centroid_cosine = cluster_pairs(vectors, cluster_size, min_cosine, seed)
        labels = components(n, left, right)
        groups, sizes = name_groups(uids, labels)
    else:
        groups, sizes, centroid_cosine = np.empty(0, str), np.empty(0, np.int32), np.empty(0, np.float32)
    table = pa.table({"uid": pa.array(uids.tolist(), pa.string()), "group": pa.array(groups.tolist(), pa.string()),
                      "size": pa.array(sizes, pa.int32()), "centroid_cosine": pa.array(centroid_cosine, pa.float32()),
                      "model": pa.array(["; ".join(sorted(m for m in models if m))] * n, pa.string())})
    write_table_atomic(table, out_path)
    return n


def components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes linked by the pairs ``(left[k], right[k])``."""
    from scipy.sparse import coo_matrix  # here, not at import: the CLI imports every stage to describe the DAG
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(left.size, np.int32), (left, right)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def name_groups(uids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per node, its component's smallest uid (code-point order, as DuckDB's) and the component's size."""
    n = uids.size
    order = np.lexsort((uids, labels))
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    run_sizes = np.diff(np.r_[starts, n])
    groups = np.empty(n, dtype=uids.dtype)
    sizes = np.empty(n, np.int32)
    groups[order] = np.repeat(uids[order[starts]], run_sizes)
    sizes[order] = np.repeat(run_sizes, run_sizes)
    return groups, sizes


class DupGroupStage(PoolStage):
    """Groups every downloaded sample with its duplicates, in three tiers (see the module docstring).

    Nothing pool-wide sits on the driver: DuckDB (out of core) lists the distinct pHashes and
    assembles the part; the pHash band search and the semantic clustering run as tasks on the
    cluster (``PoolWork.map``), each with bounded memory, writing their results under the work
    folder, where a killed run finds them. The driver holds only the perceptual tier's close pairs
    (one per near-duplicate link, not one per sample) to chain them into groups."""

    name = "dup_group"
    reads = ("phash", "sha256", "original_width", "original_height")
    output_schema = schema_for("dup_group")
    status_column = None

    def __init__(self, config: DedupConfig) -> None:
        self.config = config

    def resources(self, gpus_available: bool) -> Resources:
        return Resources(cpus=1.0)

    def _budget(self) -> float:
        """Bytes one task may hold."""
        return self.config.worker_memory_mb * float(1 << 20)

    # -- perceptual tier ------------------------------------------------------------------------

    def _phash_components(self, con: Any, work: PoolWork) -> str:
        """A relation ``(phash, comp)`` for the distinct pHashes that have a close other one."""
        empty = "(select null::bigint as phash, null::bigint as comp where false)"
        if "phash" not in self.config.tiers or self.config.radius == 0:
            return empty
        folder = work.dir / "phash"
        folder.mkdir(parents=True, exist_ok=True)
        hashes_path = folder / "distinct.parquet"
        if not hashes_path.exists():
            schema = pa.schema([pa.field("phash", pa.int64())])

            def write(tmp: Path) -> None:
                reader = con.execute("select distinct phash from samples where status = 'ok' and phash is not null"
                                     ).to_arrow_reader(1 << 20)
                with pq.ParquetWriter(tmp, schema) as writer:
                    for batch in reader:
                        writer.write_batch(pa.record_batch([batch.column(0).cast(pa.int64())], schema=schema))

            write_file_atomic(write, hashes_path, Path(work.scratch or tempfile.gettempdir()))
        count = pq.read_metadata(hashes_path.open("rb")).num_rows
        if count < 2:
            return empty
        n_bands, agree = band_plan(count, self.config.radius)
        combos = list(combinations(_bands(n_bands), agree))
        passes = max(1, math.ceil(count * 16 / self._budget()))
        n_tasks = min(len(combos), 4 * max(1, work.cpus))
        calls = [(hashes_path, combos[t::n_tasks], self.config.radius, passes, _npy_path(folder, f"pairs-{t}"))
                 for t in range(n_tasks)]
        self.last_passes = passes
        if count >= LOUD_ROWS:
            work.say(f"dup_group: pHash tier, {count:,} distinct hashes, {len(combos)} band combinations in "
                 f"{n_tasks} task(s), {passes} pass(es) each")
        work.map(phash_pairs_task, calls)
        pairs = [_load_npy(call[-1]) for call in calls]
        pairs = np.concatenate(pairs) if pairs else np.empty((0, 2), np.uint64)
        if pairs.shape[0] == 0:
            return empty
        pairs = np.unique(np.sort(pairs, axis=1), axis=0)  # a close pair agrees on several combinations: once
        nodes, index = np.unique(pairs.ravel(), return_inverse=True)
        index = index.reshape(-1, 2)
        labels = components(nodes.size, index[:, 0], index[:, 1])
        table = pa.table({"phash": pa.array(nodes.view(np.int64)), "comp": pa.array(labels.astype(np.int64))})
        path = folder / "components.parquet"
        write_table_atomic(table, path)
        return f"read_parquet({sql_string(path)})"

    # -- semantic tier --------------------------------------------------------------------------

    def _semantic_groups(self, con: Any, work: PoolWork) -> str:
        """A relation ``(uid, "group", size, centroid_cosine, model)`` over the samples with an image embedding."""
        empty = ("(select null::varchar as uid, null::varchar as \"group\", null::integer as size, "
                 "null::float as centroid_cosine, null::varchar as model where false)")
        parts = work.parts("clip_score") if "semantic" in self.config.tiers else []
        if not parts:
            return empty
        try:
            count, dim = con.execute(
                f"select count(*) filter (where not {UNTRAINED_SQL}), max(len(image_embedding)) from embeddings").fetchone()
        except duckdb.Error:  # no embeddings view: clip_score kept none (keep_embeddings off, or not run)
            return empty
        # embeddings of an untrained model are left out (the summary says the tier compared nothing, and why)
        if not count:
            return empty
        from stages.semantic_dedup import fit_centroids, separates, unit

        folder = work.dir / "semantic"
        folder.mkdir(parents=True, exist_ok=True)
        bytes_per_row = int(dim) * 2 * 3  # the float16 rows, their float32 copy in blocks, slack
        coarse = max(1, math.ceil(count * bytes_per_row / self._budget()))
        centroids_path = _npy_path(folder, "centroids")
        if not centroids_path.exists():
            sample = con.execute(f"select image_embedding from (select image_embedding from embeddings where not {UNTRAINED_SQL}) "
                                 f"using sample reservoir({min(count, 50 * coarse + 10_000)} rows) "
                                 f"repeatable ({self.config.seed})").fetchnumpy()["image_embedding"]
            sample = np.asarray([np.asarray(v, np.float32) for v in sample], np.float32)
            ok, share = separates(sample, 1.0 - self.config.semantic_eps)
            if not ok:
                work.say(f"dup_group: semantic tier skipped: {share:.0%} of random pairs of pool images are at cosine >= "
                         f"{1 - self.config.semantic_eps:g} (an embedding space that does not tell images apart: "
                         "an untrained or barely trained model)")
                return empty
            _save_npy(fit_centroids(unit(sample), coarse, self.config.seed), centroids_path)
        split = folder / "split"
        split.mkdir(exist_ok=True)
        self.last_coarse = coarse
        if count >= LOUD_ROWS:
            work.say(f"dup_group: semantic tier, {count:,} embeddings ({dim} dims) in {coarse} coarse cluster(s), "
                 f"k-means clusters of ~{self.config.semantic_cluster_size}")
        work.map(semantic_split_task, [(part, centroids_path, split / part.stem) for part in parts])
        by_cluster: dict[int, list[Path]] = {}
        for name in list_names(split):
            if name.endswith(".npz"):
                by_cluster.setdefault(int(name[:-4].rsplit("-", 1)[1]), []).append(split / name)
        calls = [(sorted(paths), self.config.semantic_cluster_size, 1.0 - self.config.semantic_eps, self.config.seed,
                  folder / f"groups-{cluster}.parquet") for cluster, paths in sorted(by_cluster.items())]
        if not calls:
            return empty
        work.map(semantic_group_task, calls)
        return f"read_parquet({sql_string(folder / 'groups-*.parquet')})"

    # -- assembly -------------------------------------------------------------------------------

    @staticmethod
    def _tier_part(con: Any, linked: Path, scratch: Path, buckets: int, key: str, group: str, size: str,
                   keeper: str) -> None:
        """``<scratch>/<key>.parquet``: every row of ``linked`` in uid order with its group's name
        (smallest uid), size and whether it is the keeper (smallest ``order_key``) in one tier."""
        source = f"read_parquet({sql_string(linked)})"
        folder = scratch / f"{key}-buckets"
        con.execute(f"copy (select uid, {key} as key, order_key, hash({key}) % {buckets} as bucket from {source} "
                    f"where {key} is not null) to {sql_string(folder)} (format parquet, partition_by (bucket))")
        done = []
        for bucket in range(buckets):
            files = folder / f"bucket={bucket}"
            if not files.is_dir():
                continue
            out = scratch / f"{key}-{bucket}.parquet"
            con.execute(f"""copy (
                with l as (select uid, key, order_key from read_parquet({sql_string(files / '*.parquet')})),
                g as (select key, min(uid) as g_name, count(*)::integer as g_size, arg_min(uid, order_key) as g_keeper
                      from l group by key)
                select l.uid, g.g_name as {group}, g.g_size as {size}, l.uid = g.g_keeper as {keeper}
                from l join g using (key)
            ) to {sql_string(out)} (format parquet)""")
            done.append(out)
        grouped = (f"select * from read_parquet([{', '.join(sql_string(p) for p in done)}]) union all " if done else "")
        con.execute(f"""copy (
            {grouped}select uid, null::varchar as {group}, null::integer as {size}, null::boolean as {keeper}
            from {source} where {key} is null order by uid
        ) to {sql_string(scratch / (key + '.parquet'))} (format parquet)""")
        shutil.rmtree(folder, ignore_errors=True)

    def process_pool(self, con: Any, work: PoolWork) -> Iterable[pa.RecordBatch]:
        """Every downloaded sample with its group, size and keeper flag in each tier, in uid order.

        DuckDB writes the pool's rows with each tier's group key and the keeper key (``linked``);
        then, per tier, a group's name, size and keeper are ``min(uid)``, ``count(*)`` and
        ``arg_min(uid, keeper key)`` of a ``group by`` in buckets of at most ``BUCKET_ROWS``
        samples, joined back to their rows (:meth:`_tier_part`); the three tiers' files, each in uid
        order, are read side by side. Only sorts, aggregates and joins of a bucket: all spill."""
        exact = "exact" in self.config.tiers
        phash_comp = self._phash_components(con, work)
        semantic = self._semantic_groups(con, work)
        columns = {row[0] for row in con.execute("describe samples").fetchall()}
        words = WORDS_SQL if self.config.split_by_text and "ocr_text" in columns else "''"
        tiers = (("exact_key", "dup_exact_group", "dup_exact_size", "dup_exact_keeper"),
                 ("phash_key", "dup_group", "dup_group_size", "dup_keeper"),
                 ("semantic_key", "dup_semantic_group", "dup_semantic_size", "dup_semantic_keeper"))
        linked_sql = f"""
        with pool as ({POOL_QUERY.format(words=words)}),
        sha_phash as (select sha256, max(phash) as phash from pool where sha256 is not null and phash is not null
                      group by sha256),
        keyed as (
            select p.uid, p.area, {'p.sha256' if exact else 'null::varchar'} as exact_key,
                   coalesce(p.phash, sp.phash) as effective_phash,  -- undecodable but the same bytes: that pHash
                   s."group" || '|' || p.words as semantic_key, s.centroid_cosine, s.model, p.words
            from pool p left join sha_phash sp on p.sha256 = sp.sha256 left join {semantic} s on p.uid = s.uid
        )
        select k.uid, k.exact_key, k.semantic_key, k.centroid_cosine, k.model,
               case when k.effective_phash is not null
                    then coalesce('c' || c.comp::varchar, 'p' || k.effective_phash::varchar) || '|' || k.words
               end as phash_key,
               {keeper_key(self.config.keeper, self.config.seed)} as order_key
        from keyed k left join {phash_comp} c on k.effective_phash = c.phash
        order by k.uid
        """
        scratch = Path(tempfile.mkdtemp(prefix="dup_group-", dir=work.scratch))
        try:
            # Per tier, the groups in buckets of at most BUCKET_ROWS samples (a bucket by the hash of
            # the group key: a group never straddles two), each bucket's aggregate joined back to its
            # rows in memory; then every row in uid order. A pool-wide join of 10^7 rows on text keys
            # does not spill within DuckDB's limit, these steps do (sorts and partitioned writes).
            linked = scratch / "linked.parquet"
            con.execute(f"copy ({linked_sql}) to {sql_string(linked)} (format parquet)")
            rows = con.execute(f"select count(*) from read_parquet({sql_string(linked)})").fetchone()[0]
            buckets = max(1, math.ceil(rows / BUCKET_ROWS))
            for key, group, size, keeper in tiers:
                self._tier_part(con, linked, scratch, buckets, key, group, size, keeper)
            sql = (f"select l.uid, e.* exclude (uid), p.* exclude (uid), s.* exclude (uid), l.centroid_cosine::float as dup_centroid_cosine, "
                   f"case when l.semantic_key is not null then l.model end as dup_embedding_model "
                   f"from (select uid, semantic_key, centroid_cosine, model from read_parquet({sql_string(linked)})) l "
                   f"positional join read_parquet({sql_string(scratch / 'exact_key.parquet')}) e "
                   f"positional join read_parquet({sql_string(scratch / 'phash_key.parquet')}) p "
                   f"positional join read_parquet({sql_string(scratch / 'semantic_key.parquet')}) s")
            reader = con.execute(sql).to_arrow_reader(1 << 17)
            schema = self.output_schema
            for batch in reader:
                yield pa.RecordBatch.from_arrays([batch.column(name).cast(field.type) for name, field in
                                                  zip(schema.names, schema)], schema=schema)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
