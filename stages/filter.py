"""Filter stage: a named policy's SQL rules over the ``samples`` view -> a selection.

Decide, then materialise (DataComp): the selection is one row per downloaded sample with
``kept`` and a readable ``reason``; resharding reads it later. Each rule is evaluated as its own
column in one DuckDB query, so the reason can name the rules a sample failed, and a rule that
evaluates to NULL (a score is missing) fails with that said.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from manifests.schemas import SELECTION
from pipeline.config import ConfigError, PolicyConfig


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def policy_sql(policy: PolicyConfig) -> str:
    """The query whose rows are the selection; printed in the docs and tested against DuckDB."""
    rules = ",\n       ".join(f"({sql}) as {_ident('rule:' + name)}" for name, sql in policy.rules.items())
    return f"select uid,\n       {rules}\nfrom samples\nwhere status = 'ok'\norder by uid"


class FilterStage:
    """Evaluates one policy over a catalog connection (the runner owns paths and the connection)."""

    name = "filter"

    def __init__(self, policy: PolicyConfig) -> None:
        self.policy = policy

    def select(self, con: duckdb.DuckDBPyConnection) -> pa.Table:
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
