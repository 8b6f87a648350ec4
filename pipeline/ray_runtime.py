"""Ray start-up in one place: an embedded local Ray by default, a cluster with --address/RAY_ADDRESS."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

from core import timeline


# Ray's settings for every Ray this project starts: a local session (here), cluster.yaml's head node
# (`ray start --head --system-config=...`, which the worker nodes take from it) and the test cluster.
# A cluster started some other way keeps what its operator set.
# Idle workers are kept, not ended: Ray ends an idle worker gracefully, through its own teardown,
# and workers that had run img2dataset downloads aborted in that teardown (absl "Mutex corrupt",
# SIGABRT, the worker's stderr forwarded to the console) in about 3% of their idle exits, after
# their task had finished (nothing lost; noise in the middle of the progress bars). A core dump
# shows Ray's OpenCensus stats harvester thread locking a mutex whose memory is being reused while
# the exiting worker's ray.shutdown() imports ray.dag: a use-after-free inside Ray (turning Ray's
# metrics collection off did not stop it). A kept worker is reused by later tasks and ends with
# the session, killed by its raylet, with no teardown to abort in.
# The cost: idle task workers stay resident until the run ends, at most about one per CPU that ran
# tasks at once (a download worker measured ~400 MiB unique memory).
RAY_SYSTEM_CONFIG: dict = {"kill_idle_workers_interval_ms": 0}


def _init_args(address: str | None, num_cpus: int | None) -> tuple[str | None, dict]:
    """``ray.init``'s address and keyword arguments for a run (see ``ray_session``)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    if address is None:
        # "local": a Ray of this run's own, as --help says, also when another Ray runs on this machine
        # (`ray start --head`): without it ray.init joins that one and refuses num_cpus with a
        # ValueError. --address auto (or RAY_ADDRESS) joins a running one on purpose.
        address = "local"
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        kwargs["_system_config"] = RAY_SYSTEM_CONFIG
        # No runtime_env: the local raylet and its workers inherit this process's environment
        # (NO_ALBUMENTATIONS_UPDATE among it, as core/__init__.py sets it), and a job runtime_env, even
        # one of env_vars only, keeps Ray from handing the workers it pre-started to the first
        # actors: 1-1.7 s more before each actor started (issue 27).
    return address, kwargs


def _init(address: str | None, num_cpus: int | None) -> None:
    """``ray.init`` for a run, its start and end on the timeline (``RayStart`` and ``ray_session``)."""
    import ray

    address, kwargs = _init_args(address, num_cpus)
    quiet_known_noise()
    timeline.absolute()
    timeline.mark("ray_start")
    ray.init(address=address, **kwargs)
    timeline.mark("ray_ready")


