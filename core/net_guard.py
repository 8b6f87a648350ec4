"""A guarded HTTP client for the download stage: what a crawler of user-supplied URLs must refuse.

A URL list is untrusted input. Fetched naively, a URL can make the crawler machine talk to
itself or to its private network (SSRF: ``http://169.254.169.254/`` is a cloud's credential
endpoint, ``http://10.0.0.5:6379/`` an internal service), read a local file (``file://``), hang
a worker forever (a server that sends one byte per second defeats a per-read timeout), or fill
its memory (an endless body). img2dataset fetches with ``urllib.request.urlopen``; this module
builds a urllib opener that closes those holes, installed for the duration of one shard's
download (:func:`installed_opener`):

- only ``http`` and ``https``; no file, ftp, data or other handler exists in the opener, so a
  ``file://`` URL (or a redirect to one) can never touch the filesystem;
- every hop, redirects included, takes its host's addresses from ``getaddrinfo`` (through a
  per-process cache, :class:`HostAddressCache`: one lookup per host per
  ``download.dns_cache_ttl_s``), refuses it when *any* of them is loopback, private, link-local
  (cloud metadata), multicast, unspecified, reserved or otherwise not globally routable, unless
  an allowlisted network (``download.allow_networks``) holds it, and then connects to exactly
  the address it checked: no second lookup, so DNS rebinding between check and connect is not
  possible. The cache holds answers, never verdicts: a cached address is checked again on every
  connection, against that request's allowlist;
- one deadline per request, redirects included, on top of the per-read timeout;
- a cap on the body: a declared ``Content-Length`` above it is refused before reading, and a
  body without one is cut off as soon as it passes the cap;
- at most ``max_redirects`` redirects, each checked like the first request.

Environment proxies (``http_proxy``) are ignored on purpose: through a proxy the destination's
address is resolved by the proxy, out of reach of the check.

The errors raised carry a stable lowercase prefix (``blocked address:``, ``invalid url:`` ...)
that ``stages.download.classify_error`` turns into an ``error_kind``.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import re
import socket
import ssl
import string
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = ("http", "https")
_CHUNK = 64 * 1024  # largest single read: one recv per step, so the deadline is checked often
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
# NAT64 (RFC 6052) embeds an IPv4 address in its last 32 bits; on a NAT64 network it reaches that
# IPv4 host, so 64:ff9b::a9fe:a9fe is 169.254.169.254 and must be judged as such.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class DownloadRefused(Exception):
    """A request the guard would not make or finish; the message starts with a stable reason."""


class InvalidURL(DownloadRefused):
    """The URL is not a well-formed absolute http(s) URL (missing, empty, no host, bad port ...)."""


class UnsupportedScheme(DownloadRefused):
    """Only http and https are fetched; file, ftp, data, gopher ... are refused unopened."""


class BlockedAddress(DownloadRefused):
    """The host resolves to an address of a network a crawler must not reach."""


class ResponseTooLarge(DownloadRefused):
    """The body is (declared or turned out) larger than ``download.max_response_bytes``."""


class DeadlineExceeded(DownloadRefused):
    """The whole request, redirects and body included, took longer than its deadline."""


class _PolicySource(Protocol):
    allow_networks: tuple[str, ...]
    max_response_bytes: int
    request_deadline_s: float
    max_redirects: int
    dns_cache_ttl_s: float


@dataclass(frozen=True)
class NetPolicy:
    """What the guarded opener allows; built from ``DownloadConfig`` (see :meth:`from_config`)."""

    allow_networks: tuple[IPNetwork, ...] = ()
    max_response_bytes: int = 32 * 1024 * 1024
    request_deadline_s: float = 20.0
    max_redirects: int = 5
    dns_cache_ttl_s: float = 120.0  # 0: every connection resolves its host afresh

    @classmethod
    def from_config(cls, config: _PolicySource) -> NetPolicy:
        return cls(
            allow_networks=parse_networks(config.allow_networks),
            max_response_bytes=config.max_response_bytes,
            request_deadline_s=config.request_deadline_s,
            max_redirects=config.max_redirects,
            dns_cache_ttl_s=config.dns_cache_ttl_s,
        )


# ---------------------------------------------------------------------------
# Pure checks
# ---------------------------------------------------------------------------


def parse_network(value: str) -> IPNetwork:
    """One allowlist entry: a CIDR network (``10.0.0.0/8``) or a single address (``127.0.0.1``).

    Host bits set (``10.0.0.5/8``) are an error rather than silently widened, since an allowlist
    wider than intended is exactly the mistake this guard exists to prevent.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not a network (write CIDR, e.g. '127.0.0.1/32' or '10.0.0.0/8')")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as err:
        hint = ""
        with contextlib.suppress(ValueError):
            hint = f"; did you mean '{ipaddress.ip_network(value.strip(), strict=False)}'?"
        raise ValueError(f"{value!r} is not a network: {err}{hint}") from None


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(parse_network(v) for v in values)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why a crawler must not connect to ``ip`` (a category name), or None for a public address.

    Categories are tested from most to least specific so the message names the real reason
    (``127.0.0.1`` is loopback, not just "private"). ``is_global`` catches what the named
    categories miss (shared address space 100.64.0.0/10, documentation ranges, ...).
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d, nothing else
            reason = blocked_reason(ip.ipv4_mapped)
            return None if reason is None else f"{reason} (as {ip.ipv4_mapped} inside IPv6)"
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = blocked_reason(inner)
            if reason is not None:
                return f"{reason} (as {inner} inside IPv6)"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
    )
    for name, hit in checks:
        if hit:
            return name
    if not ip.is_global:
        return "not globally routable"
    return None


