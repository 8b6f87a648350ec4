"""No silent stall: every wait of the driver on the cluster ends within a bound, with a message.

Every peer has runs that hang without a word (img2dataset on a server that never answers, Ray
Data waiting forever for an actor it cannot place, a model call that never returns). Here the
driver watches progress wherever it waits:

- shard tasks (download, reshard; ``pipeline.shard_tasks``): no shard finished for
  ``stall_timeout_s``;
- the per-sample actor pools (``pipeline.sample_runner``): no image finished for
  ``stall_timeout_s``, which covers a hung model call, an actor that never starts, and actors that
  cannot be placed (a replica that fits no node is refused before anything starts:
  :func:`unplaceable`).

Either way the run ends with :class:`core.errors.Stalled`: one line naming the step, the shards in
flight and what was waited on (with the resources asked and free), exit code 4; finished shards
are kept and the same command resumes.

The same watch notices a cluster that shrinks under the actor pools (a node lost, none
replacing it): :class:`ClusterShrank` ends the current streaming execution, and the runner sizes
the pools again for what is left and goes on with the unfinished shards.
"""

from __future__ import annotations

import _signal
import signal
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType

from core.errors import Stalled
from core.settings import config_section, require


@config_section
class WatchdogConfig:
    """How long any step may make no progress before the run ends with a message naming it."""

    # no shard (download, reshard) or image (ocr, parrot, clip_score, dedup) finished for this long;
    # counts model loading too, so leave room for the slowest model start on a loaded node
    stall_timeout_s: float = 600.0

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        return require((self.stall_timeout_s > 0, "watchdog.stall_timeout_s must be > 0"))


POLL_SECONDS = 1.0  # how often the watchdog looks at the clock (less for a short bound)
RESTART_CHECK_SECONDS = 3.0  # how often it asks the cluster whether nodes left (one GCS call)
RESEND_SECONDS = 5.0  # SIGINT again while the wait has not ended (a KeyboardInterrupt can be swallowed)


class ProgressWatchdog:
    """Ends the main thread's blocking wait when :meth:`beat` is not called for ``timeout_s``.

    Ray Data's streaming iterator has no timeout of its own, so a thread watches the clock and,
    past the bound, sends SIGINT to the main thread: the wait ends as on Ctrl-C (Ray tears the
    execution down), and leaving the ``with`` block turns that KeyboardInterrupt into
    :class:`Stalled` with ``describe()``'s message, taken at the moment the bound passed.

    For the watch, SIGINT raises KeyboardInterrupt in the main thread whatever handler or mask was
    there (:func:`_sigint_raises`; put back after). The signal is sent again every
    ``RESEND_SECONDS`` until the ``with`` block is left, since a KeyboardInterrupt that lands in a
    finaliser is printed and dropped by Python. Sending is done under a lock that ``__exit__`` takes
    before it stops the thread, so no signal is sent after that.
    """

    def __init__(self, timeout_s: float, describe: Callable[[float], str],
                 restart_when: Callable[[], str | None] | None = None) -> None:
        self.timeout_s = timeout_s
        self.describe = describe  # seconds waited -> the message
        self.restart_when = restart_when  # looked at every RESTART_CHECK_SECONDS: a reason ends the wait too
        self.message: str | None = None
        self.restart: str | None = None
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._sending = threading.Lock()  # held while a signal is sent; __exit__ takes it to stop sends
        self._thread = threading.Thread(target=self._watch, name="progress-watchdog", daemon=True)
        self._saved_sigint: tuple[object, bool] | None = None  # (handler, was blocked) to restore on exit

    def beat(self) -> None:
        """Progress was made: restart the clock."""
        self._last = time.monotonic()

    def __enter__(self) -> ProgressWatchdog:
        self._last = time.monotonic()
        self._saved_sigint = _sigint_raises()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        while True:
            try:
                with self._sending:
                    self._stop.set()
                self._thread.join()
                break
            except KeyboardInterrupt:  # our own signal, sent just before the stop: the wait had ended anyway
                if self.message is None and self.restart is None:
                    raise
                kind = KeyboardInterrupt
        _restore_sigint(self._saved_sigint)
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            if self.restart is not None:
                raise ClusterShrank(self.restart) from None
            if self.message is not None:
                raise Stalled(self.message) from None

    def _watch(self) -> None:
        poll = min(POLL_SECONDS, self.timeout_s / 4)
        next_check = time.monotonic() + RESTART_CHECK_SECONDS
        while not self._stop.wait(poll):
            waited = time.monotonic() - self._last
            if waited > self.timeout_s:
                try:
                    self.message = self.describe(waited)
                except Exception as err:  # noqa: BLE001 - the stall is the news; a failed description must not hide it
                    self.message = f"no progress for {waited:.0f} s ({type(err).__name__} while describing it)"
                break
            if self.restart_when is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + RESTART_CHECK_SECONDS
                self.restart = self.restart_when()
                if self.restart is not None:
                    break
        else:
            return
        while True:
            with self._sending:
                if self._stop.is_set():
                    return
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]
            if self._stop.wait(RESEND_SECONDS):
                return


