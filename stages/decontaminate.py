"""Decontamination: flag every pool sample that is a copy of an evaluation image.

Evaluation images that leak into the training pool inflate every number reported on them
(DataComp removes near-duplicates of its evaluation sets from its pools). ``[decontaminate]
eval_sets`` names the sets: folders of images, URL lists (parquet/csv/tsv/jsonl with a ``url``
column; ``file://`` paths or http URLs), WebDataset shards (a ``.tar`` or a folder of them), and
``"builtin"``: the project's own held-out sets (``sources.eval_sets.build_eval_sets``, the clean,
typographic-attack, CounterAnimal-style, retrieval and text-only sets the ablation evaluates on,
drawn with ``[ablation] eval_seed`` and ``eval_per_class``), so the ablation never trains on what it
evaluates.

Three tiers, each a reason to call a pool sample a copy of an evaluation image:

- ``exact``: the pool's ``sha256`` (of the downloaded bytes) equals the sha256 of the evaluation
  image's file bytes. For ``builtin`` those are the JPEG bytes the generator encodes: a synthetic
  set only matches exactly if the pool holds those very bytes (img2dataset re-encodes what it
  fetches, so in practice the other tiers find them). Distance 0.
- ``phash``: the 64-bit pHash (``stages.dedup.phash``) within ``radius`` bits (4: re-encodes and
  resizes; stricter than ``[dedup] radius``, see the config). Distance: the Hamming bits.
- ``semantic``: image-embedding cosine >= ``min_cosine``, the evaluation image embedded with the
  run's own CLIP (``[clip]``). Only where the pool's vectors come from that same model with
  meaningful weights: imported vectors (DataComp's L14) live in another space, and a randomly
  initialised CLIP puts unrelated images above 0.95 (21% of pairs of the builtin sets, measured),
  so then only the exact and pHash tiers run, and :func:`semantic_tier` says why. Distance:
  1 - cosine.

A sample's ``eval_match`` is its best match (exact before phash before semantic, then the
smallest distance, then the earlier evaluation image), or null.

Each set is read, hashed and embedded once: cached by its content (sha256 of its files' bytes;
for ``builtin`` the generator's arguments, since the same arguments give byte-identical sets; the
embeddings also by the CLIP model's description, which includes a checkpoint's sha256) under
``$CLIP_CURATION_CACHE`` (default ``~/.cache/clip-curation``), ``decontaminate/``.

The pool is streamed from DuckDB in batches and each batch compared with every evaluation image
at once (XOR-popcount against all eval hashes, one matrix product for the cosines, in blocks), so
memory is one batch plus the eval sets, whatever the pool's size; the work is pool x eval images
(about 1 ns a hash pair, a few per cosine), fine for eval sets up to ~10^4 images.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.cache import write_atomic
from core.cache import cache_dir as project_cache_dir
from core.errors import ConfigError
from core.settings import config_section, require
from manifests.schemas import schema_for
from stages.base import PoolStage, PoolWork, Resources
from stages.dedup import MAX_RADIUS, phash
from stages.semantic_dedup import assign, separates

BUILTIN = "builtin"
TIERS = ("exact", "phash", "semantic")  # best first
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".jsonl", ".json")
_CACHE_FORMAT = 1  # bump when what a cache file holds changes
_BLOCK_CELLS = 1 << 22  # pool rows x eval images compared at once (a block's distance matrix: 4 M cells)
POOL_BATCH_ROWS = 65_536  # pool rows per streamed batch
_FETCH_TIMEOUT_S = 30.0
# the rule that drops a matched sample: policy no-eval-dups (pipeline/default.toml) and every ablation policy
EVAL_RULE = ("not_an_eval_image", "eval_match is null")
# The semantic tier is refused when it would match more than this share of the pool (judged on at
# least MIN_JUDGED_ROWS samples): DataComp found copies of its evaluation images in a small fraction
# of a percent of its pool; a CLIP that clusters look-alikes matches tens of percent.
MAX_SEMANTIC_SHARE = 0.05
MIN_JUDGED_ROWS = 200


# -- config --------------------------------------------------------------------------------------


@config_section
class DecontaminateConfig:
    """Evaluation images to keep out of the training pool (stages/decontaminate.py)."""

    # each: "builtin" (the project's own evaluation sets), a folder of images, a URL list
    # (parquet/csv/tsv/jsonl with a url column), or WebDataset shards (a .tar, or a folder of .tar)
    eval_sets: tuple[str, ...] = (BUILTIN,)
    # pHash tier: at most this many differing bits. Stricter than [dedup] radius (10): a re-encode or
    # resize moves a real photo's pHash 0-4 bits (bench/dedup_quality.py), but low-texture scenes share
    # hashes: 59 of the 320 synthetic embedded samples fell within 10 bits of some builtin evaluation
    # image (none a copy), 4 within 4. A false match drops a training sample; crops need the semantic tier.
    radius: int = 4
    min_cosine: float = 0.95  # semantic tier: image-embedding cosine at least this

    def problems(self) -> list[str]:
        """What can be checked without reading a set; :func:`check_eval_sets` reads them."""
        problems = require(
            (isinstance(self.radius, int) and 0 <= self.radius <= MAX_RADIUS,
             f"decontaminate.radius must be within 0..{MAX_RADIUS} (got {self.radius!r})"),
            (-1.0 <= self.min_cosine <= 1.0, f"decontaminate.min_cosine must be within -1..1 (got {self.min_cosine!r})"),
            (len(set(self.eval_sets)) == len(self.eval_sets), "decontaminate.eval_sets names a set twice"),
        )
        for entry in self.eval_sets:
            problem = _static_problem(entry)
            if problem:
                problems.append(f"decontaminate.eval_sets: {entry!r}: {problem}")
        return problems


def _static_problem(entry: str) -> str | None:
    """Why ``entry`` cannot be an eval set, where that shows without reading it (None: maybe fine)."""
    if entry == BUILTIN:
        return None
    if not entry:
        return "an empty name"
    parsed = urllib.parse.urlparse(entry)
    if parsed.scheme and parsed.scheme not in ("file",) and len(parsed.scheme) > 1:
        return f"a {parsed.scheme}:// location; give a local path or a file:// URL (a URL list may name http URLs)"
    path = _local_path(entry)
    if not path.exists():
        return "no such file or folder"
    if path.is_file() and not path.name.lower().endswith((".tar", *LIST_SUFFIXES, *_compressed(LIST_SUFFIXES))):
        return "a file that is neither a .tar shard nor a URL list (.parquet, .csv, .tsv, .jsonl)"
    return None


def _compressed(suffixes: Sequence[str]) -> tuple[str, ...]:
    return tuple(s + c for s in suffixes for c in (".gz", ".zst", ".bz2"))


def _local_path(entry: str) -> Path:
    if entry.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(entry).path))
    return Path(entry).expanduser()


# -- evaluation sets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Builtin:
    """How to draw the builtin sets: ``draw(seed, per_class)`` gives (name, bytes) of every image
    (``sources.eval_sets.image_files``, passed in by the pipeline: sources sit above stages)."""

    seed: int = 10_000
    per_class: int = 40
    draw: Callable[[int, int], list[tuple[str, bytes]]] | None = None

    def files(self) -> list[tuple[str, bytes]]:
        if self.draw is None:
            raise ConfigError("the builtin sets cannot be drawn here (no sources.eval_sets given)")
        return self.draw(self.seed, self.per_class)


@dataclass(frozen=True)
class EvalSet:
    """One set's images as the tiers compare them: names, sha256 of the bytes, pHashes."""

    name: str  # as named in eval_sets
    key: str  # content key: the cache's file name
    images: tuple[str, ...]  # each image's name within the set (a path, a tar member, a URL)
    sha256: tuple[str, ...]
    phashes: np.ndarray  # uint64, one per image
    encoded: tuple[bytes, ...] = ()  # the bytes, only while freshly read (for embedding); empty from the cache
    builtin: Builtin = Builtin()  # builtin only: how to draw the set again

    @property
    def label(self) -> str:
        """The set as ``eval_match.set`` names it: the entry, and for builtin the arguments that draw it."""
        if self.name == BUILTIN:
            return f"{BUILTIN}(seed={self.builtin.seed},per_class={self.builtin.per_class})"
        return self.name


