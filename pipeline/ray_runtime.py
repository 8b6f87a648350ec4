"""Ray start-up in one place: an embedded local Ray by default, a cluster with --address/RAY_ADDRESS."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[str]:
    """Connect to (or start) Ray for the block; reuse a session that is already up (tests, notebooks).

    Yields a one-line description of where the work runs, for the summary.
    """
    import ray

    if ray.is_initialized():
        yield _describe(ray)
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    quiet_known_noise()
    if address is None:
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        # workers must import our packages even when run from another folder
        kwargs["runtime_env"] = {"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}
    on_term = signal.getsignal(signal.SIGTERM)
    ray.init(address=address, **kwargs)
    if on_term is not None and threading.current_thread() is threading.main_thread():
        # ray.init replaces the SIGTERM handler (its core worker then aborts the process with a
        # stack dump, exit 134): keep the caller's, so SIGTERM stops a run like Ctrl-C.
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield _describe(ray)
    finally:
        ray.shutdown()


def quiet_known_noise() -> None:
    """Drop Ray start-up lines that tell a user of this pipeline nothing they can act on.

    Ray Data warns "Progress bars disabled" on the first execution because the per-sample runner
    turns its bars off (it draws its own, per image); Ray logs that warning through ``log_once``,
    so taking the key here, once, is how to say "already said".

    Ray also warns on every start of a local cluster that it enabled token authentication (its
    default, which we keep): that line is dropped, and any other of that logger's warnings kept.
    (Setting RAY_AUTH_MODE=token, which also silences it, made ray.init fail with InvalidAuthToken
    when another local Ray had written a different token.)
    """
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthNotice) for f in auth.filters):
        auth.addFilter(_DropTokenAuthNotice())


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _describe(ray) -> str:  # noqa: ANN001 - the ray module
    resources = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    cpus = resources.get("CPU", 0)
    gpus = resources.get("GPU", 0)
    return f"Ray {ray.__version__}: {nodes} node(s), {cpus:g} CPU, {gpus:g} GPU"
