"""Hostile and broken inputs to the download stage, over real HTTP on 127.0.0.1 with real img2dataset.

A threaded test server serves every fault a crawl meets (bombs, empty and truncated bodies, lying
content types, redirect loops, trickling and endless responses); the URL list adds malformed URLs,
other schemes and addresses a crawler must never reach. Each case must come back as exactly one
manifest row with its reason, and nothing else may be lost or duplicated.

Safety net: while a test watches (``watching()``), an audit hook records every ``socket.connect``
of this process and *refuses* any that is not to 127.0.0.0/8 or ::1, so these tests cannot send a
packet anywhere else even if the guard under test were broken; the recorded list is then asserted
on. (The Ray test's connections happen in Ray workers, outside the hook; it only uses URLs the
guard refuses statically or by literal address, or the loopback server.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import io
import ipaddress
import json
import socket
import struct
import sys
import tarfile
import threading
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from core import net_guard
from pipeline.config import ConfigError, DatasetConfig, DownloadConfig, load_config
from pipeline.download_runner import make_uid
from sources import DatasetSource
from sources.url_list import read_url_list
from stages.download import DownloadStage, classify_error

# ---------------------------------------------------------------------------
# The safety net: an audit hook over this process's sockets and file opens
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Watch:
    connects: list[Any] = dataclasses.field(default_factory=list)  # every connect attempted
    lookups: list[str] = dataclasses.field(default_factory=list)  # every getaddrinfo host
    opened: list[str] = dataclasses.field(default_factory=list)  # every file opened
    active: bool = False


_WATCH = _Watch()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _WATCH.active:
        return
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple):
            _WATCH.connects.append(address)
            if not _is_loopback(str(address[0])):
                raise RuntimeError(f"test safety net: refused a connection to {address} (not loopback)")
    elif event == "socket.getaddrinfo":
        _WATCH.lookups.append(str(args[0]))
    elif event == "open" and isinstance(args[0], (str, bytes, Path)):
        _WATCH.opened.append(str(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed; it does nothing while no test watches


@contextlib.contextmanager
def watching() -> Iterator[_Watch]:
    _WATCH.connects.clear()
    _WATCH.lookups.clear()
    _WATCH.opened.clear()
    _WATCH.active = True
    try:
        yield _WATCH
    finally:
        _WATCH.active = False


# ---------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------


def _image(fmt: str, size: tuple[int, int] = (96, 64), colour: str = "red") -> bytes:
    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).ellipse((8, 8, size[0] // 2, size[1] - 8), fill="blue")
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb() -> bytes:
    """A PNG whose header declares 100000 x 100000 pixels (30 GB decoded) in a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _png_chunk(b"IEND", b""))


def gif_bomb() -> bytes:
    """A valid small GIF whose logical screen is patched to 65535 x 65535."""
    data = bytearray(_image("GIF"))
    data[6:10] = b"\xff\xff\xff\xff"
    return bytes(data)


def jpeg_bomb() -> bytes:
    """A valid small JPEG whose SOF0 frame header is patched to 65000 x 65000."""
    data = bytearray(_image("JPEG"))
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


JPEGS = [_image("JPEG", (96 + 16 * i, 64), c) for i, c in enumerate(["red", "green", "orange", "purple"])]
PNG = _image("PNG", (120, 90), "white")
GIF = _image("GIF", (80, 60), "yellow")
HTML = b"<!DOCTYPE html><html><body><h1>Not an image</h1></body></html>"
CAP = 1 << 20  # max_response_bytes of these tests: 1 MiB
TRICKLE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % len(JPEGS[0]))


# ---------------------------------------------------------------------------
# The hostile server
# ---------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the default backlog of 5 drops connects of 16 concurrent requests


