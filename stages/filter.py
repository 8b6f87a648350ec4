"""Filter stage: a named policy's SQL rules over the ``samples`` view -> a selection.

Decide, then materialise (DataComp): the selection is one row per downloaded sample with
``kept`` and a readable ``reason``; resharding reads it later. Each rule is evaluated as its own
column in one DuckDB query, so the reason can name the rules a sample failed, and a rule that
evaluates to NULL (a score is missing) fails with that said.
"""

from __future__ import annotations

import re
from dataclasses import field

import duckdb
import pyarrow as pa

from core.errors import ConfigError
from core.settings import config_section, require
from manifests.schemas import SELECTION
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
    params: dict[str, float] = field(default_factory=dict)

    def rendered_rules(self) -> dict[str, str]:
        """The rules with each ``{param}`` replaced by its number (a plain SQL literal)."""
        values = {k: repr(float(v)) for k, v in self.params.items()}
        return {rule: _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), sql) for rule, sql in self.rules.items()}

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        problems = require(
            (bool(self.rules), f"policies.{self.name} needs at least one rule (rules = {{ name = \"sql\" }})"),
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


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def policy_sql(policy: PolicyConfig) -> str:
    """The query whose rows are the selection; printed in the docs and tested against DuckDB."""
    rules = ",\n       ".join(f"({sql}) as {_ident('rule:' + name)}" for name, sql in policy.rendered_rules().items())
    return f"select uid,\n       {rules}\nfrom samples\nwhere status = 'ok'\norder by uid"


def referenced_columns(policy: PolicyConfig) -> tuple[str, ...]:
    """The ``samples`` columns a policy's rules name, from DuckDB's own parser (no data needed),
    so a rule naming a column that no stage writes stops the run before any work. A rule that
    does not parse is a ConfigError naming it."""
    import json

    con = duckdb.connect()
    try:
        names: set[str] = set()
        for rule, sql in policy.rendered_rules().items():
            tree = json.loads(con.execute("select json_serialize_sql(?)", [f"select ({sql}) from samples"]).fetchone()[0])
            if tree.get("error"):
                raise ConfigError(f"policies.{policy.name}.rules.{rule} is not valid SQL: {tree.get('error_message')}")
            names.update(_column_refs(tree))
        return tuple(sorted(names))
    finally:
        con.close()


def _column_refs(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["column_names"][-1]} if node.get("class") == "COLUMN_REF" else set()
        for value in node.values():
            found |= _column_refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_column_refs(v) for v in node)) if node else set()
    return set()


class FilterStage(PoolStage):
    """Evaluates one policy over a catalog connection (the runner owns paths and the connection)."""

    name = "filter"
    reads = ("uid", "status")  # and whatever the policy's rules name: see ``policy_reads``
    output_schema = SELECTION
    status_column = None

    def __init__(self, policy: PolicyConfig) -> None:
        self.policy = policy

    def resources(self, gpus_available: bool) -> Resources:
        return Resources(cpus=1.0)  # one DuckDB query on the driver

    def policy_reads(self) -> tuple[str, ...]:
        """This policy's columns: the stage's own reads plus those its rules name."""
        return tuple(sorted(set(self.reads) | set(referenced_columns(self.policy))))

    def process_pool(self, con: duckdb.DuckDBPyConnection) -> pa.Table:
        try:
            result = con.execute(policy_sql(self.policy))
        except duckdb.Error as err:
            raise ConfigError(f"policy {self.policy.name!r} has a rule DuckDB cannot run: {err}") from None
        names = list(self.policy.rules)
        uids, kept, reasons = [], [], []
        for uid, *values in result.fetchall():
            failed = [n for n, v in zip(names, values) if v is not True]
            unknown = [n for n, v in zip(names, values) if v is None]
            uids.append(uid)
            kept.append(not failed)
            if not failed:
                reasons.append("kept: " + ", ".join(names))
            else:
                parts = [f"{n} is null (missing score)" if n in unknown else f"fails {n}" for n in failed]
                reasons.append("dropped: " + "; ".join(parts))
        return pa.table(
            {"uid": uids, "policy": [self.policy.name] * len(uids), "kept": kept, "reason": reasons}, schema=SELECTION
        )
