"""Errors the user can fix, shared by every layer."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration or input problem the user must fix; printed as one line, exit code 2."""


class Stalled(RuntimeError):
    """A step made no progress for ``watchdog.stall_timeout_s`` (a hung server or model call, actors
    that cannot be placed): one line naming the step, its shards in flight and what it waited on;
    exit code 4. Finished shards are kept, so the same command resumes once the cause is fixed."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, batch schedulers), raised in the main thread like Ctrl-C's
    KeyboardInterrupt so that the run stops the same way: cleanup runs, finished shards are kept.
    A KeyboardInterrupt subclass, so that every place that handles Ctrl-C handles it too. Ray's
    blocking calls turn it into a plain KeyboardInterrupt on the way out, so ``sigterm_received``
    is what tells the two apart."""


_SIGTERM_RECEIVED: list[bool] = []


def raise_terminated(signum: int, frame: object) -> None:
    """SIGTERM handler: see ``Terminated``."""
    _SIGTERM_RECEIVED.append(True)
    raise Terminated()


def sigterm_received() -> bool:
    """Whether this process's ``raise_terminated`` has run."""
    return bool(_SIGTERM_RECEIVED)
