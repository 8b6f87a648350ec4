"""What a user sees: `python -m pipeline curate` on the embedded set, as typed in a terminal (its
own Ray, progress bars on), prints the progress bars, warnings a user can act on (each once) and
the summary; no traceback, abort or Ray-internal line."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port
from core.timeline import TIMELINE_ENV
from core.timeline import read as read_timeline

REPO = Path(__file__).resolve().parents[1]
NOISE = ("Traceback", "SIGABRT", "Fatal Python error", "core_worker", "WARNING:root", "Progress bars disabled",
         "Token authentication", "(pid=", "pid=")
SAMPLES, SHARD_SIZE = 16, 4


def test_a_clean_run_prints_bars_warnings_once_and_the_summary(tmp_path):
    config = tmp_path / "fast.toml"
    config.write_text('[ocr]\nengine = "rapidocr"\nbatch_size = 4\n[clip]\nbatch_size = 4\n')
    timeline_file = tmp_path / "timeline.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "curate", "--samples", str(SAMPLES), "--shard-size", str(SHARD_SIZE),
         "--port", str(free_port()), "--config", str(config), "--output", str(tmp_path / "run"), "--policies", "all"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, TIMELINE_ENV: str(timeline_file)},
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-4000:]
    lines = [line for chunk in console.splitlines() for line in chunk.split("\r") if line.strip()]
    for noise in NOISE:
        assert not any(noise in line for line in lines), (noise, [line for line in lines if noise in line][:3])
    # the random-weights warning: once, from the driver, with what to do about it
    random_init = [line for line in lines if "randomly initialised weights" in line]
    assert random_init == ["warning: clip_score: CLIP scores from randomly initialised weights are not meaningful; "
                           "set clip.pretrained to a tag or checkpoint"]
    # the per-sample bar moves as images finish, not once per run: some count between 0 and all
    bar = [line for line in lines if line.startswith("ocr+parrot+caption+clip_score+dedup:")]
    counts = {line.split("|")[2].split()[0] for line in bar if line.count("|") >= 2}
    assert f"0/{SAMPLES}" in counts and f"{SAMPLES}/{SAMPLES}" in counts and len(counts) >= 3, counts
    for header in ("== download:", "== per-sample stages:", "== policies", "== report:"):
        assert any(line.startswith(header) for line in lines), header
    # start-up apart from the steady rate: in the summary, and in the timeline the driver and every
    # actor wrote (what make bench's DAG section breaks down), in the order a run goes through it
    assert any(line.startswith("   the first ") and " came out after " in line for line in lines)
    events = read_timeline(str(timeline_file))
    driver = [e["event"] for e in events if "stage" not in e]
    order = ["command_start", "ray_start", "ray_ready", "pipeline_start", "execution_start", "first_images_out",
             "pipeline_done"]
    assert [e for e in driver if e in order][:len(order)] == order, driver
    at = {e["event"]: e["t"] for e in reversed(events) if "stage" not in e}
    for stage in ("ocr", "parrot", "caption", "clip_score", "dedup"):
        mine = {e["event"]: e["t"] for e in reversed(events) if e.get("stage") == stage}
        assert at["execution_start"] <= mine["actor_start"] <= mine["model_loaded"] <= mine["first_batch_done"], stage
        assert mine["first_batch_done"] <= at["pipeline_done"], stage
    pids = {stage: {e["pid"] for e in events if e.get("stage") == stage} for stage in ("ocr", "parrot", "clip_score", "dedup")}
    assert pids["ocr"] != {e["pid"] for e in events if "stage" not in e}
    # the light stages ride in the actor of the stage before them (on CPU): no process of their own
    assert pids["parrot"] == pids["ocr"] and pids["dedup"] == pids["clip_score"], pids
    # reading and decoding run as one operator, at most as many shards at once as its pace needs
    # (one on a small machine: each task more is a worker process that imports Ray Data)
    reads = sorted((e["t"], +1 if e["event"] == "shard_read_start" else -1) for e in events
                   if e["event"] in ("shard_read_start", "shard_read_end"))
    assert len(reads) == 2 * SAMPLES // SHARD_SIZE, reads
    at_once = max(itertools.accumulate(step for _, step in reads))
    assert at_once <= _read_tasks_here(config), reads
    unexplained = [line for line in lines if not (
        line.startswith(("curate embedded", "download:", "ocr+parrot+caption+clip_score+dedup:", "reshard all:", "warning: "))
        or line.startswith(("==", " "))
    )]
    assert not unexplained, unexplained[:10]


def _read_tasks_here(config_path: Path) -> int:
    """The read tasks a run of the test's config gets on this machine's cores."""
    from pipeline.config import load_config
    from pipeline.dag import step
    from pipeline.sample_runner import pool_sizes, read_tasks

    config = load_config(config_path)
    steps = [step(n) for n in ("ocr", "parrot", "caption", "clip_score", "dedup")]
    return read_tasks(config, steps, pool_sizes(config, steps, {"CPU": os.cpu_count() or 1})) or SAMPLES


def test_the_timeline_is_written_only_when_asked_for(tmp_path, monkeypatch):
    from core import timeline

    path = tmp_path / "t.jsonl"
    monkeypatch.delenv(TIMELINE_ENV, raising=False)
    timeline.mark("nothing")
    assert not path.exists()
    monkeypatch.setenv(TIMELINE_ENV, str(path))
    timeline.mark("ray_start")
    timeline.mark("model_loaded", stage="ocr")
    events = read_timeline(str(path))
    assert [(e["event"], e.get("stage"), e["pid"]) for e in events] == [("ray_start", None, os.getpid()),
                                                                       ("model_loaded", "ocr", os.getpid())]
    assert events[0]["t"] <= events[1]["t"]


PROBE = """
import os, time
import psutil, ray
from pipeline.ray_runtime import ray_session

@ray.remote(num_cpus=0.5)
def worker_pid():
    time.sleep(1)
    return os.getpid()

with ray_session(num_cpus=2):
    pids = set(ray.get([worker_pid.remote() for _ in range(4)]))  # 4 workers: twice Ray's soft limit
    time.sleep(6)  # Ray's idle killer would end the two over the limit after ~1 s idle
    print(len(pids), sum(psutil.pid_exists(pid) for pid in pids))
"""


def test_a_local_session_keeps_idle_workers_until_it_ends():
    """Workers that ran downloads aborted in Ray's teardown of an idle worker (`Mutex corrupt`,
    SIGABRT on the console); a local session keeps idle workers, which end with the session."""
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    started, alive = map(int, done.stdout.split()[-2:])
    assert started == 4 and alive == 4, done.stdout
