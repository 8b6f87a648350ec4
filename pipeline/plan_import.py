"""A pool's own values for a step, read from the run's plan instead of computed from the images.

A URL list can bring what a step would otherwise compute: a DataComp pool its CLIP embeddings
(``pipeline/clip_import.py``) and its face boxes (``pipeline/face_import.py``). Those values
travel with each row in the list's plan (``input/urls*.parquet``); such a step writes its part for
a shard on the driver from the plan and the shard's download part alone: no image read, no model.
This module is the walk they share: which plans carry a column, and for each shard, its
downloaded samples' uids beside the plan's values for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.store import RunLayout, read_schema, read_table
from pipeline.download_runner import plan_locations, read_input_lists


@dataclass(frozen=True)
class PoolRows:
    """One shard's downloaded samples and the pool's values for them."""

    shard: str
    uids: pa.ChunkedArray  # the shard's ok samples, in its download part's order
    values: pa.Table  # uid and the wanted columns, for the uids the plan has (any order)
    plan: str  # the plan file they came from


def plans_with(layout: RunLayout, column: str) -> list[str]:
    """The plan files of the run's lists (not retries, which repeat earlier rows) that carry
    ``column``, from their footers alone."""
    return [e.file for e in read_input_lists(layout)
            if e.file and not e.is_retry and column in read_schema(layout.input_dir / e.file).names]


def pool_rows(layout: RunLayout, shards: list[str], columns: list[str]) -> Iterator[PoolRows]:
    """For each of ``shards`` whose samples the plans give ``columns`` for: its ok uids and those
    values. A retry's shard finds its rows in the list they first came from; a shard of a list
    without the columns is not yielded (the step computes it as usual)."""
    plans = plans_with(layout, columns[0])
    if not plans:
        return
    lists = read_input_lists(layout)
    for shard in shards:
        owner = next((e for e in lists if shard in e.shard_list()), None)
        if owner is None or not (owner.is_retry or owner.file in plans):
            continue
        download = read_table(layout.part_path("download", shard), columns=["uid", "status", "key"])
        ok = download.filter(pc.and_(pc.equal(download.column("status"), "ok"), pc.is_valid(download.column("key"))))
        uids = ok.column("uid")
        if owner.is_retry:
            found = _by_uid(layout, plans, uids, columns)
            if found is not None:
                yield PoolRows(shard, uids, *found)
            continue
        (located,) = plan_locations(layout, owner, {shard})
        values = located.read_columns(layout, ["uid", "shard", *columns]).drop_columns(["shard"])
        yield PoolRows(shard, uids, values, owner.file)


def _by_uid(layout: RunLayout, plans: list[str], uids: pa.ChunkedArray,
            columns: list[str]) -> tuple[pa.Table, str] | None:
    for name in plans:
        table = pq.read_table(layout.input_dir / name, columns=["uid", *columns],
                              filters=[("uid", "in", uids.to_pylist())])
        if table.num_rows:
            return table, name
    return None
