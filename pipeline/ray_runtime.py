"""Ray start-up in one place: an embedded local Ray by default, a cluster with --address/RAY_ADDRESS."""

from __future__ import annotations

import contextlib
import logging
import os
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
    if address is None:
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        # workers must import our packages even when run from another folder
        kwargs["runtime_env"] = {"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}
    ray.init(address=address, **kwargs)
    try:
        yield _describe(ray)
    finally:
        ray.shutdown()


def _describe(ray) -> str:  # noqa: ANN001 - the ray module
    resources = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    cpus = resources.get("CPU", 0)
    gpus = resources.get("GPU", 0)
    return f"Ray {ray.__version__}: {nodes} node(s), {cpus:g} CPU, {gpus:g} GPU"
