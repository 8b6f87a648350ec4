"""The dup_group step's three tiers through the pool runner, on manifests written the way the stages write them.

A pool of planted groups: byte copies (exact tier), pHashes a few bits apart (perceptual tier) and
embedding vectors at cosine ~0.98 (semantic tier, as a pool's own imported vectors), checked
against the groups planted; the work split into several tasks and passes (a small
``worker_memory_mb``) must give the same part as one task; a killed run resumes from the tasks it
finished; the keeper rule is one setting for every tier.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import stages.dedup as dedup
from manifests.catalog import build_catalog, parquet_metadata
from manifests.schemas import schema_for
from manifests.store import RunLayout
from pipeline.dag import STAGE_ORDER
from pipeline.policy_runner import INPUTS_KEY, POOL_PART, pool_inputs_digest, pool_work, run_pool_step
from stages.dedup import DedupConfig, DupGroupStage, close_pairs, phash_pairs_task

DIM = 64
MODEL = "imported: test vectors"  # a pool's own vectors (a trained model's): the semantic tier compares them


def _pool(n_groups: int = 30, copies: int = 3, seed: int = 0, singles: int = 60) -> dict[str, list]:
    """Rows in planted groups of ``copies`` (group g's members share nothing with other groups), and
    ``singles`` unrelated samples: a pool is mostly not duplicates (the semantic tier checks that
    random pairs of it do not look alike, see stages.semantic_dedup.separates)."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("uid", "sha256", "phash", "area", "vector", "group")}
    for i in range(singles):
        v = rng.normal(size=DIM)
        rows["uid"].append(f"s{i:03d}")
        rows["sha256"].append(f"single-{i}")
        rows["phash"].append(np.int64(np.uint64(int(rng.integers(0, 2**63))).view(np.int64)).item())
        rows["vector"].append(v / np.linalg.norm(v))
        rows["area"].append(50 + i)
        rows["group"].append(-1)
    for g in range(n_groups):
        base_hash = int(rng.integers(0, 2**63))
        base_vec = rng.normal(size=DIM)
        base_vec /= np.linalg.norm(base_vec)
        for c in range(copies):
            rows["uid"].append(f"u{g:03d}-{c}")
            rows["sha256"].append(f"bytes-{g}" if c < 2 else f"bytes-{g}-{c}")  # copies 0 and 1: the same bytes
            flip = 0 if c < 2 else (1 << int(rng.integers(0, 64))) | (1 << int(rng.integers(0, 64)))
            rows["phash"].append(np.int64(np.uint64(base_hash ^ flip).view(np.int64)).item())
            noise = rng.normal(size=DIM) * 0.02
            v = base_vec + noise
            rows["vector"].append(v / np.linalg.norm(v))
            rows["area"].append(100 * (c + 1) + g)  # the last copy is the largest
            rows["group"].append(g)
    return rows


def _write_run(root, rows: dict[str, list], shards: int = 3) -> RunLayout:
    layout = RunLayout(root)
    n = len(rows["uid"])
    for s in range(shards):
        idx = list(range(s, n, shards))
        shard = f"{s:05d}"
        pick = lambda k: [rows[k][i] for i in idx]  # noqa: E731
        download = pa.table({
            "uid": pick("uid"), "status": ["ok"] * len(idx), "shard": [shard] * len(idx),
            "sha256": pick("sha256"), "original_width": pick("area"), "original_height": [1] * len(idx),
        })
        hashes = pa.table({"uid": pick("uid"), "dedup_status": ["ok"] * len(idx),
                           "phash": pa.array(pick("phash"), pa.int64())})
        vectors = pa.array([np.asarray(v, np.float16).tolist() for v in pick("vector")], pa.list_(pa.float16()))
        clip = pa.table({"uid": pick("uid"), "clip_status": ["ok"] * len(idx), "clip_model": [MODEL] * len(idx),
                         "image_embedding": vectors, "text_embedding": vectors})
        for stage, table in (("download", download), ("dedup", hashes), ("clip_score", clip)):
            layout.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, layout.part_path(stage, shard))
    build_catalog(layout, STAGE_ORDER)
    return layout


def _part(layout: RunLayout) -> dict[str, list]:
    table = pq.read_table(layout.part_path("dup_group", POOL_PART))
    assert table.schema.equals(schema_for("dup_group"))
    return table.to_pydict()