class RayStart:
    """``ray.init`` begun on a thread while the driver goes on planning, for a run that will need
    Ray: its ~3 s start is mostly waiting on the processes it spawns (GCS, dashboard, raylet,
    agents), which the planning's CPU work overlaps. ``ray_session(started=...)`` takes it over;
    ``abandon`` (a run that stopped first) waits for it and shuts it down. Nothing starts when a
    Ray is already up in this process (tests, notebooks): the session reuses that one.

    The thread lives until Ray is shut down: Ray starts its processes with the parent-death
    signal, which Linux sends when the *thread* that spawned them ends (they were killed, and the
    driver exited 1 a minute later, "Failed to connect to GCS").
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, preload: tuple[str, ...] = ()) -> None:
        """``preload``: modules the run needs once Ray is up (``ray.data``: 0.9 CPU-s with pandas),
        imported by the thread that waits, while Ray starts, rather than after it."""
        import ray

        self.preload = preload
        self.error: BaseException | None = None
        self.taken = False
        self._thread: threading.Thread | None = None
        self._up = threading.Event()
        self._down = threading.Event()
        if ray.is_initialized():
            return
        self._thread = threading.Thread(target=self._hold, args=(address, num_cpus), name="ray-start", daemon=True)
        self._thread.start()

    def _hold(self, address: str | None, num_cpus: int | None) -> None:
        try:
            _init(address, num_cpus)
        except BaseException as err:  # noqa: BLE001 - handed to the thread that waits (wait)
            self.error = err
            return
        finally:
            self._up.set()
        self._down.wait()  # Ray's processes die with this thread

    def wait(self) -> bool:
        """Block until Ray is up (raising what ``ray.init`` raised); whether this start began it."""
        if self._thread is None:
            return False
        for name in self.preload:
            importlib.import_module(name)
        self._up.wait()
        if self.error is not None:
            raise self.error
        return True

    def release(self) -> None:
        """After ``ray.shutdown``: let the thread end."""
        self._down.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def abandon(self) -> None:
        """A run that ends before its session took this Ray over: wait for the start, shut it down."""
        if self._thread is None or self.taken:
            return
        self._up.wait()
        if self.error is None:
            import ray

            ray.shutdown()
        self.release()


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None,
                started: RayStart | None = None) -> Iterator[str]:
    """Connect to (or start) Ray for the block; reuse a session that is already up (tests, notebooks).

    ``started``: a ``RayStart`` begun earlier (same address), taken over rather than starting again.
    Yields a one-line description of where the work runs, for the summary.
    """
    import ray

    if started is not None:
        started.taken = True
        began = started.wait()
    else:
        began = False
    if ray.is_initialized() and not began:
        yield _describe(ray)
        return
    on_term = signal.getsignal(signal.SIGTERM)
    if not began:
        _init(address, num_cpus)
    if on_term is not None and threading.current_thread() is threading.main_thread():
        # ray.init replaces the SIGTERM handler (its core worker then aborts the process with a
        # stack dump, exit 134): keep the caller's, so SIGTERM stops a run like Ctrl-C.
        signal.signal(signal.SIGTERM, on_term)
    try:
        with native_noise_dropped():  # after ray.init: the processes it started keep the real stderr
            yield _describe(ray)
    finally:
        ray.shutdown()
        if started is not None:
            started.release()


# Lines Ray's C++ core writes to the driver's stderr (file descriptor 2, not Python's logging)
# that a user of this pipeline can do nothing about.
NATIVE_NOISE: tuple[bytes, ...] = (
    # Ray Data starts each actor of a pool with its context and function as object-store arguments
    # and max_restarts=-1 (actor fault tolerance, which we keep: a lost node's actors restart); the
    # core worker then warns, once per actor, that a restart would fail if those objects were lost.
    # They are owned by the driver, which outlives the actors.
    b"has constructor arguments in the object store and max_restarts > 0",
)


@contextlib.contextmanager
def native_noise_dropped() -> Iterator[None]:
    """Pass the driver's file descriptor 2 through a thread that drops ``NATIVE_NOISE`` lines.

    Everything else (progress bars, with their carriage returns, warnings, errors) goes through
    unchanged, as it arrives. Nothing is filtered when stderr has no file descriptor (a notebook).
    """
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    copier = threading.Thread(target=_copy_dropping_noise, args=(read_end, real), name="stderr-filter", daemon=True)
    copier.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer is gone: the copier drains it and ends
        copier.join(timeout=5)
        os.close(real)


def _copy_dropping_noise(read_end: int, out: int) -> None:
    with contextlib.suppress(OSError):
        while chunk := os.read(read_end, 65536):
            if any(noise in chunk for noise in NATIVE_NOISE):
                chunk = b"\n".join(line for line in chunk.split(b"\n") if not any(n in line for n in NATIVE_NOISE))
            if chunk:
                os.write(out, chunk)
    os.close(read_end)


def quiet_known_noise() -> None:
    """Drop Ray start-up lines that tell a user of this pipeline nothing they can act on.

    Ray Data warns "Progress bars disabled" on the first execution because the per-sample runner
    turns its bars off (it draws its own, per image); Ray logs that warning through ``log_once``,
    so taking the key here, once, is how to say "already said".

    Ray also warns on every start of a local cluster that it enabled token authentication (its
    default, which we keep): that line is dropped, and any other of that logger's warnings kept;
    so is its note that a ``ray.init`` on a thread (``RayStart``) set no SIGTERM handler.
    (Setting RAY_AUTH_MODE=token, which also silences it, made ray.init fail with InvalidAuthToken
    when another local Ray had written a different token.)
    """
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")
    for name, notice in (("ray._private.authentication.authentication_token_setup",
                          "Token authentication is enabled for this Ray cluster"),
                         # RayStart runs ray.init on a thread, where Ray leaves the SIGTERM handler
                         # alone, and says so: ours is the one the run keeps anyway (ray_session)
                         ("ray._private.worker", "SIGTERM handler is not set because current thread")):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.notice == notice for f in logger.filters):
            logger.addFilter(_DropNotice(notice))


class _DropNotice(logging.Filter):
    def __init__(self, notice: str) -> None:
        super().__init__()
        self.notice = notice

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.notice)


def _describe(ray) -> str:  # noqa: ANN001 - the ray module
    resources = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    cpus = resources.get("CPU", 0)
    gpus = resources.get("GPU", 0)
    return f"Ray {ray.__version__}: {nodes} node(s), {cpus:g} CPU, {gpus:g} GPU"
