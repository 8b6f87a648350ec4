"""Filter stage: a named policy's SQL rules over the ``samples`` view -> a selection.

Decide, then materialise (DataComp): the selection is one row per downloaded sample with
``kept`` and a readable ``reason``; resharding reads it later. Each rule is evaluated as its own
column in one DuckDB query, so the reason can name the rules a sample failed, and a rule that
evaluates to NULL (a score is missing) fails with that said. All of it runs in DuckDB: at 10^7
rows, Python sees the handful of distinct outcomes, never a row.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa

from core.errors import ConfigError
from core.settings import config_section, require
from manifests.catalog import sql_string
from manifests.schemas import SELECTION
from manifests.uids import UID_TYPE, uids_as_bytes
from stages.base import PoolStage, Resources


@config_section
class PolicyConfig:
    """A named filter policy: SQL rules over the catalog's ``samples`` view; kept when all hold.

    Each rule is a DuckDB boolean expression evaluated per downloaded sample, and may use window
    functions over the pool (``quantile_cont(x, 0.5) over ()``), so percentile policies stay SQL.
    A rule that evaluates to NULL (a score is missing) counts as failed, with that as the reason.

    ``params`` are the policy's numbers, named once: a rule says ``{keep_fraction}`` and the value
    comes from ``params`` (``[policies.x] params = { keep_fraction = 0.3 }``), so a threshold is
    changed in one place and the description can name the setting.
    """

    name: str
    description: str = ""
    rules: dict[str, str] = field(default_factory=dict)
    # numbers, or names of columns (a text value: ``score = "similarity"`` ranks by the pool's own score;
    # a list of names: ``keepers = ["dup_keeper", "dup_exact_keeper"]`` renders as a comma-separated list)
    params: dict[str, float | str | list[str]] = field(default_factory=dict)

    def rendered_rules(self) -> dict[str, str]:
        """The rules with each ``{param}`` replaced by its number (a plain SQL literal) or, for a
        text value, the column it names (a quoted identifier), for a list, those columns."""
        def render(value: float | str | list[str]) -> str:
            if isinstance(value, str):
                return _ident(value)
            if isinstance(value, (list, tuple)):
                return ", ".join(_ident(str(v)) for v in value)
            return repr(float(value))

        values = {k: render(v) for k, v in self.params.items()}
        return {rule: _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), sql) for rule, sql in self.rules.items()}

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        problems = require(
            (bool(self.rules), f"policies.{self.name} needs at least one rule (rules = {{ name = \"sql\" }})"),
            (len(self.rules) <= MAX_RULES, f"policies.{self.name} has {len(self.rules)} rules; at most {MAX_RULES}"),
        )
        problems += require(
            *((sql.strip() != "", f"policies.{self.name}.rules.{rule} must be SQL text") for rule, sql in self.rules.items())
        )
        used = {m for sql in self.rules.values() for m in _PLACEHOLDER.findall(sql)}
        problems += [f"policies.{self.name}.rules names {{{m}}}, which is not in policies.{self.name}.params"
                     for m in sorted(used - set(self.params))]
        problems += [f"policies.{self.name}.params.{m} is not used by any rule" for m in sorted(set(self.params) - used)]
        return problems


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_RULES = 40  # a sample's outcome over a policy's rules is one 64-bit integer: 3 ** rules values


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _syntax_tree(sql: str) -> dict:
    """DuckDB's parse of ``select (<rule>) from samples`` as JSON: no data, no catalog needed."""
    return _parse(f"select ({sql}) from samples")


def _parse(statement: str) -> dict:
    """A statement's syntax tree (a fresh copy: callers may edit it). Cached, and on one
    connection: opening a DuckDB instance costs more than parsing."""
    return json.loads(_parsed_text(statement))


# The texts are inlined as SQL literals, not passed as ``?`` parameters: to type a parameter,
# DuckDB's Python binding imports pandas (0.3 s), and `curate` parses the policies while it plans,
# before Ray starts (issue 27).
@functools.lru_cache(maxsize=256)
def _parsed_text(statement: str) -> str:
    with _PARSER_LOCK:
        return _parser().execute(f"select json_serialize_sql({sql_string(statement)})").fetchone()[0]


def _unparse(tree: dict) -> str:
    """A syntax tree (:func:`_parse`) back to SQL text."""
    with _PARSER_LOCK:
        return _parser().execute(f"select json_deserialize_sql({sql_string(json.dumps(tree))}::json)").fetchone()[0]