def test_every_tier_finds_its_planted_groups_and_keeps_the_largest(tmp_path):
    rows = _pool()
    layout = _write_run(tmp_path / "run", rows)
    assert run_pool_step(layout, DupGroupStage(DedupConfig()))
    got = _part(layout)
    by_uid = {u: i for i, u in enumerate(got["uid"])}
    for g in range(30):
        members = [f"u{g:03d}-{c}" for c in range(3)]
        at = [by_uid[m] for m in members]
        # exact: copies 0 and 1 share bytes; copy 2 is alone
        assert [got["dup_exact_group"][i] for i in at] == [members[0], members[0], members[2]]
        assert [got["dup_exact_keeper"][i] for i in at] == [False, True, True]  # the larger of 0 and 1
        # perceptual: copy 2 is 2 bits away, so all three; semantic: all three at cosine ~0.98
        for column in ("dup_group", "dup_semantic_group"):
            assert [got[column][i] for i in at] == [members[0]] * 3, column
        for column in ("dup_keeper", "dup_semantic_keeper"):
            assert [got[column][i] for i in at] == [False, False, True], column
        assert [got["dup_semantic_size"][i] for i in at] == [3, 3, 3]
    assert set(got["dup_embedding_model"]) == {MODEL}
    assert parquet_metadata(layout.part_path("dup_group", POOL_PART))[INPUTS_KEY] == pool_inputs_digest(
        layout, DupGroupStage(DedupConfig()))
    assert not (layout.stage_dir("dup_group") / "work").exists()  # intermediate files go once the part is in place
    assert not run_pool_step(layout, DupGroupStage(DedupConfig()))  # same inputs: nothing to do
    # a run killed after the part went in place, before its work folder went: the rerun sweeps it
    leftover = pool_work(layout, DupGroupStage(DedupConfig()), "y" * 64).dir / "phash" / "pairs-0.npy"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"x")
    assert not run_pool_step(layout, DupGroupStage(DedupConfig()))
    assert not (layout.stage_dir("dup_group") / "work").exists()


def test_many_small_tasks_give_the_same_part_as_one(tmp_path, monkeypatch):
    rows = _pool(n_groups=40, seed=1)
    one = _write_run(tmp_path / "one", rows)
    many = _write_run(tmp_path / "many", rows)
    run_pool_step(one, DupGroupStage(DedupConfig()))
    # 15 kB a worker (a test's pool): the pHash search in passes, the embeddings in several coarse clusters,
    # and the groups joined back to their rows in buckets of 7 samples
    monkeypatch.setattr(dedup, "BUCKET_ROWS", 7)
    stage = DupGroupStage(DedupConfig(worker_memory_mb=15_000 / 2**20))
    work = pool_work(many, stage, "x" * 64)
    table = pa.Table.from_batches(list(stage.process_pool(_connect(many), work)))
    assert stage.last_passes == 1 and stage.last_coarse == 5
    a, b = _part(one), table.to_pydict()
    for column in ("uid", "dup_group", "dup_keeper", "dup_exact_group", "dup_semantic_group", "dup_semantic_keeper"):
        assert a[column] == b[column], column


def _connect(layout: RunLayout):
    from manifests.catalog import connect

    return connect(layout.catalog_path, layout)


def test_phash_passes_and_task_split_find_exactly_the_close_pairs(tmp_path):
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, size=3000, dtype=np.int64).view(np.uint64)
    near = hashes[:300] ^ (np.uint64(1) << rng.integers(0, 64, size=300).astype(np.uint64))
    hashes = np.unique(np.concatenate([hashes, near]))
    path = tmp_path / "distinct.parquet"
    pq.write_table(pa.table({"phash": pa.array(hashes.view(np.int64))}), path)
    i, j = close_pairs(hashes, 6)
    want = {tuple(sorted((int(hashes[a]), int(hashes[b])))) for a, b in zip(i, j)}
    bands, agree = dedup.band_plan(hashes.size, 6)
    combos = list(itertools.combinations(dedup._bands(bands), agree))
    got = set()
    for t in range(3):  # three tasks, each in 4 passes over the key space
        out = tmp_path / f"pairs-{t}.npy"
        phash_pairs_task(path, combos[t::3], 6, 4, out)
        got |= {tuple(sorted(map(int, p))) for p in np.load(out)}
    assert got == want and len(want) >= 300


