"""The guard's per-process host address cache: one lookup per host per TTL, round robin, and the
guard's check on every address it hands out.

The only stand-in is the resolver (``socket.getaddrinfo``), which has to be: the test must not ask
real DNS anything. It answers ``hostN.test`` with loopback addresses (all of 127.0.0.0/8 is
loopback on Linux), optionally 200 ms late, and refuses every other name. Everything else is
real: HTTP servers on 127.0.0.x, img2dataset through the download stage's ``process_shard``, the
guarded opener. An audit hook refuses any connect outside 127.0.0.0/8 and ::1 while a test runs.

Throughput is not asserted here (speed targets live in ``make bench``): the download test asserts
its cause, one lookup per host for 1,000 URLs. The ratio itself, measured side by side:

    PYTHONPATH=. .venv/bin/python tests/test_dns_cache.py --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import io
import ipaddress
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from PIL import Image

import pipeline  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE: img2dataset's resizer imports albumentations)
from core import net_guard
from stages.download import DownloadConfig, DownloadStage

N_HOSTS = 5
ADDRESSES_PER_HOST = 2  # host i -> 127.0.0.(2i+1), 127.0.0.(2i+2): round robin has two to choose from
DELAY_S = 0.2

# ---------------------------------------------------------------------------
# Safety net and the resolver stand-in
# ---------------------------------------------------------------------------

_NET_WATCH = {"active": False}


def _refuse_non_loopback(event: str, args: tuple[Any, ...]) -> None:
    if _NET_WATCH["active"] and event == "socket.connect" and isinstance(args[1], tuple):
        host = str(args[1][0]).split("%", 1)[0]
        if not ipaddress.ip_address(host).is_loopback:
            raise RuntimeError(f"test safety net: refused a connection to {args[1]} (not loopback)")


sys.addaudithook(_refuse_non_loopback)  # cannot be removed; does nothing while no test watches

_REAL_GETADDRINFO = socket.getaddrinfo


def _entry(address: str, port: int) -> tuple[Any, ...]:
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))


class FakeResolver:
    """``socket.getaddrinfo`` for made-up names: a table, a delay per lookup, a count per name."""

    def __init__(self, table: dict[str, list[str]], delay_s: float = 0.0) -> None:
        self.table = table
        self.delay_s = delay_s
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                 flags: int = 0) -> list[tuple[Any, ...]]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        with contextlib.suppress(ValueError):  # a literal address: parsed, never sent to DNS
            ipaddress.ip_address(name.split("%", 1)[0])
            return _REAL_GETADDRINFO(name, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        with self._lock:
            self.calls[name] += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        addresses = self.table.get(name.lower())
        if addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [_entry(a, int(port or 0)) for a in addresses]


def host_table() -> dict[str, list[str]]:
    return {f"host{i}.test": [f"127.0.0.{ADDRESSES_PER_HOST * i + k + 1}" for k in range(ADDRESSES_PER_HOST)]
            for i in range(N_HOSTS)}


@contextlib.contextmanager
def fake_dns(table: dict[str, list[str]], delay_s: float = 0.0) -> Iterator[FakeResolver]:
    """Swap the resolver in and the process's cache out (so no test sees another's answers)."""
    resolver = FakeResolver(table, delay_s)
    net_guard.HOST_ADDRESSES.clear()
    socket.getaddrinfo = resolver  # type: ignore[assignment]
    _NET_WATCH["active"] = True
    try:
        yield resolver
    finally:
        _NET_WATCH["active"] = False
        socket.getaddrinfo = _REAL_GETADDRINFO
        net_guard.HOST_ADDRESSES.clear()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------
# Real HTTP on 127.0.0.x
# ---------------------------------------------------------------------------


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


class ImageServer:
    """One threaded HTTP server on ``address``, serving the same small JPEG at every path."""

    def __init__(self, address: str, port: int = 0) -> None:
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                with served._lock:
                    served.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(JPEG)))
                self.end_headers()
                self.wfile.write(JPEG)

            def log_message(self, *args: Any) -> None:
                pass

        self.requests = 0
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer((address, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def image_servers() -> Iterator[dict[str, ImageServer]]:
    """A server on each address of every fake host; a host's servers share a port (a URL has one)."""
    with contextlib.ExitStack() as stack:
        servers: dict[str, ImageServer] = {}
        for addresses in host_table().values():
            port = 0
            for address in addresses:
                servers[address] = stack.enter_context(ImageServer(address, port))
                port = servers[address].port
        yield servers


