"""Faults of the machine, not of the data: a driver SIGKILLed mid-stage, a disk that fills up, an
output that cannot be written. Each must end in a clear message, with nothing marked done that is
not complete, and a rerun must give exactly what an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import free_port
from run_compare import assert_runs_equal, curated_digests, load_run

from manifests.store import RunLayout
from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]


KILL_CONFIG = """
[ocr]
engine = "rapidocr"
batch_size = 4
[clip]
batch_size = 4     # small batches: shards finish one by one, so a kill can land between them
[reshard]
samples_per_shard = 8
"""


KILL_POLICIES = ("all", "no-parrot", "tmars")


@pytest.fixture(scope="module")
def kill_reference(ray_local, tmp_path_factory) -> tuple[list[str], Path]:
    """The killed runs' arguments (output aside) and an uninterrupted run of them."""
    base = tmp_path_factory.mktemp("kill")
    config = base / "kill.toml"
    config.write_text(KILL_CONFIG)
    args = ["curate", "--samples", "24", "--shard-size", "4", "--port", str(free_port()), "--config", str(config),
            "--policies", ",".join(KILL_POLICIES), "--no-progress"]
    reference = base / "uninterrupted"
    assert main([*args, "--output", str(reference)]) == 0
    return args, reference


def _start_and_wait_mid_stage(args: list[str], root: Path, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """Start `python -m pipeline curate` in its own process group; return once the per-sample
    stages have finished a shard (so a signal now lands mid-stage)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args, "--output", str(root)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
    )
    layout = RunLayout(root)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not layout.done_shards("clip_score"):
        time.sleep(0.02)
    return proc


def _assert_resumes_to_reference(args: list[str], root: Path, reference: Path) -> None:
    layout = RunLayout(root)
    done_at_stop = len(layout.done_shards("clip_score"))
    assert 1 <= done_at_stop < len(layout.done_shards("download")), "the stop must land mid-stage"
    assert not (root / "curated").exists()
    assert main([*args, "--output", str(root)]) == 0
    want = load_run(str(reference), KILL_POLICIES)
    got = load_run(str(root), KILL_POLICIES)
    assert_runs_equal(got, want)
    for stage in ("download", "ocr", "parrot", "clip_score"):
        uids = [r["uid"] for r in got[stage]]
        assert len(uids) == len(set(uids)) == len(want[stage])
    assert curated_digests(str(root), KILL_POLICIES) == curated_digests(str(reference), KILL_POLICIES)


@pytest.mark.slow
def test_driver_killed_mid_stage_resumes_to_identical_outputs(kill_reference, tmp_path):
    """SIGKILL `python -m pipeline curate`'s process group while the per-sample stages are part
    done; the rerun's manifests and curated shards equal an uninterrupted run's."""
    args, reference = kill_reference
    root = tmp_path / "killed"
    proc = _start_and_wait_mid_stage(args, root)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _assert_resumes_to_reference(args, root, reference)


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_resumes(kill_reference, tmp_path):
    """`kill PID` (SIGTERM, what batch schedulers send) mid-stage: one line, exit 143, no trace or
    abort (Ray's core worker used to dump a stack and abort, exit 134); the rerun resumes."""
    args, reference = kill_reference
    root = tmp_path / "terminated"
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = _start_and_wait_mid_stage(args, root, stderr=err)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    text = log.read_text(errors="replace")
    assert "terminated (SIGTERM): rerun the same command to resume" in text
    for noise in ("Traceback", "SIGABRT", "Fatal Python error", "SIGTERM received"):
        assert noise not in text, text[-3000:]
    _assert_resumes_to_reference(args, root, reference)


HALF_BUILT_ON_INTERRUPT = """
import sys
import pipeline.cli as cli

class HalfBuilt:
    # like Ray Data's Dataset when the interrupt lands in its __init__: __del__ reads what was never set
    def __init__(self):
        raise KeyboardInterrupt
    def __del__(self):
        self.executor

def interrupted_command(args):
    HalfBuilt()

cli.cmd_stats = interrupted_command
sys.exit(cli.main(["stats"]))
"""


def test_an_interrupt_inside_a_constructor_prints_one_line_not_a_trace():
    """CI caught it once: SIGTERM landed inside Ray Data's ``Dataset.__init__`` and the half-built
    object's ``__del__`` printed "Exception ignored ... Traceback" after the one-line message."""
    done = subprocess.run([sys.executable, "-c", HALF_BUILT_ON_INTERRUPT], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert "interrupted: rerun the same command to resume" in done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def test_unwritable_output_is_one_clear_error(tmp_path, capsys):
    """An output root that cannot be written (a file is in the way) fails before any work."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    code = main(["curate", "--output", str(blocker / "run"), "--samples", "4", "--port", str(free_port()), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "not writable" in err and str(blocker / "run") in err and "Traceback" not in err
    assert blocker.read_text().startswith("a file")


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 1.5 MiB (needs mount rights: root in a container with CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _complete_tar_uids(tar_path: Path) -> list[str]:
    """uids in a tar, reading every member to the end (a truncated tar raises)."""
    uids = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            data = tar.extractfile(member).read() if member.isfile() else b""
            if member.name.endswith(".json"):
                uids.append(json.loads(data)["uid"])
    return uids


@pytest.mark.slow
def test_disk_full_marks_nothing_done_that_is_incomplete_and_resumes(ray_local, small_disk, tmp_path):
    """The output disk fills up mid-run (real ENOSPC from a 1.5 MiB tmpfs): the run ends with a
    message naming it, every part that exists describes a complete tar, and after the disk grows
    the same command finishes with every sample exactly once."""
    root = small_disk / "run"
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text('[ocr]\nengine = "rapidocr"\n')
    args = ["curate", "--output", str(root), "--samples", "40", "--shard-size", "8", "--port", str(port),
            "--config", str(config), "--policies", "all", "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "No space left on device" in output, output[-3000:]
    own = [line for line in done.stderr.splitlines() if "pid=" not in line]  # not lines Ray forwards from workers
    assert not any("Traceback" in line for line in own), done.stderr[-3000:]
    assert "rerun the same command" in output

    layout = RunLayout(root)
    parts = sorted(layout.done_shards("download"))
    for shard in parts:  # a part is the completion marker: its tar must be whole and hold its ok rows
        rows = pq.read_table(layout.part_path("download", shard)).to_pylist()
        ok = sorted(r["uid"] for r in rows if r["status"] == "ok")
        assert sorted(_complete_tar_uids(layout.shards_dir / f"{shard}.tar")) == ok
    assert not (root / "curated" / "all" / "sizes.json").exists() or (root / "curated" / "all" / "manifest.parquet").exists()

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(args) == 0
    download = pq.read_table(layout.stage_dir("download")).to_pylist()
    uids = [r["uid"] for r in download]
    assert len(uids) == len(set(uids)) == 48  # 40 good + 8 broken on purpose
    ok = sorted(r["uid"] for r in download if r["status"] == "ok")
    assert len(ok) == 40
    in_tars = sorted(u for tar in layout.shards_dir.glob("*.tar") for u in _complete_tar_uids(tar))
    assert in_tars == ok
    for stage in ("ocr", "parrot", "clip_score"):
        scored = [r["uid"] for r in pq.read_table(layout.stage_dir(stage)).to_pylist()]
        assert sorted(scored) == ok, stage
    curated = pq.read_table(root / "curated" / "all" / "manifest.parquet").column("uid").to_pylist()
    assert sorted(curated) == ok
    shutil.rmtree(root, ignore_errors=True)
