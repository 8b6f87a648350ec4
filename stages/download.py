"""Download stage: one shard of URLs -> one WebDataset tar + one manifest table, via img2dataset.

We call img2dataset's own ``Downloader`` (its thread pool, HTTP client, resizer and WebDataset
writer) on one shard at a time, rather than its ``download()`` entry point, because the runner
owns what img2dataset does not: scheduling on Ray with declared resources, atomic commit of the
shard, and an account of every input row. The gaps of img2dataset closed here:

- it fetches any URL urllib can open, wherever it points, for as long as the server trickles and
  however large the body: the shard's download runs with the guarded opener of
  ``core.net_guard`` installed (http(s) only, no loopback/private/link-local/... address
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
from importlib.metadata import version
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from core import net_guard
from core.net_guard import parse_network
from core.settings import config_section, network_problems, require
from manifests.schemas import schema_for
from stages.base import Resources, ShardOutput, ShardStage


@config_section
class DownloadConfig:
    """How the download stage calls img2dataset's downloader for each shard."""

    shard_size: int = 64
    thread_count: int = 16
    timeout_s: float = 2.0
    retries: int = 0
    image_size: int = 512
    resize_mode: str = "keep_ratio_largest"
    encode_quality: int = 95
    max_image_pixels: int = 40_000_000
    cpus_per_task: float = 1.0
    # The network guard (core/net_guard.py). URL lists are untrusted input: by default a host
    # that resolves to a loopback, private, link-local (cloud metadata), multicast or reserved
    # address is refused before connecting. allow_networks lets chosen networks through (CIDR).
    allow_networks: tuple[str, ...] = ()
    max_response_bytes: int = 32 * 1024 * 1024  # body cap: declared or streamed beyond it = failed
    request_deadline_s: float = 20.0  # whole request incl. redirects and body (timeout_s is per read)
    max_redirects: int = 5  # each hop is checked like the first request
    # A host's addresses are looked up once per this many seconds per worker process, not once
    # per URL (every address is still checked on every connection). 120 s sits inside the 60-300 s
    # TTLs image hosts and CDNs publish, so a renumbered host is followed within two minutes,
    # while a worker's stream of shards asks its resolver about each host ~once. 0 turns it off.
    dns_cache_ttl_s: float = 120.0

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        problems = require(
            (self.shard_size >= 1, "download.shard_size must be >= 1"),
            (self.thread_count >= 1, "download.thread_count must be >= 1"),
            (self.timeout_s > 0, "download.timeout_s must be > 0"),
            (self.retries >= 0, "download.retries must be >= 0"),
            (self.image_size >= 16, "download.image_size must be >= 16"),
            (self.resize_mode in {"no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"}, f"download.resize_mode {self.resize_mode!r} is not an img2dataset resize mode"),
            (self.max_image_pixels > 0, "download.max_image_pixels must be > 0"),
            (self.cpus_per_task > 0, "download.cpus_per_task must be > 0"),
            (self.max_response_bytes >= 1024, "download.max_response_bytes must be >= 1024 (bytes)"),
            (self.request_deadline_s > 0, "download.request_deadline_s must be > 0 (seconds)"),
            (0 <= self.max_redirects <= 20, "download.max_redirects must be within 0..20"),
            (self.dns_cache_ttl_s >= 0, "download.dns_cache_ttl_s must be >= 0 (seconds; 0 turns the cache off)"),
        )
        problems += network_problems(self.allow_networks, "download.allow_networks", parse_network)
        return problems

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
# Then urllib's, img2dataset's and Pillow's wording (after "HTTP Error NNN", which gives http_NNN).
_MESSAGE_RULES = (
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
# Every error_kind a manifest row can have, besides http_NNN (one per HTTP status).
ERROR_KINDS: tuple[str, ...] = tuple(sorted({kind for _, kind in _OWN_RULES + _MESSAGE_RULES} | {"other"}))


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
    for needle, kind in _MESSAGE_RULES:
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


class DownloadStage(ShardStage):
    """Downloads one shard of (uid, url, caption) rows with img2dataset's downloader."""

    name = "download"
    reads = ("url", "caption")
    output_schema = schema_for("download")
    status_column = "status"

    def __init__(self, config: DownloadConfig) -> None:
        self.config = config

    def resources(self, gpus_available: bool) -> Resources:
        """CPUs per shard task as configured; downloading never needs a GPU."""
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
            sample_writer_class=fail_fast_writer(WebDatasetSampleWriter),
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

    def process_shard(self, shard: str, inputs: pa.Table, work_dir: Path) -> ShardOutput:
        """Download ``inputs`` (uid, url, caption) as shard ``shard`` into ``work_dir``.

        Files by role: "tar" (img2dataset's WebDataset shard), "parquet" (its sidecar table),
        "stats" (its stats json). Rows whose URL is refused without a request (see
        ``refuse_urls``) are not given to img2dataset; they come back in the manifest as
        failures with their reason.
        """
        work_dir.mkdir(parents=True, exist_ok=True)
        refused = refuse_urls(inputs)
        fetch = inputs
        if refused:
            keep = [uid not in refused for uid in inputs.column("uid").to_pylist()]
            fetch = inputs.filter(pa.array(keep, pa.bool_()))
        input_path = work_dir / "input.feather"
        feather.write_feather(fetch.select(["url", "caption", "uid"]), input_path, compression="uncompressed")
        downloader = self._downloader(work_dir, fetch.num_rows)
        with net_guard.installed_opener(net_guard.NetPolicy.from_config(self.config)):
            downloader.download_shard((int(shard), str(input_path)))  # raises on shard-level failure
        files = {
            "tar": work_dir / f"{shard}.tar",
            "parquet": work_dir / f"{shard}.parquet",
            "stats": work_dir / f"{shard}_stats.json",
        }
        produced = pq.read_table(files["parquet"])
        return ShardOutput(
            manifest=self._manifest(inputs, produced, shard, refused),
            files=files,
            bytes_written=sum(path.stat().st_size for path in files.values()),
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
        # a retry's plan says which attempt each row is (manifests.schemas.RETRY_INPUT); a first fetch is 1
        attempts = rows.column("attempt").to_pylist() if "attempt" in rows.column_names else [1] * rows.num_rows
        for row, attempt in zip(rows.select(["uid", "url", "caption"]).to_pylist(), attempts):
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
                    "attempt": attempt,
                }
            )
        return pa.Table.from_pylist(out, schema=self.output_schema)


def fail_fast_writer(writer_class: type) -> type:
    """img2dataset's sample writer, made to stop the shard at its first failed write.

    img2dataset catches an exception from writing a sample, prints it and goes on with the next:
    after a full disk (``ENOSPC``) the tar's buffered file may keep half a member and write it
    later, so the shard would be committed with a tar that repeats some samples and lacks others.
    Here the first error sticks: later writes raise it again without touching the tar, and
    ``close`` (which img2dataset calls outside its per-sample ``try``) raises it, so the shard
    fails whole and a rerun downloads it again.
    """

    class FailFastSampleWriter(writer_class):  # type: ignore[misc, valid-type]
        first_error: Exception | None = None

        def write(self, *args: Any, **kwargs: Any) -> None:
            if self.first_error is not None:
                raise self.first_error
            try:
                super().write(*args, **kwargs)
            except Exception as err:
                self.first_error = err
                raise

        def close(self) -> None:
            try:
                super().close()
            except Exception as err:
                if self.first_error is None:
                    raise
                raise self.first_error from err
            if self.first_error is not None:
                raise self.first_error

    return FailFastSampleWriter


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