def is_allowed(ip: IPAddress, allow: Iterable[IPNetwork]) -> bool:
    """True when an allowlisted network holds ``ip`` (or the IPv4 address inside it)."""
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            candidates.append(inner)
    return any(c.version == net.version and c in net for c in candidates for net in allow)


def check_address(ip: IPAddress, allow: Iterable[IPNetwork], host: str = "") -> None:
    """Raise BlockedAddress unless ``ip`` is public or allowlisted."""
    if is_allowed(ip, allow):
        return
    reason = blocked_reason(ip)
    if reason is not None:
        named = f"{host!r} resolves to {ip}" if host and host != str(ip) else str(ip)
        raise BlockedAddress(
            f"blocked address: {named} is a {reason} address; not connected "
            "(download.allow_networks can allow a network on purpose)"
        )


def _address_of(sockaddr: tuple[Any, ...]) -> IPAddress:
    # IPv6 link-local results may carry a zone ("fe80::1%eth0"); the zone does not change the class
    return ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])


def resolve_checked(host: str, port: int, allow: Iterable[IPNetwork], ttl_s: float = 0.0,
                    timeout: float | None = None) -> list[tuple[Any, ...]]:
    """Resolve ``host`` and check every address; return the getaddrinfo entries to connect to.

    Every address must pass, not just the first: a name that resolves to one public and one
    private address would otherwise reach the private one whenever the public one fails.
    Connecting to these entries (never to the name again) is what rules out DNS rebinding.
    With ``ttl_s > 0`` the answer may come from the process's :data:`HOST_ADDRESSES` cache (one
    lookup per host per ``ttl_s``); it is checked here all the same, on every call. ``timeout``
    bounds only a wait for another thread's lookup of the same host.
    """
    allow = tuple(allow)
    if ttl_s > 0:
        infos = HOST_ADDRESSES.lookup(host, port, ttl_s, timeout)
    else:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"no address for host {host!r}")
    for info in infos:
        check_address(_address_of(info[4]), allow, host)
    return infos


# ---------------------------------------------------------------------------
# The per-process host address cache
# ---------------------------------------------------------------------------

