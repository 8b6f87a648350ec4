"""Train on a policy's kept samples straight from the download shards, through its selection.

Resharding copies every kept sample once per policy (``curated/<policy>/``); at 10^8 samples and a
handful of policies that is several copies of the pool. Here the selection is the subset: the kept
uids (``selections/<policy>.parquet``) are joined once with the download manifest (each uid's latest
attempt: shard and key, ``manifests.catalog.download_relations``) into a plan of which download
shards hold kept samples and which keys in each; training then streams those shards through a
WebDataset pipeline that keeps only the planned keys.

- Only the shards holding a kept sample are read; in a shard, a member that is not kept is seeked
  over, never read or decoded (``stages.reshard.iter_kept_samples``, the reader resharding uses, so
  both group members into samples by the same rule).
- The sample stream equals the curated shards': the same uids, and the ``.jpg`` and ``.txt`` bytes
  unchanged (resharding copies them verbatim and rewrites only the ``.json``'s ``key``; here the
  ``.json`` keeps the download key). ``tests/test_train_from_selection.py`` checks it.
- Shards are drawn with replacement in proportion to the samples they keep, so each kept sample is
  as likely to be drawn as from the (equal-sized) curated shards.
- Memory: the plan holds the kept keys as one Arrow string column grouped by shard (about the keys'
  bytes; shared copy-on-write with forked DataLoader workers); a Python set of keys exists for the
  one shard being read. The join runs in DuckDB under the run's memory cap, spilling past it.
- A remote root (``s3://``) is read in place through fsspec, with seeks: no local copy.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset

from manifests.catalog import bound_memory, connect, download_relations
from manifests.store import RunLayout
from manifests.uids import SQL_AS_TEXT, UID_BATCH, UID_TYPE, uids_as_bytes
from stages.reshard import iter_kept_samples
from training.train import SampleSource


@dataclass(frozen=True)
class SelectionPlan:
    """Which download shards hold a policy's kept samples, and which keys in each (shards sorted)."""

    policy: str
    urls: tuple[str, ...]  # shards/<shard>.tar: a local path or an fsspec URL
    counts: tuple[int, ...]  # kept samples of each url
    starts: tuple[int, ...]  # where each url's keys start in ``keys``
    keys: pa.Array  # every kept key, grouped by url in url order (sorted within a url)

    @property
    def samples(self) -> int:
        return len(self.keys)

    def item(self, index: int) -> dict[str, Any]:
        """``urls[index]`` and its kept keys, as :func:`read_selected` reads them: the set is built
        when the shard is drawn, so one shard's keys are Python objects at a time."""
        keys = self.keys.slice(self.starts[index], self.counts[index]).to_pylist()
        return {"url": self.urls[index], "keys": frozenset(keys)}


def _kept_uids(path: Path) -> pa.Table:
    """The selection's kept uids as 16 bytes (read in batches: never the whole file as text)."""
    pieces = []
    with fsspec.open(str(path), "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=UID_BATCH, columns=["uid", "kept"]):
            kept = batch.filter(pc.fill_null(batch.column("kept"), False))
            pieces.extend(uids_as_bytes(kept.column("uid")).chunks)
    return pa.table({"uid": pa.chunked_array(pieces, UID_TYPE)})


def plan_selection(layout: RunLayout, policy: str) -> SelectionPlan:
    """Join the selection's kept uids with each uid's latest download attempt.

    As resharding (``pipeline.reshard_runner.plan_reshard``): a uid kept by several rows is one
    sample, and every kept uid must be an ok download, else the selection is from another run.
    """
    path = layout.selection_path(policy)
    if not path.exists():
        raise FileNotFoundError(f"no selection {path}: run `make curate` (with policy {policy!r}) first")
    kept = _kept_uids(path)
    con = connect(Path(":memory:"), layout, read_only=False)
    try:
        bound_memory(con, layout)
        con.register("kept_bytes", kept)
        con.execute(f"create temp table kept_uids as select distinct {SQL_AS_TEXT} as uid from kept_bytes")
        _, latest = download_relations(con, layout)
        planned = con.execute(
            f"select shard, key from {latest} as download semi join kept_uids using (uid) "
            "where status = 'ok' and key is not null order by shard, key"
        ).to_arrow_table()
        wanted = con.execute("select count(*) from kept_uids").fetchone()[0]
    finally:
        con.close()
    if planned.num_rows != wanted:
        raise ValueError(
            f"selection {policy}: {wanted - planned.num_rows} kept uid(s) have no downloaded sample; "
            "is the selection from another run?"
        )
    by_shard = pc.value_counts(planned.column("shard").combine_chunks())  # in order of first appearance: sorted
    counts = by_shard.field("counts").to_pylist()
    return SelectionPlan(
        policy,
        urls=tuple(str(layout.shards_dir / f"{s}.tar") for s in by_shard.field("values").to_pylist()),
        counts=tuple(counts),
        starts=tuple(itertools.accumulate(counts, initial=0))[:-1],
        keys=planned.column("key").combine_chunks(),
    )


def read_selected(items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A WebDataset stage: ``{"url", "keys"}`` items -> the kept samples, as ``tarfile_to_samples``
    gives them (``__key__``, ``__url__``, one entry of bytes per lower-cased extension)."""
    for item in items:
        url, keys = item["url"], item["keys"]
        found = 0
        with fsspec.open(url, "rb") as f:
            for key, members in iter_kept_samples(f, keys, name=url):
                found += 1
                yield {"__key__": key, "__url__": url, **{ext.lower(): data for ext, data in members.items()}}
        if found != len(keys):
            raise ValueError(f"{url}: {len(keys) - found} planned sample(s) not in the tar")


def selection_samples(plan: SelectionPlan) -> Iterator[dict[str, Any]]:
    """Every kept sample once, shard by shard: one epoch of what training draws from."""
    return read_selected(plan.item(i) for i in range(len(plan.urls)))


class ResampledSelection(IterableDataset):
    """Endless ``{"url", "keys"}`` items: shards drawn with replacement, weighted by kept samples,
    seeded per DataLoader worker and pass (as ``wds.ResampledShards(deterministic=True)``)."""

    def __init__(self, plan: SelectionPlan, seed: int) -> None:
        super().__init__()
        self.plan, self.seed, self.epoch = plan, seed, -1
        self.cumulative = [start + n for start, n in zip(plan.starts, plan.counts)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        self.epoch += 1
        rng = random.Random(wds.utils.make_seed(wds.utils.pytorch_worker_seed(), self.epoch, self.seed))
        indices = range(len(self.plan.urls))
        while True:
            yield self.plan.item(rng.choices(indices, cum_weights=self.cumulative)[0])


class SelectedSamples(SampleSource):
    """A policy's kept samples read from the download shards through its selection."""

    kind = "selection"

    def __init__(self, plan: SelectionPlan) -> None:
        if not plan.samples:
            raise ValueError(f"policy {plan.policy!r} kept no sample")
        self.plan = plan
        self.shards = len(plan.urls)

    def stages(self, seed: int) -> list[Any]:
        return [ResampledSelection(self.plan, seed), read_selected]