def test_a_killed_run_resumes_from_the_tasks_it_finished(tmp_path):
    layout = _write_run(tmp_path / "run", _pool(n_groups=10))
    stage = DupGroupStage(DedupConfig(semantic_cluster_size=4))
    digest = pool_inputs_digest(layout, stage)
    work = pool_work(layout, stage, digest)
    ran = []

    def dying(fn, calls):
        out = []
        for call in calls:
            if len(ran) == 3:
                raise KeyboardInterrupt  # the run is killed after three tasks
            ran.append(fn.__name__)
            out.append(fn(*call))
        return out

    work.map = dying
    with pytest.raises(KeyboardInterrupt):
        list(stage.process_pool(_connect(layout), work))
    finished = sorted((work.dir / "phash").glob("pairs-*.npy"))
    assert len(finished) == 3
    stamps = {p: p.stat().st_mtime_ns for p in finished}
    work = pool_work(layout, stage, digest)
    table = pa.Table.from_batches(list(stage.process_pool(_connect(layout), work)))
    assert {p: p.stat().st_mtime_ns for p in finished} == stamps  # found on disk, not searched again
    clean = _write_run(tmp_path / "clean", _pool(n_groups=10))
    run_pool_step(clean, stage)
    assert table.to_pydict() == _part(clean)


@pytest.mark.parametrize("rule", ["largest", "hard", "easy", "random"])
def test_the_keeper_rule_is_one_setting_for_every_tier(tmp_path, rule):
    layout = _write_run(tmp_path / "run", _pool(n_groups=12, seed=2))
    run_pool_step(layout, DupGroupStage(DedupConfig(keeper=rule)))
    got = _part(layout)
    groups: dict[str, list[int]] = {}
    for i, g in enumerate(got["dup_semantic_group"]):
        groups.setdefault(g, []).append(i)
    for members in groups.values():
        keepers = [i for i in members if got["dup_semantic_keeper"][i]]
        assert len(keepers) == 1
        cos = [got["dup_centroid_cosine"][i] for i in members]
        if rule == "hard":
            assert got["dup_centroid_cosine"][keepers[0]] == min(cos)
        if rule == "easy":
            assert got["dup_centroid_cosine"][keepers[0]] == max(cos)
        # the perceptual tier (the same members here) keeps the same sample: one rule
        assert got["dup_keeper"][keepers[0]]


def test_embeddings_of_an_untrained_model_are_not_compared(tmp_path):
    rows = _pool(n_groups=5)
    layout = _write_run(tmp_path / "run", rows)
    for part in layout.stage_dir("clip_score").glob("part-*.parquet"):
        table = pq.read_table(part)
        table = table.set_column(table.schema.get_field_index("clip_model"), "clip_model",
                                 pa.array(["ViT-S-32 random-init(seed=0)"] * table.num_rows))
        pq.write_table(table, part)
    build_catalog(layout, STAGE_ORDER)
    run_pool_step(layout, DupGroupStage(DedupConfig()))
    got = _part(layout)
    assert set(got["dup_semantic_group"]) == {None} and all(g is not None for g in got["dup_group"])


def test_config_problems_name_the_setting():
    assert DedupConfig(tiers=("exact", "bytes")).problems() == [
        "dedup.tiers must be a list of exact, phash, semantic (got ('exact', 'bytes'))"]
    assert "dedup.keeper must be one of largest, hard, easy, random" in DedupConfig(keeper="first").problems()[0]
    assert "dedup.semantic_eps" in DedupConfig(semantic_eps=1.5).problems()[0]


def test_the_same_template_with_different_words_is_two_samples(tmp_path):
    """split_by_text: copies whose OCR read other words leave the pHash and semantic groups; a copy read the
    same (case and order aside) stays; text-free copies are untouched."""
    rows = _pool(n_groups=4)
    layout = _write_run(tmp_path / "run", rows)
    texts = {"u000-0": "SALE today", "u000-1": "today sale", "u000-2": "OPEN today",  # group 0: copy 2 says OPEN
             "u001-0": "", "u001-1": None, "u001-2": ""}
    uids = list(texts)
    layout.stage_dir("ocr").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"uid": uids, "ocr_status": ["ok"] * len(uids), "ocr_text": [texts[u] for u in uids]}),
                   layout.part_path("ocr", "00000"))
    build_catalog(layout, STAGE_ORDER)
    run_pool_step(layout, DupGroupStage(DedupConfig(split_by_text=True)))
    got = _part(layout)
    group = dict(zip(got["uid"], got["dup_group"]))
    semantic = dict(zip(got["uid"], got["dup_semantic_group"]))
    for column in (group, semantic):
        assert column["u000-0"] == column["u000-1"] == "u000-0" and column["u000-2"] == "u000-2"
        assert column["u001-0"] == column["u001-1"] == column["u001-2"] == "u001-0"
        assert column["u002-0"] == column["u002-2"] == "u002-0"
    without = DupGroupStage(DedupConfig())  # the default: words not compared
    run_pool_step(layout, without)
    assert dict(zip(*(_part(layout)[c] for c in ("uid", "dup_group"))))["u000-2"] == "u000-0"
