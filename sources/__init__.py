"""The dataset registry: turns a named dataset of the config into URL rows (and a server, if any).

Two sources: ``embedded`` (generated offline, served on 127.0.0.1 for the duration of the
download, ground truth kept in a sidecar file the stages never read) and ``url_list`` (a user's
parquet/csv/jsonl, path or fsspec URL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from core.errors import ConfigError
from core.net_guard import parse_network
from core.settings import config_section, network_problems, require
from sources.pool_embeddings import EMBEDDINGS_KEY, IMAGE_EMBEDDING, LAYOUTS, TEXT_EMBEDDING, load_pool_embeddings
from sources.url_list import read_url_list
from stages.download import DownloadConfig


@config_section
class DatasetConfig:
    """A named dataset: the embedded offline generator, or a URL list (path or fsspec URL)."""

    name: str
    description: str = ""
    source: str = "url_list"  # "embedded" | "url_list"
    url_list: str = ""
    # the list's URL and caption columns: a name, or names tried in order (the first the list has;
    # a name in another case also matches), so LAION's published URL/TEXT read with no flags
    url_column: str | tuple[str, ...] = ("url", "URL")
    caption_column: str | tuple[str, ...] = ("caption", "TEXT", "text")
    # The list's other columns are kept as source columns (sources/url_list.py), but these:
    drop_columns: tuple[str, ...] = ()
    # Source columns renamed on the way in (keys match in any case): names the pipeline writes too
    # (DuckDB compares names without case) become source_<name>; LAION's WIDTH/HEIGHT and
    # DataComp's original_width/original_height/sha256/face_bboxes are the pool's, not our download's.
    rename_columns: dict[str, str] = field(default_factory=lambda: dict(SOURCE_RENAMES))
    # Policies added to ``policies`` when the list has the named source column (and --policies
    # was not given): LAION-400M's own filter where LAION's similarity is there.
    policies_if_column: dict[str, str] = field(default_factory=dict)
    # Embeddings the pool ships beside the list (sources/pool_embeddings.py): "" none, "npz"
    # (DataComp: <list>.npz, keys <model>_img / <model>_txt), "clip-retrieval" (img_emb/, text_emb/
    # .npy beside metadata/); imported by the CLIP step when [clip] embeddings_from = "pool".
    embeddings: str = ""
    embeddings_model: str = "l14"  # npz key prefix: DataComp ships b32 and l14
    samples: int = 320
    seed: int = 0
    port: int = 8710
    policies: tuple[str, ...] = ("all", "no-text", "no-parrot", "clip-score-top", "tmars", "no-parrot-tmars", "dedup", "no-eval-dups")
    # Networks this dataset's URLs may reach despite the download guard, added to
    # download.allow_networks for this dataset only: the embedded dataset is served on 127.0.0.1,
    # an intranet mirror might be on 10.1.0.0/16. Empty for an ordinary web URL list.
    allow_networks: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        problems = require(
            (self.source in {"embedded", "url_list"}, f"datasets.{self.name}.source must be 'embedded' or 'url_list', not {self.source!r}"),
        )
        problems += require((self.embeddings in LAYOUTS, f"datasets.{self.name}.embeddings must be one of "
                             f"{', '.join(repr(x) for x in LAYOUTS)}, not {self.embeddings!r}"))
        problems += network_problems(self.allow_networks, f"datasets.{self.name}.allow_networks", parse_network)
        if self.source == "embedded":
            problems += require(
                (self.samples >= 1, f"datasets.{self.name}.samples must be >= 1"),
                (0 <= self.port < 65536, f"datasets.{self.name}.port must be a TCP port"),
            )
        return problems

SOURCE_RENAMES = {
    "width": "source_width",
    "height": "source_height",
    "original_width": "source_original_width",
    "original_height": "source_original_height",
    "sha256": "source_sha256",
    "face_bboxes": "source_face_bboxes",  # DataComp's; the faces step imports them as its face_bboxes
}

EMBEDDED_GENERATOR_VERSION = "2"


@dataclass
class DatasetSource:
    """What the runner needs from a dataset: an identity, its URL rows, and a way to serve them."""

    config: DatasetConfig
    url_list: str = ""
    slow_seconds: float = 4.0
    # embedded only: how the generator draws the samples (sources.embedded.GeneratorSettings; None:
    # its defaults, the dataset every test knows). The ablation sets other proportions.
    generator: Any = None
    _samples: list[Any] | None = field(default=None, repr=False)
    _table: pa.Table | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def is_embedded(self) -> bool:
        return self.config.source == "embedded"

    def fingerprint(self) -> str:
        """Identifies the input, so a rerun into the same output can tell it is the same list
        (computed once: a URL list is read for it, and may be released after planning)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        if self.is_embedded:
            ident = {
                "generator": EMBEDDED_GENERATOR_VERSION,
                "samples": self.config.samples,
                "seed": self.config.seed,
                "port": self.config.port,
            }
            return "embedded:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        table = self.load_urls()
        digest = hashlib.sha256()
        for column in ("url", "caption"):
            for chunk in table.column(column).chunks:
                for buf in chunk.buffers():
                    if buf is not None:
                        digest.update(buf)
        return "url_list:" + digest.hexdigest()[:16]

    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.config.port}"

    def download_config(self, base: DownloadConfig) -> DownloadConfig:
        """``base`` with this dataset's ``allow_networks`` added to the download guard's allowlist.

        The download guard refuses loopback and private addresses by default; a dataset that
        needs one says so in its own config (the embedded dataset: ``127.0.0.1/32``, where it
        serves itself), so the exception applies to that dataset's run only, never to a user's
        web URL list. ``pipeline.curate.curate`` downloads with this config, not ``base``; a direct
        caller of ``run_download`` must do the same.
        """
        extra = tuple(n for n in self.config.allow_networks if n not in base.allow_networks)
        if not extra:
            return base
        return dataclasses.replace(base, allow_networks=base.allow_networks + extra)

    def _embedded_samples(self) -> list[Any]:
        if self._samples is None:
            from sources.embedded import generate

            if self.generator is None:
                self._samples = generate(self.config.samples, self.config.seed)
            else:
                self._samples = generate(self.config.samples, self.config.seed, self.generator)
        return self._samples

    def load_urls(self) -> pa.Table:
        """The URL rows (url, caption) in input order."""
        if self.is_embedded:
            from sources.embedded import EmbeddedServer

            unstarted = EmbeddedServer(self._embedded_samples(), port=self.config.port)
            unstarted.base_url = self.base_url()  # rows depend only on the address, not a live server
            rows = unstarted.url_rows()
            return pa.table({"url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows]})
        if self._table is None:
            path = self.url_list or self.config.url_list
            table = read_url_list(path, self.config.url_column, self.config.caption_column,
                                  self.config.drop_columns, self.config.rename_columns)
            pooled = load_pool_embeddings(path, self.config.embeddings, self.config.embeddings_model, table.num_rows)
            if pooled is not None:  # row-aligned with the list: attached before any row is dropped
                for name, column in pooled.columns().items():
                    table = table.append_column(name, column)
                table = table.replace_schema_metadata({EMBEDDINGS_KEY: pooled.origin})
            self._table = table
        return self._table

    def source_columns(self) -> tuple[str, ...]:
        """The list's columns kept besides url and caption (none for the embedded dataset); not
        the pool's embeddings, which go to the CLIP step."""
        if self.is_embedded:
            return ()
        return tuple(c for c in self.load_urls().column_names[2:] if c not in (IMAGE_EMBEDDING, TEXT_EMBEDDING))

    def policies_for(self, policies: tuple[str, ...]) -> tuple[str, ...]:
        """``policies`` plus those the dataset adds when the list has their column (``policies_if_column``)."""
        present = {c.lower() for c in self.source_columns()}
        extra = [p for p, column in self.config.policies_if_column.items() if column.lower() in present and p not in policies]
        return policies + tuple(extra)

    def release_urls(self) -> None:
        """Drop the URL rows read for the fingerprint or the plan: once planned, the driver needs
        none of them (a million-row list is ~100 MB held for nothing); a later call reads again."""
        self._table = None

    def ground_truth(self) -> pa.Table | None:
        """Ground truth of the embedded dataset (None for URL lists)."""
        if not self.is_embedded:
            return None
        from sources.embedded import ground_truth_table

        return ground_truth_table(self._embedded_samples(), self.base_url())

    @contextlib.contextmanager
    def serve(self) -> Iterator[None]:
        """Serve the embedded dataset on 127.0.0.1 while the block runs (no-op for URL lists)."""
        if not self.is_embedded:
            yield
            return
        from sources.embedded import EmbeddedServer

        try:
            server = EmbeddedServer(self._embedded_samples(), port=self.config.port, slow_seconds=self.slow_seconds)
            server.__enter__()
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {self.config.port} on 127.0.0.1 is in use, so the embedded dataset cannot be served; "
                    f"set datasets.{self.config.name}.port in a --config file or pass --port"
                ) from None
            raise
        try:
            yield
        finally:
            server.__exit__(None, None, None)


def open_source(config: DatasetConfig, url_list: str = "", slow_seconds: float = 4.0) -> DatasetSource:
    """The source for a named dataset; a URL list given on the command line overrides the config's."""
    if config.source == "url_list" and not (url_list or config.url_list):
        raise ConfigError(
            f"dataset {config.name!r} needs a URL list: pass URL_LIST=<parquet|csv|jsonl> to make "
            "(or --url-list), with url and caption columns"
        )
    return DatasetSource(config=config, url_list=url_list, slow_seconds=slow_seconds)


def ground_truth_path(root: Path) -> Path:
    return root / "ground_truth.parquet"