def _sigint_raises() -> tuple[object, bool] | None:
    """Make SIGINT raise KeyboardInterrupt in the main thread for the watch; returns what to restore.

    The watchdog's signal is only as good as the main thread's SIGINT handler: a library that left
    its own (Ray's ``DeferSigint`` only records the signal while its block runs, and a block left
    open keeps it) or a blocked SIGINT made the wait go on forever (seen in ``make test``: the
    watchdog fired again and again, the main thread never noticed). None off the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    handler = _signal.getsignal(signal.SIGINT)
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if handler is not signal.default_int_handler:
        _signal.signal(signal.SIGINT, signal.default_int_handler)  # not signal.signal: DeferSigint replaces it
    return handler, blocked


def _restore_sigint(saved: tuple[object, bool] | None) -> None:
    if saved is None:
        return
    handler, blocked = saved
    if handler is not None and handler is not signal.default_int_handler:  # None: set outside Python, cannot be put back
        _signal.signal(signal.SIGINT, handler)  # type: ignore[arg-type]
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


class ClusterShrank(Exception):
    """Nodes left while actor pools sized for them ran: the runner re-sizes the pools to what
    remains and goes on with the shards not finished (a pool sized for the larger cluster could
    wait forever for CPUs that are gone)."""


def cluster_shrank(sized_for: Mapping[str, float], now: Mapping[str, float]) -> str | None:
    """Why pools sized for ``sized_for`` (``ray.cluster_resources()``) no longer fit: fewer CPUs or
    GPUs alive ``now`` (None when nothing left)."""
    lost = [k for k in ("CPU", "GPU") if now.get(k, 0.0) + 1e-9 < sized_for.get(k, 0.0)]
    if not lost:
        return None
    was = ", ".join(f"{sized_for.get(k, 0.0):g} {k}" for k in ("CPU", "GPU"))
    left = ", ".join(f"{now.get(k, 0.0):g} {k}" for k in ("CPU", "GPU"))
    return f"a node left: the cluster has {left} (the pools were sized for {was})"


def unplaceable(requests: Mapping[str, Mapping[str, float]], nodes: list[Mapping[str, float]]) -> str | None:
    """Why some pool's replica fits on no node (None when each fits on at least one).

    ``requests``: pool -> one replica's resources ({"CPU": 1.0, "GPU": 0.25}); ``nodes``: each
    alive node's total resources (``ray.nodes()``'s "Resources"). A replica must fit on a single
    node; Ray would otherwise wait for such a node forever.
    """
    for pool, request in requests.items():
        wanted = {k: v for k, v in request.items() if v > 0}
        if any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in wanted.items()) for node in nodes):
            continue
        asked = ", ".join(f"{v:g} {k}" for k, v in sorted(wanted.items()))
        largest = "; ".join(
            sorted({", ".join(f"{node.get(k, 0.0):g} {k}" for k in sorted(wanted)) for node in nodes}, reverse=True)
        ) or "no alive node"
        return (f"{pool}: one replica asks for {asked}, and no node has that much (nodes: {largest}); lower "
                f"[{pool}] cpus_per_replica / gpus_per_replica or add a larger node")
    return None


def first_shards(shards: list[str], shown: int = 8) -> str:
    """The first few shard names and how many more: a stall message stays one line at 10^4 shards."""
    more = f" and {len(shards) - shown} more" if len(shards) > shown else ""
    return ", ".join(shards[:shown]) + more


def resources_line(asked: Mapping[str, Mapping[str, float]], free: Mapping[str, float]) -> str:
    """'asked ocr 2 x 0.9 CPU, ...; free now 0 CPU, 0 GPU': what a stalled wait was waiting for."""
    pools = ", ".join(
        f"{name} {', '.join(f'{v:g} {k}' for k, v in sorted(r.items()) if v > 0 and k != 'replicas')}"
        + (f" x {r['replicas']:g}" if r.get("replicas") else "")
        for name, r in asked.items()
    )
    return f"asked per replica: {pools}; free now: {free.get('CPU', 0.0):g} CPU, {free.get('GPU', 0.0):g} GPU"
