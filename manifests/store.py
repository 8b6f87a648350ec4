"""Where a run's files live, and how they are written so that an existing file is a complete one.

A manifest part is written under a temporary name in the same folder and renamed into place: a
part that exists is done. That single rule makes every stage resumable per shard.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class RunLayout:
    """The folders of one run (one dataset in one output root)."""

    root: Path

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def input_path(self) -> Path:
        return self.root / "input" / "urls.parquet"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def selections_dir(self) -> Path:
        return self.root / "selections"

    def selection_path(self, policy: str) -> Path:
        return self.selections_dir / f"{policy}.parquet"

    def curated_dir(self, policy: str) -> Path:
        return self.root / "curated" / policy

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def stage_dir(self, stage: str) -> Path:
        return self.root / "manifests" / stage

    def part_path(self, stage: str, shard: str) -> Path:
        return self.stage_dir(stage) / f"part-{shard}.parquet"

    def done_shards(self, stage: str) -> set[str]:
        """Shards whose manifest part for ``stage`` exists (and so is complete)."""
        folder = self.stage_dir(stage)
        if not folder.is_dir():
            return set()
        return {p.name[len("part-") : -len(".parquet")] for p in folder.glob("part-*.parquet")}

    def stages_present(self) -> list[str]:
        folder = self.root / "manifests"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("part-*.parquet")))


def tmp_sibling(path: Path) -> Path:
    """A unique temporary name next to ``path`` (same filesystem, so rename is atomic)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:12]}")


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file under a temporary name, fsync it, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(data: object, path: Path) -> None:
    """JSON to a temporary sibling, synced, then renamed: a marker file that exists is whole."""
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def move_into_place(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (atomic on one filesystem), replacing a stale ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def remove_stale_temporaries(folder: Path) -> int:
    """Delete what a killed run left under temporary names; returns how many entries went."""
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.glob(f"{TMP_PREFIX}*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed
