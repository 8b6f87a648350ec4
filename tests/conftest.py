"""Shared fixtures: one local Ray for the session, loopback ports, and one small embedded run."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

SMALL_SAMPLES = 40
SMALL_SHARD_SIZE = 12
RESHARD_SIZE = 8


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """An embedded local Ray shared by the tests (the pipeline reuses a running session)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def embedded_run(ray_local, tmp_path_factory) -> dict:
    """`curate` of a small embedded dataset, done once; tests read what it wrote."""
    from pipeline.cli import main

    base = tmp_path_factory.mktemp("embedded")
    out = base / "run"
    config = base / "config.toml"
    config.write_text(f"[reshard]\nsamples_per_shard = {RESHARD_SIZE}\n")
    port = free_port()
    args = [
        "curate",
        "--config", str(config),
        "--output", str(out),
        "--samples", str(SMALL_SAMPLES),
        "--shard-size", str(SMALL_SHARD_SIZE),
        "--port", str(port),
        "--no-progress",
    ]
    assert main(args) == 0
    return {"root": Path(out), "port": port, "args": args, "config": config}
