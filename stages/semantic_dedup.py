"""Semantic near-duplicates from image embeddings: the numerics of SemDeDup, in numpy.

SemDeDup (Abbas et al. 2023) and NeMo Curator's semantic dedup find images that show the same
thing although their bytes and pHashes differ (another crop, a watermark, a re-shot product
photo): two samples are semantic duplicates when their unit image embeddings have cosine
``>= 1 - eps``. Comparing every pair of a pool is quadratic, so both first cluster the embeddings
with k-means and compare pairs only inside a cluster: a near-duplicate pair (cosine 0.95 and up)
almost always lands in the same cluster, and a cluster of m rows costs m^2 instead of n*m.

The clustering is *spherical* k-means (Lloyd on the unit sphere: assign by largest cosine, the
centroid is the normalised mean) because the duplicate test is a cosine: the clusters then group
by the same measure the pairs are judged by, and the embedding's length carries nothing.

At scale the lead runs this two-level on Ray: coarse clusters partition the pool across workers;
inside a worker, :func:`cluster_pairs` fits fine centroids on one coarse cluster's rows and emits
the pairs within each fine cluster; union-find over the pairs makes the groups, and a keeper rule
(NeMo's hard/easy keep by the cosine to the centroid, which :func:`cluster_pairs` returns per row)
picks one per group. Nothing here knows of Ray, files or DuckDB.

Memory is bounded by the inputs plus a block: every similarity matrix is computed in tiles of
``block`` rows (and, inside a large cluster, ``block`` columns), never as an m x m matrix, and each
tile is converted to float32 and normalised on the fly (so float16 embeddings are read as stored
and never copied whole). The tiles are float32 matrix products, which is what BLAS does fastest.
"""

from __future__ import annotations

import math

import numpy as np

from core.errors import ConfigError

# A similarity tile of assign() holds at most this many float32 entries (64 MB), whatever `block`
# says, so that many centroids cannot turn a block of rows into gigabytes.
_MAX_TILE_ENTRIES = 1 << 24
# Rows per assign() block inside cluster_pairs: a worker's peak is its rows plus ~12 MB, not ~100 MB.
_WORKER_ASSIGN_BLOCK = 8192
# Two unit rows closer than this (1 - cosine) count as the same row when fit_centroids clips k to
# the number of distinct rows: float32 rounding leaves identical directions ~1e-7 apart.
_SAME_ROW = 1e-6


def unit(vectors: np.ndarray) -> np.ndarray:
    """float32 rows scaled to norm 1, zero rows left 0 (they have no direction to compare)."""
    _check_2d("embeddings", vectors)
    x = np.array(vectors, dtype=np.float32)  # the one copy: scaled in place below
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0] = 1.0
    x /= norms[:, None]
    return x


def _check_2d(name: str, array: np.ndarray) -> None:
    """One line naming an argument that is not a rows x dims matrix."""
    if np.ndim(array) != 2:
        raise ConfigError(f"{name} must be a 2-d array (rows x dims), not shape {np.shape(array)}")


def _positive(name: str, value: int) -> None:
    """One line naming a size argument below 1."""
    if int(value) < 1:
        raise ConfigError(f"{name} must be at least 1, not {value}")


def _gap(x: np.ndarray, seeds_t: np.ndarray) -> np.ndarray:
    """1 - cosine of unit rows to each seed column, 0 below float rounding (the same direction)."""
    gap = np.maximum(1.0 - x @ seeds_t, 0.0)
    gap[gap < _SAME_ROW] = 0.0
    return gap