class HostileServer:
    """A threaded HTTP server on 127.0.0.1 serving good images and every fault; counts requests.

    Every handler ends within a few seconds on its own (trickles and streams are bounded), so a
    client that never gives up cannot keep the test alive either.
    """

    MAX_HANDLER_SECONDS = 5.0

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self.port = self._server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def total(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str = "image/jpeg", headers: dict[str, str] | None = None,
                      length: int | None = -1) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                if length is not None:
                    self.send_header("Content-Length", str(len(body) if length == -1 else length))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def _redirect(self, location: str, code: int = 302) -> None:
                self._send(code, b"", "text/plain", {"Location": location})

            def _stream(self, total: int, chunked: bool) -> None:
                """Up to ``total`` bytes without a Content-Length, until the client hangs up."""
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                block = b"\xff" * 65536
                end = time.monotonic() + outer.MAX_HANDLER_SECONDS
                sent = 0
                while sent < total and time.monotonic() < end:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                    sent += len(block)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")

            def _trickle(self, data: bytes, start: int = 0) -> None:
                """Send ``data[:start]`` at once, then the rest a byte per 0.2 s: every gap is far
                below the 1.5 s read timeout, so only a deadline can stop it (bounded here too)."""
                end = time.monotonic() + outer.MAX_HANDLER_SECONDS
                self.wfile.write(data[:start])
                self.wfile.flush()
                for i in range(start, len(data)):
                    if time.monotonic() > end:
                        return
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                with outer._lock:
                    outer.requests[path] += 1
                self.close_connection = True
                try:
                    self._route(path)
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
                    pass

            def _route(self, path: str) -> None:  # noqa: C901 - one table of faults
                base = outer.base
                if path.startswith("/good/"):
                    i = int(path.rsplit("/", 1)[-1].split(".")[0])
                    return self._send(200, JPEGS[i % len(JPEGS)])
                routes: dict[str, Any] = {
                    "/good.png": lambda: self._send(200, PNG, "image/png"),
                    "/good.gif": lambda: self._send(200, GIF, "image/gif"),
                    "/caf%C3%A9.jpg": lambda: self._send(200, JPEGS[3]),
                    "/image-as-html.jpg": lambda: self._send(200, JPEGS[1], "text/html; charset=utf-8"),
                    "/html-as-jpeg.jpg": lambda: self._send(200, HTML, "image/jpeg"),
                    "/empty.jpg": lambda: self._send(200, b""),
                    "/truncated.jpg": lambda: self._send(200, JPEGS[0][: len(JPEGS[0]) // 2]),
                    "/truncated.png": lambda: self._send(200, PNG[: len(PNG) // 2], "image/png"),
                    "/truncated.gif": lambda: self._send(200, GIF[: len(GIF) // 2], "image/gif"),
                    "/short-body.jpg": lambda: self._send(200, JPEGS[0][:100], length=len(JPEGS[0])),
                    "/bomb.png": lambda: self._send(200, png_bomb(), "image/png"),
                    "/bomb.gif": lambda: self._send(200, gif_bomb(), "image/gif"),
                    "/bomb.jpg": lambda: self._send(200, jpeg_bomb()),
                    "/missing.jpg": lambda: self._send(404, b"not found", "text/plain"),
                    "/loop": lambda: self._redirect("/loop"),
                    "/redirect-ok": lambda: self._redirect(f"{base}/good/2.jpg", 301),
                    "/redirect-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data/"),
                    "/redirect-private": lambda: self._redirect("http://10.0.0.1/admin", 307),
                    "/redirect-localhost-v6": lambda: self._redirect(f"http://[::1]:{outer.port}/good/0.jpg"),
                    "/redirect-file": lambda: self._redirect(f"file://{outer.canary}"),
                    "/redirect-ftp": lambda: self._redirect("ftp://127.0.0.1/x.jpg"),
                    "/huge-declared.jpg": lambda: self._send(200, b"\xff" * 1024, length=10 * 1024**3),
                    "/huge-stream.jpg": lambda: self._stream(4 * CAP, chunked=False),
                    "/huge-chunked.jpg": lambda: self._stream(4 * CAP, chunked=True),
                    "/trickle-body.jpg": lambda: self._trickle(TRICKLE_HEAD + JPEGS[0], len(TRICKLE_HEAD)),
                    "/trickle-headers.jpg": lambda: self._trickle(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"),
                    "/slow-first-byte.jpg": lambda: (time.sleep(4.0), self._send(200, JPEGS[0])),
                }
                if path.startswith("/chain/"):
                    n = int(path.rsplit("/", 1)[-1])
                    return self._redirect(f"/chain/{n + 1}")
                handler = routes.get(path)
                if handler is None:
                    return self._send(404, b"not found", "text/plain")
                handler()

        return Handler

    canary = ""  # a real image file on disk that file:// URLs name; set by the fixture


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[HostileServer]:
    canary = tmp_path_factory.mktemp("canary") / "canary.jpg"
    canary.write_bytes(JPEGS[0])  # a valid image: if file:// were ever read, that row would be "ok"
    with HostileServer() as srv:
        srv.canary = str(canary)
        yield srv


def _config(**overrides: Any) -> DownloadConfig:
    values: dict[str, Any] = dict(
        shard_size=256, thread_count=16, timeout_s=1.5, retries=0, request_deadline_s=3.0,
        max_response_bytes=CAP, allow_networks=("127.0.0.1/32",),
    )
    values.update(overrides)
    config = DownloadConfig(**values)
    config.validate()
    return config


def _rows(cases: list[tuple[Any, str]]) -> pa.Table:
    return pa.table({
        "uid": [make_uid(url or "", caption) for url, caption in cases],
        "url": pa.array([url for url, _ in cases], pa.string()),
        "caption": [caption for _, caption in cases],
    })


def _run(config: DownloadConfig, rows: pa.Table, work: Path) -> tuple[list[dict[str, Any]], float, Path]:
    started = time.monotonic()
    result = DownloadStage(config).process_shard("000000", rows, work)
    return result.manifest.to_pylist(), time.monotonic() - started, result.files["tar"]


# ---------------------------------------------------------------------------
# Every hostile input, one shard, the real stage
# ---------------------------------------------------------------------------

LONG_CAPTION = "a very long caption " * 5_000  # 100 KB


def hostile_cases(srv: HostileServer) -> list[tuple[Any, str, str]]:
    """(url, caption, expected error_kind or "ok")."""
    b = srv.base
    data_png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    return [
        # good ones, and good ones in odd clothes
        (f"{b}/good/0.jpg", "a red picture", "ok"),
        (f"{b}/good/1.jpg", "a green picture", "ok"),
        (f"{b}/good/1.jpg", "the same URL with another caption: another sample", "ok"),
        (f"{b}/good.png", "a png", "ok"),
        (f"{b}/good.gif", "a gif", "ok"),
        (f"{b}/image-as-html.jpg", "an image served as text/html", "ok"),
        (f"{b}/redirect-ok", "a redirect to a good image", "ok"),
        (f"{b}/café.jpg", "a non-ASCII path", "ok"),
        (f"{b}/good/3.jpg", LONG_CAPTION, "ok"),
        (f"{b}/good/0.jpg?caption=odd", "caption with \u0000 NUL, emoji \U0001f99c, RTL \u202e and \ufffd", "ok"),
        # broken bodies
        (f"{b}/html-as-jpeg.jpg", "HTML served as image/jpeg", "not_an_image"),
        (f"{b}/empty.jpg", "zero bytes", "empty_body"),
        (f"{b}/truncated.jpg", "half a JPEG", "corrupt_image"),
        (f"{b}/truncated.png", "half a PNG", "corrupt_image"),
        (f"{b}/truncated.gif", "half a GIF", "corrupt_image"),
        (f"{b}/short-body.jpg", "a body shorter than its Content-Length", "truncated_body"),
        (f"{b}/bomb.png", "PNG declaring 100000x100000", "decompression_bomb"),
        (f"{b}/bomb.gif", "GIF declaring 65535x65535", "decompression_bomb"),
        (f"{b}/bomb.jpg", "JPEG declaring 65000x65000", "decompression_bomb"),
        (f"{b}/missing.jpg", "a 404", "http_404"),
        # redirects
        (f"{b}/loop", "a redirect to itself", "redirect_loop"),
        (f"{b}/chain/0", "an endless chain of redirects", "redirect_loop"),
        (f"{b}/redirect-metadata", "a redirect to the cloud metadata address", "blocked_address"),
        (f"{b}/redirect-private", "a redirect to 10.0.0.1", "blocked_address"),
        (f"{b}/redirect-localhost-v6", "a redirect to [::1] (not allowlisted)", "blocked_address"),
        (f"{b}/redirect-file", "a redirect to file://", "unsupported_scheme"),
        (f"{b}/redirect-ftp", "a redirect to ftp://", "unsupported_scheme"),
        # slow and enormous
        (f"{b}/trickle-body.jpg", "a body at 5 bytes/s: the 3 s deadline", "deadline_exceeded"),
        (f"{b}/trickle-headers.jpg", "headers at 5 bytes/s", "deadline_exceeded"),
        (f"{b}/slow-first-byte.jpg", "nothing for 4 s: the 1.5 s read timeout", "timeout"),
        (f"{b}/huge-declared.jpg", "Content-Length 10 GiB", "response_too_large"),
        (f"{b}/huge-stream.jpg", "4 MiB without Content-Length", "response_too_large"),
        (f"{b}/huge-chunked.jpg", "4 MiB chunked", "response_too_large"),
        # addresses a crawler must not reach (literal addresses: refused before any connect)
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata", "blocked_address"),
        ("http://10.0.0.1/", "RFC1918 10/8", "blocked_address"),
        ("http://172.16.0.1/", "RFC1918 172.16/12", "blocked_address"),
        ("http://192.168.1.1/", "RFC1918 192.168/16", "blocked_address"),
        ("http://100.64.0.1/", "shared address space", "blocked_address"),
        (f"http://[::1]:{srv.port}/good/0.jpg", "IPv6 loopback, not allowlisted", "blocked_address"),
        ("http://[fe80::1]/", "IPv6 link-local", "blocked_address"),
        ("http://[fd00::1]/", "IPv6 unique local", "blocked_address"),
        ("http://[::ffff:169.254.169.254]/", "metadata as IPv4-mapped IPv6", "blocked_address"),
        ("http://[64:ff9b::a9fe:a9fe]/", "metadata through NAT64", "blocked_address"),
        ("http://224.0.0.1/", "multicast", "blocked_address"),
        (f"http://0.0.0.0:{srv.port}/good/0.jpg", "unspecified (Linux connects it to this host)", "blocked_address"),
        ("https://169.254.169.254/", "metadata over https", "blocked_address"),
        # other schemes: refused without touching the filesystem or the network
        (f"file://{srv.canary}", "a local file that is a valid image", "unsupported_scheme"),
        ("file:///etc/passwd", "a local file", "unsupported_scheme"),
        ("ftp://127.0.0.1/x.jpg", "ftp", "unsupported_scheme"),
        ("gopher://127.0.0.1:70/_", "gopher", "unsupported_scheme"),
        (data_png, "a data: URL holding a valid PNG", "unsupported_scheme"),
        ("javascript:alert(1)", "javascript", "unsupported_scheme"),
        # malformed
        (None, "a null URL", "invalid_url"),
        ("", "an empty URL", "invalid_url"),
        ("   ", "a blank URL", "invalid_url"),
        ("http://", "no host", "invalid_url"),
        ("http:///nohost.jpg", "no host either", "invalid_url"),
        ("http://[::1", "an unclosed IPv6 bracket", "invalid_url"),
        ("ht!tp://x", "a broken scheme", "invalid_url"),
        ("http://exa mple.com/a.jpg", "a space in the host", "invalid_url"),
        (f"{b}/a b.jpg", "a space in the path", "invalid_url"),
        (f"{b}/a\nb.jpg", "a newline (header injection)", "invalid_url"),
        ("http://127.0.0.1:99999/a.jpg", "a port out of range", "invalid_url"),
        (f"http://user:secret@127.0.0.1:{srv.port}/creds.jpg", "credentials in the URL", "invalid_url"),
        ("//127.0.0.1/relative.jpg", "scheme-relative", "invalid_url"),
    ]


def test_every_hostile_input_is_one_failed_row_with_its_reason(server: HostileServer, tmp_path: Path) -> None:
    cases = hostile_cases(server)
    rows = _rows([(url, caption) for url, caption, _ in cases])
    before = server.total()
    with watching() as watch:
        manifest, elapsed, tar_path = _run(_config(), rows, tmp_path / "work")

    # one row per input row, in input order: nothing lost, nothing duplicated
    assert [r["uid"] for r in manifest] == rows.column("uid").to_pylist()
    assert len({r["uid"] for r in manifest}) == len(cases)
    got = Counter()
    for (url, caption, expected), row in zip(cases, manifest):
        assert row["url"] == url and row["caption"] == caption
        if expected == "ok":
            assert row["status"] == "ok", (url, row["error"])
            assert row["error"] is None and row["error_kind"] is None and row["width"] > 0 and len(row["sha256"]) == 64
        else:
            assert row["status"] == "failed", (url, expected)
            assert row["error_kind"] == expected, (url, row["error_kind"], row["error"])
            assert row["error"] and row["key"] is None and row["sha256"] is None
        got[row["error_kind"] or "ok"] += 1
    assert got == Counter(expected for _, _, expected in cases)

    # the good ones are in the tar, with their captions (the 100 KB one whole), and only they
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        texts = {Path(m.name).stem: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}
    ok = [r for r in manifest if r["status"] == "ok"]
    assert sorted(Path(n).stem for n in names if n.endswith(".jpg")) == sorted(r["key"] for r in ok)
    assert LONG_CAPTION in texts.values()

    # the messages say what happened
    by_caption = {r["caption"]: r for r in manifest}
    assert "[at redirect hop 1]" in by_caption["a redirect to the cloud metadata address"]["error"]
    assert "169.254.169.254" in by_caption["a redirect to the cloud metadata address"]["error"]
    assert "link-local" in by_caption["cloud metadata"]["error"]
    assert "Content-Length 10737418240" in by_caption["Content-Length 10 GiB"]["error"]

    # nothing but the loopback server was ever connected to; no local file was read
    assert watch.connects, "the good URLs must have connected"
    assert {c[0] for c in watch.connects} == {"127.0.0.1"}, watch.connects
    assert not any(p.startswith(server.canary) or p == "/etc/passwd" for p in watch.opened)
    for literal in ("169.254.169.254", "10.0.0.1", "::1", "0.0.0.0", "224.0.0.1"):
        assert literal in watch.lookups  # the guard did resolve and check them ...
        assert all(c[0] != literal for c in watch.connects)  # ... and never connected
    assert server.requests["/creds.jpg"] == 0 and server.requests["/a b.jpg"] == 0
    assert server.requests["/redirect-metadata"] == 1
    assert server.requests["/chain/5"] == 1 and server.requests["/chain/6"] == 0  # max_redirects = 5
    assert server.total() - before < 2 * len(cases)

    # the slow ones were cut off by the deadline, not left hanging
    assert elapsed < 20, elapsed  # bounded (a hang would be minutes); the kinds above are the precise check


def test_without_an_allowlist_loopback_is_refused_before_any_request(server: HostileServer, tmp_path: Path) -> None:
    """The default config: the test server on 127.0.0.1 is not reachable by any spelling of it."""
    port = server.port
    spellings = [
        f"http://127.0.0.1:{port}/good/0.jpg",
        f"http://localhost:{port}/good/0.jpg",
        f"http://LOCALHOST:{port}/good/0.jpg",  # /etc/hosts: no DNS query
        f"http://[::1]:{port}/good/0.jpg",
        f"http://0.0.0.0:{port}/good/0.jpg",
        f"http://0:{port}/good/0.jpg",
        f"http://2130706433:{port}/good/0.jpg",
        f"http://0x7f.1:{port}/good/0.jpg",
        f"http://127.1:{port}/good/0.jpg",
        f"http://017700000001:{port}/good/0.jpg",
        f"http://[::ffff:127.0.0.1]:{port}/good/0.jpg",
        f"https://127.0.0.1:{port}/good/0.jpg",
        f"http://127.0.0.1:{port}/redirect-ok",
    ]
    for spelling in spellings:  # numeric spellings must parse without DNS, or the test would query it
        host = spelling.split("//", 1)[1].rsplit(":", 1)[0].strip("[]")
        if "localhost" not in host.lower():
            socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    rows = _rows([(u, f"spelling {i}") for i, u in enumerate(spellings)])
    config = dataclasses.replace(_config(), allow_networks=())
    before = server.total()
    with watching() as watch:
        manifest, elapsed, _ = _run(config, rows, tmp_path / "work")
    assert len(manifest) == len(spellings)
    for url, row in zip(spellings, manifest):
        assert row["status"] == "failed" and row["error_kind"] == "blocked_address", (url, row["error"])
    assert server.total() == before, "the server must receive zero requests"
    assert watch.connects == []
    assert elapsed < 10, elapsed  # img2dataset's own start-up; no request waited on anything


def test_a_shard_of_only_refused_urls_still_commits(tmp_path: Path) -> None:
    """Nothing left for img2dataset: it still writes an empty tar and sidecar; every row is accounted for."""
    rows = _rows([(None, "null"), ("file:///etc/passwd", "file"), ("http://[::1", "bracket")])
    with watching() as watch:
        manifest, _, tar_path = _run(_config(), rows, tmp_path / "work")
    assert [(r["status"], r["error_kind"]) for r in manifest] == [
        ("failed", "invalid_url"), ("failed", "unsupported_scheme"), ("failed", "invalid_url")]
    with tarfile.open(tar_path) as tar:
        assert tar.getnames() == []
    assert watch.connects == [] and "/etc/passwd" not in watch.opened


def test_redirect_to_metadata_is_refused_at_the_hop_before_connecting(server: HostileServer) -> None:
    policy = net_guard.NetPolicy(allow_networks=net_guard.parse_networks(["127.0.0.1/32"]), request_deadline_s=3.0)
    before = server.requests["/redirect-metadata"]
    with watching() as watch:
        started = time.monotonic()
        with pytest.raises(net_guard.BlockedAddress, match=r"169\.254\.169\.254 is a link-local address.*redirect hop 1"):
            net_guard.guarded_urlopen(f"{server.base}/redirect-metadata", policy, timeout=1.5)
        elapsed = time.monotonic() - started
    assert server.requests["/redirect-metadata"] == before + 1
    assert [c[0] for c in watch.connects] == ["127.0.0.1"]  # the first hop only
    assert "169.254.169.254" in watch.lookups
    assert elapsed < 2.0  # refused, not waited on


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, made here (cryptography), and its key."""
    crypto = pytest.importorskip("cryptography")
    del crypto
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_goes_to_the_checked_address_with_the_name_verified(tmp_path: Path) -> None:
    """TLS over the guard's pre-connected socket: SNI and certificate checks still use the URL's name."""
    import ssl

    cert, key = _self_signed(tmp_path)
    with HostileServer() as srv:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        srv._server.socket = server_ctx.wrap_socket(srv._server.socket, server_side=True)
        trust = ssl.create_default_context(cafile=str(cert))
        allow = net_guard.NetPolicy(allow_networks=net_guard.parse_networks(["127.0.0.1/32"]), request_deadline_s=3.0)
        with watching() as watch:
            for host in ("127.0.0.1", "localhost"):
                with net_guard.guarded_urlopen(f"https://{host}:{srv.port}/good/1.jpg", allow, 2.0, trust) as r:
                    assert r.read() == JPEGS[1]
            with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # system CAs only
                net_guard.guarded_urlopen(f"https://127.0.0.1:{srv.port}/good/1.jpg", allow, 2.0)
            with pytest.raises(net_guard.BlockedAddress):
                net_guard.guarded_urlopen(f"https://localhost:{srv.port}/good/1.jpg", net_guard.NetPolicy(), 2.0, trust)
        assert srv.requests["/good/1.jpg"] == 2
        assert {c[0] for c in watch.connects} == {"127.0.0.1"} and len(watch.connects) == 3


# ---------------------------------------------------------------------------
# The guard's pure parts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("address, reasons", [
    ("127.0.0.1", {"loopback"}), ("127.255.0.9", {"loopback"}), ("::1", {"loopback"}),
    ("10.0.0.1", {"private"}), ("172.16.0.1", {"private"}), ("172.31.255.255", {"private"}),
    ("192.168.1.1", {"private"}), ("fc00::1", {"private"}), ("fd12:3456::1", {"private"}),
    ("169.254.169.254", {"link-local"}), ("fe80::1", {"link-local"}),
    ("224.0.0.1", {"multicast"}), ("239.255.255.250", {"multicast"}), ("ff02::1", {"multicast"}),
    ("0.0.0.0", {"unspecified"}), ("::", {"unspecified"}),
    ("240.0.0.1", {"private", "reserved"}), ("255.255.255.255", {"private", "reserved"}),  # Python versions differ
    ("100.64.0.1", {"not globally routable", "private"}),  # shared address space (carrier NAT)
    ("192.0.2.1", {"private", "not globally routable"}),  # documentation
    ("::ffff:127.0.0.1", {"loopback (as 127.0.0.1 inside IPv6)"}),
    ("::ffff:169.254.169.254", {"link-local (as 169.254.169.254 inside IPv6)"}),
    ("64:ff9b::a9fe:a9fe", {"link-local (as 169.254.169.254 inside IPv6)"}),  # NAT64
    ("2002:a00:1::", {"private (as 10.0.0.1 inside IPv6)"}),  # 6to4
])
def test_blocked_reason_names_the_category(address: str, reasons: set[str]) -> None:
    ip = ipaddress.ip_address(address)
    assert net_guard.blocked_reason(ip) in reasons
    with pytest.raises(net_guard.BlockedAddress, match="blocked address"):
        net_guard.check_address(ip, ())


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert net_guard.blocked_reason(ip) is None
    net_guard.check_address(ip, ())


def test_allowlist_lets_exactly_its_networks_through() -> None:
    allow = net_guard.parse_networks(["127.0.0.1/32", "10.1.0.0/16"])
    for ok in ("127.0.0.1", "10.1.2.3", "::ffff:127.0.0.1"):
        net_guard.check_address(ipaddress.ip_address(ok), allow)
    for refused in ("127.0.0.2", "10.2.0.1", "::1", "169.254.169.254"):
        with pytest.raises(net_guard.BlockedAddress):
            net_guard.check_address(ipaddress.ip_address(refused), allow)


def test_resolve_checked_refuses_before_connecting() -> None:
    """Resolution of literals and localhost only (no DNS query leaves the machine); no connect at all."""
    with watching() as watch:
        for host in ("169.254.169.254", "10.0.0.1", "192.168.1.1", "::1", "224.0.0.1", "0.0.0.0", "localhost",
                     "2130706433", "fe80::1"):
            with pytest.raises(net_guard.BlockedAddress, match="blocked address"):
                net_guard.resolve_checked(host, 80, ())
        infos = net_guard.resolve_checked("localhost", 80, net_guard.parse_networks(["127.0.0.0/8"]))
    assert {i[4][0] for i in infos} <= {"127.0.0.1"}
    assert watch.connects == []


def test_every_resolved_address_must_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with one allowed and one blocked address is refused (the resolver is the only stand-in)."""
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
    monkeypatch.setattr(net_guard.socket, "getaddrinfo", lambda *a, **k: answers)
    with pytest.raises(net_guard.BlockedAddress, match="169.254.169.254"):
        net_guard.resolve_checked("rebinding.example", 80, net_guard.parse_networks(["127.0.0.1/32"]))


@pytest.mark.parametrize("url, kind", [
    (None, net_guard.InvalidURL), ("", net_guard.InvalidURL), ("http://", net_guard.InvalidURL),
    ("http://[::1", net_guard.InvalidURL), ("ht!tp://x", net_guard.InvalidURL), ("http://a b/", net_guard.InvalidURL),
    ("http://x:99999/", net_guard.InvalidURL), ("http://u:p@x/", net_guard.InvalidURL), (b"http://x/", net_guard.InvalidURL),
    ("http://x/\ud800", net_guard.InvalidURL), ("http://x/\t", net_guard.InvalidURL),
    ("file:///etc/passwd", net_guard.UnsupportedScheme), ("FILE:///etc/passwd", net_guard.UnsupportedScheme),
    ("ftp://x/", net_guard.UnsupportedScheme), ("gopher://x/", net_guard.UnsupportedScheme),
    ("data:,hello", net_guard.UnsupportedScheme),
])
def test_check_url_refuses(url: Any, kind: type) -> None:
    with pytest.raises(kind) as err:
        net_guard.check_url(url)
    assert classify_error(str(err.value)) in {"invalid_url", "unsupported_scheme"}


@pytest.mark.parametrize("url", ["http://example.com/a.jpg", "HTTPS://Example.com:8443/a.jpg?x=1#f",
                                 "http://例え.jp/画像.jpg", "http://[2001:db8::1]/a.jpg"])
def test_check_url_accepts(url: str) -> None:
    assert net_guard.check_url(url) == url


def test_international_urls_are_sent_encoded() -> None:
    opener = net_guard.build_guarded_opener(net_guard.NetPolicy())
    handler = next(h for h in opener.handlers if isinstance(h, net_guard.GuardedHTTPHandler))
    req = handler.http_request(urllib.request.Request("http://例え.jp:8080/画像 1.jpg?q=ü".replace(" ", "%20")))
    assert req.selector == "/%E7%94%BB%E5%83%8F%201.jpg?q=%C3%BC"
    assert req.unredirected_hdrs["Host"] == "xn--r8jz45g.jp:8080"


def test_the_opener_has_no_file_ftp_or_data_handler(tmp_path: Path) -> None:
    canary = tmp_path / "canary.txt"
    canary.write_text("secret")
    opener = net_guard.build_guarded_opener(net_guard.NetPolicy())
    with watching() as watch:
        for url in (canary.as_uri(), "data:,hello", "ftp://127.0.0.1/x"):
            with pytest.raises((net_guard.DownloadRefused, urllib.error.URLError)):
                opener.open(url, timeout=1)
    assert str(canary) not in watch.opened and watch.connects == []


def test_installed_opener_is_removed_afterwards() -> None:
    previous = urllib.request._opener  # type: ignore[attr-defined]
    with net_guard.installed_opener(net_guard.NetPolicy()) as opener:
        assert urllib.request._opener is opener  # type: ignore[attr-defined]
    assert urllib.request._opener is previous  # type: ignore[attr-defined]


def test_classify_error_of_the_guard_messages() -> None:
    assert classify_error("blocked address: '169.254.169.254' is a link-local address") == "blocked_address"
    assert classify_error("deadline exceeded: the response was not complete within 2 s") == "deadline_exceeded"
    assert classify_error("response too large: Content-Length 9 exceeds 1 bytes") == "response_too_large"
    assert classify_error("unsupported scheme 'file': only http and https are fetched") == "unsupported_scheme"
    assert classify_error("empty body: the server sent no bytes") == "empty_body"
    assert classify_error("HTTP Error 302: The HTTP server returned a redirect error that would lead to an "
                          "infinite loop.\nThe last 30x error message was:\nFound") == "redirect_loop"
    assert classify_error("HTTP Error 404: Not Found") == "http_404"


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("toml, message", [
    ('[download]\nallow_networks = ["10.0.0.5/8"]\n', "download.allow_networks: '10.0.0.5/8' is not a network.*did you mean '10.0.0.0/8'"),
    ('[download]\nallow_networks = ["localhost"]\n', "download.allow_networks: 'localhost' is not a network"),
    ('[download]\nallow_networks = "127.0.0.1/32"\n', "download.allow_networks must be a list of strings"),
    ("[download]\nmax_response_bytes = 0\n", "download.max_response_bytes must be >= 1024"),
    ("[download]\nrequest_deadline_s = 0\n", "download.request_deadline_s must be > 0"),
    ("[download]\nmax_redirects = -1\n", "download.max_redirects must be within 0..20"),
    ('[datasets.embedded]\nallow_networks = ["127.0.0.1/33"]\n', "datasets.embedded.allow_networks: '127.0.0.1/33'"),
])
def test_bad_guard_config_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_defaults_are_safe_and_only_the_embedded_dataset_allows_loopback() -> None:
    config = load_config()
    assert config.download.allow_networks == ()
    assert config.download.max_response_bytes == 32 * 1024 * 1024
    embedded = DatasetSource(config.dataset("embedded")).download_config(config.download)
    assert embedded.allow_networks == ("127.0.0.1/32",)
    web = DatasetSource(config.dataset("laion-subset"), url_list="x.csv").download_config(config.download)
    assert web.allow_networks == ()
    assert config.download.allow_networks == ()  # not widened in place


# ---------------------------------------------------------------------------
# A list with broken text, end to end through the Ray runner
# ---------------------------------------------------------------------------


def _broken_text_csv(path: Path, base: str) -> None:
    port = base.rsplit(":", 1)[1]
    lines = [
        b"url,caption",
        f"{base}/good/0.jpg,a red picture".encode(),
        f"{base}/good/0.jpg,a red picture".encode(),  # exact repeat: planned once
        f"{base}/good/0.jpg,the same picture with another caption".encode(),
        f"{base}/good/1.jpg,caf\xe9 in Latin-1 \xff\xfe".encode("latin-1"),  # not UTF-8
        f"{base}/caf\xe9.jpg,a Latin-1 byte in the URL".encode("latin-1"),
        f"{base}/good/2.jpg,\"{'x' * 100_000}\"".encode(),
        b",a row without a URL",
        b"file:///etc/passwd,a local file",
        f"http://[::1]:{port}/good/3.jpg,IPv6 loopback".encode(),  # loopback, so safe even if the guard broke
        f"{base}/bomb.png,a bomb".encode(),
        f"{base}/trickle-body.jpg,a trickle".encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_url_list_text_is_repaired_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    _broken_text_csv(path, "http://127.0.0.1:1")
    table = read_url_list(str(path))
    assert table.num_rows == 11
    captions = table.column("caption").to_pylist()
    urls = table.column("url").to_pylist()
    assert captions[3] == "caf\ufffd in Latin-1 \ufffd\ufffd"
    assert urls[4] == "http://127.0.0.1:1/caf%E9.jpg"
    assert len(captions[5]) == 100_000
    lines = tmp_path / "list.jsonl"
    lines.write_bytes(b'{"url": "http://127.0.0.1:1/\\ud800.jpg", "caption": "lone \\udc00 surrogate"}\n'
                      b'{"url": "http://127.0.0.1:1/ok.jpg", "caption": null}\n')
    table = read_url_list(str(lines))
    assert table.to_pylist() == [
        {"url": "http://127.0.0.1:1/%ED%A0%80.jpg", "caption": "lone \ufffd surrogate"},
        {"url": "http://127.0.0.1:1/ok.jpg", "caption": ""},
    ]
    huge = tmp_path / "huge.jsonl"  # a 2 MiB caption: longer than pyarrow's parse block
    huge.write_text(json.dumps({"url": "http://127.0.0.1:1/a.jpg", "caption": "y" * (2 << 20)}) + "\n")
    assert len(read_url_list(str(huge)).column("caption")[0].as_py()) == 2 << 20
    raw = pa.array([b"http://127.0.0.1:1/\xe9.jpg", b"http://127.0.0.1:1/ok.jpg"], pa.binary())
    pq.write_table(pa.table({"url": raw.view(pa.string()), "caption": raw}), tmp_path / "list.parquet")
    table = read_url_list(str(tmp_path / "list.parquet"))
    assert table.column("url").to_pylist()[0] == "http://127.0.0.1:1/%E9.jpg"
    table.column("caption").to_pylist()  # valid UTF-8: this used to raise UnicodeDecodeError


def test_hostile_list_through_the_ray_runner(ray_local, server: HostileServer, tmp_path: Path) -> None:
    from manifests.store import RunLayout
    from pipeline.download_runner import plan_download, run_download

    path = tmp_path / "list.csv"
    _broken_text_csv(path, server.base)
    dataset = DatasetConfig(name="hostile", source="url_list", url_list=str(path), allow_networks=("127.0.0.1/32",))
    dataset.validate()
    source = DatasetSource(dataset)
    config = source.download_config(dataclasses.replace(_config(), shard_size=4, thread_count=4))
    layout = RunLayout(tmp_path / "out")
    work = plan_download(source, layout, config)
    report = run_download(source, layout, config, work, progress=False)
    assert not report.shards_failed and report.duplicates_dropped == 1
    rows = pq.read_table(tmp_path / "out" / "manifests" / "download").to_pylist()
    planned = pq.read_table(tmp_path / "out" / "input" / "urls.parquet")
    assert len(rows) == planned.num_rows == 10  # 11 rows, one exact repeat
    assert sorted(r["uid"] for r in rows) == sorted(planned.column("uid").to_pylist())
    kinds = {(r["url"].rsplit("/", 1)[-1] if r["url"] else "", r["caption"][:20]): r["error_kind"] or r["status"]
             for r in rows}
    assert kinds == {
        ("0.jpg", "a red picture"): "ok",
        ("0.jpg", "the same picture wit"): "ok",
        ("1.jpg", "caf\ufffd in Latin-1 \ufffd\ufffd"): "ok",
        ("caf%E9.jpg", "a Latin-1 byte in th"): "http_404",
        ("2.jpg", "x" * 20): "ok",
        ("", "a row without a URL"): "invalid_url",
        ("passwd", "a local file"): "unsupported_scheme",
        ("3.jpg", "IPv6 loopback"): "blocked_address",
        ("bomb.png", "a bomb"): "decompression_bomb",
        ("trickle-body.jpg", "a trickle"): "deadline_exceeded",
    }
    assert server.requests["/caf%E9.jpg"] >= 1  # the repaired URL was fetched as the byte it named
    counts = json.loads((tmp_path / "out" / "input" / "dataset.json").read_text())
    assert counts["duplicates_dropped"] == 1
