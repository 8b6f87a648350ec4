"""Reshard stage: copy the kept samples of a few source tars into one new WebDataset shard.

DataComp's split of work: a policy *decides* (``selections/<policy>.parquet``), this stage
*materialises*. It is Ray-free; ``pipeline.reshard_runner`` plans which source samples go into which
output shard and runs one call of :meth:`ReshardStage.process_shard` per output shard as a Ray task.

Why it looks the way it does:

- Memory is bounded by construction: source tars are read member by member with ``tarfile`` (the
  data of a member we do not keep is seeked over, never read), the list of headers ``tarfile``
  accumulates is dropped after each member, and only the members of the current sample are held;
  each sample is written out before the next one is read.
- Bytes are copied unchanged (``.jpg`` and ``.txt`` and any other member img2dataset wrote); only
  the ``.json`` is rewritten, to carry the new ``key``. With ``blur_faces`` (off by default) the
  ``.jpg`` of a sample with face boxes is decoded, every box blurred as DataComp's resharder does
  (img2dataset's ``BoundingBoxBlurrer``) and re-encoded; its json records ``face_bboxes`` (as
  DataComp's ``--inject-blur-metadata``) and ``faces_blurred``. Lineage (``source_shard``, ``source_key``)
  goes to the Parquet sibling and the curated manifest, not into the sample. Images are never
  decoded, so resharding costs about a copy.
- Output is reproducible and depends only on the kept samples: they are written in uid order
  (spooled first, in memory up to a bound, then on local disk), by webdataset's own ``TarWriter``
  (the writer img2dataset uses) with a fixed mtime, owner and mode. The same selection gives
  byte-identical tars whichever shards its samples were downloaded into (a retry, an appended list).
- The tar and its Parquet sibling are written under temporary names and renamed when complete, so
  an existing ``<shard>.tar`` is a whole one.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import pickle
import tarfile
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, Union

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from core.settings import config_section, require
from manifests.schemas import CURATED
from manifests.store import tar_key, tmp_sibling
from stages.base import Resources, ShardOutput, ShardStage

if TYPE_CHECKING:  # pragma: no cover
    import webdataset as wds


@config_section
class ReshardConfig:
    """Materialising a policy's kept samples as new WebDataset shards."""

    samples_per_shard: int = 64  # DataComp uses 10000; small here so the embedded run has several
    # Blur every face box (the faces step's face_bboxes) of each curated image, as DataComp's
    # resharder does (img2dataset's BoundingBoxBlurrer), re-encoded as JPEG; needs [faces] enabled.
    blur_faces: bool = False

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        problems = require(
            (self.samples_per_shard >= 1, "reshard.samples_per_shard must be >= 1"),
        )
        return problems

# A blurred image is re-encoded as JPEG at img2dataset's (and our download's) default quality, so
# the member stays ``.jpg`` for every reader (DataComp writes WebP at quality 100 instead).
BLUR_JPEG_QUALITY = 95

# Fixed tar header fields: the same samples give the same bytes on any machine, any day.
TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header (1 KiB) to every member
TAR_OWNER = "curation"
TAR_MODE = 0o444

# The Parquet sibling of each output tar (``<shard>.parquet``), like img2dataset's per-shard table:
# typed columns, one row per sample, in tar order.
CURATED_SHARD = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),  # __key__ in this tar
        pa.field("caption", pa.string()),  # the .txt member, decoded
        pa.field("width", pa.int32()),  # of the stored image, from img2dataset's json
        pa.field("height", pa.int32()),
        pa.field("source_shard", pa.string(), nullable=False),  # shards/<source_shard>.tar
        pa.field("source_key", pa.string(), nullable=False),
    ]
)

# A shard's kept samples wait in memory up to this many bytes, then in a local temporary file, to
# be written in uid order (one extra local copy of a shard past it: resharding stays about a copy).
SPOOL_IN_MEMORY_BYTES = 64 * 1024 * 1024


class SpooledSample(NamedTuple):
    """A kept sample read from its source tar, waiting in the spool to be written (sorts by uid)."""

    uid: str
    offset: int  # where its pickled members start in the spool
    source_shard: str
    source_key: str


# Per source tar: the keys to keep, or a key -> uid mapping, which also checks each sample's uid.
SourceKeys = Union[Collection[str], Mapping[str, str]]


def _normalise(location: Path | str) -> str:
    """One spelling per source tar (absolute local path, or the URL as given), to spot repeats."""
    text = str(location)
    return text if "://" in text else str(Path(text).resolve())


def key_width(samples_per_shard: int) -> int:
    """Digits of the in-shard index in a key; img2dataset's rule (``ceil(log10(max(n, 2)))``)."""
    return len(str(max(samples_per_shard, 2) - 1))


def new_key(shard: str, index: int, samples_per_shard: int) -> str:
    """Key of the ``index``-th sample of output ``shard``: img2dataset's scheme, unique in a policy."""
    return f"{shard}{index:0{key_width(samples_per_shard)}d}"