def fit_centroids(sample: np.ndarray, k: int, seed: int, iterations: int = 10) -> np.ndarray:
    """Spherical k-means centroids of ``sample``'s rows, deterministic for ``seed``.

    Seeded by greedy k-means++ (as scikit-learn: each next seed is the best of 2 + ln k draws with
    probability proportional to 1 - cosine to the nearest seed so far, which for unit vectors is
    half the squared distance, i.e. D^2 sampling), so the seeds spread over the data instead of
    piling into its densest part, and two seeds rarely split one dense topic; then at most
    ``iterations`` Lloyd steps on the sphere (stopping early when no row changes cluster). A
    cluster that empties keeps its centroid. ``k`` is clipped to the number of distinct directions
    (seeding stops when every row coincides with a seed), and zero rows are ignored. Returns
    (k', d) float32 unit rows; k' is 0 only when every row is zero or there are none.
    """
    _check_2d("sample", sample)
    _positive("k", k)
    if int(iterations) < 0:
        raise ConfigError(f"iterations must be 0 or more, not {iterations}")
    x = unit(sample)
    nonzero = np.any(x != 0, axis=1)
    if not nonzero.all():
        x = x[nonzero]
    n, d = x.shape
    if n == 0:
        return np.zeros((0, d), dtype=np.float32)
    rng = np.random.default_rng(seed)
    trials = 2 + int(math.log(max(int(k), 1)))  # sklearn's greedy k-means++: best of a few draws
    chosen = [int(rng.integers(n))]
    gap = _gap(x, x[chosen[0]][:, None])[:, 0]  # 1 - cosine to the nearest seed so far
    while len(chosen) < k:
        cumulative = np.cumsum(gap, dtype=np.float64)
        total = cumulative[-1]
        if total <= 0.0:  # every row coincides with a seed: no distinct row is left
            break
        draws = np.searchsorted(cumulative, rng.random(trials) * total, side="right")
        draws = np.minimum(draws, n - 1)
        draws = draws[gap[draws] > 0.0]  # rounding at the end of the cumsum can land on a seed's twin
        if len(draws) == 0:
            draws = np.flatnonzero(gap)[:1]
        candidates = np.minimum(gap[:, None], _gap(x, x[draws].T))  # the gaps were each draw chosen
        best = int(np.argmin(candidates.sum(axis=0, dtype=np.float64)))
        chosen.append(int(draws[best]))
        gap = candidates[:, best].copy()
    centroids = x[chosen].copy()
    labels = None
    for _ in range(int(iterations)):
        new_labels, _ = assign(x, centroids)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        order = np.argsort(labels, kind="stable")
        present, starts = np.unique(labels[order], return_index=True)
        sums = np.add.reduceat(x[order], starts, axis=0)
        centroids[present] = unit(sums)  # a cluster left empty keeps its centroid
    return centroids