AddrInfo = tuple[Any, ...]  # one getaddrinfo entry: (family, type, proto, canonname, sockaddr)
Resolver = Callable[[str, int], Sequence[AddrInfo]]

# How long a name that does not exist is remembered (capped by the positive TTL). Only
# EAI_NONAME/EAI_NODATA are cached: they are the name server's answer, and a dead domain with
# many URLs would otherwise cost a lookup per URL. EAI_AGAIN, EAI_FAIL and timeouts are the
# resolver's trouble, usually passing: caching them would fail every URL of a healthy host for
# as long as the entry lived, so they are shared only with the lookups waiting on the same
# attempt and the next connection asks again.
NEGATIVE_TTL_S = 10.0
_NEGATIVE_CODES = frozenset(
    code for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None)) if code is not None
)


def _system_resolver(host: str, port: int) -> Sequence[AddrInfo]:
    # looked up at call time, so a resolver swapped into the socket module (tests) is the one used
    return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _with_port(info: AddrInfo, port: int) -> AddrInfo:
    """The entry with ``port`` in its sockaddr: (addr, port) for IPv4, (addr, port, flow, scope) for IPv6."""
    family, socktype, proto, canonname, sockaddr = info
    if sockaddr[1] == port:
        return info
    return (family, socktype, proto, canonname, (sockaddr[0], port, *sockaddr[2:]))


def _round_robin(infos: Sequence[AddrInfo], turn: int) -> list[AddrInfo]:
    """``infos`` with each address family's addresses rotated by ``turn``, families kept in order.

    getaddrinfo orders families by RFC 6724 (IPv6 first only where it is routable); rotating
    across families would send every other connection to the family it put last.
    """
    families: dict[int, list[AddrInfo]] = {}
    for info in infos:
        families.setdefault(info[0], []).append(info)
    out: list[AddrInfo] = []
    for group in families.values():
        k = turn % len(group)
        out += group[k:] + group[:k]
    return out


@dataclass
class _Answer:
    resolved_at: float  # clock() when the lookup finished
    infos: tuple[AddrInfo, ...] = ()
    error: OSError | None = None  # a cached "no such name"
    turns: int = 0  # connections served so far: where the round robin starts next


class HostAddressCache:
    """getaddrinfo answers per host name, for one process, shared by all its download threads.

    Without it every URL costs a lookup, and a resolver 200 ms away caps a 16-thread shard at
    80 URLs/s whatever the servers do. Here a host is resolved once per TTL: the lookup runs
    outside the lock, and threads wanting the same host meanwhile wait for that one lookup
    instead of starting their own (a shard's first wave of threads often asks for one host).
    Successive connections start at successive addresses of the host (round robin), the rest
    following as fallbacks. The key is the host name (case-folded, as DNS compares names); the
    port only fills in the sockaddr. IP literals are not cached (no lookup to save). The cache
    holds answers, not verdicts: :func:`resolve_checked` checks every address it returns, each
    time, so an address refused for one request is refused from the cache too, and one request's
    allowlist never lets another's through. At most ``max_entries`` hosts are kept; the oldest
    answers are dropped first.
    """

    def __init__(self, resolver: Resolver = _system_resolver, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 10_000) -> None:
        self._resolver = resolver
        self._clock = clock
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._answers: dict[str, _Answer] = {}
        self._pending: dict[str, Future[_Answer]] = {}

    def lookup(self, host: str, port: int, ttl_s: float, timeout: float | None = None) -> list[AddrInfo]:
        """The host's addresses for ``port``, rotated for this connection; resolving when not fresh.

        ``timeout`` bounds only the wait for another thread's lookup of the same host (a
        request's deadline); a lookup this thread runs itself is as long as getaddrinfo takes.
        """
        if _is_ip_literal(host):
            return list(self._resolver(host, port))
        key = host.lower()
        with self._lock:
            answer = self._fresh(key, ttl_s)
            if answer is not None:
                return self._serve(answer, port)
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = Future()
                owner = True
            else:
                owner = False
        if owner:
            answer = self._resolve(key, host, port, pending)
        else:
            try:
                answer = pending.result(timeout)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"deadline exceeded: the address lookup of {host!r} did not finish in time"
                ) from None
        with self._lock:
            return self._serve(answer, port)

    def clear(self) -> None:
        """Forget every answer (lookups in flight finish and are stored)."""
        with self._lock:
            self._answers.clear()

    def _fresh(self, key: str, ttl_s: float) -> _Answer | None:
        answer = self._answers.get(key)
        if answer is None:
            return None
        lifetime = ttl_s if answer.error is None else min(ttl_s, NEGATIVE_TTL_S)
        return answer if self._clock() - answer.resolved_at < lifetime else None

    def _resolve(self, key: str, host: str, port: int, pending: Future[_Answer]) -> _Answer:
        """Run the lookup, store what may be cached, and hand the outcome to the waiting threads."""
        try:
            infos = tuple(self._resolver(host, port))
        except OSError as err:
            answer = _Answer(self._clock(), error=err)
            cacheable = isinstance(err, socket.gaierror) and err.errno in _NEGATIVE_CODES
        except BaseException as err:
            with self._lock:
                del self._pending[key]
            pending.set_exception(err)
            raise
        else:
            answer = _Answer(self._clock(), infos=infos)
            cacheable = bool(infos)
        with self._lock:
            del self._pending[key]
            self._answers.pop(key, None)
            if cacheable:
                self._answers[key] = answer  # at the end: insertion order is age order
                while len(self._answers) > self._max_entries:
                    del self._answers[next(iter(self._answers))]
        pending.set_result(answer)
        return answer

    @staticmethod
    def _serve(answer: _Answer, port: int) -> list[AddrInfo]:
        """Called under the lock: the answer's addresses for this connection, or its error raised."""
        if answer.error is not None:
            raise type(answer.error)(*answer.error.args)  # a copy: each thread raises its own
        turn = answer.turns
        answer.turns += 1
        return [_with_port(i, port) for i in _round_robin(answer.infos, turn)]


HOST_ADDRESSES = HostAddressCache()  # one per process: a Ray worker's shards, one after another, share it


def check_url(url: object) -> str:
    """Return ``url`` when it is a well-formed absolute http(s) URL, else raise why not.

    Checked without any network or filesystem access, so a refused URL costs nothing. Non-ASCII
    characters are allowed (they are percent-encoded when sent); whitespace and control
    characters are not (http.client would refuse them anyway, with a less clear message).
    """
    if url is None:
        raise InvalidURL("invalid url: missing (null)")
    if not isinstance(url, str):
        raise InvalidURL(f"invalid url: not text but {type(url).__name__}")
    if not url.strip():
        raise InvalidURL("invalid url: empty")
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidURL("invalid url: not valid Unicode (holds a lone surrogate)") from None
    bad = _CONTROL_OR_SPACE.search(url)
    if bad:
        raise InvalidURL(f"invalid url: contains whitespace or a control character ({bad.group()!r} at {bad.start()})")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - parsing the port raises on a bad one
    except ValueError as err:
        raise InvalidURL(f"invalid url: {err}") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise InvalidURL("invalid url: no scheme (expected http:// or https://)")
    if scheme not in ALLOWED_SCHEMES:
        raise UnsupportedScheme(f"unsupported scheme {scheme!r}: only http and https are fetched")
    if not host:
        raise InvalidURL("invalid url: no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidURL("invalid url: credentials in the URL (user@host) are not sent")
    return url


# ---------------------------------------------------------------------------
# Connections and responses
# ---------------------------------------------------------------------------


def guarded_create_connection(
    address: tuple[str, int],
    timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
    source_address: tuple[str, int] | None = None,
    *,
    policy: NetPolicy,
    deadline: float,
) -> socket.socket:
    """``socket.create_connection`` that checks the resolved addresses first and connects to them."""
    host, port = address
    infos = resolve_checked(host, port, policy.allow_networks, policy.dns_cache_ttl_s,
                            timeout=max(0.0, deadline - time.monotonic()))
    last_error: OSError | None = None
    for family, socktype, proto, _canonname, sockaddr in infos:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(
                f"deadline exceeded: could not connect to {host!r} within {policy.request_deadline_s:g} s"
            )
        sock = socket.socket(family, socktype, proto)
        try:
            per_op = timeout if isinstance(timeout, (int, float)) else None
            sock.settimeout(remaining if per_op is None else min(per_op, remaining))
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            last_error = err
    raise last_error if last_error is not None else OSError(f"could not connect to {host!r}")


@dataclass
class _Limits:
    deadline: float  # time.monotonic() by which the whole request must be done
    deadline_s: float  # the configured deadline, for messages
    op_timeout: float | None  # per socket operation (urlopen's timeout)
    max_bytes: int


class _GuardedReader:
    """Wraps a response's buffered socket file: one recv per step, deadline and body cap enforced.

    ``BufferedReader.read(n)`` and ``readline()`` loop over recv internally, each recv with the
    full per-operation timeout, so a server trickling a byte per second keeps them alive forever.
    Here every step is one recv at most, with the socket timeout shrunk to what is left of the
    deadline before it.
    """

    def __init__(self, fp: Any, sock: socket.socket, limits: _Limits) -> None:
        self._fp = fp
        self._sock = sock
        self._limits = limits
        self._body = False
        self.body_bytes = 0

    def start_body(self) -> None:
        """Headers are parsed: count what follows against the cap."""
        self._body = True

    def _step(self, fn: Any, *args: Any) -> Any:
        remaining = self._limits.deadline - time.monotonic()
        if remaining <= 0:
            raise self._deadline_error()
        per_op = self._limits.op_timeout
        self._sock.settimeout(remaining if per_op is None else min(per_op, remaining))
        try:
            return fn(*args)
        except TimeoutError as err:
            if time.monotonic() >= self._limits.deadline - 0.05:
                raise self._deadline_error() from err
            raise

    def _deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"deadline exceeded: the response was not complete within {self._limits.deadline_s:g} s "
            f"({self.body_bytes} body bytes by then; download.request_deadline_s)"
        )

    def _count(self, n: int) -> None:
        if self._body:
            self.body_bytes += n
            if self.body_bytes > self._limits.max_bytes:
                raise ResponseTooLarge(
                    f"response too large: the body passed {self._limits.max_bytes} bytes "
                    "(download.max_response_bytes); reading stopped"
                )

    def read(self, n: int | None = -1) -> bytes:
        chunks: list[bytes] = []
        got = 0
        while n is None or n < 0 or got < n:
            want = _CHUNK if n is None or n < 0 else min(_CHUNK, n - got)
            data = self._step(self._fp.read1, want)
            if not data:
                break
            self._count(len(data))
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def read1(self, n: int = -1) -> bytes:
        data = self._step(self._fp.read1, _CHUNK if n is None or n < 0 else n)
        self._count(len(data))
        return data

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        got = 0
        while got < len(view):
            n = self._step(self._fp.readinto1, view[got:])
            if not n:
                break
            self._count(n)
            got += n
        return got

    def readline(self, limit: int | None = -1) -> bytes:
        out = bytearray()
        while limit is None or limit < 0 or len(out) < limit:
            peeked = self._step(self._fp.peek, 1)  # at most one recv, when the buffer is empty
            if not peeked:
                break
            end = peeked.find(b"\n")
            take = len(peeked) if end < 0 else end + 1
            if limit is not None and limit >= 0:
                take = min(take, limit - len(out))
            out += self._fp.read(take)  # served from the buffer: no recv
            if out.endswith(b"\n"):
                break
        self._count(len(out))
        return bytes(out)

    def peek(self, n: int = 0) -> bytes:
        return self._step(self._fp.peek, n)

    def close(self) -> None:
        self._fp.close()

    def __getattr__(self, name: str) -> Any:  # fileno, closed, flush ...
        return getattr(self._fp, name)


class GuardedHTTPResponse(http.client.HTTPResponse):
    """An HTTPResponse whose reads go through :class:`_GuardedReader`."""

    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None, *, limits: _Limits) -> None:
        super().__init__(sock, debuglevel, method, url)
        self.fp = _GuardedReader(self.fp, sock, limits)  # type: ignore[assignment]
        self._limits = limits

    def begin(self) -> None:
        super().begin()
        if self.length is not None and self.length > self._limits.max_bytes:
            raise ResponseTooLarge(
                f"response too large: Content-Length {self.length} exceeds {self._limits.max_bytes} bytes "
                "(download.max_response_bytes); not read"
            )
        self.fp.start_body()  # type: ignore[union-attr]


def _guard_connection(conn: http.client.HTTPConnection, policy: NetPolicy, deadline: float) -> None:
    conn._create_connection = functools.partial(  # type: ignore[attr-defined]
        guarded_create_connection, policy=policy, deadline=deadline
    )
    per_op = conn.timeout if isinstance(conn.timeout, (int, float)) else None
    limits = _Limits(deadline, policy.request_deadline_s, per_op, policy.max_response_bytes)
    conn.response_class = functools.partial(GuardedHTTPResponse, limits=limits)  # type: ignore[assignment]


class GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int | None = None, *, policy: NetPolicy, deadline: float,
                 **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)
        _guard_connection(self, policy, deadline)


class GuardedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to the checked address, with SNI and certificate checks against the URL's host name."""

    def __init__(self, host: str, port: int | None = None, *, policy: NetPolicy, deadline: float,
                 **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)
        _guard_connection(self, policy, deadline)


# ---------------------------------------------------------------------------
# urllib handlers and the opener
# ---------------------------------------------------------------------------

_DEADLINE_ATTR = "guard_deadline"


def _deadline_for(req: urllib.request.Request, policy: NetPolicy) -> float:
    """The request's deadline, set by its first hop and carried over by redirects."""
    deadline = getattr(req, _DEADLINE_ATTR, None)
    if deadline is None:
        deadline = time.monotonic() + policy.request_deadline_s
        setattr(req, _DEADLINE_ATTR, deadline)
    return deadline


def _prepare(req: urllib.request.Request) -> urllib.request.Request:
    """Check the URL; send a non-ASCII path percent-encoded and a non-ASCII host as IDNA.

    http.client writes the request line and headers as ASCII/Latin-1 only, so without this an
    internationalised URL (common in web lists) fails with a codec error instead of being fetched.
    """
    check_url(req.full_url)
    if not req.selector.isascii():
        req.selector = quote(req.selector, safe=string.punctuation)
    if not req.host.isascii():
        try:
            req.add_unredirected_header("Host", req.host.encode("idna").decode("ascii"))
        except UnicodeError as err:
            raise InvalidURL(f"invalid url: host {req.host!r} is not a valid internationalised name ({err})") from None
    return req


def _open_hop(handler: urllib.request.AbstractHTTPHandler, conn_class: type, req: urllib.request.Request,
              policy: NetPolicy, **kwargs: Any) -> Any:
    factory = functools.partial(conn_class, policy=policy, deadline=_deadline_for(req, policy))
    try:
        return handler.do_open(factory, req, **kwargs)
    except BlockedAddress as err:
        hops = len(getattr(req, "redirect_dict", {}))
        if hops:
            raise BlockedAddress(f"{err} [at redirect hop {hops}]") from None
        raise


class GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: NetPolicy) -> None:
        super().__init__()
        self.policy = policy

    def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
        return _prepare(self.do_request_(req))

    def http_open(self, req: urllib.request.Request) -> Any:
        return _open_hop(self, GuardedHTTPConnection, req, self.policy)


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: NetPolicy, context: Any = None) -> None:
        super().__init__(context=context)
        self.policy = policy

    def https_request(self, req: urllib.request.Request) -> urllib.request.Request:
        return _prepare(self.do_request_(req))

    def https_open(self, req: urllib.request.Request) -> Any:
        return _open_hop(self, GuardedHTTPSConnection, req, self.policy, context=self._context)


class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Redirects: http(s) only, at most ``max_redirects``, the deadline carried to the next hop.

    The next hop's address is checked by the same connection class as the first request's, when
    it connects: a redirect to ``http://169.254.169.254/`` is refused before any packet is sent.
    """

    def __init__(self, policy: NetPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.max_redirections = policy.max_redirects

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any) -> Any:
        location = headers.get("location") or headers.get("uri")
        if location:
            try:
                scheme = urlsplit(location.strip()).scheme.lower()
            except ValueError as err:
                fp.close()
                raise InvalidURL(f"invalid url in redirect ({code}): {err}") from None
            if scheme and scheme not in ALLOWED_SCHEMES:
                fp.close()
                raise UnsupportedScheme(
                    f"unsupported scheme {scheme!r} in a redirect ({code}) to {location[:200]!r}: "
                    "only http and https are fetched"
                )
        if self.max_redirections == 0:
            fp.close()
            raise urllib.error.HTTPError(req.full_url, code, "redirect loop: redirects are not followed "
                                         "(download.max_redirects = 0)", headers, None)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        check_url(newurl)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            setattr(new, _DEADLINE_ATTR, getattr(req, _DEADLINE_ATTR, None))
        return new


def build_guarded_opener(
    policy: NetPolicy, https_context: ssl.SSLContext | None = None
) -> urllib.request.OpenerDirector:
    """An opener with only the guarded http(s) handlers: no file, ftp, data or proxy handler.

    ``https_context`` defaults to Python's (system CAs, host name checked); tests pass one that
    trusts their own certificate.
    """
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.UnknownHandler(),  # any other scheme: "unknown url type", nothing opened
        urllib.request.HTTPDefaultErrorHandler(),
        GuardedRedirectHandler(policy),
        urllib.request.HTTPErrorProcessor(),
        GuardedHTTPHandler(policy),
        GuardedHTTPSHandler(policy, context=https_context),
    ):
        opener.add_handler(handler)
    return opener


_INSTALL_LOCK = threading.Lock()


@contextlib.contextmanager
def installed_opener(policy: NetPolicy) -> Iterator[urllib.request.OpenerDirector]:
    """Make ``urllib.request.urlopen`` use the guarded opener while the block runs.

    img2dataset calls the module-level ``urlopen`` from its worker threads, so the opener must be
    the process-wide one; the previous opener is put back afterwards, so nothing else in the
    process (a test, another stage) keeps the guard. The lock serialises two shard downloads in
    one process, which would otherwise install and remove each other's opener.
    """
    opener = build_guarded_opener(policy)
    with _INSTALL_LOCK:
        previous = urllib.request._opener  # type: ignore[attr-defined]
        urllib.request.install_opener(opener)
        try:
            yield opener
        finally:
            urllib.request.install_opener(previous)  # type: ignore[arg-type]


def guarded_urlopen(url: str, policy: NetPolicy, timeout: float | None = None,
                    https_context: ssl.SSLContext | None = None) -> Any:
    """Open ``url`` with a fresh guarded opener (no global state): for callers other than img2dataset."""
    opener = build_guarded_opener(policy, https_context)
    req = urllib.request.Request(url)
    return opener.open(req) if timeout is None else opener.open(req, timeout=timeout)