@functools.cache
def _parser() -> duckdb.DuckDBPyConnection:
    return duckdb.connect()


_PARSER_LOCK = threading.Lock()


def _parsed_rules(policy: PolicyConfig) -> dict[str, dict]:
    """Each rule's syntax tree; a rule that does not parse is a ConfigError naming it."""
    trees = {}
    for rule, sql in policy.rendered_rules().items():
        tree = _syntax_tree(sql)
        if tree.get("error"):
            raise ConfigError(f"policies.{policy.name}.rules.{rule} is not valid SQL: {tree.get('error_message')}")
        trees[rule] = tree
    return trees


def referenced_columns(policy: PolicyConfig) -> tuple[str, ...]:
    """The ``samples`` columns a policy's rules name, so a rule naming a column that no stage
    writes stops the run before any work (and the policies' input holds just these columns)."""
    return tuple(sorted(set().union(*(_column_refs(t) for t in _parsed_rules(policy).values()))))


_WHOLE_POOL_ENDS = ("CURRENT_ROW_RANGE", "UNBOUNDED_FOLLOWING")  # with no ORDER BY every row is a peer: the whole pool


def _pool_aggregate(node: dict) -> dict | None:
    """For ``agg(x) over ()`` (an aggregate over the whole pool: one value, the same on every row),
    the plain aggregate ``agg(x)`` as a syntax node; None for any other window (ranks, frames,
    partitions, orders: a value per row)."""
    try:
        pool_wide = (node["type"] == "WINDOW_AGGREGATE" and not node["partitions"] and not node["orders"]
                     and not node["arg_orders"] and node["start"] == "UNBOUNDED_PRECEDING"
                     and node["end"] in _WHOLE_POOL_ENDS and node["exclude_clause"] == "NO_OTHER"
                     and not node["ignore_nulls"] and node["start_expr"] is None and node["end_expr"] is None)
        if not pool_wide:
            return None
        return {"class": "FUNCTION", "type": "FUNCTION", "alias": "", "query_location": node["query_location"],
                "function_name": node["function_name"], "schema": node["schema"], "catalog": node["catalog"],
                "children": node["children"], "filter": node["filter_expr"], "distinct": node["distinct"],
                "order_bys": {"type": "ORDER_MODIFIER", "orders": []}, "is_operator": False, "export_state": False}
    except KeyError:  # a DuckDB whose syntax tree differs: evaluate the window as written
        return None


