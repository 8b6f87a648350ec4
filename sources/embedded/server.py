"""The loopback HTTP server that serves the samples, and URLs that fail on purpose.

A real crawl meets 404s, timeouts, truncated JPEGs and HTML pages where an image was
promised; ``EmbeddedServer`` serves each of these (``BROKEN_KINDS``) next to the good images
so the downloader's error handling is exercised offline, on 127.0.0.1 only.
"""

from __future__ import annotations

import http.server
import re
import threading
import time
from typing import Any, Sequence

from PIL import Image

from sources.embedded.generate import EmbeddedSample, sample_url
from sources.embedded.scene import encode_jpeg

BROKEN_KINDS: tuple[str, ...] = ("http_404", "timeout", "corrupt", "html")
_BROKEN_PREFIX: dict[str, str] = {"http_404": "missing", "timeout": "slow", "corrupt": "corrupt", "html": "page"}
_BROKEN_PER_KIND = 2


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default listen backlog is 5: img2dataset opens thread_count connections per
    # shard task and several tasks run at once, so a backlog of 5 overflows and clients see
    # "connection reset by peer" on good URLs. Room for every concurrent request of a run.
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:  # noqa: D401
        """Client hang-ups (e.g. a timed-out slow download) are expected; stay silent."""


class EmbeddedServer:
    """Serves the samples over HTTP on 127.0.0.1 (ThreadingHTTPServer in a daemon thread).

    Besides the good images it serves the failure modes a real crawl meets (404s,
    timeouts, truncated JPEGs, HTML instead of an image) so the downloader's error
    handling is exercised too.
    """

    def __init__(self, samples: Sequence[EmbeddedSample], host: str = "127.0.0.1", port: int = 0,
                 slow_seconds: float = 4.0) -> None:
        self.samples = list(samples)
        self.host = host
        self.port = port
        self.slow_seconds = float(slow_seconds)
        self._images: dict[str, bytes] = {s.sample_id: s.image for s in self.samples}
        self._fallback_jpeg = self.samples[0].image if self.samples else encode_jpeg(
            Image.new("RGB", (64, 64), (128, 128, 128)))
        self._stopping = threading.Event()
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # -- lifecycle -------------------------------------------------------
    def start(self) -> "EmbeddedServer":
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _QuietServer((self.host, self.port), self._handler_class())
        self.port = self._server.server_address[1]
        self.base_url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="embedded-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content ---------------------------------------------------------
    def _real_jpeg(self, i: int) -> bytes:
        if not self.samples:
            return self._fallback_jpeg
        return self.samples[i % len(self.samples)].image

    def url_rows(self) -> list[dict]:
        """Rows for img2dataset: every sample, then 2 URLs of each broken kind."""
        if not self.base_url:
            raise RuntimeError("server not started")
        rows = [{"url": sample_url(self.base_url, s.sample_id), "caption": s.caption} for s in self.samples]
        for kind in BROKEN_KINDS:
            for i in range(_BROKEN_PER_KIND):
                rows.append({"url": f"{self.base_url}/broken/{_BROKEN_PREFIX[kind]}-{i}.jpg",
                             "caption": f"a broken link of kind {kind.replace('_', ' ')} number {i}"})
        return rows

    def _route(self, path: str) -> tuple[int, str, bytes, float]:
        """Map a path to (status, content type, body, delay seconds)."""
        path = path.split("?", 1)[0]
        m = re.fullmatch(r"/images/(s\d+)\.jpg", path)
        if m and m.group(1) in self._images:
            return 200, "image/jpeg", self._images[m.group(1)], 0.0
        m = re.fullmatch(r"/broken/(missing|slow|corrupt|page)-(\d+)\.jpg", path)
        if m:
            kind, i = m.group(1), int(m.group(2))
            if kind == "slow":
                return 200, "image/jpeg", self._real_jpeg(i), self.slow_seconds
            if kind == "corrupt":
                data = self._real_jpeg(i)
                return 200, "image/jpeg", data[: int(len(data) * 0.4)], 0.0
            if kind == "page":
                html = (f"<!DOCTYPE html><html><head><title>Image {i}</title></head>"
                        f"<body><h1>Not an image</h1><p>page {i}</p></body></html>").encode()
                return 200, "text/html; charset=utf-8", html, 0.0
        return 404, "text/plain; charset=utf-8", b"not found", 0.0

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "EmbeddedServer/1.0"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def _serve(self, with_body: bool) -> None:
                status, ctype, body, delay = outer._route(self.path)
                if delay > 0:
                    end = time.monotonic() + delay
                    while time.monotonic() < end:
                        if outer._stopping.wait(min(0.05, max(0.0, end - time.monotonic()))):
                            return  # shutting down: drop the request
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if with_body:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    pass

            def do_GET(self) -> None:  # noqa: N802
                self._serve(True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._serve(False)

        return Handler
