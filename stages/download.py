"""Download stage: one shard of URLs -> one WebDataset tar + one manifest table, via img2dataset.

We call img2dataset's own ``Downloader`` (its thread pool, HTTP client, resizer and WebDataset
writer) on one shard at a time, rather than its ``download()`` entry point, because the runner
owns what img2dataset does not: scheduling on Ray with declared resources, atomic commit of the
shard, and an account of every input row. The gaps of img2dataset closed here:

- it fetches any URL urllib can open, wherever it points, for as long as the server trickles and
  however large the body: the shard's download runs with the guarded opener of
  ``pipeline.net_guard`` installed (http(s) only, no loopback/private/link-local/... address
  unless ``download.allow_networks`` holds it, checked at every redirect before connecting; a
  deadline per request; a body cap);
- a URL that is missing or malformed, or of another scheme, is refused here without being
  handed to img2dataset at all (``invalid_url``, ``unsupported_scheme``): ``file://`` never
  reaches anything that could open a file;
- it decodes with OpenCV, which accepts truncated JPEGs and decodes a decompression bomb before
  checking its size: a validating resizer checks the declared size and fully decodes with Pillow
  first (web image formats only), and records a reason;
- it drops a sample whose processing raises: every input uid missing from its output is added
  back as a failed row (``error_kind = dropped``);
- its error messages are free text: ``classify_error`` maps them to a short ``error_kind``.

Content types are not trusted either way: the bytes decide. HTML served as ``image/jpeg`` fails
as ``not_an_image``; a real image served as ``text/html`` (misconfigured servers and CDNs do
that) is kept, since its bytes decode and validate like any other image.
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
from pipeline import net_guard
from pipeline.config import DownloadConfig
from stages.base import Resources

Image.MAX_IMAGE_PIXELS = None  # our own, configurable guard below replaces Pillow's warning

_FAILED = (None, None, None, None, None)
# Pillow decoders tried on downloaded bytes: the web's image formats. Others are refused unparsed
# (e.g. EPS would run Ghostscript; exotic decoders are where parser bugs live).
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # JPEG includes MPO (phone photos)

# Reasons the guard and this module write, first: their text is ours, so they match exactly, and
# they take precedence over what an HTTP status or urllib wording would suggest.
_OWN_RULES = (
    ("blocked address", "blocked_address"),
    ("unsupported scheme", "unsupported_scheme"),
    ("invalid url", "invalid_url"),
    ("response too large", "response_too_large"),
    ("deadline exceeded", "deadline_exceeded"),
    ("empty body", "empty_body"),
    ("infinite loop", "redirect_loop"),  # urllib: too many redirects, or the same URL again
    ("redirect loop", "redirect_loop"),
)


def classify_error(message: str | None) -> str | None:
    """A short, groupable reason for a failure message (None when there is no failure)."""
    if message is None:
        return None
    text = message.lower()
    for needle, kind in _OWN_RULES:
        if needle in text:
            return kind
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
        ("temporary failure in name resolution", "dns_error"),
        ("unknown url type", "invalid_url"),
        ("no host given", "invalid_url"),
        ("nonnumeric port", "invalid_url"),
        ("can't contain control characters", "invalid_url"),
        ("x-robots-tag", "disallowed"),
        ("incompleteread", "truncated_body"),  # the connection closed before Content-Length bytes came
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
    """Wraps img2dataset's resizer: refuse bombs by declared size, and empty, corrupt or non-image bytes.

    The declared size is read from the header (PNG IHDR, GIF screen/frame descriptor, JPEG SOF,
    ...) before any pixel is decoded, so a 100000 x 100000 PNG costs a few bytes, not 30 GB.
    """

    def __init__(self, resizer: Any, max_pixels: int) -> None:
        self.resizer = resizer
        self.max_pixels = max_pixels

    def __call__(self, img_stream: BinaryIO, blurring_bbox_list: Any = None) -> tuple[Any, ...]:
        img_stream.seek(0, 2)
        if img_stream.tell() == 0:
            return _FAILED + ("empty body: the server sent no bytes",)
        img_stream.seek(0)
        try:
            with Image.open(img_stream, formats=ACCEPTED_FORMATS) as image:
                width, height = image.size  # read from the header; nothing decoded yet
                if width * height > self.max_pixels:
                    return _FAILED + (
                        f"decompression bomb: declared {width}x{height} exceeds {self.max_pixels} pixels",
                    )
                image.load()  # full decode: truncated data raises here
        except UnidentifiedImageError:
            return _FAILED + (f"not an image: the bytes are none of {', '.join(ACCEPTED_FORMATS)}",)
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
        """Download ``rows`` (uid, url, caption) as shard ``shard`` into ``work_dir``.

        Rows whose URL is refused without a request (see ``refuse_urls``) are not given to
        img2dataset; they come back in the manifest as failures with their reason.
        """
        work_dir.mkdir(parents=True, exist_ok=True)
        refused = refuse_urls(rows)
        fetch = rows
        if refused:
            keep = [uid not in refused for uid in rows.column("uid").to_pylist()]
            fetch = rows.filter(pa.array(keep, pa.bool_()))
        input_path = work_dir / "input.feather"
        feather.write_feather(fetch.select(["url", "caption", "uid"]), input_path, compression="uncompressed")
        downloader = self._downloader(work_dir, fetch.num_rows)
        with net_guard.installed_opener(net_guard.NetPolicy.from_config(self.config)):
            downloader.download_shard((int(shard), str(input_path)))  # raises on shard-level failure
        sidecar = work_dir / f"{shard}.parquet"
        produced = pq.read_table(sidecar)
        return ShardDownload(
            tar_path=work_dir / f"{shard}.tar",
            sidecar_parquet=sidecar,
            stats_path=work_dir / f"{shard}_stats.json",
            manifest=self._manifest(rows, produced, shard, refused),
        )

    def _manifest(
        self, rows: pa.Table, produced: pa.Table, shard: str, refused: dict[str, str] | None = None
    ) -> pa.Table:
        """One manifest row per input row, in input order; rows img2dataset lost become failures."""
        refused = refused or {}
        by_uid = {r["uid"]: r for r in produced.to_pylist()}
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        engine = f"img2dataset {version('img2dataset')}"
        out: list[dict[str, Any]] = []
        for row in rows.select(["uid", "url", "caption"]).to_pylist():
            got = by_uid.get(row["uid"])
            if row["uid"] in refused:
                status, error = "failed", refused[row["uid"]]
                got = {}
            elif got is None:
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



def refuse_urls(rows: pa.Table) -> dict[str, str]:
    """uid -> reason for every row whose URL is refused before any request (no network, no files).

    Missing, empty and malformed URLs, and schemes other than http(s), never reach img2dataset:
    urllib would open ``file://`` and ``data:`` itself, and fail on the others with messages
    that do not say what was wrong.
    """
    refused: dict[str, str] = {}
    for uid, url in zip(rows.column("uid").to_pylist(), rows.column("url").to_pylist()):
        try:
            net_guard.check_url(url)
        except net_guard.DownloadRefused as err:
            refused[uid] = str(err)
    return refused