def url_rows(servers: dict[str, ImageServer], n_urls: int) -> pa.Table:
    """``n_urls`` URLs spread evenly over the fake hosts, each host's port from its first server."""
    table = host_table()
    urls = []
    for k in range(n_urls):
        host = f"host{k % N_HOSTS}.test"
        urls.append(f"http://{host}:{servers[table[host][0]].port}/img/{k}.jpg")
    return pa.table({"uid": [f"{k:08x}" for k in range(n_urls)], "url": urls,
                     "caption": [f"caption {k}" for k in range(n_urls)]})


def download_config(servers: dict[str, ImageServer], ttl_s: float) -> DownloadConfig:
    config = DownloadConfig(
        shard_size=200, thread_count=16, timeout_s=5.0, request_deadline_s=10.0, image_size=64,
        allow_networks=tuple(f"{a}/32" for a in servers), dns_cache_ttl_s=ttl_s,
    )
    config.validate()
    return config


def download(config: DownloadConfig, rows: pa.Table, work: Path) -> list[dict[str, Any]]:
    """The download stage's own per-shard call, shard after shard in this process (as a Ray worker does)."""
    manifest: list[dict[str, Any]] = []
    for i, start in enumerate(range(0, rows.num_rows, config.shard_size)):
        shard = rows.slice(start, config.shard_size)
        result = DownloadStage(config).process_shard(f"{i:06d}", shard, work / f"{i:06d}")
        manifest += result.manifest.to_pylist()
    return manifest


# ---------------------------------------------------------------------------
# Through the download stage
# ---------------------------------------------------------------------------


def test_a_thousand_urls_over_five_hosts_cost_five_lookups(tmp_path: Path) -> None:
    """1,000 URLs, 5 hosts, a resolver 200 ms away, 5 shards in one process: one lookup per host,
    every image fetched, and each host's two addresses take turns (exactly half each)."""
    with image_servers() as servers, fake_dns(host_table(), DELAY_S) as resolver:
        rows = url_rows(servers, 1000)
        manifest = download(download_config(servers, ttl_s=120.0), rows, tmp_path)
    assert len(manifest) == 1000
    assert Counter(r["status"] for r in manifest) == {"ok": 1000}, Counter(r["error_kind"] for r in manifest)
    assert resolver.calls == {f"host{i}.test": 1 for i in range(N_HOSTS)}
    assert {a: s.requests for a, s in servers.items()} == {a: 100 for a in servers}


def test_without_the_cache_every_url_is_a_lookup(tmp_path: Path) -> None:
    """The off switch (``dns_cache_ttl_s = 0``) resolves per connection, as before the cache."""
    with image_servers() as servers, fake_dns(host_table()) as resolver:
        manifest = download(download_config(servers, ttl_s=0.0), url_rows(servers, 50), tmp_path)
    assert Counter(r["status"] for r in manifest) == {"ok": 50}
    assert sum(resolver.calls.values()) == 50


# ---------------------------------------------------------------------------
# The cache alone
# ---------------------------------------------------------------------------


