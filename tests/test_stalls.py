"""No silent stall: a wait the run cannot win ends within ``watchdog.stall_timeout_s`` with one
message naming the step, its shards and what it waited on (exit 4), and the same command resumes.

Real Ray, real curate runs of the embedded dataset on 127.0.0.1:
- actors that cannot be placed: another job holds every CPU of the (real, local) cluster;
- a model call that never returns: the test-only hook ``CURATION_TEST_HANG_STAGE`` makes the OCR
  actor's batches hang (a subprocess, so the hook reaches its Ray workers);
- a replica that fits on no node is refused before anything starts (:func:`unplaceable`).
Shard tasks (download, reshard) stall the same way: tests/test_shard_tasks.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from core.errors import Stalled
from manifests.store import RunLayout
from pipeline import watchdog
from pipeline.cli import main
from pipeline.sample_runner import HANG_HOOK
from pipeline.watchdog import ProgressWatchdog, unplaceable

REPO = Path(__file__).resolve().parents[1]
STALL_S = 20
ENGINES = """
[ocr]
engine = "rapidocr"
batch_size = 4
[clip]
batch_size = 4
"""
SAMPLES, SHARD_SIZE = 16, 8
NOISE = ("Traceback", "SIGABRT", "Fatal Python error", "core_worker")


def test_a_replica_no_node_can_hold_is_named_with_what_it_asked():
    two_small = [{"CPU": 2.0, "memory": 1e9}, {"CPU": 2.0}]
    assert unplaceable({"ocr": {"CPU": 2.0}, "clip_score": {"CPU": 0.5, "GPU": 0.0}}, two_small) is None
    why = unplaceable({"ocr": {"CPU": 3.0}}, two_small)  # 4 CPUs in all, but no node has 3
    assert why == ("ocr: one replica asks for 3 CPU, and no node has that much (nodes: 2 CPU); lower [ocr] "
                   "cpus_per_replica / gpus_per_replica or add a larger node")
    why = unplaceable({"clip_score": {"CPU": 1.0, "GPU": 0.25}}, [{"CPU": 8.0}, {"CPU": 16.0, "GPU": 0.0}])
    assert why is not None and why.startswith("clip_score: one replica asks for 1 CPU, 0.25 GPU")
    assert "(nodes: 8 CPU, 0 GPU; 16 CPU, 0 GPU)" in why or "(nodes: 16 CPU, 0 GPU; 8 CPU, 0 GPU)" in why


def test_the_watchdog_interrupts_again_when_its_first_interrupt_is_swallowed(monkeypatch):
    """A KeyboardInterrupt that lands in a finaliser is dropped by Python; the wait must still end."""
    monkeypatch.setattr(watchdog, "RESEND_SECONDS", 0.3)
    swallowed = 0
    started = time.monotonic()
    with pytest.raises(Stalled, match="nothing moved"):
        with ProgressWatchdog(0.4, lambda waited: "nothing moved"):
            while time.monotonic() - started < 30:
                try:
                    time.sleep(0.02)
                except KeyboardInterrupt:
                    if swallowed:
                        raise
                    swallowed += 1  # as Python does with an exception raised in a __del__
    assert swallowed == 1 and time.monotonic() - started < 5


def test_the_watchdog_interrupts_whatever_sigint_handler_or_mask_a_library_left(monkeypatch):
    """Seen in make test: an earlier test left SIGINT so that it no longer raised, and the wait never
    ended. During the watch SIGINT raises and is unblocked; after it, what was there is put back."""
    import signal

    monkeypatch.setattr(watchdog, "RESEND_SECONDS", 0.3)
    recorded = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: recorded.append(signum))  # as Ray's DeferSigint does
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        started = time.monotonic()
        with pytest.raises(Stalled):
            with ProgressWatchdog(0.4, lambda waited: "stuck"):
                while time.monotonic() - started < 30:
                    time.sleep(0.02)
        assert time.monotonic() - started < 5 and not recorded
        assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, before)


def test_the_watchdog_sends_nothing_once_its_block_is_left(monkeypatch):
    monkeypatch.setattr(watchdog, "RESEND_SECONDS", 0.05)
    with ProgressWatchdog(60, lambda waited: "never"):
        pass
    time.sleep(0.3)  # a signal sent now would raise KeyboardInterrupt here


def test_pools_that_cannot_start_or_a_call_that_never_returns_end_with_a_message_and_resume(
    ray_local, tmp_path, capsys
):
    config, short = tmp_path / "run.toml", tmp_path / "short-bound.toml"
    config.write_text(ENGINES)  # the default bound, 600 s
    short.write_text(f"[watchdog]\nstall_timeout_s = {STALL_S}\n{ENGINES}")
    out = tmp_path / "run"
    common = ["curate", "--samples", str(SAMPLES), "--shard-size", str(SHARD_SIZE), "--port", str(free_port()),
              "--policies", "all", "--output", str(out), "--no-progress"]
    args = [*common, "--config", str(short)]  # the stalled runs: all downloaded, the rest waits
    layout = RunLayout(out)
    assert main([*common, "--config", str(config), "--stages", "download"]) == 0

    # 1. another job holds every CPU: the actor pools cannot be placed, Ray Data would wait forever
    @ray_local.remote(num_cpus=ray_local.cluster_resources()["CPU"])
    class Hog:
        def ready(self) -> bool:
            return True

    hog = Hog.remote()
    ray_local.get(hog.ready.remote())
    capsys.readouterr()
    started = time.monotonic()
    assert main(args) == 4
    took = time.monotonic() - started
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stalled: ")]
    assert len(lines) == 1, err
    waited = re.match(r"stalled: ocr\+parrot\+caption\+clip_score\+dedup: no image finished in (\d+) s \(", lines[0])
    assert waited and STALL_S <= int(waited.group(1)) <= STALL_S + 10, lines[0]  # the seconds it waited (21 at load)
    assert f"(0 of {SAMPLES} done); shards in flight: 000000, 000001; asked per replica: ocr " in lines[0]
    assert "free now: 0 CPU, 0 GPU" in lines[0]
    assert "rerun the same command to resume" in err and not any(n in err for n in NOISE), err
    assert took < STALL_S + 60, took
    downloaded = {"000000", "000001"}  # the shards with images (a third holds only the broken URLs)
    assert not layout.done_shards("ocr") & downloaded
    ray_local.kill(hog)
    print(f"\nplacement wait ended after {took:.0f} s: {lines[0]}", file=sys.__stdout__)

    # 2. the OCR call never returns (a subprocess: the hook must reach its own Ray's workers)
    started = time.monotonic()
    hung = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=STALL_S + 300, env={**os.environ, HANG_HOOK: "ocr"})
    took = time.monotonic() - started
    assert hung.returncode == 4, hung.stderr[-3000:]
    lines = [line for line in hung.stderr.splitlines() if line.startswith("stalled: ")]
    waited = re.search(r"no image finished in (\d+) s", lines[0]) if len(lines) == 1 else None
    assert waited and STALL_S <= int(waited.group(1)) <= STALL_S + 10, hung.stderr[-3000:]
    assert "shards in flight: 000000, 000001" in lines[0]
    assert not any(n in hung.stderr for n in NOISE), hung.stderr[-3000:]
    assert not layout.done_shards("ocr") & downloaded
    print(f"hung OCR call ended the run after {took:.0f} s (Ray start and download check included): {lines[0]}",
          file=sys.__stdout__)

    # 3. the cause gone, the same command (with the default bound) finishes the run
    assert main([*common, "--config", str(config)]) == 0
    assert layout.done_shards("ocr") == layout.done_shards("clip_score") == layout.done_shards("download")
    assert (out / "curated" / "all" / "sizes.json").is_file()
