"""One Ray task per shard, for every shard stage (download, reshard): submit, wait, retry, report.

What the shard stages share is written once here. Each task asks for its stage's declared
resources and is retried (``MAX_RETRIES``) when its worker process dies (an OOM kill, a lost
node); an exception raised by the task's own code is not retried, since the same inputs would
raise again. Results come back one at a time, as they finish, and go to ``on_done`` on the
driver: the driver is the one that commits what must only be written by a live run (see
``pipeline.download_runner`` for why the download part is written there).

A failed shard is handled by the rule the caller chooses:

- ``"continue"``: record the shard's error and let the others finish (download: shards are
  independent, and the rerun redoes exactly the failed ones);
- ``"stop"``: cancel the rest and raise, naming the shard (reshard: a policy's folder is complete
  or redone whole, so the other shards' work would be thrown away anyway).

Under either rule, output that breaks the stage's declared schema stops the run (a bug in the
stage repeats on every shard), and no shard finishing for ``stall_seconds`` cancels everything and
raises :class:`core.errors.Stalled` naming the shards still pending and the resources asked and
free (``pipeline.watchdog``): a hung server, a wedged worker or a task no node can take ends the
run with a message instead of holding it forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from core.errors import Stalled
from pipeline.watchdog import WatchdogConfig, resources_line, first_shards
from stages.base import ShardOutput, ShardStage, StageContractError

STALL_SECONDS = WatchdogConfig().stall_timeout_s  # no shard finished for this long: cancel all, name the pending shards
MAX_RETRIES = 2  # re-runs of a task whose worker died
ERROR_CHARS = 300  # an error is reported as one line of at most this many characters
POLL_SECONDS = 5.0  # how often the stall clock is looked at (less for a short stall_seconds)

FailureRule = Literal["continue", "stop"]


@dataclass(frozen=True)
class ShardTask:
    """One shard's call: the task function's arguments, and the samples it moves the bar by."""

    shard: str
    args: tuple[Any, ...]
    samples: int


def error_line(err: BaseException) -> str:
    """The line of an error that names its cause, cut to ``ERROR_CHARS``.

    A Ray task error's text is the whole remote traceback; its last line is the exception itself.
    """
    text = str(err).strip()
    return text.splitlines()[-1][:ERROR_CHARS] if text else type(err).__name__


def run_shard_tasks(
    stage: ShardStage,
    fn: Callable[..., ShardOutput],
    tasks: Sequence[ShardTask],
    *,
    on_done: Callable[[str, ShardOutput], None],
    failure: FailureRule,
    label: str | None = None,
    progress: bool = True,
    stall_seconds: float = STALL_SECONDS,
) -> dict[str, str]:
    """Run ``fn(*task.args)`` as one Ray task per shard (Ray must be up); shard -> error of the
    shards that failed under the ``"continue"`` rule.

    ``fn`` returns the shard's :class:`ShardOutput`; its manifest is checked against ``stage``'s
    schema, then handed to ``on_done(shard, output)`` on the driver. An exception from ``fn`` or
    from ``on_done`` is the shard's failure. ``label`` names the work in the progress bar and in
    errors (default: the stage's name).
    """
    import ray
    from tqdm import tqdm

    if failure not in ("continue", "stop"):
        raise ValueError(f"failure rule {failure!r}: use 'continue' or 'stop'")
    label = label or stage.name
    if not tasks:
        return {}
    if not ray.is_initialized():
        raise RuntimeError(f"{label} needs a running Ray session (ray.init or pipeline.ray_runtime.ray_session)")
    resources = stage.resources(gpus_available=ray.cluster_resources().get("GPU", 0) > 0)
    remote = ray.remote(fn).options(
        num_cpus=resources.cpus,
        num_gpus=resources.gpus,
        max_retries=MAX_RETRIES,
        retry_exceptions=False,
        name=f"{stage.name}_shard",
    )
    pending = {remote.remote(*task.args): task for task in tasks}
    failed: dict[str, str] = {}
    poll = min(POLL_SECONDS, stall_seconds / 4)
    bar = tqdm(total=sum(task.samples for task in tasks), unit="sample", desc=label, disable=not progress)
    last_finished = time.monotonic()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll)
            if not ready:
                if time.monotonic() - last_finished > stall_seconds:
                    names = first_shards(sorted(task.shard for task in pending.values()))
                    free = ray.available_resources()
                    _cancel(pending, force=True)  # a stalled task may not heed a polite cancel
                    asked = {f"{stage.name} task": {"CPU": resources.cpus, "GPU": resources.gpus}}
                    raise Stalled(f"{label}: no shard finished in {stall_seconds:.0f} s; waiting on shard(s) {names}; "
                                  f"{resources_line(asked, free)}")
                continue
            last_finished = time.monotonic()
            for ref in ready:
                task = pending.pop(ref)
                try:
                    output = ray.get(ref)
                    stage.check_output(output.manifest.column_names)
                    on_done(task.shard, output)
                except StageContractError:
                    _cancel(pending)
                    raise
                except Exception as err:  # noqa: BLE001 - the rule decides what one shard's failure does
                    if failure == "stop":
                        _cancel(pending)
                        raise RuntimeError(f"{label}: shard {task.shard} failed: {error_line(err)}") from err
                    failed[task.shard] = f"{type(err).__name__}: {error_line(err)}"
                bar.update(task.samples)
    finally:
        bar.close()
    return failed


def _cancel(refs: Iterable[Any], force: bool = False) -> None:
    """Cancel tasks; not forced unless asked, since a killed worker costs a process restart."""
    import ray

    for ref in refs:
        ray.cancel(ref, force=force)
