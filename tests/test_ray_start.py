"""Ray started on a thread while the driver plans (pipeline.ray_runtime.RayStart), on a real local
Ray in a process of its own (the tests' shared Ray would be reused, not started)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "SIGTERM handler is not set" not in done.stderr  # Ray's note about its thread: dropped
    return done.stdout


def test_a_ray_started_on_a_thread_serves_the_run_after_the_thread_would_have_ended():
    """The processes Ray spawns die with the thread that spawned them (the parent-death signal):
    the session must still run tasks well after ray.init returned, then shut down."""
    out = _run(
        "import sys, time, ray\n"
        "from pipeline.ray_runtime import RayStart, ray_session\n"
        "start = RayStart(num_cpus=2, preload=('ray.data',))\n"
        "print('ray.data before', 'ray.data' in sys.modules, flush=True)\n"
        "with ray_session(started=start) as where:\n"
        "    print('ray.data in the session', 'ray.data' in sys.modules, flush=True)\n"
        "    time.sleep(3)\n"
        "    print(where, ray.get(ray.remote(lambda: 41 + 1).remote()), flush=True)\n"
        "print('after', ray.is_initialized(), start._thread.is_alive() if start._thread else None)\n"
    )
    lines = out.splitlines()
    # the module the run needs next was imported by the waiting thread, not left for after the start
    assert lines[:2] == ["ray.data before False", "ray.data in the session True"], out
    assert lines[2].startswith("Ray ") and lines[2].endswith(" 42"), out
    assert lines[3] == "after False False", out  # shut down, and the thread that held it has ended


def test_a_run_that_stops_before_its_session_shuts_the_early_ray_down():
    out = _run(
        "import psutil, ray\n"
        "from pipeline.ray_runtime import RayStart\n"
        "start = RayStart(num_cpus=2)\n"
        "start.abandon()\n"
        "children = [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != 'zombie']\n"
        "print(ray.is_initialized(), [p.name() for p in children])\n"
    )
    assert out.strip() == "False []", out


def test_an_early_start_is_not_made_when_ray_is_already_up():
    out = _run(
        "import ray\n"
        "from pipeline.ray_runtime import RayStart, ray_session\n"
        "ray.init(num_cpus=1, include_dashboard=False, logging_level='ERROR')\n"
        "start = RayStart()\n"
        "with ray_session(started=start) as where:\n"
        "    pass\n"
        "print(start._thread, ray.is_initialized())\n"  # reused, and left up for its owner
    )
    assert out.strip() == "None True", out
