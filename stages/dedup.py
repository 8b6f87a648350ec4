"""Near-duplicate detection: a perceptual hash per image, then groups over the whole pool.

Web-scale image-text pools repeat the same picture many times (re-uploads, thumbnails, crops,
re-encodes); a CLIP model trained on them sees those pictures more often than the rest and
memorises them. Exact byte hashes (``sha256`` from the download manifest) catch only identical
files, so each image also gets a 64-bit DCT perceptual hash (pHash), which survives re-encoding,
resizing and light cropping: two images whose pHashes differ in at most ``dedup.radius`` bits are
taken to be the same picture.

Two stages, because the two halves have different units of work:

- :class:`DedupStage` (per sample, streaming) hashes each decoded image. Cheap: ~0.4 ms a
  512 px image (the stored size), so it runs beside the model stages on a quarter of a core.
- :class:`DupGroupStage` (over the pool) links samples with equal bytes or close pHashes and
  names each connected group by its smallest uid, so a filter policy can keep one sample per
  group (the shipped ``dedup`` policy keeps the largest image of each) or drop big groups. Grouping is deterministic: the same pool gives
  the same groups whatever the row order.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from math import comb
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from core.images import as_rgb
from core.settings import config_section, require
from manifests.schemas import schema_for
from stages.base import BatchStage, PoolStage, Resources

HASH_BITS = 64
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
    """

    radius: int = 10

    def problems(self) -> list[str]:
        return require(
            (
                isinstance(self.radius, int) and 0 <= self.radius <= MAX_RADIUS,
                f"dedup.radius must be within 0..{MAX_RADIUS} (got {self.radius!r})",
            ),
        )


# -- per-sample stage ----------------------------------------------------------------------------


class DedupStage(BatchStage):
    """Hashes each decoded image; a sample without pixels is a failed row with the reason."""

    name = "dedup"
    reads = ("image",)
    output_schema = schema_for("dedup")
    status_column = "dedup_status"

    def __init__(self, config: DedupConfig) -> None:
        self.config = config

    def resources(self, gpus_available: bool) -> Resources:
        # ~1 ms a row at most: a quarter of a core keeps up with the model stages and never
        # takes a core from them; small batches keep the stream moving (as parrot).
        return Resources(cpus=0.25, gpus=0.0, batch_size=32, replicas=1)

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
    _, uid_rank = np.unique(uid_arr, return_inverse=True)  # code-point order, as DuckDB's

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
    from scipy.sparse import coo_matrix  # here, not at import: the CLI imports every stage to describe the DAG
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(src.size, dtype=np.int32), (src, dst)), shape=(n_nodes, n_nodes))
    _, labels = connected_components(graph, directed=False)
    row_labels = labels[:n]

    # Name each component by its smallest uid: sort rows by (component, uid), take each run's first.
    order = np.lexsort((uid_rank, row_labels))
    sorted_labels = row_labels[order]
    run_starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    run_sizes = np.diff(np.r_[run_starts, n])
    group_of = np.empty(n, dtype=object)
    size_of = np.empty(n, dtype=np.int64)
    group_of[order] = np.repeat(uid_arr[order[run_starts]], run_sizes)
    size_of[order] = np.repeat(run_sizes, run_sizes)

    known = has_sha | has_hash
    groups = [str(g) if k else None for g, k in zip(group_of, known)]
    sizes = [int(s) if k else None for s, k in zip(size_of, known)]
    return groups, sizes


# -- pool stage ----------------------------------------------------------------------------------

POOL_QUERY = ("select uid, phash, sha256, original_width, original_height from samples "
              "where status = 'ok' order by uid")


def group_keepers(groups: Sequence[str | None], areas: Sequence[int | None]) -> list[bool | None]:
    """Per row, whether it is the one sample of its group a dedup keeps: the largest ``area``
    (original width x height; a missing one ranks below any), ties to the earlier row (rows come in
    uid order). None where the row has no group. A column, so that a dedup policy reads one boolean
    instead of ranking every group in a window at filter time (10M rows: 0.2 s instead of 5 s)."""
    n = len(groups)
    if n == 0:
        return []
    codes = pa.array(groups, pa.string()).dictionary_encode().indices.fill_null(-1).to_numpy().astype(np.int64)
    grouped = codes >= 0
    area = np.array([-1 if a is None else a for a in areas], np.int64)
    order = np.lexsort((np.arange(n), -area, codes))  # by group, then largest area, then row
    sorted_codes = codes[order]
    first = order[np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]]
    keeper = np.zeros(n, bool)
    keeper[first] = True
    return [bool(k) if g else None for k, g in zip(keeper, grouped)]


class DupGroupStage(PoolStage):
    """Groups every downloaded sample with its near-duplicates (see :func:`dup_groups`)."""

    name = "dup_group"
    reads = ("phash", "sha256", "original_width", "original_height")
    output_schema = schema_for("dup_group")
    status_column = None

    def __init__(self, config: DedupConfig) -> None:
        self.config = config

    def resources(self, gpus_available: bool) -> Resources:
        return Resources(cpus=1.0)

    def process_pool(self, con: Any) -> pa.Table:
        table = con.execute(POOL_QUERY).to_arrow_table()
        uids = table.column("uid").to_pylist()
        groups, sizes = dup_groups(
            uids, table.column("phash").to_pylist(), table.column("sha256").to_pylist(), self.config.radius
        )
        widths, heights = table.column("original_width").to_pylist(), table.column("original_height").to_pylist()
        areas = [None if w is None or h is None else w * h for w, h in zip(widths, heights)]
        schema = self.output_schema
        return pa.Table.from_arrays(
            [
                pa.array(uids, type=schema.field("uid").type),
                pa.array(groups, type=schema.field("dup_group").type),
                pa.array(sizes, type=schema.field("dup_group_size").type),
                pa.array(group_keepers(groups, areas), type=schema.field("dup_keeper").type),
            ],
            schema=schema,
        )