def cache_dir() -> Path:
    """Where eval sets' hashes and embeddings are kept: ``$CLIP_CURATION_CACHE/decontaminate``."""
    return project_cache_dir("decontaminate")


def _decode_rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _read_tar(path: Path, label: str) -> list[tuple[str, bytes]]:
    out = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                    out.append((f"{label}:{member.name}", tar.extractfile(member).read()))  # type: ignore[union-attr]
    except (tarfile.TarError, OSError) as err:
        raise ConfigError(f"cannot read {path} as a tar ({type(err).__name__}: {err})") from None
    return out


def _read_list_urls(path: Path) -> list[str]:
    """The ``url`` (or ``URL``) column of a parquet/csv/tsv/jsonl list."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    name = path.name.lower()
    for suffix in (".gz", ".zst", ".bz2"):
        name = name.removesuffix(suffix)
    try:
        if name.endswith((".parquet", ".pq")):
            table = pq.read_table(path)
        elif name.endswith((".csv", ".tsv")):
            delimiter = "\t" if name.endswith(".tsv") else ","
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
        else:
            table = pajson.read_json(path)
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(f"not a readable URL list ({type(err).__name__}: {err})") from None
    column = next((c for c in table.column_names if c.lower() == "url"), None)
    if column is None:
        raise ConfigError(f"the URL list has no url column (it has {', '.join(table.column_names) or 'none'})")
    return [u for u in table.column(column).to_pylist() if u]


def _fetch(url: str) -> bytes:
    if url.startswith("file://"):
        return _local_path(url).read_bytes()
    with urllib.request.urlopen(url, timeout=_FETCH_TIMEOUT_S) as response:  # noqa: S310 - the user's own list
        return response.read()


def _read_files(entry: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image of a non-builtin set; a ConfigError says why it cannot be read."""
    problem = _static_problem(entry)
    if problem:
        raise ConfigError(problem)
    path = _local_path(entry)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        images = [(str(p.relative_to(path)), p.read_bytes()) for p in files if p.name.lower().endswith(IMAGE_SUFFIXES)]
        if not images:
            for tar in (p for p in files if p.name.lower().endswith(".tar")):
                images += _read_tar(tar, str(tar.relative_to(path)))
        return images
    if path.name.lower().endswith(".tar"):
        return _read_tar(path, path.name)
    out = []
    for url in _read_list_urls(path):
        try:
            out.append((url, _fetch(url)))
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot fetch {url} ({type(err).__name__}: {err})") from None
    return out


