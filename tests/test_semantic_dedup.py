"""The semantic-dedup numerics (stages/semantic_dedup.py) on planted near-duplicates: every planted
pair is found, no pair of independent vectors is, and the answer depends neither on the block size,
nor on float16 storage, nor on anything but the seed."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ConfigError
from stages.semantic_dedup import assign, cluster_pairs, fit_centroids, pairs_within_clusters, unit

D = 384
NOISE = 0.2  # unit(x + NOISE * g / sqrt(d)) has cosine ~ 1 / sqrt(1 + NOISE^2) ~ 0.98 with x


def _random_unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    return unit(rng.standard_normal((n, d)))


def _near_copies(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    return unit(x + NOISE * rng.standard_normal(x.shape) / np.sqrt(x.shape[1]))


def _planted(seed: int, n: int, copies: int, topics: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """n unit rows (around `topics` centres when given, as real embeddings cluster), and near-copies
    of `copies` of them appended after; returns the rows and the planted (i, j) pairs."""
    rng = np.random.default_rng(seed)
    if topics:
        centres = _random_unit(rng, topics)
        base = unit(centres[rng.integers(topics, size=n)] + 0.9 * rng.standard_normal((n, D)) / np.sqrt(D))
    else:
        base = _random_unit(rng, n)
    originals = rng.choice(n, size=copies, replace=False)
    rows = np.concatenate([base, _near_copies(rng, base[originals])])
    return rows, {(int(o), n + c) for c, o in enumerate(originals)}


def _pair_set(i: np.ndarray, j: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(i.tolist(), j.tolist()))


def test_unit_scales_rows_and_keeps_zero_rows():
    out = unit(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float16))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-6)


def test_every_planted_pair_and_no_independent_pair_within_one_cluster():
    rows, planted = _planted(0, 1500, 200)
    i, j, cos = pairs_within_clusters(rows, np.zeros(len(rows), np.int32), 0.95)
    assert _pair_set(i, j) == planted
    assert (i < j).all() and i.dtype == j.dtype == np.int64 and cos.dtype == np.float32
    assert cos.min() >= 0.95 and cos.max() < 0.995  # the copies sit near 0.98, not at 1
    np.testing.assert_allclose(cos, np.einsum("ij,ij->i", rows[i], rows[j]), atol=1e-5)


def test_cluster_pairs_finds_every_planted_pair_in_clustered_embeddings():
    rows, planted = _planted(1, 3000, 300, topics=8)
    i, j, cos, centroid_cos = cluster_pairs(rows, cluster_size=-(-len(rows) // 8), min_cosine=0.95, seed=3)  # k = 8
    assert _pair_set(i, j) == planted
    assert centroid_cos.shape == (len(rows),) and centroid_cos.dtype == np.float32
    # the cosine to the row's own (nearest) centroid: an independent check with the same centroids
    labels, expected = assign(rows, fit_centroids(rows, 8, seed=3))
    np.testing.assert_allclose(centroid_cos, expected, atol=1e-6)
    assert len(np.unique(labels)) == 8
    assert centroid_cos.min() > 0.3  # rows sit near their topic's centroid, not at random


def test_a_pair_in_different_clusters_is_not_reported():
    rows, planted = _planted(2, 200, 50)
    labels = np.arange(len(rows)) % 2  # copies at odd distance land in the other cluster
    i, j, _ = pairs_within_clusters(rows, labels, 0.95)
    assert _pair_set(i, j) == {(a, b) for a, b in planted if (b - a) % 2 == 0}


def test_results_do_not_depend_on_block_size_and_a_cluster_can_exceed_the_block():
    rows, planted = _planted(4, 900, 150)
    labels = np.zeros(len(rows), np.int32)
    labels[::3] = 1  # two clusters of 700 and 350 rows, both far bigger than the small blocks
    reference = pairs_within_clusters(rows, labels, 0.95, block=2048)
    assert len(reference[0]) > 0
    for block in (1, 7, 64, 333):
        i, j, cos = pairs_within_clusters(rows, labels, 0.95, block=block)
        np.testing.assert_array_equal(i, reference[0])
        np.testing.assert_array_equal(j, reference[1])
        np.testing.assert_allclose(cos, reference[2], atol=1e-6)
    centroids = fit_centroids(rows, 10, seed=0)
    big = assign(rows, centroids)
    for block in (1, 100):
        small = assign(rows, centroids, block=block)
        np.testing.assert_array_equal(small[0], big[0])
        np.testing.assert_allclose(small[1], big[1], atol=1e-6)


def test_deterministic_for_a_seed():
    rows, _ = _planted(5, 2500, 100)
    first = cluster_pairs(rows, cluster_size=300, min_cosine=0.95, seed=11, sample=1000)
    again = cluster_pairs(rows, cluster_size=300, min_cosine=0.95, seed=11, sample=1000)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fit_centroids(rows, 9, seed=1), fit_centroids(rows, 9, seed=1))
    assert not np.array_equal(fit_centroids(rows, 9, seed=1), fit_centroids(rows, 9, seed=2))


def test_float16_input_gives_the_float32_answer():
    rows, planted = _planted(6, 1200, 120, topics=4)
    half = rows.astype(np.float16)
    labels = assign(rows, fit_centroids(rows, 4, seed=0))[0]
    i, j, cos = pairs_within_clusters(half, labels, 0.95)
    assert _pair_set(i, j) == _pair_set(*pairs_within_clusters(rows, labels, 0.95)[:2])
    assert cos.dtype == np.float32
    np.testing.assert_array_equal(assign(half, fit_centroids(half, 4, seed=0))[0], labels)
    assert _pair_set(*cluster_pairs(half, 300, 0.95, seed=0)[:2]) == planted


def test_spherical_kmeans_recovers_separated_topics():
    rng = np.random.default_rng(7)
    centres = _random_unit(rng, 5, 32)
    truth = rng.integers(5, size=1000)
    rows = unit(centres[truth] + 0.5 * rng.standard_normal((1000, 32)) / np.sqrt(32)) * rng.uniform(0.5, 3, (1000, 1))
    centroids = fit_centroids(rows, 5, seed=0)
    assert centroids.shape == (5, 32) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    labels, _ = assign(rows, centroids)
    for topic in range(5):  # each topic is exactly one cluster: length of the rows does not matter
        assert len(np.unique(labels[truth == topic])) == 1
    assert len(np.unique(labels)) == 5


def test_k_is_clipped_to_distinct_rows_and_zero_rows_are_ignored():
    rows = np.repeat(np.eye(3, 8, dtype=np.float32), 20, axis=0) * 2.5
    rows = np.concatenate([rows, np.zeros((5, 8), np.float32)])
    centroids = fit_centroids(rows, 10, seed=0)
    assert len(centroids) == 3
    np.testing.assert_allclose(np.sort(np.abs(centroids).sum(axis=1)), [1, 1, 1], atol=1e-6)
    assert fit_centroids(np.zeros((4, 8)), 3, seed=0).shape == (0, 8)


def test_empty_input_and_a_single_row():
    for result in (cluster_pairs(np.zeros((0, D), np.float16), 100, 0.95, seed=0),
                   cluster_pairs(np.ones((1, D), np.float16), 100, 0.95, seed=0)):
        assert all(len(a) == 0 for a in result[:3])
    _, _, _, centroid_cos = cluster_pairs(np.ones((1, D), np.float16), 100, 0.95, seed=0)
    np.testing.assert_allclose(centroid_cos, [1.0], atol=1e-3)
    labels, cos = assign(np.zeros((0, D)), np.ones((2, D)))
    assert labels.shape == cos.shape == (0,)
    assert all(len(a) == 0 for a in pairs_within_clusters(np.zeros((0, D)), np.zeros(0), 0.95))
    assert all(len(a) == 0 for a in cluster_pairs(np.zeros((3, D)), 1, 0.95, seed=0)[:3])  # zero rows pair with nothing


@pytest.mark.parametrize("call, message", [
    (lambda: pairs_within_clusters(np.ones((2, 4)), np.zeros(2), 0.0), "min_cosine"),
    (lambda: pairs_within_clusters(np.ones((2, 4)), np.zeros(3), 0.9), "labels"),
    (lambda: cluster_pairs(np.ones((2, 4)), 0, 0.9, seed=0), "cluster_size"),
    (lambda: fit_centroids(np.ones(4), 2, seed=0), "2-d"),
    (lambda: assign(np.ones((2, 4)), np.ones((2, 5))), "dims"),
])
def test_a_bad_argument_is_one_line_naming_it(call, message):
    with pytest.raises(ConfigError, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_an_embedding_space_that_does_not_separate_images_is_refused():
    """A barely trained model puts every pair of images above the threshold: the semantic tiers must
    not call them all duplicates; a space where random pairs are far apart passes, with a few real copies."""
    from stages.semantic_dedup import MAX_RANDOM_PAIR_SHARE, separates

    rng = np.random.default_rng(0)
    spread = rng.normal(size=(500, 64)).astype(np.float32)
    spread[:10] = spread[10:20] + 0.01  # ten real copies
    ok, share = separates(spread, 0.95)
    assert ok and share < MAX_RANDOM_PAIR_SHARE
    collapsed = np.ones((300, 64), np.float32) + 0.05 * rng.normal(size=(300, 64)).astype(np.float32)
    ok, share = separates(collapsed, 0.95)
    assert not ok and share > 0.9