def assign(vectors: np.ndarray, centroids: np.ndarray, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid by cosine: (labels int32, cosine to it float32).

    Rows are normalised a block at a time (at most ``block`` rows, and at most 16M similarities per
    tile), so a pool of float16 embeddings is never copied whole. A zero row gets label 0, cosine 0.
    """
    _check_2d("vectors", vectors)
    _check_2d("centroids", centroids)
    _positive("block", block)
    n = len(vectors)
    labels = np.zeros(n, dtype=np.int32)
    cosines = np.zeros(n, dtype=np.float32)
    if n == 0:
        return labels, cosines
    if len(centroids) == 0:
        raise ConfigError("assign needs at least one centroid, got none")
    if centroids.shape[1] != vectors.shape[1]:
        raise ConfigError(f"centroids have {centroids.shape[1]} dims, the vectors {vectors.shape[1]}")
    c = unit(centroids)
    step = max(1, min(int(block), _MAX_TILE_ENTRIES // len(c)))
    for start in range(0, n, step):
        sims = unit(vectors[start : start + step]) @ c.T
        best = np.argmax(sims, axis=1)
        labels[start : start + len(best)] = best
        cosines[start : start + len(best)] = sims[np.arange(len(best)), best]
    return labels, cosines


def _pairs_in_cluster(vectors: np.ndarray, members: np.ndarray, min_cosine: float, block: int,
                      found: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Append the pairs among ``members`` (ascending row indices) with cosine >= ``min_cosine``.

    The upper triangle of the cluster's similarity matrix, in block x block tiles: memory is two
    tiles of rows and one tile of similarities, whatever the cluster's size.
    """
    m = len(members)
    for a in range(0, m, block):
        rows_idx = members[a : a + block]
        rows = unit(vectors[rows_idx])
        for b in range(a, m, block):
            cols_idx = members[b : b + block]
            sims = rows @ (rows if b == a else unit(vectors[cols_idx])).T
            ii, jj = np.nonzero(sims >= min_cosine)
            if b == a:  # the diagonal tile: each pair once, no row with itself
                upper = ii < jj
                ii, jj = ii[upper], jj[upper]
            if len(ii):
                found.append((rows_idx[ii], cols_idx[jj], sims[ii, jj]))


def pairs_within_clusters(vectors: np.ndarray, labels: np.ndarray, min_cosine: float, block: int = 2048
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i, j), i < j, of rows with equal labels and cosine >= ``min_cosine``.

    SemDeDup's duplicate test, restricted to a cluster. Returns (i int64, j int64, cosine float32),
    sorted by (i, j) so the answer does not depend on ``block``. Rows may be float16 or float32 and
    need not be unit (each tile is normalised as it is read); a zero row pairs with nothing.
    The output is every pair: a cluster of c copies of one image gives c(c-1)/2 of them.
    """
    _check_2d("vectors", vectors)
    _positive("block", block)
    if not 0.0 < float(min_cosine) <= 1.0:
        raise ConfigError(f"min_cosine must be in (0, 1] (1 - eps), not {min_cosine}")
    labels = np.asarray(labels)
    if labels.shape != (len(vectors),):
        raise ConfigError(f"labels must have one entry per row ({len(vectors)}), not shape {labels.shape}")
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if len(vectors) > 1:
        order = np.argsort(labels, kind="stable")  # stable: row indices ascend inside each cluster
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        for members in np.split(order, bounds):
            if len(members) > 1:
                _pairs_in_cluster(vectors, members, float(min_cosine), int(block), found)
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i = np.concatenate([f[0] for f in found]).astype(np.int64)
    j = np.concatenate([f[1] for f in found]).astype(np.int64)
    cos = np.concatenate([f[2] for f in found]).astype(np.float32)
    order = np.lexsort((j, i))
    return i[order], j[order], cos[order]


def cluster_pairs(vectors: np.ndarray, cluster_size: int, min_cosine: float, seed: int,
                  sample: int = 20000) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What one worker does with one coarse cluster's rows: fine k-means, then pairs inside.

    k = ceil(m / cluster_size) centroids are fit on at most ``sample`` rows drawn with ``seed``
    (k-means needs a sample, not the pool, to place its centroids), every row is assigned, and
    the pairs within each fine cluster are returned as (i, j, cosine) with row indices into
    ``vectors``, plus each row's cosine to its centroid (float32; NeMo's hard/easy keepers keep the
    member farthest from / nearest to it). Deterministic for ``seed``.
    """
    _check_2d("vectors", vectors)
    _positive("cluster_size", cluster_size)
    _positive("sample", sample)
    m = len(vectors)
    empty = np.zeros(0, np.int64)
    if m == 0:
        return empty, empty.copy(), np.zeros(0, np.float32), np.zeros(0, np.float32)
    rng = np.random.default_rng([int(seed), 1])  # its own stream: fit_centroids draws from `seed`
    rows = np.sort(rng.choice(m, size=sample, replace=False)) if m > sample else slice(None)
    centroids = fit_centroids(vectors[rows], math.ceil(m / int(cluster_size)), seed)
    if len(centroids) == 0:  # every sampled row is zero: no direction to cluster by, so one cluster
        labels, centroid_cosine = np.zeros(m, np.int32), np.zeros(m, np.float32)
    else:
        # 8192-row blocks: as fast as the default on 2 cores (measured), an eighth of its memory
        labels, centroid_cosine = assign(vectors, centroids, block=_WORKER_ASSIGN_BLOCK)
    i, j, cos = pairs_within_clusters(vectors, labels, min_cosine)
    return i, j, cos, centroid_cosine


# An embedding space in which more than this share of random pairs of pool images look like
# duplicates does not tell images apart (a random init: ~7% of pairs of different real photos at
# cosine >= 0.95, bench/dedup_quality.py; a model trained for a few steps: every pair): the semantic
# tiers refuse it. Real duplicates are a vanishing share of a pool's random pairs (a pool where one
# picture is a fifth of all samples would reach 4%).
MAX_RANDOM_PAIR_SHARE = 0.05
SEPARATION_SAMPLE = 2000  # rows whose pairs are checked (about 2 million pairs)


def separates(vectors: np.ndarray, min_cosine: float) -> tuple[bool, float]:
    """Whether the embeddings tell images apart at ``min_cosine``: the share of pairs of distinct
    rows (a sample of a pool, or an evaluation set) at or above it must stay below
    :data:`MAX_RANDOM_PAIR_SHARE`; real duplicates are a vanishing share of random pairs, a space
    that does not separate makes most of them look alike. Returns (verdict, the share measured)."""
    _check_2d("embeddings", vectors)
    rows = unit(vectors[:SEPARATION_SAMPLE])
    n = rows.shape[0]
    if n < 2:
        return True, 0.0
    similar = 0
    for start in range(0, n, 512):
        block = rows[start:start + 512] @ rows.T
        above = block >= min_cosine
        above[np.arange(block.shape[0]), np.arange(start, start + block.shape[0])] = False  # not a row with itself
        similar += int(above.sum())
    share = similar / (n * (n - 1))
    return share <= MAX_RANDOM_PAIR_SHARE, share