def load_eval_set(entry: str, builtin: Builtin = Builtin()) -> EvalSet:
    """Read, hash and cache one set (``builtin``: how to draw the builtin sets).

    A set that cannot be read, or holds no image, or an image that does not decode, is a
    ConfigError naming the set and the problem, in one line."""
    try:
        if entry == BUILTIN:
            key = hashlib.sha256(json.dumps([_CACHE_FORMAT, BUILTIN, "eval-v1", builtin.seed, builtin.per_class]).encode()).hexdigest()
            cached = _cached_set(entry, key, builtin)
            if cached is not None:
                return cached
            files = builtin.files()
        else:
            files = _read_files(entry)
            digest = hashlib.sha256(json.dumps([_CACHE_FORMAT, "files"]).encode())
            for name, data in files:
                digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
            key = digest.hexdigest()
            cached = _cached_set(entry, key, builtin)
            if cached is not None:
                return cached
        if not files:
            raise ConfigError("no images in it")
        hashes = []
        for name, data in files:
            try:
                hashes.append(phash(_decode_rgb(data)))
            except Exception as err:  # noqa: BLE001 - any undecodable file: named, the run stops
                raise ConfigError(f"image {name} does not decode ({type(err).__name__}: {err})") from None
    except ConfigError as err:
        raise ConfigError(f"decontaminate.eval_sets: {entry!r}: {err}") from None
    result = EvalSet(entry, key, tuple(n for n, _ in files), tuple(hashlib.sha256(d).hexdigest() for _, d in files),
                     np.array(hashes, dtype=np.int64).view(np.uint64), tuple(d for _, d in files), builtin)
    write_atomic(cache_dir() / f"{key}.npz", lambda f: np.savez(
        f, images=np.array(result.images, dtype=object).astype(str), sha256=np.array(result.sha256, dtype=str),
        phashes=result.phashes))
    return result


def _cached_set(entry: str, key: str, builtin: Builtin) -> EvalSet | None:
    path = cache_dir() / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            return EvalSet(entry, key, tuple(str(x) for x in data["images"]), tuple(str(x) for x in data["sha256"]),
                           data["phashes"].astype(np.uint64), builtin=builtin)
    except (OSError, ValueError, KeyError):  # a torn or foreign file: read the set again
        return None


def check_eval_sets(config: DecontaminateConfig, builtin: Builtin = Builtin()) -> list[EvalSet]:
    """Every set, read (or from the cache): a run checks them at start, before any work."""
    return [load_eval_set(entry, builtin) for entry in config.eval_sets]


