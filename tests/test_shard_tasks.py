"""The one shard-task runner, on the session's local Ray: both failure rules, the stall timeout,
a worker that dies mid-task, and a stage whose output breaks its declared schema."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from ray import cloudpickle

from core.errors import Stalled
from pipeline.shard_tasks import ShardTask, error_line, run_shard_tasks
from stages.base import Resources, ShardOutput, ShardStage, StageContractError

# Ray's workers cannot import this test module by name: send its functions by value instead.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class TinyStage(ShardStage):
    """A shard stage that declares two columns; the task functions below do its work."""

    name = "tiny"
    reads = ("uid",)
    output_schema = pa.schema([pa.field("uid", pa.string()), pa.field("value", pa.int64())])

    def resources(self, gpus_available: bool) -> Resources:
        return Resources(cpus=0.5)

    def process_shard(self, shard: str, inputs: object, work_dir: Path) -> ShardOutput:
        return ShardOutput(pa.table({"uid": [f"{shard}-0"], "value": [1]}, schema=self.output_schema))


def ok_task(shard: str) -> ShardOutput:
    return TinyStage().process_shard(shard, None, Path("."))


def failing_task(shard: str) -> ShardOutput:
    raise ValueError("the first line\n" + "x" * 500)


def sleeping_task(shard: str, seconds: float) -> ShardOutput:
    time.sleep(seconds)
    return ok_task(shard)


def dying_once_task(shard: str, marker: str) -> ShardOutput:
    """Kill its own worker process on the first attempt, as an OOM kill would; succeed after."""
    if not os.path.exists(marker):
        Path(marker).write_text("attempt 1")
        os._exit(1)
    return ok_task(shard)


def dropping_task(shard: str) -> ShardOutput:
    return ShardOutput(pa.table({"uid": [f"{shard}-0"]}))  # "value" missing: a bug in the stage


class Collected(dict):
    """on_done: remembers each shard's output rows."""

    def __call__(self, shard: str, output: ShardOutput) -> None:
        self[shard] = output.manifest.num_rows


def _run(fn, tasks: list[ShardTask], done: Collected, **kwargs) -> dict[str, str]:
    return run_shard_tasks(TinyStage(), fn, tasks, on_done=done, progress=False, **kwargs)


def _dispatch(shard: str, kind: str, *args: object) -> ShardOutput:
    """One task function for mixed tasks: the runner takes one ``fn`` for all shards."""
    return {"ok": ok_task, "fail": failing_task, "sleep": sleeping_task}[kind](shard, *args)


def test_error_line_is_the_last_line_cut_short():
    assert error_line(ValueError("a\nb\n")) == "b"
    assert error_line(ValueError("y" * 400)) == "y" * 300
    assert error_line(KeyboardInterrupt()) == "KeyboardInterrupt"


def test_continue_records_the_failed_shard_and_finishes_the_others(ray_local):
    done = Collected()
    tasks = [ShardTask(s, (s, kind), 1) for s, kind in (("a", "ok"), ("b", "fail"), ("c", "ok"))]
    failed = _run(_dispatch, tasks, done, failure="continue")
    assert dict(done) == {"a": 1, "c": 1}
    assert list(failed) == ["b"]
    kind, line = failed["b"].split(": ", 1)
    assert "ValueError" in kind and line == "x" * 300  # the traceback's last line, trimmed


def test_stop_cancels_the_rest_and_names_the_shard(ray_local):
    done = Collected()
    tasks = [ShardTask("bad", ("bad", "fail"), 1)] + [ShardTask(s, (s, "sleep", 60.0), 1) for s in ("s1", "s2")]
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^tiny run: shard bad failed: x{300}$"):
        _run(_dispatch, tasks, done, failure="stop", label="tiny run")
    assert time.monotonic() - started < 30 and not done


def test_stall_cancels_and_names_the_pending_shard(ray_local):
    done = Collected()
    tasks = [ShardTask("quick", ("quick", "ok"), 1), ShardTask("slow", ("slow", "sleep", 120.0), 1)]
    started = time.monotonic()
    with pytest.raises(Stalled, match=r"^tiny: no shard finished in 2 s; waiting on shard\(s\) slow; asked per replica: "
                       r"tiny task 0.5 CPU; free now: \d+(\.\d+)? CPU, 0 GPU$"):
        _run(_dispatch, tasks, done, failure="continue", stall_seconds=2.0)
    assert time.monotonic() - started < 20
    assert dict(done) == {"quick": 1}


def test_a_worker_killed_mid_task_is_retried(ray_local, tmp_path):
    marker = tmp_path / "attempted"
    done = Collected()
    failed = _run(dying_once_task, [ShardTask("a", ("a", str(marker)), 1)], done, failure="stop")
    assert failed == {} and dict(done) == {"a": 1} and marker.read_text() == "attempt 1"


def test_output_that_breaks_the_schema_is_refused_naming_the_column(ray_local):
    done = Collected()
    with pytest.raises(StageContractError, match=r"stage 'tiny' broke its output schema: missing column\(s\) value"):
        _run(dropping_task, [ShardTask("a", ("a",), 1)], done, failure="continue")
    assert not done
