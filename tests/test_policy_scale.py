"""The filter step as DuckDB runs it at scale (policy inputs joined once, selections decided and
written without rows in Python), checked against the previous Python-built selection on a small
pool with missing scores, window rules and failed downloads: same rows, order, kept and reasons;
an unchanged rerun writes nothing; a changed score rewrites only the policies it moves."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import ConfigError
from manifests.catalog import build_catalog, connect, materialise_policy_inputs, policy_inputs_path
from manifests.schemas import SELECTION
from manifests.store import RunLayout
from manifests.uids import UID_TYPE, read_selection, uids_as_text, with_uid_bytes
from pipeline.config import load_config
from pipeline.dag import STAGE_ORDER
from pipeline.policy_runner import select_policies
from stages.filter import FilterStage, PolicyConfig, PolicyInput, PoolConstants, fold_pool_constants, pool_constant_queries, reorders_rows

SHARDS, PER_SHARD = 3, 40

EXTRA = {
    # two rules, one a window over a column with NULLs: every reason shape (kept, fails, is null, both)
    "mixed": PolicyConfig("mixed", rules={"wide": "original_width >= 700",
                                          "top_half": "clip_score >= quantile_cont(clip_score, 0.5) over ()"}),
    "quoted": PolicyConfig("quoted", rules={"it's short": "len(caption) < 12"}),
    # rules DuckDB may answer out of order (each outcome then comes with its row's position): a rank
    # per row, and a subquery that names the outer row; and a scalar subquery, computed once
    "ranked": PolicyConfig("ranked", rules={"top_third": "percent_rank() over (order by clip_score nulls first) >= 0.66"}),
    "parrot_relative": PolicyConfig("parrot_relative", rules={
        "above_kind_mean": "clip_score >= (select avg(s2.clip_score) from samples s2 where s2.is_parrot = samples.is_parrot)"}),
    "above_median": PolicyConfig("above_median", rules={"above": "clip_score >= (select median(clip_score) from samples)"}),
}


def _h(i: int, salt: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{i}".encode()).digest()[:4], "little")


def _write_parts(layout: RunLayout, shard: int, scale: float = 1.0) -> None:
    """One shard's part per stage; every 7th download failed, every 5th CLIP score and every 6th
    text area missing (NULL), as a failed decode leaves them."""
    rows = range(shard * PER_SHARD, (shard + 1) * PER_SHARD)
    uids = [hashlib.md5(str(i).encode()).hexdigest() for i in rows]
    name = f"part-{shard:06d}.parquet"
    tables = {
        "download": {"uid": uids, "status": ["failed" if i % 7 == 3 else "ok" for i in rows],
                     "caption": [f"caption {'x' * (_h(i, 1) % 9)}" for i in rows],
                     "original_width": [400 + _h(i, 2) % 600 for i in rows],
                     "original_height": [300 + _h(i, 3) % 400 for i in rows],
                     # a LAION list's own score (a source column; laion-sim reads it)
                     "similarity": [None if i % 7 == 3 else (_h(i, 8) % 1000) / 2000 for i in rows]},
        "ocr": {"uid": uids, "text_area_ratio": [None if i % 6 == 1 else (_h(i, 4) % 100) / 2000 for i in rows]},
        "parrot": {"uid": uids, "is_parrot": [_h(i, 5) % 4 == 0 for i in rows]},
        "caption": {"uid": uids, "caption_lang": [None if i % 9 == 4 else ("en", "de", "fr")[_h(i, 9) % 3] for i in rows],
                    "caption_n_words": [1 + _h(i, 10) % 6 for i in rows],
                    "caption_n_chars": [3 + _h(i, 11) % 30 for i in rows]},
        "clip_score": {"uid": uids, "clip_score": [None if i % 5 == 2 else scale * (_h(i, 6) % 1000) / 1000 for i in rows],
                       "clip_score_masked": [None if i % 5 == 2 else (_h(i, 7) % 1000) / 1000 for i in rows]},
    }
    for stage, columns in tables.items():
        layout.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), layout.stage_dir(stage) / name)


def _write_dup_groups(layout: RunLayout) -> None:
    uids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(SHARDS * PER_SHARD)]
    groups = [uids[i - i % 3] if i % 10 < 3 else None for i in range(len(uids))]  # a few groups of three
    keepers = [None if g is None else groups.index(g) == i for i, g in enumerate(groups)]  # one per group
    layout.stage_dir("dup_group").mkdir(parents=True, exist_ok=True)
    nothing = pa.nulls(len(uids), pa.bool_())  # no byte copies, no embeddings: the other tiers compared nothing
    pq.write_table(pa.table({"uid": uids, "dup_group": groups, "dup_keeper": keepers,
                             "dup_exact_keeper": nothing, "dup_semantic_keeper": nothing}),
                   layout.stage_dir("dup_group") / "part-pool.parquet")
    from manifests.schemas import schema_for  # no evaluation image in this pool: eval_match null throughout
    match = schema_for("decontaminate").field("eval_match").type
    layout.stage_dir("decontaminate").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"uid": uids, "eval_match": pa.nulls(len(uids), match)}),
                   layout.stage_dir("decontaminate") / "part-pool.parquet")


def _python_selection(con: duckdb.DuckDBPyConnection, policy: PolicyConfig) -> pa.Table:
    """The previous filter stage, verbatim in effect: rows fetched into Python, reasons built there."""
    rules = ", ".join(f'({sql}) as "rule:{name}"' for name, sql in policy.rendered_rules().items())
    names = list(policy.rules)
    uids, kept, reasons = [], [], []
    for uid, *values in con.execute(f"select uid, {rules} from samples where status = 'ok' order by uid").fetchall():
        failed = [n for n, v in zip(names, values) if v is not True]
        unknown = [n for n, v in zip(names, values) if v is None]
        uids.append(uid)
        kept.append(not failed)
        reasons.append("kept: " + ", ".join(names) if not failed else
                       "dropped: " + "; ".join(f"{n} is null (missing score)" if n in unknown else f"fails {n}" for n in failed))
    table = pa.table({"uid": uids, "policy": [policy.name] * len(uids), "kept": kept, "reason": reasons})
    return with_uid_bytes(table).cast(SELECTION)


@pytest.fixture()
def run(tmp_path: Path):
    layout = RunLayout(tmp_path / "run")
    for shard in range(SHARDS):
        _write_parts(layout, shard)
    _write_dup_groups(layout)
    build_catalog(layout, STAGE_ORDER)
    config = load_config()
    config.policies.update(EXTRA)
    return layout, config, tuple(config.policies)


def _mtimes(layout: RunLayout) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(layout.selections_dir.glob("*.parquet"))}


def test_selections_equal_the_python_built_ones(run):
    layout, config, policies = run
    reports = {r.policy: r for r in select_policies(layout, config, policies)}
    con = connect(layout.catalog_path, layout)
    reasons = set()
    for name in policies:
        expected = _python_selection(con, config.policy(name))
        written = pq.read_table(layout.selection_path(name)).cast(SELECTION)
        assert written.equals(expected), name
        assert FilterStage(config.policy(name)).process_pool(con).equals(expected), name  # the table-returning path too
        assert (reports[name].kept, reports[name].total) == (sum(expected["kept"].to_pylist()), expected.num_rows)
        reasons |= set(expected["reason"].to_pylist())
    con.close()
    # the pool exercises every shape of reason, NULLs and window rules included
    assert {"kept: wide, top_half", "dropped: fails wide", "dropped: top_half is null (missing score)",
            "dropped: fails wide; top_half is null (missing score)", "dropped: masked_top_fraction is null (missing score)",
            "dropped: little_text is null (missing score)", "kept: it's short"} <= reasons, sorted(reasons)


def test_clip_score_top_never_keeps_a_sample_without_a_score(run):
    """A missing CLIP score must not count as a high one (``percent_rank()`` orders NULLs last by
    default, which once ranked them at the top): the shipped rule drops them, saying why."""
    layout, config, _ = run
    select_policies(layout, config, ("clip-score-top",))
    build_catalog(layout, STAGE_ORDER)  # as curate does after the filter step: the selection views
    con = connect(layout.catalog_path, layout)
    kept_without_score = con.execute(
        "select count(*) from selection_clip_score_top sel join samples using (uid) where sel.kept and samples.clip_score is null",
    ).fetchone()[0]
    missing = con.execute("select count(*) from samples where status = 'ok' and clip_score is null").fetchone()[0]
    said = con.execute("select count(*) from selection_clip_score_top sel join samples using (uid) "
                       "where samples.clip_score is null and reason = 'dropped: top_fraction is null (missing score)'").fetchone()[0]
    con.close()
    assert missing > 0 and kept_without_score == 0 and said == missing


def test_policy_inputs_hold_what_samples_has(run):
    layout, config, policies = run
    columns = ["clip_score", "dup_group", "is_parrot", "original_width", "status", "text_area_ratio"]
    inputs = materialise_policy_inputs(layout, columns, STAGE_ORDER)
    assert inputs.built and inputs.path == policy_inputs_path(layout)
    con = connect(layout.catalog_path, layout)
    expected = con.execute(f"select uid, {', '.join(columns)} from samples where status = 'ok' order by uid").fetchall()
    got = con.execute(f"select uid, {', '.join(columns)} from read_parquet(?)", [str(inputs.path)]).fetchall()
    con.close()
    assert got == expected and inputs.rows == len(expected)
    again = materialise_policy_inputs(layout, columns, STAGE_ORDER)
    assert not again.built and again.uid_digest == inputs.uid_digest  # the parts did not change: reused
    before = inputs.path.stat().st_mtime_ns
    _write_parts(layout, 1)  # same content, new files: rebuilt, same uids
    rebuilt = materialise_policy_inputs(layout, columns, STAGE_ORDER)
    assert rebuilt.built and rebuilt.uid_digest == inputs.uid_digest and inputs.path.stat().st_mtime_ns != before


def test_rerun_rewrites_only_the_selections_that_changed(run):
    layout, config, policies = run
    select_policies(layout, config, policies)
    first = _mtimes(layout)
    assert len(first) == len(policies)
    os.utime(policy_inputs_path(layout), ns=(1, 1))  # any later write would show
    assert not any(r.changed for r in select_policies(layout, config, policies))
    assert _mtimes(layout) == first

    _write_parts(layout, 2)  # parts rewritten, same values: inputs rebuilt, no selection moves
    build_catalog(layout, STAGE_ORDER)
    assert not any(r.changed for r in select_policies(layout, config, policies))
    assert _mtimes(layout) == first

    _write_parts(layout, 2, scale=0.5)  # shard 2's CLIP scores halved: only the clip_score rankings move
    build_catalog(layout, STAGE_ORDER)
    changed = {r.policy for r in select_policies(layout, config, policies) if r.changed}
    moved = {"clip-score-top", "mixed", "ranked", "parrot_relative", "above_median"}
    assert changed == moved
    now = _mtimes(layout)
    assert {n for n in now if now[n] != first[n]} == {f"{name}.parquet" for name in moved}
    con = connect(layout.catalog_path, layout)
    assert pq.read_table(layout.selection_path("mixed")).cast(SELECTION).equals(_python_selection(con, config.policy("mixed")))
    con.close()
    assert not list(layout.selections_dir.glob(".tmp-*")) and not list(layout.root.glob(".tmp-*"))


def test_a_rule_that_is_not_true_or_false_is_named(run):
    layout, config, _ = run
    config.policies["counts"] = PolicyConfig("counts", rules={"area": "text_area_ratio * 10"})
    with pytest.raises(ConfigError, match=r"policies\.counts\.rules\.area must be true or false"):
        select_policies(layout, config, ("counts",))
    config.policies["typo"] = PolicyConfig("typo", rules={"bad": "no_such_column > 1"})
    with pytest.raises(ConfigError, match="policy 'typo' has a rule DuckDB cannot run"):
        select_policies(layout, config, ("typo",))


def test_a_selection_holds_uids_as_16_bytes_and_its_views_show_them_as_text(run):
    """The selection file writes each uid as 16 bytes, uncompressed (a file per policy of every
    sample: the bytes it writes are the time it takes); the catalog's views and ``read_selection``
    give back the manifests' text, so joins on uid work as before."""
    layout, config, _ = run
    select_policies(layout, config, ("no-text",))
    build_catalog(layout, STAGE_ORDER)
    path = layout.selection_path("no-text")
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    assert pq.read_schema(path).field("uid").type == UID_TYPE and column.compression == "UNCOMPRESSED"
    con = connect(layout.catalog_path, layout)
    ok = [u for (u,) in con.execute("select uid from samples where status = 'ok' order by uid").fetchall()]
    assert [u for (u,) in con.execute("select uid from selection_no_text").fetchall()] == ok
    assert [u for (u,) in con.execute("select uid from selections where policy = 'no-text'").fetchall()] == ok
    kept = {u for (u,) in con.execute("select uid from samples join selection_no_text using (uid) where kept").fetchall()}
    con.close()
    table = read_selection(path)
    assert table.column("uid").to_pylist() == ok and table.schema.field("uid").type == pa.string()
    assert kept == {r["uid"] for r in table.to_pylist() if r["kept"]} and 0 < len(kept) < len(ok)
    assert uids_as_text(pq.read_table(path).column("uid")).to_pylist() == ok