def eval_embeddings(eval_set: EvalSet, clip_config: Any, description: str) -> np.ndarray:
    """The set's L2-normalised image embeddings by the run's CLIP (float32), cached by the set's
    content and ``description`` (the model and its weights)."""
    tag = hashlib.sha256(description.encode()).hexdigest()[:16]
    path = cache_dir() / f"{eval_set.key}-{tag}.npy"
    if path.exists():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass
    encoded = eval_set.encoded
    if not encoded:  # hashes came from the cache: read the bytes again
        encoded = tuple(d for _, d in (eval_set.builtin.files() if eval_set.name == BUILTIN
                                       else _read_files(eval_set.name)))
    from core.devices import cuda_visible, resolve_device
    from models.clip_onnx import load_clip_scorer

    cfg = clip_config  # the engine the pool's embeddings came from (stages/clip_score.py): the same arithmetic
    device = resolve_device(cfg.device, cuda_visible(), "clip.device")
    clip = load_clip_scorer(cfg.model, cfg.pretrained, device=device, precision=cfg.precision, seed=cfg.seed,
                            engine=cfg.engine, batch_size=cfg.batch_for(device))
    vectors = clip.encode_images([_decode_rgb(d) for d in encoded]).astype(np.float32)
    write_atomic(path, lambda f: np.save(f, vectors))
    return vectors


_BUILTIN_LABEL = re.compile(rf"{BUILTIN}\(seed=(-?\d+),per_class=(\d+)\)")


def eval_images(set_label: str, images: Collection[str], draw: Callable[[int, int], list[tuple[str, bytes]]] | None = None
                ) -> dict[str, bytes]:
    """The file bytes of evaluation images named by ``eval_match`` (set, image), for the report:
    those still readable (a set read or drawn once for all of them)."""
    wanted = set(images)
    try:
        builtin = _BUILTIN_LABEL.fullmatch(set_label)
        if builtin:
            files = Builtin(int(builtin.group(1)), int(builtin.group(2)), draw).files()
        elif _local_path(set_label).is_dir() and all((_local_path(set_label) / i).is_file() for i in wanted):
            files = [(i, (_local_path(set_label) / i).read_bytes()) for i in wanted]
        else:
            files = _read_files(set_label)
    except (ConfigError, OSError, ValueError):
        return {}
    return {name: data for name, data in files if name in wanted}


# -- matching ------------------------------------------------------------------------------------


