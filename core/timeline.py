"""Start-up events of a run, as JSON lines in one file, when ``CLIP_CURATION_TIMELINE`` names it.

Where the seconds before the first processed image go (Ray's start, actor processes, model loads,
the first batch) is spread over the driver and every actor. Each writes its events here with the
wall clock and its pid; ``make bench``'s DAG section reads the file back (bench/dag_bench.py).
Unset (the default), ``mark`` does nothing. Ray's local workers inherit the driver's environment,
so one variable set before the run reaches them; a line is one short ``O_APPEND`` write, which
processes on one machine do not interleave.
"""

from __future__ import annotations

import json
import os
import sys
import time

TIMELINE_ENV = "CLIP_CURATION_TIMELINE"
_failed = False


def absolute() -> None:
    """Make the timeline's path absolute in this process's environment, before Ray starts: a
    worker's working directory is not the driver's."""
    path = os.environ.get(TIMELINE_ENV)
    if path:
        os.environ[TIMELINE_ENV] = os.path.abspath(path)


def mark(event: str, **fields: object) -> None:
    """Append ``{"event", "t" (epoch s), "pid", **fields}`` to the timeline file, if one is set."""
    path = os.environ.get(TIMELINE_ENV)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as err:  # a diagnostic never fails a run: said once per process, then dropped
        global _failed
        if not _failed:
            _failed = True
            print(f"warning: {TIMELINE_ENV}={path}: cannot write the timeline ({err})", file=sys.stderr)


def read(path: str) -> list[dict]:
    """The events of a timeline file, in the order they were written."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