def test_concurrent_lookups_of_a_host_wait_for_one_resolution() -> None:
    resolver = FakeResolver(host_table(), delay_s=DELAY_S)
    cache = net_guard.HostAddressCache(resolver)
    threads_per_host = 8
    start = threading.Barrier(N_HOSTS * threads_per_host)
    answers: dict[str, list[set[str]]] = {f"host{i}.test": [] for i in range(N_HOSTS)}

    def ask(host: str) -> None:
        start.wait()
        infos = cache.lookup(host, 80, ttl_s=60.0)
        answers[host].append({i[4][0] for i in infos})

    threads = [threading.Thread(target=ask, args=(h,)) for h in answers for _ in range(threads_per_host)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert resolver.calls == {h: 1 for h in answers}
    table = host_table()
    assert all(got == [set(table[h])] * threads_per_host for h, got in answers.items())
    assert elapsed < 40 * DELAY_S  # not 40 lookups one after another (a loose bound: a busy machine)


def test_answers_expire_after_the_ttl() -> None:
    clock = FakeClock()
    table = {"a.test": ["127.0.0.1"]}
    resolver = FakeResolver(table)
    cache = net_guard.HostAddressCache(resolver, clock=clock)
    assert cache.lookup("a.test", 80, ttl_s=60.0)[0][4] == ("127.0.0.1", 80)
    table["a.test"] = ["127.0.0.2"]  # the name moves
    clock.now += 59.9
    assert cache.lookup("A.TEST", 80, ttl_s=60.0)[0][4] == ("127.0.0.1", 80)  # names compare case-folded
    assert resolver.calls["a.test"] == 1
    clock.now += 0.2
    assert cache.lookup("a.test", 80, ttl_s=60.0)[0][4] == ("127.0.0.2", 80)
    assert resolver.calls["a.test"] == 2
    assert cache.lookup("a.test", 8080, ttl_s=60.0)[0][4] == ("127.0.0.2", 8080)  # the port is not the key
    assert resolver.calls["a.test"] == 2


def test_connections_take_turns_over_a_hosts_addresses() -> None:
    """Round robin within each address family; getaddrinfo's family order is kept."""
    v4 = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    v6 = ["::1", "::ffff:127.0.0.4"]
    cache = net_guard.HostAddressCache(FakeResolver({"rr.test": v6 + v4}))
    orders = [[i[4][0] for i in cache.lookup("rr.test", 443, ttl_s=60.0)] for _ in range(6)]
    assert [o[:2] for o in orders] == [v6, v6[::-1]] * 3
    assert [o[2] for o in orders] == v4 * 2
    assert all(sorted(o) == sorted(v6 + v4) for o in orders)  # every address, the rest as fallbacks


def test_a_missing_name_is_remembered_briefly_a_resolver_failure_not_at_all() -> None:
    clock = FakeClock()
    resolver = FakeResolver({})
    cache = net_guard.HostAddressCache(resolver, clock=clock)
    for _ in range(3):
        with pytest.raises(socket.gaierror, match="Name or service not known"):
            cache.lookup("gone.test", 80, ttl_s=120.0)
    assert resolver.calls["gone.test"] == 1
    clock.now += net_guard.NEGATIVE_TTL_S + 0.1
    with pytest.raises(socket.gaierror):
        cache.lookup("gone.test", 80, ttl_s=120.0)
    assert resolver.calls["gone.test"] == 2

    failing = 0

    def flaky(host: str, port: int) -> list[tuple[Any, ...]]:
        nonlocal failing
        failing += 1
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    cache = net_guard.HostAddressCache(flaky, clock=clock)
    for _ in range(3):
        with pytest.raises(socket.gaierror, match="Temporary failure"):
            cache.lookup("flaky.test", 80, ttl_s=120.0)
    assert failing == 3


def test_a_waiter_gives_up_at_its_deadline() -> None:
    resolver = FakeResolver({"slow.test": ["127.0.0.1"]}, delay_s=0.5)
    cache = net_guard.HostAddressCache(resolver)
    owner = threading.Thread(target=cache.lookup, args=("slow.test", 80, 60.0))
    owner.start()
    while not resolver.calls:
        time.sleep(0.005)
    with pytest.raises(net_guard.DeadlineExceeded, match="slow.test"):
        cache.lookup("slow.test", 80, ttl_s=60.0, timeout=0.01)
    owner.join()
    assert cache.lookup("slow.test", 80, ttl_s=60.0)[0][4] == ("127.0.0.1", 80)
    assert resolver.calls["slow.test"] == 1


# ---------------------------------------------------------------------------
# The guard still checks what the cache returns
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def listener(address: str) -> Iterator[socket.socket]:
    """A listening socket that records connections without answering them (non-blocking accept)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen(16)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def _accepted(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def test_a_cached_blocked_address_is_refused_before_connecting() -> None:
    allowed = net_guard.NetPolicy(allow_networks=net_guard.parse_networks(["127.0.0.9/32"]), request_deadline_s=3.0)
    strict = net_guard.NetPolicy(request_deadline_s=3.0)  # loopback not allowed
    with listener("127.0.0.9") as sock, fake_dns({"blocked.test": ["127.0.0.9"],
                                                  "mixed.test": ["127.0.0.9", "169.254.169.254"]}) as resolver:
        port = sock.getsockname()[1]
        url = f"http://blocked.test:{port}/x.jpg"
        # the answer enters the cache through an allowed connection (the listener sees it) ...
        net_guard.guarded_create_connection(("blocked.test", port), 2.0, policy=allowed,
                                            deadline=time.monotonic() + 3).close()
        assert _accepted(sock) == 1
        # ... and is refused from the cache under a policy that does not allow it, every time
        for _ in range(3):
            with pytest.raises(net_guard.BlockedAddress, match="'blocked.test' resolves to 127.0.0.9 is a loopback"):
                net_guard.guarded_urlopen(url, strict, timeout=2.0)
        # one allowed and one blocked address: refused on every call, cached or not
        for _ in range(2):
            with pytest.raises(net_guard.BlockedAddress, match="169.254.169.254 is a link-local"):
                net_guard.guarded_urlopen(f"http://mixed.test:{port}/x.jpg", allowed, timeout=2.0)
        assert _accepted(sock) == 0
        assert resolver.calls == {"blocked.test": 1, "mixed.test": 1}  # the refusals came from the cache


def test_the_ttl_is_validated() -> None:
    assert DownloadConfig(dns_cache_ttl_s=-1.0).problems() == [
        "download.dns_cache_ttl_s must be >= 0 (seconds; 0 turns the cache off)"]


# ---------------------------------------------------------------------------
# The measurement (not a test): throughput with a 200 ms resolver vs none, side by side
# ---------------------------------------------------------------------------


MODES = {  # name: (resolver delay, dns_cache_ttl_s)
    "no delay, cache": (0.0, 120.0),
    "200 ms, cache": (DELAY_S, 120.0),
    "no delay, no cache": (0.0, 0.0),
    "200 ms, no cache": (DELAY_S, 0.0),
}
BASELINE = "no delay, cache"


def measure(reps: int, n_urls: int, work: Path) -> dict[str, list[float]]:
    """Seconds per run of ``n_urls`` through the stage; the modes take turns within each repetition."""
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    with image_servers() as servers:
        rows = url_rows(servers, n_urls)
        with fake_dns(host_table()):
            download(download_config(servers, 120.0), rows.slice(0, 50), work / "warm-up")  # imports, first shard
        for rep in range(reps):
            for mode, (delay, ttl) in MODES.items():
                with fake_dns(host_table(), delay):
                    started = time.monotonic()
                    manifest = download(download_config(servers, ttl), rows, work / f"{rep}-{list(MODES).index(mode)}")
                    seconds[mode].append(time.monotonic() - started)
                assert sum(r["status"] == "ok" for r in manifest) == n_urls
                print(f"rep {rep} {mode:20s} {seconds[mode][-1]:6.2f} s", flush=True)
    return seconds


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    import os
    import tempfile

    parser = argparse.ArgumentParser(description="throughput of the download stage with a slow resolver")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--urls", type=int, default=1000)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        seconds = measure(args.reps, args.urls, Path(tmp))
    for mode, values in seconds.items():
        paired = [b / v for b, v in zip(seconds[BASELINE], values)]  # same repetition, side by side
        print(f"{mode:20s} median {_median(values):6.2f} s   throughput vs {BASELINE!r}: "
              f"median of paired ratios {_median(paired):4.2f} (min {min(paired):4.2f})")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