class PoolConstants:
    """Values that are the same on every row of one version of the policy input (a quantile over the
    pool, an uncorrelated scalar subquery), each kept by the query that computes it: computed once
    and shared by every policy that uses it. :meth:`prefetch` computes them on a second connection
    while the caller goes on: writing a selection keeps one core busy in Arrow, so on two cores the
    other computes the thresholds that later policies will need."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con
        self._values: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._background: ThreadPoolExecutor | None = None
        self._cursor: duckdb.DuckDBPyConnection | None = None

    def __len__(self) -> int:
        return len(self._values)

    def value(self, computing: str) -> dict | None:
        """The constant's syntax node for ``computing`` (a one-row, one-column ``v`` query), or None
        when it cannot be computed on its own (a subquery naming the outer row)."""
        with self._lock:
            future = self._values.get(computing)
            mine = future is None
            if mine:
                future = self._values[computing] = Future()
        if mine:
            future.set_result(self._compute(self._con, computing))
        return future.result()

    def prefetch(self, queries: Iterable[str]) -> None:
        """Start computing ``queries`` (from :func:`pool_constant_queries`) in the background."""
        with self._lock:
            for computing in queries:
                if computing not in self._values:
                    if self._background is None:
                        self._cursor = self._con.cursor()
                        self._background = ThreadPoolExecutor(1, thread_name_prefix="pool-constants")
                    self._values[computing] = self._background.submit(self._compute, self._cursor, computing)

    def close(self) -> None:
        """Stop the background work (interrupting a query still running) and release its connection."""
        if self._background is not None:
            if any(not f.done() for f in self._values.values()):
                self._cursor.interrupt()
            self._background.shutdown(wait=True, cancel_futures=True)
            self._cursor.close()
            self._background = self._cursor = None

    @staticmethod
    def _compute(con: duckdb.DuckDBPyConnection, computing: str) -> dict | None:
        try:
            type_name, text = con.execute(f"select typeof(v), v::varchar from ({computing})").fetchone()
        except duckdb.Error:  # e.g. a subquery naming a column of the outer row: not a constant
            return None
        literal = "NULL" if text is None else sql_string(text)
        cast = _parse(f"select cast({literal} as {type_name})")  # DuckDB's own text, back to its type: exact
        return None if cast.get("error") else cast["statements"][0]["node"]["select_list"][0]


def _fold(query: str, relation: str, constant_for: Callable[[str], dict | None]) -> str:
    """``query`` with each pool-wide value replaced by ``constant_for(<the query computing it>)``
    where that is not None; the text unchanged when nothing was replaced."""
    tree = _parse(query)
    if tree.get("error"):
        return query  # the caller runs it and reports DuckDB's message
    folded = False

    def computing(expression: dict, over: str | None) -> str:
        template = _parse(f"select 1 from {over} as samples" if over else "select 1")
        template["statements"][0]["node"]["select_list"] = [dict(expression, alias="v")]
        return _unparse(template)

    def fold(node: object) -> object:
        nonlocal folded
        if isinstance(node, list):
            return [fold(v) for v in node]
        if not isinstance(node, dict):
            return node
        if node.get("class") in ("WINDOW", "SUBQUERY"):  # never inside: a nested query has its own rows
            aggregate = _pool_aggregate(node) if node["class"] == "WINDOW" else None
            scalar = node["class"] == "SUBQUERY" and node.get("subquery_type") == "SCALAR"
            constant = (constant_for(computing(aggregate, relation)) if aggregate else
                        constant_for(computing(node, None)) if scalar else None)
            if constant is None:
                return node
            folded = True
            return dict(constant, alias=node.get("alias", ""))
        return {k: fold(v) for k, v in node.items()}

    tree = fold(tree)
    return _unparse(tree) if folded else query


def fold_pool_constants(query: str, relation: str, constants: PoolConstants) -> str:
    """``query`` (a select over ``relation as samples``) with each value that is the same on every
    row computed once and written in as a constant: an aggregate over the whole pool
    (``quantile_cont(x, 0.5) over ()``) and an uncorrelated scalar subquery (``(select max(x) from
    t)``).

    Why: DuckDB evaluates such a window as a window, which at 10^7 rows costs more than the
    aggregate itself and may return rows out of order (so each outcome then needs its row's
    position); with the constant in place the rule is a plain projection that keeps the input's
    order. Same values: the aggregate is run over the same rows, and the constant is DuckDB's own
    text of the value cast back to its type (exact for floats). Anything that cannot be computed
    on its own (a correlated subquery) is left as written."""
    return _fold(query, relation, constants.value)


def pool_constant_queries(query: str, relation: str) -> list[str]:
    """The queries that compute ``query``'s pool-wide values (for :meth:`PoolConstants.prefetch`)."""
    found: list[str] = []
    _fold(query, relation, lambda computing: found.append(computing))  # returns None: nothing replaced
    return found


def reorders_rows(query: str) -> bool:
    """Whether DuckDB may return ``query``'s rows out of its input's order: a window function or
    a subquery anywhere in it."""
    return _reorders(_parse(query))


def _reorders(node: object) -> bool:
    """A window function or a subquery anywhere in a rule's tree: DuckDB may return rows out of order."""
    if isinstance(node, dict):
        return node.get("class") in ("WINDOW", "SUBQUERY") or any(_reorders(v) for v in node.values())
    return isinstance(node, list) and any(_reorders(v) for v in node)


def _column_refs(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["column_names"][-1]} if node.get("class") == "COLUMN_REF" else set()
        for value in node.values():
            found |= _column_refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_column_refs(v) for v in node)) if node else set()
    return set()


_CODE_TYPES = ((5, np.uint8), (10, np.uint16), (20, np.uint32), (MAX_RULES, np.uint64))
_DUCK_TYPES = {np.uint8: "utinyint", np.uint16: "usmallint", np.uint32: "uinteger", np.uint64: "ubigint"}
# a selection as written: policy and reason dictionary-encoded (a handful of values); read back as strings
_WRITTEN = pa.schema([pa.field("uid", UID_TYPE, nullable=False),
                      pa.field("policy", pa.dictionary(pa.int8(), pa.string()), nullable=False),
                      pa.field("kept", pa.bool_(), nullable=False),
                      pa.field("reason", pa.dictionary(pa.int32(), pa.string()), nullable=False)])