def iter_kept_samples(fileobj: BinaryIO, keep: Collection[str], name: str = "tar") -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for each kept sample, in tar order, holding one sample at a time.

    ``fileobj`` must be seekable: members that are not kept are skipped by seeking past their data.
    Samples are grouped as webdataset groups them (``manifests.store.tar_key``: key = name up to
    the first dot of the basename), and, like webdataset, a sample is consecutive members with the
    same key. A kept key that shows up twice (or a sample with one extension twice) is an error:
    which copy to take would be a guess.
    """
    yielded: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        while (info := tar.next()) is not None:
            tar.members.clear()  # tarfile remembers every header it read; a long tar must not grow memory
            if not info.isfile():
                continue
            member_key, ext = tar_key(info.name)
            if member_key != key:
                if members:
                    yield key, members  # type: ignore[misc]
                    yielded.add(key)  # type: ignore[arg-type]
                key, members = member_key, {}
            if member_key not in keep:
                continue
            if member_key in yielded or ext in members:
                raise ValueError(f"{name}: sample {member_key!r} appears twice (member {info.name!r})")
            handle = tar.extractfile(info)
            assert handle is not None  # a regular file
            members[ext] = handle.read()
        if members:
            yield key, members  # type: ignore[misc]


def blur_face_boxes(jpg: bytes, boxes: Sequence[Sequence[float]]) -> bytes:
    """``jpg`` with every box (``[x1, y1, x2, y2]`` fractions) blurred as DataComp's resharder does:
    img2dataset's ``BoundingBoxBlurrer`` (each box grown by 10 % of its longer side, a Gaussian
    blur of sigma 0.1 x the largest box's longer side, blended in through a blurred mask), then
    JPEG at ``BLUR_JPEG_QUALITY``. Deterministic: the same bytes and boxes give the same bytes."""
    import numpy as np
    from img2dataset.blurrer import BoundingBoxBlurrer
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as image:
        pixels = np.asarray(image.convert("RGB"))
    with warnings.catch_warnings():  # albumentations' notice about always_apply, once per image
        warnings.simplefilter("ignore")
        blurred = BoundingBoxBlurrer()(pixels, [list(map(float, b)) for b in boxes])
    out = io.BytesIO()
    Image.fromarray(blurred).save(out, format="JPEG", quality=BLUR_JPEG_QUALITY)
    return out.getvalue()


class ReshardStage(ShardStage):
    """Writes one output shard of a policy from an ordered list of (source tar, kept keys)."""

    name = "reshard"
    reads = ("uid", "kept", "shard", "key")  # the selection's kept uids; the download manifest's shard/key
    output_schema = CURATED
    status_column = None  # every row is a sample written; a shard that fails writes nothing

    def __init__(self, policy: str, samples_per_shard: int, blur_faces: bool = False) -> None:
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.policy = policy
        self.samples_per_shard = samples_per_shard
        self.blur_faces = blur_faces

    def resources(self, gpus_available: bool) -> Resources:
        """One CPU per output shard: a task streams bytes from tar to tar, never decodes."""
        return Resources(cpus=1.0)

    def process_shard(self, shard: str, inputs: Sequence[tuple[Path | str, SourceKeys]], work_dir: Path,
                      faces: Mapping[str, Sequence[Sequence[float]] | None] | None = None) -> ShardOutput:
        """Write ``work_dir/<shard>.tar`` and ``<shard>.parquet`` from ``inputs``; return its manifest.

        ``faces`` (with ``blur_faces``): uid -> its face boxes, blurred in its image; a uid it lacks,
        or maps to None (the faces step failed on it), is copied unblurred with ``face_bboxes: null``.

        Files by role: "tar", "parquet" (already renamed into place). Each source tar is streamed
        once, in its own member order, into a spool; the samples are then written in uid order, the
        ``i``-th getting key ``new_key(shard, i)``. Every listed key must be in its tar, else
        nothing is written.
        """
        if self.blur_faces and faces is None:
            raise ValueError(f"shard {shard}: blur_faces is on but no face boxes were given")
        tars = [_normalise(t) for t, _ in inputs]
        if len(set(tars)) != len(tars):
            raise ValueError(f"shard {shard}: a source tar is listed twice; give each tar's keys once")
        total = sum(len(set(keys)) for _, keys in inputs)
        if total > self.samples_per_shard:
            raise ValueError(f"shard {shard}: {total} samples planned, more than samples_per_shard={self.samples_per_shard}")
        work_dir.mkdir(parents=True, exist_ok=True)
        tar_path = work_dir / f"{shard}.tar"
        parquet_path = work_dir / f"{shard}.parquet"
        tmp_tar, tmp_parquet = tmp_sibling(tar_path), tmp_sibling(parquet_path)
        rows: list[dict] = []
        import webdataset as wds  # here, not at import: webdataset imports torch (seconds), and the CLI imports every stage

        try:
            with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES, dir=work_dir) as spool:
                spooled: list[SpooledSample] = []
                for source_tar, keys in inputs:
                    self._spool_source(str(source_tar), keys, spool, spooled)
                spooled.sort()  # uid order: where a sample was downloaded does not change the bytes
                with open(tmp_tar, "wb") as out:
                    # closed on error too, while ``out`` is open: else tarfile flushes into a closed file later
                    with wds.TarWriter(out, encoder=False, mtime=TAR_MTIME, user=TAR_OWNER, group=TAR_OWNER,
                                       mode=TAR_MODE) as writer:
                        for sample in spooled:
                            spool.seek(sample.offset)
                            members = pickle.load(spool)
                            key = new_key(shard, len(rows), self.samples_per_shard)
                            written, row = self._rewrite(members, key, sample, faces if self.blur_faces else None)
                            writer.write(written)
                            rows.append(row)
                    out.flush()
                    os.fsync(out.fileno())
            shard_table = pa.Table.from_pylist(rows, schema=CURATED_SHARD)
            pq.write_table(shard_table, tmp_parquet, compression="zstd")
            with open(tmp_parquet, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_tar, tar_path)
            os.replace(tmp_parquet, parquet_path)
        finally:
            tmp_tar.unlink(missing_ok=True)
            tmp_parquet.unlink(missing_ok=True)
        manifest = pa.table(
            {
                "uid": shard_table.column("uid"),
                "policy": pa.array([self.policy] * len(rows), pa.string()),
                "shard": pa.array([shard] * len(rows), pa.string()),
                "key": shard_table.column("key"),
                "source_shard": shard_table.column("source_shard"),
                "source_key": shard_table.column("source_key"),
            },
            schema=CURATED,
        )
        size = tar_path.stat().st_size + parquet_path.stat().st_size
        return ShardOutput(manifest, files={"tar": tar_path, "parquet": parquet_path}, bytes_written=size)

    def _spool_source(self, source_tar: str, keys: SourceKeys, spool: BinaryIO, spooled: list[SpooledSample]) -> None:
        """Stream one source tar (a local path or an fsspec URL) into the spool, noting each kept
        sample's uid and offset; raise if a listed key is missing or holds another uid. Remote tars
        are read with seeks too: skipped members are not fetched."""
        wanted = set(keys)
        expected_uid = keys if isinstance(keys, Mapping) else None
        source_shard = source_tar.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar")
        found: set[str] = set()
        with fsspec.open(source_tar, "rb") as f:
            for source_key, members in iter_kept_samples(f, wanted, name=str(source_tar)):
                found.add(source_key)
                if "json" not in members:
                    raise ValueError(f"{source_tar}: sample {source_key} has no .json member (need its uid)")
                uid = json.loads(members["json"])["uid"]
                if expected_uid is not None and uid != expected_uid[source_key]:
                    raise ValueError(
                        f"{source_tar}: sample {source_key} holds uid {uid}, "
                        f"the download manifest says {expected_uid[source_key]}"
                    )
                spooled.append(SpooledSample(uid, spool.tell(), source_shard, source_key))
                pickle.dump(members, spool, protocol=pickle.HIGHEST_PROTOCOL)
        missing = wanted - found
        if missing:
            raise ValueError(f"{source_tar}: {len(missing)} planned sample(s) not in the tar, e.g. {sorted(missing)[:3]}")

    @staticmethod
    def _rewrite(members: dict[str, bytes], key: str, sample: SpooledSample,
                 faces: Mapping[str, Sequence[Sequence[float]] | None] | None = None) -> tuple[dict[str, bytes | str], dict]:
        """The sample to write (bytes unchanged but the json's ``key``; with ``faces``, its faces
        blurred) and its row of the Parquet sibling. The json names no source shard: where a
        sample was downloaded (its first list, an appended one, a retry) is lineage, kept in the
        Parquet sibling and the curated manifest."""
        meta = json.loads(members["json"])
        meta["key"] = key
        written: dict[str, bytes | str] = {"__key__": key, **members}
        if faces is not None:
            boxes = faces.get(sample.uid)
            blurred = 0
            if boxes and "jpg" in members:
                written["jpg"] = blur_face_boxes(members["jpg"], boxes)
                blurred = len(boxes)
            meta["face_bboxes"] = None if boxes is None else [list(map(float, b)) for b in boxes]
            meta["faces_blurred"] = blurred
        written["json"] = json.dumps(meta, indent=4).encode("utf-8")  # img2dataset's formatting
        caption = members["txt"].decode("utf-8", errors="replace") if "txt" in members else meta.get("caption")
        row = {
            "uid": sample.uid,
            "key": key,
            "caption": caption,
            "width": meta.get("width"),
            "height": meta.get("height"),
            "source_shard": sample.source_shard,
            "source_key": sample.source_key,
        }
        return written, row