def test_a_selection_written_before_uids_were_bytes_still_reads_as_text(run):
    """A run made by the previous version keeps a policy's text-uid selection until a run rewrites
    it (``curate --policies`` names only some): its view reads it as it is, beside the new ones."""
    layout, config, _ = run
    select_policies(layout, config, ("no-text",))
    old = read_selection(layout.selection_path("no-text")).replace_schema_metadata(None)
    pq.write_table(old.set_column(1, "policy", pa.array(["old"] * old.num_rows)), layout.selection_path("old"))
    build_catalog(layout, STAGE_ORDER)
    con = connect(layout.catalog_path, layout)
    ok = [u for (u,) in con.execute("select uid from samples where status = 'ok' order by uid").fetchall()]
    assert [u for (u,) in con.execute("select uid from selection_old").fetchall()] == ok
    by_policy = dict(con.execute("select policy, count(distinct uid) from selections join samples using (uid) group by 1").fetchall())
    con.close()
    assert by_policy == {"no-text": len(ok), "old": len(ok)}


def test_pool_wide_values_are_computed_once_exactly_and_keep_the_input_order(run):
    """``agg(x) over ()`` and a scalar subquery that does not name the outer row are one value for
    the whole pool: the filter computes each once, writes it into the rule as a constant (exact:
    DuckDB's text of the FLOAT or DOUBLE cast back) and the rule then keeps the input's row order;
    a value per row (a rank, a running or partitioned window, a correlated subquery) stays as written."""
    con = duckdb.connect()
    con.execute("create table t as select i, (i * 0.1 + 0.07)::float as f, i * 0.1 + 0.07 as d, i % 3 = 0 as g, "
                "null::float as n from range(1000) r(i)")
    constants = PoolConstants(con)

    def query(rule: str) -> str:
        return f"select i, ({rule}) as r0 from t as samples"

    def outcomes(sql: str) -> list:
        return con.execute(f"select r0 from ({sql}) order by i").fetchall()

    folded = ["f >= quantile_disc(f, 0.37) over ()",  # the threshold is a FLOAT in the data: an inexact constant flips its row
              "d >= quantile_disc(d, 0.61) over ()", "d >= avg(d) over ()", "f > (select quantile_cont(f, 0.9) from t)",
              "coalesce(f < max(n) over (), g)", "d > sum(d) filter (where g) over () / 1e3",
              "d < count(distinct i % 7) over (rows between unbounded preceding and unbounded following)"]
    for rule in folded:
        sql = fold_pool_constants(query(rule), "t", constants)
        assert not reorders_rows(sql) and reorders_rows(query(rule)), sql
        assert outcomes(sql) == outcomes(query(rule)) and 0 < sum(bool(v) for (v,) in outcomes(sql)) < 1000, rule
    computed = len(constants)
    fold_pool_constants(query("f < quantile_disc(f, 0.37) over ()"), "t", constants)  # shares the first rule's value
    assert len(constants) == computed == len(folded)
    as_written = ["percent_rank() over (order by f) > 0.5", "sum(d) over (rows between unbounded preceding and current row) > 10",
                  "d > avg(d) over (partition by g)", "d >= (select max(t2.d) from t t2 where t2.g = samples.g) - 50",
                  "d > avg(d) over (order by i)"]
    for rule in as_written:
        assert fold_pool_constants(query(rule), "t", constants) == query(rule), rule
    con.close()

    # the shipped percentile policies: two thresholds for three policies, each then a projection in the input's order
    layout, config, _ = run
    shipped = {name: FilterStage(config.policy(name)) for name in ("clip-score-top", "tmars", "no-parrot-tmars")}
    inputs = materialise_policy_inputs(layout, sorted({c for s in shipped.values() for c in s.policy_reads()}), STAGE_ORDER)
    source = PolicyInput(f"read_parquet('{inputs.path}', file_row_number = true)", "file_row_number")
    con = connect(layout.catalog_path, layout)
    constants = PoolConstants(con)
    queries = [q for stage in shipped.values() for q in pool_constant_queries(stage.decision_sql(source), source.relation)]
    assert len(queries) == 3 and len(set(queries)) == 2  # tmars and no-parrot-tmars share a threshold
    constants.prefetch(queries)  # computed in the background, then used
    for stage in shipped.values():
        sql = fold_pool_constants(stage.decision_sql(source), source.relation, constants)
        assert reorders_rows(stage.decision_sql(source)) and not reorders_rows(sql), sql
    constants.close()
    con.close()
    assert len(constants) == 2