def reason_text(rules: list[str], code: int) -> str:
    """The readable reason for one outcome: rule i held (0), failed (1) or was NULL (2), digit i of
    ``code`` in base 3. ``kept: r1, r2`` or ``dropped: fails r1; r2 is null (missing score)``."""
    states = [(code // 3**i) % 3 for i in range(len(rules))]
    if not any(states):
        return "kept: " + ", ".join(rules)
    return "dropped: " + "; ".join(f"{r} is null (missing score)" if s == 2 else f"fails {r}"
                                    for r, s in zip(rules, states) if s)


@dataclass(frozen=True)
class PolicyInput:
    """What a policy runs over: a relation of the downloaded samples in uid order with the columns
    its rules name (aliased ``samples`` in the query), and a column numbering its rows in that order,
    which puts rows back in uid order after a window rule (``over (order by ...)``) moved them."""

    relation: str
    position: str


@dataclass(frozen=True)
class Decisions:
    """One policy's outcome per input row, in the input's order (0: kept), as one small integer a
    row in a NumPy array (1 byte a row for up to 5 rules): no Python object per row."""

    codes: np.ndarray
    counts: dict[int, int]  # outcome -> samples
    reasons: dict[int, str]  # outcome -> reason text
    digest: str  # sha256 of the outcomes in row order: equal digests, equal decisions

    @property
    def kept(self) -> int:
        return self.counts.get(0, 0)

    @property
    def total(self) -> int:
        return len(self.codes)


class FilterStage(PoolStage):
    """Evaluates one policy in DuckDB (the runner owns paths and the connection).

    No row passes through Python: each rule is a column of one DuckDB query, a sample's outcome is
    an integer combining them (into a NumPy array, by Arrow), and the selection (``uid, policy,
    kept, reason``) is Arrow batches of the input's uids beside dictionary-encoded outcomes, which
    the runner streams to Parquet; Python touches only the few distinct outcomes.
    """

    name = "filter"
    reads = ("uid", "status")  # and whatever the policy's rules name: see ``policy_reads``
    output_schema = SELECTION
    status_column = None

    def __init__(self, policy: PolicyConfig) -> None:
        self.policy = policy

    def resources(self, gpus_available: bool) -> Resources:
        return Resources(cpus=1.0)  # DuckDB queries on the driver

    def policy_reads(self) -> tuple[str, ...]:
        """This policy's columns: the stage's own reads plus those its rules name."""
        return tuple(sorted(set(self.reads) | set(referenced_columns(self.policy))))

    def _cannot_run(self, err: duckdb.Error) -> ConfigError:
        return ConfigError(f"policy {self.policy.name!r} has a rule DuckDB cannot run: {err}")

    def decision_sql(self, source: PolicyInput) -> str:
        """Each rule as a column ``r<i>`` (NULL when a score is missing), per input row."""
        rules = ", ".join(f"({sql}) as r{i}" for i, sql in enumerate(self.policy.rendered_rules().values()))
        return f"select {source.position}, {rules} from {source.relation} as samples"

    def decide(self, con: duckdb.DuckDBPyConnection, source: PolicyInput,
               constants: PoolConstants | None = None) -> Decisions:
        """Evaluate the rules over ``source``: DuckDB computes each row's outcome and hands it over
        in Arrow batches, in the input's order when no rule can reorder rows (:func:`reorders_rows`),
        else with each row's position, which puts it in place (a window rule such as
        ``over (order by clip_score)`` returns rows in its own order; no sort restores it). Pool-wide
        values (``quantile_cont(x, 0.5) over ()``) are computed first, once (:func:`fold_pool_constants`;
        ``constants`` shares them between policies over the same ``source``)."""
        names = list(self.policy.rules)
        _parsed_rules(self.policy)  # a rule that does not parse: a ConfigError naming it
        try:
            inner = fold_pool_constants(self.decision_sql(source), source.relation,
                                        PoolConstants(con) if constants is None else constants)
            types = {n: t for n, t, *_ in con.execute(f"describe {inner}").fetchall()}
            for i, rule in enumerate(names):
                if types[f"r{i}"] not in ("BOOLEAN", '"NULL"', "NULL"):
                    raise ConfigError(f"policies.{self.policy.name}.rules.{rule} must be true or false, "
                                      f"not {types[f'r{i}']} (a comparison such as x < 0.5)")
            code = " + ".join(f"(case when r{i} then 0 when not r{i} then {3**i} else {2 * 3**i} end)"
                              for i in range(len(names)))
            dtype = next(t for n, t in _CODE_TYPES if len(names) <= n)
            rows = con.execute(f"select count(*) from {source.relation}").fetchone()[0]
            codes = np.zeros(rows, dtype)
            duck_type = _DUCK_TYPES[dtype]
            if not reorders_rows(inner):  # rows come back in the input's order: just the outcome, 1 byte a row
                filled = 0
                for batch in con.execute(f"select ({code})::{duck_type} from ({inner})").to_arrow_reader(1 << 20):
                    part = batch.column(0).to_numpy()
                    if filled + len(part) > rows:  # a rule that makes rows (unnest): no outcome per sample
                        raise ConfigError(f"policy {self.policy.name!r}: its rules return more rows than the "
                                          f"{rows} samples (one value per sample is needed)")
                    codes[filled : filled + len(part)] = part
                    filled += len(part)
                if filled != rows:
                    raise RuntimeError(f"policy {self.policy.name!r}: {filled} outcomes for {rows} rows")
            else:  # a window or subquery may reorder rows: each outcome comes with its row's position
                position_type = "uinteger" if rows < 1 << 32 else "ubigint"
                query = f"select {source.position}::{position_type}, ({code})::{duck_type} from ({inner})"
                for batch in con.execute(query).to_arrow_reader(1 << 20):
                    codes[batch.column(0).to_numpy()] = batch.column(1).to_numpy()
        except duckdb.Error as err:
            raise self._cannot_run(err) from None
        if codes.itemsize <= 2:  # up to 10 rules: count by value (a sort of 10M rows costs ten times more)
            counts = np.bincount(codes)
            present = np.flatnonzero(counts)
            counts = counts[present]
        else:
            present, counts = np.unique(codes, return_counts=True)
        return Decisions(codes, {int(c): int(n) for c, n in zip(present, counts)},
                         {int(c): reason_text(names, int(c)) for c in present}, hashlib.sha256(codes.data).hexdigest())

    def selection_batches(self, decisions: Decisions, uids: Iterable[pa.Array]) -> Iterator[pa.RecordBatch]:
        """The selection's rows, batch by batch: ``uids`` (the input's, in order, in any batches, 16
        bytes each: ``manifests.uids``) beside their outcomes; policy and reason dictionary-encoded (``written_schema``)."""
        present = np.array(sorted(decisions.reasons), dtype=decisions.codes.dtype)
        reasons = pa.array([decisions.reasons[int(c)] for c in present], pa.string())
        if decisions.codes.itemsize <= 2:  # outcome -> its reason's index, by table lookup
            table = np.zeros(int(present[-1]) + 1 if len(present) else 1, np.int32)
            table[present] = np.arange(len(present), dtype=np.int32)
            reason_index = table.__getitem__
        else:
            reason_index = lambda codes: np.searchsorted(present, codes).astype(np.int32)  # noqa: E731
        policy = pa.array([self.policy.name], pa.string())
        offset = 0
        for uid in uids:
            codes = decisions.codes[offset : offset + len(uid)]
            if len(codes) != len(uid):
                raise RuntimeError(f"policy {self.policy.name!r}: more uids than its {len(decisions.codes)} decisions")
            offset += len(uid)
            yield pa.record_batch([
                uid, pa.DictionaryArray.from_arrays(np.zeros(len(uid), np.int8), policy), pa.array(codes == 0),
                pa.DictionaryArray.from_arrays(reason_index(codes), reasons),
            ], schema=_WRITTEN)
        if offset != len(decisions.codes):
            raise RuntimeError(f"policy {self.policy.name!r}: {len(decisions.codes)} decisions for {offset} uids")

    written_schema = _WRITTEN  # of ``selection_batches``

    def process_pool(self, con: duckdb.DuckDBPyConnection) -> pa.Table:
        """The selection as a table, straight over the catalog's ``samples`` (a small pool; the
        pipeline writes selections with :func:`pipeline.policy_runner.select_policies` instead)."""
        columns = ", ".join(_ident(c) for c in self.policy_reads())
        try:
            con.execute(f"create or replace temp table _policy_input as "
                        f"select {columns} from samples where status = 'ok' order by uid")
        except duckdb.Error as err:
            raise self._cannot_run(err) from None
        decisions = self.decide(con, PolicyInput("_policy_input", "rowid"))
        uids = uids_as_bytes(con.execute("select uid from _policy_input").to_arrow_table().column("uid")).chunks
        return pa.Table.from_batches(list(self.selection_batches(decisions, uids)), schema=_WRITTEN).cast(SELECTION)
