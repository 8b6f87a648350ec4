"""Twenty kill points: the driver's whole process group SIGKILLed at seeded random moments spread
over every step of a run (download, the per-sample stages, dup_group, filter, reshard, a catalog
rebuild, the report), and every kill followed by a rerun of the same command.

Slow (~10 min on 2 idle cores): skipped unless CURATION_KILL_TESTS=1 (``make test-kill``).

How the moments are spread. A run of the embedded set spends most of its time in download and
OCR, so wall-clock moments drawn over a whole run would miss the short steps. An uninterrupted
reference run is watched first (its output folder, polled every few ms, and the titles of its Ray
worker processes); that gives each step's start event and its duration. A kill point is then
"step S: its start event in this run + u x S's reference duration", u seeded-uniform in [0, 1).

Why chains. A rerun to completion after every one of 20 kills would cost 20 runs; instead the
kills come in two chains of ten in DAG order: a fresh run is killed in download, its rerun is
killed again later, ..., and the chain's last rerun runs to completion. So every kill is followed
by a rerun of the same command, which resumes from what the kill left. Right after each kill the
output folder is checked: every file under a final name is complete, and every part, selection
and curated shard it holds equals the reference's. After each chain: manifests equal to the
reference (wall-clock columns aside), curated tars byte-identical, every uid once per stage.

The table (kill point, moment, what was running, result) is printed to the test log.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import free_port
from run_compare import VOLATILE, curated_digests, load_run, same

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("CURATION_KILL_TESTS") != "1",
                       reason="20 SIGKILLs of real runs (~10 min): run with `make test-kill`"),
]

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("CURATION_KILL_SEED", "16"))
POLICIES = ("all", "no-parrot", "tmars", "dedup")
SAMPLE_STAGES = ("ocr", "parrot", "clip_score", "dedup")
MANIFEST_STAGES = ("download", *SAMPLE_STAGES, "dup_group")
CONFIG = """
[ocr]
engine = "rapidocr"   # fast on CPU
batch_size = 4
replicas = 1
[clip]
model = "curation-tiny"   # our small open_clip config, random init: scores are real, cheap to compute
batch_size = 4
replicas = 1
[reshard]
samples_per_shard = 8
[decontaminate]
eval_sets = []   # the decontaminate step off: these chains count the catalog rebuilds of dup_group and filter
"""
SAMPLES, SHARD_SIZE = "24", "8"  # 24 good + 8 broken URLs: 4 download shards, one of them all failures

# Two chains of ten kills, each in DAG order (``catalog@X``: the catalog rebuild right after step X).
CHAINS = (
    ("download", "download", "per_sample", "per_sample", "dup_group", "catalog@dup_group", "filter",
     "reshard", "reshard", "report"),
    ("download", "download", "per_sample", "per_sample", "dup_group", "filter", "catalog@filter",
     "reshard", "reshard", "report"),
)
# Each step's start event, and the event that ends its window in the reference run.
WINDOWS = {
    "download": ("download.start", "download.end"),
    "per_sample": ("per_sample.start", "per_sample.end"),
    "dup_group": ("dup_group.start", "catalog@dup_group.start"),
    "catalog@dup_group": ("catalog@dup_group.start", "filter.start"),
    "filter": ("filter.start", "catalog@filter.start"),
    "catalog@filter": ("catalog@filter.start", "catalog@filter.end"),
    "reshard": ("reshard.start", "reshard.end"),
    "report": ("report.start", "report.end"),
}
ORDER = ("download.start", "download.end", "per_sample.start", "per_sample.end", "dup_group.start",
         "catalog@dup_group.start", "filter.start", "catalog@filter.start", "catalog@filter.end",
         "reshard.start", "reshard.end", "report.start", "report.end")
PER_SAMPLE_TITLES = ("ray::MapWorker", "read_shard", "decode_batch")
QUIET_TITLES = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::_StatsActor",
                "ray::ActorLocationTracker", "ray::_AutoscalingCoordinatorActor")
TMP = ".tmp-"
CATALOG_TMP = re.compile(r"^\.tmp-catalog\.duckdb\.[0-9a-f]{12}$")
DOWNLOAD_TMP = re.compile(r"^shards/\.tmp-\d{6}-[0-9a-f]{8}$")


# --- watching a run ---------------------------------------------------------------------------


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every live process in session ``sid`` (the driver's, from
    start_new_session): the driver, Ray's raylet and GCS, and its workers, titled ``ray::<task>``."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2 :].split()
            if int(fields[3]) != sid or fields[0] == b"Z":
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                found[int(name)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
    return found


def busy_titles(procs: dict[int, str]) -> Counter:
    """The Ray workers doing something of ours (task or actor titles), counted."""
    titles = Counter()
    for cmd in procs.values():
        if cmd.startswith("ray::") and not cmd.startswith(QUIET_TITLES):
            titles[cmd.split()[0].removeprefix("ray::")] += 1
    return titles


def list_tree(root: Path) -> set[str]:
    """Relative paths under ``root``, not descending into temporary folders (img2dataset's work)."""
    names = set()
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        prefix = "" if rel == "." else rel + "/"
        names.update(prefix + n for n in files)
        names.update(prefix + d for d in dirs)
        dirs[:] = [d for d in dirs if not d.startswith(TMP)]
    return names


def file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@dataclass(frozen=True)
class Expected:
    """What a complete run holds: the planned shards (from the run's frozen plan) and policies."""

    shards: tuple[str, ...]
    policies: tuple[str, ...] = POLICIES

    @classmethod
    def from_plan(cls, root: Path) -> Expected:
        plan = pq.read_table(root / "input" / "urls.parquet", columns=["shard"])
        return cls(tuple(sorted(set(plan.column("shard").to_pylist()))))

    def download_done(self, names: set[str]) -> bool:
        return all(f"manifests/download/part-{s}.parquet" in names for s in self.shards)

    def samples_done(self, names: set[str]) -> bool:
        return all(f"manifests/{st}/part-{s}.parquet" in names for st in SAMPLE_STAGES for s in self.shards)

    def reshard_done(self, names: set[str]) -> bool:
        return all(f"curated/{p}/sizes.json" in names for p in self.policies)


# The catalog rebuilds of a run, counted from the first one that sees every per-sample part:
# the 1st is followed by dup_group, the 2nd (dup_group's) by filter, the 3rd (filter's) by
# reshard; the one after reshard (every policy's sizes.json there) by Ray's shutdown and the report.
AFTER_REBUILD = {1: "dup_group.start", 2: "filter.start", 3: "catalog@filter.end"}


class RunWatch:
    """One ``python -m pipeline curate`` run in its own session, and the times (seconds since its
    start) at which each step's event was first seen."""

    def __init__(self, args: list[str], root: Path, log: Path, expected: Expected | None = None) -> None:
        self.root, self.expected = root, expected
        root.parent.mkdir(parents=True, exist_ok=True)
        self.initial = list_tree(root) if root.exists() else set()
        self.log = open(log, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--output", str(root)], cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.events: dict[str, float] = {}
        self.polls = 0
        self._event_poll: dict[str, int] = {}
        self.names: set[str] = set(self.initial)
        self.titles: Counter = Counter()
        self.catalog = file_id(root / "catalog.duckdb")
        self.report = file_id(root / "report" / "index.html")
        self.rebuilds_with_samples = 0
        self._titles_at = 0.0
        self.ended: float | None = None
        self.ray_up = False

    def now(self) -> float:
        return time.monotonic() - self.started

    def _event(self, name: str) -> None:
        if name not in self.events:
            self.events[name] = self.now()
            self._event_poll[name] = self.polls

    def _seen_before_this_poll(self, name: str) -> bool:
        return self._event_poll.get(name, self.polls) < self.polls

    def refresh_titles(self) -> None:
        self._titles_at = time.monotonic()
        procs = session_processes(self.proc.pid)
        self.titles = busy_titles(procs)
        self.ray_up = any("raylet" in cmd for cmd in procs.values())

    def poll(self) -> None:
        """One look at the folder (and, every 100 ms, at the worker processes): record new events."""
        self.polls += 1
        catalog = file_id(self.root / "catalog.duckdb")  # before the listing: a rebuild seen here is over
        names = list_tree(self.root) if self.root.exists() else set()
        self.names = names
        if self.expected is None:
            if "input/urls.parquet" not in names:
                return
            self.expected = Expected.from_plan(self.root)
        x, new = self.expected, names - self.initial
        if time.monotonic() - self._titles_at > 0.1:
            self.refresh_titles()
            if any(f"ray::{t}".startswith(PER_SAMPLE_TITLES) or "read_shard" in t or "decode_batch" in t
                   for t in self.titles):
                self._event("per_sample.start")
        if any(DOWNLOAD_TMP.match(n) for n in new):
            self._event("download.start")
        if x.download_done(names):
            self._event("download.end")
        if x.samples_done(names):
            self._event("per_sample.end")
        rebuilt = catalog is not None and catalog != self.catalog
        self.catalog = catalog
        if rebuilt and x.samples_done(names):
            self.rebuilds_with_samples += 1
            if self.rebuilds_with_samples in AFTER_REBUILD:
                self._event(AFTER_REBUILD[self.rebuilds_with_samples])
            if self.rebuilds_with_samples > len(AFTER_REBUILD) and x.reshard_done(names):
                self._event("report.start")  # the rebuild after reshard (which may have had nothing to do)
        if any(CATALOG_TMP.match(n) for n in names):
            for step, over in (("dup_group", "filter.start"), ("filter", "catalog@filter.end")):
                if self._seen_before_this_poll(f"{step}.start") and over not in self.events:
                    self._event(f"catalog@{step}.start")
        if "filter.start" in self.events and any(n.startswith("curated/") for n in new):
            self._event("reshard.start")
        if "reshard.start" in self.events and x.reshard_done(names):
            self._event("reshard.end")
        if "report.start" in self.events and not self.ray_up:
            self._event("ray.down")  # what is left of the report window: rendering the page
        report = file_id(self.root / "report" / "index.html")
        if report is not None and report != self.report:
            self._event("report.end")

    def running(self) -> bool:
        return self.proc.poll() is None

    def latest_event(self) -> str:
        seen = [n for n in ORDER if n in self.events]
        return max(seen, key=lambda n: (self.events[n], ORDER.index(n))) if seen else "start-up"

    def wait(self, timeout: float = 900) -> int:
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.005)
        code = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        self.poll()
        self.ended = self.now()
        self.log.close()
        return code


# --- checks -----------------------------------------------------------------------------------


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    """Every member of a tar, each read to its end (a truncated tar raises)."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read() if m.isfile() else b"") for m in tar]


def tar_uids(path: Path) -> list[str]:
    return [json.loads(data)["uid"] for name, data in tar_members(path) if name.endswith(".json")]


def incomplete_final_files(root: Path) -> list[str]:
    """Files under a final (non-temporary) name that are not whole: Parquet that does not read,
    JSON that does not parse, a tar cut short, a catalog DuckDB cannot open, a report page without
    its end, a download part whose tar lacks its ok rows, a curated tar short of ``sizes.json``."""
    problems = []
    for rel in sorted(list_tree(root)):
        path = root / rel
        if any(part.startswith(TMP) for part in Path(rel).parts) or path.is_dir():
            continue
        try:
            if rel.endswith(".parquet"):
                pq.read_table(path)
            elif rel.endswith(".json"):
                json.loads(path.read_bytes())
            elif rel.endswith(".tar"):
                tar_members(path)
            elif rel.endswith(".duckdb"):
                duckdb.connect(str(path), read_only=True).close()
            elif rel.endswith(".html") and not path.read_text(encoding="utf-8").rstrip().endswith("</html>"):
                problems.append(f"{rel}: page cut short")
        except Exception as err:  # noqa: BLE001 - any failure to read is what we look for
            problems.append(f"{rel}: {type(err).__name__}: {str(err)[:120]}")
    for part in sorted((root / "manifests" / "download").glob("part-*.parquet")):
        shard = part.name[len("part-") : -len(".parquet")]
        ok = sorted(r["uid"] for r in pq.read_table(part).to_pylist() if r["status"] == "ok")
        try:
            in_tar = sorted(tar_uids(root / "shards" / f"{shard}.tar"))
        except Exception as err:  # noqa: BLE001
            in_tar = [f"{type(err).__name__}: {err}"]
        if in_tar != ok:
            problems.append(f"shards/{shard}.tar does not hold the {len(ok)} ok rows of its part")
    for sizes_path in sorted(root.glob("curated/*/sizes.json")):
        folder = sizes_path.parent
        sizes = json.loads(sizes_path.read_text())
        for name, count in sizes.items():
            try:
                keys = {m.split(".", 1)[0] for m, _ in tar_members(folder / name)}
            except Exception as err:  # noqa: BLE001
                problems.append(f"{folder.name}/{name}: listed in sizes.json, {type(err).__name__}")
                continue
            if len(keys) != count:
                problems.append(f"{folder.name}/{name}: {len(keys)} samples, sizes.json says {count}")
        manifest = folder / "manifest.parquet"
        if not manifest.exists() or pq.read_table(manifest).num_rows != sum(sizes.values()):
            problems.append(f"{folder.name}: manifest.parquet missing or not {sum(sizes.values())} rows")
    return problems


def rows(path: Path) -> list[dict]:
    return sorted(pq.read_table(path).to_pylist(), key=lambda r: (r.get("policy") or "", r["uid"]))


def rows_differ(got: list[dict], want: list[dict]) -> str | None:
    """Where two row lists differ (wall-clock columns aside, floats within run_compare's tolerance)."""
    if len(got) != len(want):
        return f"{len(got)} rows, reference {len(want)}"
    for g, w in zip(got, want):
        for column in w:
            if column not in VOLATILE and not same(g.get(column), w[column]):
                return f"uid {w.get('uid')} {column}: {g.get(column)!r} vs {w[column]!r}"
    return None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def differs_from_reference(root: Path, reference: Path) -> list[str]:
    """What is on disk under a final name and differs from the reference: every manifest part,
    selection and curated tar that exists must equal the reference's (a partial run holds fewer
    of them, never other ones), and no uid may appear twice in a stage."""
    problems = []
    for stage in MANIFEST_STAGES:
        seen = Counter()
        for part in sorted((root / "manifests" / stage).glob("part-*.parquet")):
            got = rows(part)
            seen.update(r["uid"] for r in got)
            want = reference / "manifests" / stage / part.name
            why = rows_differ(got, rows(want)) if want.exists() else "not in the reference"
            if why:
                problems.append(f"{stage}/{part.name}: {why}")
        twice = [u for u, n in seen.items() if n > 1]
        if twice:
            problems.append(f"{stage}: {len(twice)} uid(s) in more than one part, e.g. {twice[0]}")
    for selection in sorted((root / "selections").glob("*.parquet")):
        why = rows_differ(rows(selection), rows(reference / "selections" / selection.name))
        if why:
            problems.append(f"selections/{selection.name}: {why}")
    for tar in sorted(root.glob("curated/*/*.tar")):
        if tar.parent.name.startswith(TMP):  # a policy's reshard in progress (pathlib's * matches dot names): not final
            continue
        want = reference / "curated" / tar.parent.name / tar.name
        if not want.exists() or sha256(tar) != sha256(want):
            problems.append(f"curated/{tar.parent.name}/{tar.name}: not the reference's bytes")
    return problems


def completed_run_problems(root: Path, reference: Path) -> list[str]:
    """After a chain's last rerun: the run equals the reference (run_compare.load_run's tables plus
    dedup and dup_group), curated tars are byte-identical, every uid is once in every stage."""
    problems = incomplete_final_files(root) + differs_from_reference(root, reference)
    want, got = load_run(str(reference), POLICIES), load_run(str(root), POLICIES)
    for stage in ("dedup", "dup_group"):
        want[stage] = rows(reference / "manifests" / stage)
        got[stage] = rows(root / "manifests" / stage)
    for table in want:
        key = (lambda r: (r.get("policy") or "", r["uid"])) if table == "curated" else None
        why = rows_differ(sorted(got[table], key=key) if key else got[table],
                          sorted(want[table], key=key) if key else want[table])
        if why:
            problems.append(f"{table}: {why}")
        uids = Counter((r.get("policy"), r["uid"]) for r in got[table])
        if any(n > 1 for n in uids.values()):
            problems.append(f"{table}: a uid appears twice")
    if curated_digests(str(root), POLICIES) != curated_digests(str(reference), POLICIES):
        problems.append("curated tars are not byte-identical to the reference's")
    return problems


# --- killing ----------------------------------------------------------------------------------


@dataclass
class KillPoint:
    chain: int
    target: str
    fraction: float
    window: float
    delay: float = 0.0  # seconds after the start event (the short steps)
    units: int = 0  # the long steps (PROGRESS_UNITS): killed once this many of their units are done
    units_total: int = 0
    durations_no_ray: float = 0.0  # the report's window in a run that did not start Ray
    missed: str = ""
    running: str = ""
    result: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def moment(self) -> str:
        if self.target in PROGRESS_UNITS:
            return f"{WINDOWS[self.target][0]}, then {self.units} of {self.units_total} {PROGRESS_UNITS[self.target][1]}"
        return f"{WINDOWS[self.target][0]} + {self.fraction:.2f} x {self.window:.2f}s"



def describe_state(watch: RunWatch) -> str:
    """What was running when the kill landed: the last step event this run reached, what its
    output folder held, which Ray workers were busy and which temporaries were being written."""
    names, x = watch.names, watch.expected
    step = watch.latest_event()
    counts = []
    downloaded = sum(f"manifests/download/part-{s}.parquet" in names for s in x.shards)
    counts.append(f"download {downloaded}/{len(x.shards)}")
    if downloaded:
        counts.append("ocr/parrot/clip/dedup " + "/".join(
            str(sum(f"manifests/{st}/part-{s}.parquet" in names for s in x.shards)) for st in SAMPLE_STAGES))
    if any(n.startswith("selections/") and not n.startswith("selections/.tmp") for n in names):
        counts.append(f"selections {sum(f'selections/{p}.parquet' in names for p in x.policies)}")
    if any(n.startswith("curated/") for n in names):
        done = sum(f"curated/{p}/sizes.json" in names for p in x.policies)
        tars = sum(1 for n in names if re.fullmatch(r"curated/[^/]+/\d{6}\.tar", n))
        counts.append(f"curated {done}/{len(x.policies)} ({tars} tars)")
    fresh = names - watch.initial
    temporaries = sorted({re.sub(r"\.[0-9a-f]{12}$|-[0-9a-f]{8}$", "", n) for n in fresh if "/.tmp-" in "/" + n})
    busy = ", ".join(f"{t} x{n}" if n > 1 else t for t, n in sorted(watch.titles.items()))
    text = f"after {step}: {'; '.join(counts)}"
    if busy:
        text += f"; ray: {busy}"
    if temporaries:
        text += f"; writing {', '.join(t.replace('.tmp-', '~') for t in temporaries[:3])}"
    return text


# The long steps are killed by progress, not by the clock: after the k-th of their units is done
# (k = fraction x units, so always before the last), in this run, whatever its speed. A delay
# measured on the reference run lands anywhere in a rerun that resumes, or on a loaded machine.
PROGRESS_UNITS = {
    "download": (re.compile(r"manifests/download/part-\d{6}\.parquet"), "download parts"),
    "per_sample": (re.compile(r"manifests/clip_score/part-\d{6}\.parquet"), "per-sample parts"),
    "reshard": (re.compile(r"curated/[^/]+/\d{6}\.tar"), "curated tars"),
}


def units_done(target: str, names: set[str]) -> int:
    pattern, _ = PROGRESS_UNITS[target]
    return sum(1 for n in names if pattern.fullmatch(n))


def kill_at(watch: RunWatch, point: KillPoint, timeout: float = 900) -> None:
    """Wait for the point's start event in this run, then for its progress (``PROGRESS_UNITS``)
    or its delay; SIGKILL the group."""
    start_event, end_event = WINDOWS[point.target]
    deadline = time.monotonic() + timeout
    later = ORDER[ORDER.index(start_event) + 1 :]
    while watch.running() and time.monotonic() < deadline:
        watch.poll()
        if start_event in watch.events or any(e in watch.events for e in later if e != end_event):
            break
        time.sleep(0.005)
    started = watch.events.get(start_event, watch.now())
    watch.refresh_titles()
    if point.target == "report" and not watch.ray_up:  # nothing left to reshard: no Ray to shut down
        point.window = point.durations_no_ray
        point.delay = point.fraction * point.window
    if point.target in PROGRESS_UNITS:
        while watch.running() and units_done(point.target, watch.names) < point.units and end_event not in watch.events:
            watch.poll()
            time.sleep(0.005)
    while point.target not in PROGRESS_UNITS and watch.running() and watch.now() < started + point.delay:
        watch.poll()
        if point.target == "report" and "report.end" in watch.events:
            break  # the page is written: kill now, before the driver exits
        time.sleep(0.005)
    watch.poll()
    watch.refresh_titles()
    point.running = describe_state(watch)
    if not watch.running():  # the harness missed the window (not a pipeline fault): shown, not failed
        point.missed = f"MISSED: the run ended (exit {watch.proc.returncode}) before the kill"
        point.running += " (run ended first)"
        if watch.wait() != 0:
            point.problems.append(f"the run ended with exit {watch.proc.returncode}")
        return
    os.killpg(watch.proc.pid, signal.SIGKILL)
    watch.proc.wait(timeout=60)
    watch.log.close()
    deadline = time.monotonic() + 30
    while session_processes(watch.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_processes(watch.proc.pid)
    if left:
        point.problems.append(f"{len(left)} process(es) of the run outlived the kill: {sorted(left.values())[:3]}")
        for pid in left:  # ours: started by this run's driver
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_args(config: Path, port: int) -> list[str]:
    return ["curate", "--samples", SAMPLES, "--shard-size", SHARD_SIZE, "--port", str(port), "--config", str(config),
            "--policies", ",".join(POLICIES), "--no-progress"]


def windows_of(reference: RunWatch) -> dict[str, float]:
    """Each kill target's duration in the reference run (a step not seen there fails the test)."""
    durations = {}
    events = dict(reference.events)
    for step, after in (("dup_group", "filter.start"), ("filter", "catalog@filter.end")):
        events.setdefault(f"catalog@{step}.start", events.get(after, 0.0))  # a rebuild too quick to see: 0 s
    for target, (start, end) in WINDOWS.items():
        missing = [e for e in (start, end) if e not in events]
        assert not missing, f"reference run: no {missing} event; events seen: {events}"
        durations[target] = max(0.0, events[end] - events[start])
    durations["report (no Ray)"] = max(0.0, events["report.end"] - events.get("ray.down", events["report.start"]))
    return durations


def print_table(points: list[KillPoint], chain_results: list[str], reference: RunWatch, seconds: float) -> None:
    lines = [f"kill points (seed {SEED}); reference run {reference.ended or 0:.1f} s, events (s): "
             + ", ".join(f"{e} {reference.events[e]:.1f}" for e in ORDER if e in reference.events)]
    lines.append(f"{'#':>2}  {'chain':5}  {'kill point':18}  {'moment (after the event, this run)':46}  "
                 f"{'what was running':70}  result")
    for i, p in enumerate(points, 1):
        moment = f"{p.moment} = {p.delay:.2f}s"
        lines.append(f"{i:>2}  {p.chain:<5}  {p.target:18}  {moment:46}  {p.running:70}  {p.result}")
    for chain, result in enumerate(chain_results):
        lines.append(f"chain {chain} final rerun: {result}")
    lines.append(f"total {seconds:.0f} s; load average {os.getloadavg()[0]:.1f}")
    print("\n" + "\n".join(lines))


def test_twenty_kill_points_resume_to_identical_outputs(tmp_path, capsys):
    """SIGKILL `python -m pipeline curate`'s process group at 20 seeded moments over every step;
    after each kill nothing under a final name is incomplete or differs from an uninterrupted run,
    and the reruns end with the reference's manifests and byte-identical curated shards."""
    began = time.monotonic()
    config = tmp_path / "kill.toml"
    config.write_text(CONFIG)
    args = run_args(config, free_port())  # one port for every run: the URLs, and so the uids, name it

    reference_root = tmp_path / "reference"
    reference = RunWatch(args, reference_root, tmp_path / "reference.log")
    assert reference.wait() == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert incomplete_final_files(reference_root) == []
    durations = windows_of(reference)
    expected = reference.expected
    totals = {target: units_done(target, list_tree(reference_root)) for target in PROGRESS_UNITS}

    rng = random.Random(SEED)
    points: list[KillPoint] = []
    chain_results: list[str] = []
    try:
        for chain, targets in enumerate(CHAINS):
            chain_results.append(run_chain(chain, targets, rng, args, tmp_path, reference_root, durations, expected,
                                           points, totals))
    finally:
        with capsys.disabled():
            print_table(points, chain_results, reference, time.monotonic() - began)
    assert all(not p.problems for p in points), [p.result for p in points if p.problems]
    assert all(r == "identical to the reference" for r in chain_results), chain_results


def run_chain(chain: int, targets: tuple[str, ...], rng: random.Random, args: list[str], tmp_path: Path,
              reference_root: Path, durations: dict[str, float], expected: Expected, points: list[KillPoint],
              totals: dict[str, int]) -> str:
    """A fresh output killed at each target in turn (each kill's rerun is the next killed run), then
    a last rerun to completion; returns the chain's result. Appends its kill points to ``points``."""
    root = tmp_path / f"chain{chain}" / "run"
    mine = []
    for n, target in enumerate(targets):
        point = KillPoint(chain, target, rng.random(), durations[target],
                          durations_no_ray=durations["report (no Ray)"])
        point.delay = point.fraction * point.window
        if target in PROGRESS_UNITS:
            point.units_total = totals[target]
            point.units = int(point.fraction * point.units_total)  # 0 .. total-1: always before the step ends
        points.append(point)
        mine.append(point)
        kill_at(RunWatch(args, root, tmp_path / f"chain{chain}-{n}.log", expected), point)
        point.problems += incomplete_final_files(root) + differs_from_reference(root, reference_root)
        point.result = ("FAIL: " + "; ".join(point.problems)[:300] if point.problems else point.missed or "ok")
    log = tmp_path / f"chain{chain}-final.log"
    code = RunWatch(args, root, log, expected).wait()
    problems = [f"rerun exit {code}: " + log.read_text(errors="replace")[-500:]] if code else []
    problems += completed_run_problems(root, reference_root)
    for point in mine:
        point.result += "; resumed identical" if not problems else "; chain FAILED"
    return "identical to the reference" if not problems else "FAIL: " + "; ".join(problems)[:600]