def nearest_hashes(pool: np.ndarray, eval_hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pool hash (uint64), the index of the closest eval hash and its Hamming distance, by one
    XOR-popcount against every eval hash, in blocks of rows (ties: the earlier eval hash)."""
    best = np.zeros(pool.size, np.int64)
    dist = np.full(pool.size, 255, np.int64)
    if eval_hashes.size == 0 or pool.size == 0:
        return best, dist
    rows = max(1, _BLOCK_CELLS // eval_hashes.size)
    for start in range(0, pool.size, rows):
        block = np.bitwise_count(pool[start : start + rows, None] ^ eval_hashes[None, :])
        best[start : start + rows] = block.argmin(axis=1)
        dist[start : start + rows] = block.min(axis=1)
    return best, dist


def _description(clip_config: Any) -> tuple[str, bool]:
    from models.clip import weights_description

    return weights_description(clip_config.model, clip_config.pretrained, clip_config.seed)


def _has_view(con: Any, name: str) -> bool:
    return bool(con.execute("select count(*) from information_schema.tables where table_name = ?", [name]).fetchone()[0])


def semantic_tier(con: Any, description: str | None) -> str | None:
    """None when the semantic tier applies to this pool (its ``embeddings`` come from the model
    ``description``, or any one model when None, with meaningful weights); else why it does not,
    a sentence the summary prints."""
    if not _has_view(con, "embeddings"):
        return "the pool has no image embeddings (clip.keep_embeddings off, or no clip_score): exact and pHash tiers only"
    models = [m for (m,) in con.execute("select distinct model from embeddings").fetchall()]
    if description is None:
        description = models[0] if len(models) == 1 else None
    if description is None or description not in models:
        shown = ", ".join(repr(m) for m in models[:3])
        return (f"the pool's embeddings come from {shown}, not this run's CLIP, and cannot be compared with it: "
                "exact and pHash tiers only")
    meaningful = con.execute("select bool_and(clip_weights_meaningful) from clip_score where clip_model = ?",
                             [description]).fetchone()[0] if _has_view(con, "clip_score") else None
    if meaningful is False:
        return ("the pool's CLIP weights are a random init, whose cosines do not tell copies apart: "
                "exact and pHash tiers only (set clip.pretrained)")
    return None


def semantic_share_note(share: float, rows: int, min_cosine: float) -> str | None:
    """None when the semantic tier matches a plausible share of the pool; else why it is off.

    Real pools copy a vanishing share of their evaluation sets, but a weakly trained CLIP (the
    ablation's own 120-step scorer, say) clusters look-alikes above ``min_cosine``: its cosines
    called 37% of a 2,000-sample embedded pool copies of the 1,800 builtin images while random pairs
    of those images stayed at 0.4% (:func:`separation_note` passes such a space: one pool image
    meets a few look-alikes among many evaluation images). Judged on the pool's first batch (rows in
    uid order: a uniform sample), from ``MIN_JUDGED_ROWS`` rows up."""
    if rows < MIN_JUDGED_ROWS or share <= MAX_SEMANTIC_SHARE:
        return None
    return (f"the semantic tier would call {share:.0%} of the pool copies of an evaluation image (cosine >= "
            f"{min_cosine:g}; judged on {rows} samples): this CLIP does not tell a copy from a look-alike (a real "
            f"pool copies far less than {MAX_SEMANTIC_SHARE:.0%}): exact and pHash tiers only")


def separation_note(vectors: np.ndarray, min_cosine: float) -> str | None:
    """None when the evaluation images' embeddings tell images apart at ``min_cosine``; else why
    the semantic tier is off (a barely trained model puts every pair above it: all would match)."""
    ok, share = separates(vectors, min_cosine)
    if ok:
        return None
    return (f"{share:.0%} of pairs of distinct evaluation images are at cosine >= {min_cosine:g} with this CLIP: its "
            "embeddings do not tell images apart (an untrained or barely trained model): exact and pHash tiers only")


def _semantic_share(batch: pa.RecordBatch, vectors: np.ndarray, min_cosine: float) -> tuple[float, int]:
    """The share of the batch's rows with an embedding whose nearest evaluation image is at cosine
    ``min_cosine`` or more, and how many rows had an embedding."""
    column = batch.column("image_embedding")
    rows = np.flatnonzero(np.asarray(column.is_valid()))
    if rows.size == 0:
        return 0.0, 0
    _, cosine = assign(_embeddings(column, rows), vectors)
    return float((cosine >= min_cosine).mean()), int(rows.size)


def _embeddings(column: pa.Array, rows: np.ndarray) -> np.ndarray:
    """The list column's vectors at ``rows`` as one float32 matrix."""
    picked = column.take(pa.array(rows))
    return np.asarray(pc.list_flatten(picked).to_numpy(zero_copy_only=False), np.float32).reshape(rows.size, -1)


# -- pool stage ----------------------------------------------------------------------------------


class DecontaminateStage(PoolStage):
    """Finds, for every downloaded sample, its best match among the evaluation images, if any."""

    name = "decontaminate"
    reads = ("phash", "sha256")  # and the embeddings view when there is one (optional: not declared)
    output_schema = schema_for("decontaminate")
    status_column = None

    def __init__(self, config: DecontaminateConfig, clip_config: Any = None, builtin: Builtin = Builtin()) -> None:
        self.config = config
        self.clip_config = clip_config  # the run's [clip]: the semantic tier embeds with it
        self.builtin = builtin  # the builtin sets: [ablation] eval_seed, eval_per_class
        self.note: str | None = None  # why the semantic tier did not run, after process_pool
        self._loaded: list[EvalSet] | None = None

    def resources(self, gpus_available: bool) -> Resources:
        return Resources(cpus=1.0)

    def _sets(self) -> list[EvalSet]:
        """The sets, read (or taken from the cache) once per stage: the digest and the matching share them."""
        if self._loaded is None:
            self._loaded = check_eval_sets(self.config, self.builtin)
        return self._loaded

    def inputs_key(self) -> str:
        """Beyond the manifests and config: the sets' contents and the CLIP that embeds them."""
        keys = [s.key for s in self._sets()]
        description = _description(self.clip_config)[0] if self.clip_config is not None else None
        return json.dumps([keys, description, self.builtin.seed, self.builtin.per_class])

    def process_pool(self, con: Any, work: PoolWork | None = None) -> Iterator[pa.RecordBatch]:
        """The pool's rows with their ``eval_match``, batch by batch, in uid order."""
        sets = self._sets()
        description = _description(self.clip_config)[0] if self.clip_config is not None else None
        self.note = (semantic_tier(con, description) if description is not None
                     else "no [clip] config given: exact and pHash tiers only")
        labels = [(s.label, image) for s in sets for image in s.images]
        eval_sha = pa.array([h for s in sets for h in s.sha256], pa.string())
        eval_hashes = np.concatenate([s.phashes for s in sets]) if sets else np.zeros(0, np.uint64)
        vectors = None
        if self.note is None:
            assert description is not None
            vectors = np.concatenate([eval_embeddings(s, self.clip_config, description) for s in sets])
            self.note = separation_note(vectors, self.config.min_cosine)
            vectors = None if self.note else vectors
        if self.note is None:
            sql = ("select d.uid, p.phash, d.sha256, e.image_embedding from download d "
                   "left join dedup p using (uid) "
                   "left join (select uid, image_embedding from embeddings where model = $model) e using (uid) "
                   "where d.status = 'ok' order by d.uid")
            reader = con.execute(sql, {"model": description}).to_arrow_reader(POOL_BATCH_ROWS)
        else:
            sql = ("select d.uid, p.phash, d.sha256 from download d left join dedup p using (uid) "
                   "where d.status = 'ok' order by d.uid")
            reader = con.execute(sql).to_arrow_reader(POOL_BATCH_ROWS)
        return self._batches(reader, labels, eval_sha, eval_hashes, vectors)

    def _batches(self, reader: pa.RecordBatchReader, labels: list[tuple[str, str]], eval_sha: pa.Array,
                 eval_hashes: np.ndarray, vectors: np.ndarray | None) -> Iterator[pa.RecordBatch]:
        match_type = self.output_schema.field("eval_match").type
        batches = iter(reader)
        first = next(batches, None)
        if vectors is not None and first is not None:
            share, rows = _semantic_share(first, vectors, self.config.min_cosine)
            self.note = semantic_share_note(share, rows, self.config.min_cosine)
            vectors = None if self.note else vectors
        for batch in itertools.chain(() if first is None else (first,), batches):
            n = batch.num_rows
            tier = np.full(n, len(TIERS), np.int64)  # index into TIERS; len(TIERS): no match
            which = np.zeros(n, np.int64)
            distance = np.zeros(n, np.float64)
            # exact: the first eval image with the same bytes
            exact = pc.index_in(batch.column("sha256"), value_set=eval_sha).to_numpy(zero_copy_only=False)
            exact = np.nan_to_num(np.asarray(exact, dtype=np.float64), nan=-1).astype(np.int64)
            hit = exact >= 0
            tier[hit], which[hit] = 0, exact[hit]
            # phash
            hashes = batch.column("phash")
            has_hash = np.asarray(hashes.is_valid())
            rows = np.flatnonzero(has_hash & (tier > 0))
            if rows.size:
                values = hashes.take(pa.array(rows)).to_numpy().view(np.uint64)
                best, dist = nearest_hashes(values, eval_hashes)
                close = dist <= self.config.radius
                tier[rows[close]], which[rows[close]], distance[rows[close]] = 1, best[close], dist[close]
            # semantic
            if vectors is not None and "image_embedding" in batch.schema.names:
                column = batch.column("image_embedding")
                has_vec = np.asarray(column.is_valid())
                rows = np.flatnonzero(has_vec & (tier > 1))
                if rows.size:
                    best, cosine = assign(_embeddings(column, rows), vectors)  # the nearest eval image: as a centroid, by cosine
                    close = cosine >= self.config.min_cosine
                    tier[rows[close]], which[rows[close]] = 2, best[close]
                    distance[rows[close]] = np.maximum(0.0, 1.0 - cosine[close].astype(np.float64))
            matched = tier < len(TIERS)
            sets_col = [labels[w][0] if m else None for w, m in zip(which, matched)]
            images_col = [labels[w][1] if m else None for w, m in zip(which, matched)]
            tiers_col = [TIERS[t] if m else None for t, m in zip(tier, matched)]
            struct = pa.StructArray.from_arrays(
                [pa.array(sets_col, pa.string()), pa.array(images_col, pa.string()),
                 pa.array(tiers_col, pa.string()), pa.array(distance, pa.float64())],
                fields=list(match_type), mask=pa.array(~matched))
            yield pa.RecordBatch.from_arrays([batch.column("uid").cast(pa.string()), struct], schema=self.output_schema)
