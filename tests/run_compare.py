"""Compare two curation runs (local folders or s3:// roots): same samples, statuses and scores,
byte-identical curated shards. Used by the fault and cluster tests."""

from __future__ import annotations

import hashlib
import json
import math

from manifests.store import as_path, read_bytes, read_table

STAGES = ("download", "ocr", "parrot", "clip_score")
VOLATILE = {"downloaded_at", "error"}  # wall-clock time; an error text may name the attempt's timing


def load_run(root: str, policies: tuple[str, ...] | str) -> dict[str, list[dict]]:
    """Every stage's manifest (sorted by uid), the selections and the curated manifests of a run."""
    if isinstance(policies, str):
        policies = tuple(policies.split(","))
    base = as_path(root)
    out = {s: sorted(read_table(base / "manifests" / s).to_pylist(), key=lambda r: r["uid"]) for s in STAGES}
    out["selections"] = sorted(read_table(base / "selections").to_pylist(), key=lambda r: (r["policy"], r["uid"]))
    out["curated"] = []
    for policy in policies:
        out["curated"] += read_table(base / "curated" / policy / "manifest.parquet").to_pylist()
    return out


def curated_digests(root: str, policies: tuple[str, ...] | str) -> dict[str, str]:
    """sha256 of every curated tar, by ``<policy>/<shard>.tar``."""
    if isinstance(policies, str):
        policies = tuple(policies.split(","))
    base = as_path(root)
    digests = {}
    for policy in policies:
        sizes = json.loads(read_bytes(base / "curated" / policy / "sizes.json"))
        for name in sizes:
            digests[f"{policy}/{name}"] = hashlib.sha256(read_bytes(base / "curated" / policy / name)).hexdigest()
    return digests


def same(a: object, b: object, tol: float = 1e-4) -> bool:
    """Equal, with floats within ``tol`` (thread counts and batch composition move the last bits)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, abs_tol=tol) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, tol) for x, y in zip(a, b))
    return a == b


def assert_runs_equal(got: dict[str, list[dict]], want: dict[str, list[dict]]) -> None:
    for table in want:
        assert len(got[table]) == len(want[table]), (table, len(got[table]), len(want[table]))
        for g, w in zip(got[table], want[table]):
            for column in w:
                if column in VOLATILE:
                    continue
                assert same(g[column], w[column]), (table, w.get("uid"), column, g[column], w[column])
