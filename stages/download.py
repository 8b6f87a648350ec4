"""Download stage: one shard of URLs -> one WebDataset tar + one manifest table, via img2dataset.

We call img2dataset's own ``Downloader`` (its thread pool, HTTP client, resizer and WebDataset
writer) on one shard at a time, rather than its ``download()`` entry point, because the runner
owns what img2dataset does not: scheduling on Ray with declared resources, atomic commit of the
shard, and an account of every input row. Three gaps of img2dataset are closed here:

- it decodes with OpenCV, which accepts truncated JPEGs and decodes a decompression bomb before
  checking its size: a validating resizer checks the declared size and fully decodes with Pillow
  first, and records a reason;
- it drops a sample whose processing raises: every input uid missing from its output is added
  back as a failed row (``error_kind = dropped``);
- its error messages are free text: ``classify_error`` maps them to a short ``error_kind``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from manifests.schemas import schema_for
from pipeline.config import DownloadConfig
from stages.base import Resources

Image.MAX_IMAGE_PIXELS = None  # our own, configurable guard below replaces Pillow's warning

_FAILED = (None, None, None, None, None)


def classify_error(message: str | None) -> str | None:
    """A short, groupable reason for a failure message (None when there is no failure)."""
    if message is None:
        return None
    text = message.lower()
    http = re.search(r"http error (\d{3})", text)
    if http:
        return f"http_{http.group(1)}"
    rules = (
        ("timed out", "timeout"),
        ("decompression bomb", "decompression_bomb"),
        ("not an image", "not_an_image"),
        ("corrupt image", "corrupt_image"),
        ("image decoding error", "decode_error"),
        ("connection refused", "connection_refused"),
        ("name or service not known", "dns_error"),
        ("unknown url type", "invalid_url"),
        ("no host given", "invalid_url"),
        ("x-robots-tag", "disallowed"),
        ("dropped", "dropped"),
        ("image too small", "image_too_small"),
        ("image area too large", "image_too_large"),
        ("aspect ratio too large", "bad_aspect_ratio"),
        ("urlopen error", "connection_error"),
        ("remote end closed", "connection_error"),
        ("connection reset", "connection_error"),
    )
    for needle, kind in rules:
        if needle in text:
            return kind
    return "other"


class ValidatingResizer:
    """Wraps img2dataset's resizer: refuse bombs by declared size, and corrupt or non-image bytes."""

    def __init__(self, resizer: Any, max_pixels: int) -> None:
        self.resizer = resizer
        self.max_pixels = max_pixels

    def __call__(self, img_stream: BinaryIO, blurring_bbox_list: Any = None) -> tuple[Any, ...]:
        img_stream.seek(0)
        try:
            with Image.open(img_stream) as image:
                width, height = image.size  # read from the header; nothing decoded yet
                if width * height > self.max_pixels:
                    return _FAILED + (
                        f"decompression bomb: declared {width}x{height} exceeds {self.max_pixels} pixels",
                    )
                image.load()  # full decode: truncated data raises here
        except UnidentifiedImageError:
            return _FAILED + ("not an image: the bytes are not a known image format",)
        except Image.DecompressionBombError as err:
            return _FAILED + (f"decompression bomb: {err}",)
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            return _FAILED + (f"corrupt image: {err}",)
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


@dataclass
class ShardDownload:
    """What one shard's download produced, all inside the work folder the runner gave."""

    tar_path: Path
    sidecar_parquet: Path  # img2dataset's own per-shard parquet
    stats_path: Path
    manifest: pa.Table  # schema manifests.schemas.DOWNLOAD, one row per input row


class DownloadStage:
    """Downloads one shard of (uid, url, caption) rows with img2dataset's downloader."""

    name = "download"

    def __init__(self, config: DownloadConfig) -> None:
        self.config = config

    @property
    def resources(self) -> Resources:
        return Resources(cpus=self.config.cpus_per_task, batch_size=self.config.shard_size)

    def _downloader(self, work_dir: Path, n_rows: int) -> Any:
        from img2dataset.downloader import Downloader
        from img2dataset.resizer import Resizer
        from img2dataset.writer import WebDatasetSampleWriter

        cfg = self.config
        resizer = Resizer(
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            resize_only_if_bigger=True,
            encode_quality=cfg.encode_quality,
            encode_format="jpg",
        )
        return Downloader(
            sample_writer_class=WebDatasetSampleWriter,
            resizer=ValidatingResizer(resizer, cfg.max_image_pixels),
            thread_count=max(1, min(cfg.thread_count, n_rows)),
            save_caption=True,
            extract_exif=False,
            output_folder=str(work_dir),
            column_list=["url", "caption", "uid"],
            timeout=cfg.timeout_s,
            number_sample_per_shard=max(cfg.shard_size, 2),
            oom_shard_count=6,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format="jpg",
            retries=cfg.retries,
            user_agent_token="img2dataset",
            disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
        )

    def run_shard(self, rows: pa.Table, shard: str, work_dir: Path) -> ShardDownload:
        """Download ``rows`` (uid, url, caption) as shard ``shard`` into ``work_dir``."""
        work_dir.mkdir(parents=True, exist_ok=True)
        input_path = work_dir / "input.feather"
        feather.write_feather(rows.select(["url", "caption", "uid"]), input_path, compression="uncompressed")
        downloader = self._downloader(work_dir, rows.num_rows)
        downloader.download_shard((int(shard), str(input_path)))  # raises on shard-level failure
        sidecar = work_dir / f"{shard}.parquet"
        produced = pq.read_table(sidecar)
        return ShardDownload(
            tar_path=work_dir / f"{shard}.tar",
            sidecar_parquet=sidecar,
            stats_path=work_dir / f"{shard}_stats.json",
            manifest=self._manifest(rows, produced, shard),
        )

    def _manifest(self, rows: pa.Table, produced: pa.Table, shard: str) -> pa.Table:
        """One manifest row per input row, in input order; rows img2dataset lost become failures."""
        by_uid = {r["uid"]: r for r in produced.to_pylist()}
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        engine = f"img2dataset {version('img2dataset')}"
        out: list[dict[str, Any]] = []
        for row in rows.select(["uid", "url", "caption"]).to_pylist():
            got = by_uid.get(row["uid"])
            if got is None:
                status, error = "failed", "dropped: img2dataset returned no record for this sample"
                got = {}
            elif got["status"] == "success":
                status, error = "ok", None
            else:
                status, error = "failed", got.get("error_message") or got["status"]
            ok = status == "ok"
            out.append(
                {
                    "uid": row["uid"],
                    "url": row["url"],
                    "caption": row["caption"],
                    "status": status,
                    "error_kind": classify_error(error),
                    "error": error,
                    "shard": shard,
                    "key": got.get("key") if ok else None,
                    "width": got.get("width") if ok else None,
                    "height": got.get("height") if ok else None,
                    "original_width": got.get("original_width") if ok else None,
                    "original_height": got.get("original_height") if ok else None,
                    "sha256": got.get("sha256") if ok else None,
                    "download_engine": engine,
                    "downloaded_at": now,
                }
            )
        return pa.Table.from_pylist(out, schema=schema_for("download"))

