"""What every benchmark of ``make bench`` shares: result rows, the run context, a process-tree
memory sampler, the machine description and the embedded input pool.

Every benchmark compares two things measured in the same run, on the same inputs, taking turns
(round-robin) so that load from other processes on a shared machine falls on both sides alike;
the number it reports is a ratio of the two, never an absolute rate held against a fixed target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import io
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the project's packages
    sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (sets NO_ALBUMENTATIONS_UPDATE before easyocr imports albumentations)

# -- results -------------------------------------------------------------------------------------


@dataclass
class Ratio:
    """One line of the summary table: a side-by-side ratio and its target.

    ``met`` is None for a ratio without a target (reported for information).
    """

    bench: str
    name: str
    value: float | None
    unit: str  # how to print value: "x" (a ratio) or "s", "MiB", ...
    target: str  # e.g. ">= 0.9", "< 1 s", "" (none)
    met: bool | None
    note: str = ""

    def value_text(self) -> str:
        if self.value is None:
            return "n/a"
        if self.unit == "x":
            return f"{self.value:.2f}x"
        if self.unit == "s":
            return f"{self.value:.3f} s"
        if self.unit == "MiB":
            return f"{self.value:.0f} MiB"
        return f"{self.value:.3g} {self.unit}"

    def met_text(self) -> str:
        return "—" if self.met is None else ("met" if self.met else "NOT met")


@dataclass
class BenchResult:
    """What one benchmark hands to the driver: summary rows, a Markdown section, raw numbers."""

    name: str
    title: str
    rows: list[Ratio] = field(default_factory=list)
    markdown: str = ""  # the benchmark's own section of BENCHMARKS.md (how measured, the detail table)
    data: dict[str, Any] = field(default_factory=dict)  # raw numbers, written to results/<name>.json
    seconds: float = 0.0
    error: str = ""  # set when the benchmark raised: the run goes on with the others


SET_FOR_THE_BENCH_RAY: set[str] = set()  # variables ensure_ray set in this process (not the user's)


def user_environment() -> dict[str, str]:
    """This process's environment less what the benchmark set for its own Ray: a command timed as a
    user runs it (``curate`` in a fresh process) gets the user's settings, not the benchmark's."""
    return {k: v for k, v in os.environ.items() if k not in SET_FOR_THE_BENCH_RAY}


@dataclass
class Context:
    """The run's settings, passed to every benchmark's ``run(ctx)``."""

    quick: bool
    work_dir: Path  # scratch space (inputs, run roots); removed at the end unless kept
    results_dir: Path  # plots and raw JSON, referenced from BENCHMARKS.md
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    log: Callable[[str], None] = print
    _pools: dict[int, Any] = field(default_factory=dict)
    ray_started_here: bool = False

    def pool(self, samples: int) -> "Pool":
        """Embedded samples downloaded into WebDataset shards once per size, shared by benchmarks."""
        if samples not in self._pools:
            self._pools[samples] = make_pool(self, samples)
        return self._pools[samples]

    def ensure_ray(self) -> None:
        """A local Ray with every core of this machine, started once for the whole run."""
        import logging

        import ray

        if ray.is_initialized():
            return
        # Ray starts its workers at nice 15 (so that its own daemons win); a benchmark compares them
        # with loops in this process at nice 0, and on a shared machine the niced side would lose
        # to every other process. Same priority on both sides; a user's setting wins.
        if "RAY_worker_niceness" not in os.environ:
            os.environ["RAY_worker_niceness"] = "0"
            SET_FOR_THE_BENCH_RAY.add("RAY_worker_niceness")
        # no runtime_env, as pipeline/ray_runtime.py: the workers inherit this environment
        ray.init(num_cpus=self.cores, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        self.ray_started_here = True


# -- timing --------------------------------------------------------------------------------------


@dataclass
class Timer:
    """Accumulated wall-clock and process CPU time of the calls run through it."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    calls: int = 0
    laps: list[float] = field(default_factory=list)

    def run(self, fn: Callable[[], Any]) -> Any:
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn()
        finally:
            lap = time.perf_counter() - w
            self.wall_s += lap
            self.cpu_s += time.process_time() - c
            self.calls += 1
            self.laps.append(lap)


def high_water_mib() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries that across fork and exec,
    so a child of a large process (this suite, after the DuckDB benchmark: ~5.7 GB) reported its
    parent's size, which made planning look like it added 5.6 GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))


# -- memory of a whole process tree --------------------------------------------------------------


def _psutil() -> Any:
    """psutil, a declared dependency (benchmarks measure process trees with it)."""
    import psutil

    return psutil


def tree_rss(pid: int | None = None) -> tuple[int, int]:
    """(sum of RSS in bytes, number of processes) of ``pid`` and all its descendants.

    A local Ray started by this process (GCS, raylet, its workers and actors) is part of the tree.
    Shared pages (libraries, the object store) count once per process that maps them, so the sum
    is an upper bound of what the tree holds.
    """
    psutil = _psutil()
    try:
        root = psutil.Process(pid or os.getpid())
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0, 0
    total = 0
    n = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
            n += 1
        except psutil.Error:
            continue
    return total, n


class TreeMemorySampler:
    """Samples the process tree's summed RSS in a thread; ``peak`` is the largest sample.

    Reading /proc/<pid>/statm for a few dozen processes costs well under a millisecond, so a
    0.2 s period costs the measured work nothing noticeable.
    """

    def __init__(self, period_s: float = 0.2, tree: bool = True) -> None:
        self.period_s = period_s
        self.tree = tree  # False: this process only
        self.peak = 0
        self.peak_processes = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._cpu_first: dict[tuple[int, float], float] = {}
        self._cpu_last: dict[tuple[int, float], float] = {}
        self._starting = True

    def _sample(self) -> None:
        psutil = _psutil()
        me = psutil.Process()
        try:
            procs = [me] + (me.children(recursive=True) if self.tree else [])
        except psutil.Error:
            procs = [me]
        rss = n = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    times = proc.cpu_times()
                n += 1
            except psutil.Error:
                continue
            cpu = times.user + times.system
            key = (proc.pid, proc.create_time())
            self._cpu_first.setdefault(key, cpu if self._starting else 0.0)
            self._cpu_last[key] = cpu
        self.samples.append((time.perf_counter() - self._t0, rss))
        if rss > self.peak:
            self.peak, self.peak_processes = rss, n

    @property
    def cpu_seconds(self) -> float:
        """CPU time the tree spent while sampled (processes that lived between two samples are missed)."""
        return sum(last - self._cpu_first[key] for key, last in self._cpu_last.items())

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> "TreeMemorySampler":
        self._t0 = time.perf_counter()
        self._sample()
        self._starting = False
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


# -- the machine ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ["avx", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"]
                return " ".join(f for f in wanted if f in flags) or "none of avx/avx2/avx512"
    except OSError:
        pass
    return "?"


def _gpu() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - a description, never a failure
        pass
    return "none (torch sees no CUDA device)"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """The machine and software the numbers come from (for BENCHMARKS.md and the JSON)."""
    psutil = _psutil()
    mem = psutil.virtual_memory()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 1
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count() or 1,
        "cores_usable": affinity,
        "ram_gib": round(mem.total / 2**30, 1),
        "gpu": _gpu(),
        "versions": {
            p: _version(p)
            for p in ("torch", "ray", "duckdb", "pyarrow", "onnxruntime", "open_clip_torch", "easyocr",
                      "rapidocr-onnxruntime", "rapidocr", "webdataset", "img2dataset", "numpy", "pillow")
        },
    }


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def busy_processes(limit: int = 5) -> list[str]:
    """The processes using the most CPU right now outside this run (noise on a shared machine)."""
    psutil = _psutil()
    mine = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    procs = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if proc.pid in mine:
                continue
            proc.cpu_percent(None)
            procs.append(proc)
        except psutil.Error:
            continue
    time.sleep(0.5)
    usage = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            pct = proc.cpu_percent(None)
            if pct >= 5:
                cmd = " ".join(proc.info.get("cmdline") or [proc.info.get("name") or "?"])
                usage.append((pct, f"{pct:.0f}% {' '.join(cmd.split())[:90]}"))
    return [text for _, text in sorted(usage, reverse=True)[:limit]]


# -- inputs: the embedded dataset, downloaded with img2dataset -----------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


POOL_SHARD_SIZE = 64  # the default [download] shard_size


@dataclass
class Pool:
    """Embedded samples downloaded by the pipeline's own download step (img2dataset, Ray)."""

    layout: Any  # manifests.store.RunLayout
    shards: list[str]  # downloaded shards, in order, each with its tar and download part
    ok_per_shard: dict[str, int]
    samples: int  # generated samples (the plan also holds 8 broken URLs on purpose)
    seconds: float
    port: int = 0  # of the embedded dataset it was made from (its plan's fingerprint holds it)

    @property
    def ok(self) -> int:
        return sum(self.ok_per_shard.values())

    def tar(self, shard: str) -> Path:
        return Path(self.layout.shards_dir) / f"{shard}.tar"

    def subset(self, shards: list[str], root: Path) -> Any:
        """A fresh run root holding only ``shards``' tars and download parts (hard links)."""
        from manifests.store import RunLayout

        layout = RunLayout(root)
        for shard in shards:
            _link(self.tar(shard), Path(layout.shards_dir) / f"{shard}.tar")
            _link(Path(self.layout.part_path("download", shard)), Path(layout.part_path("download", shard)))
        plan = Path(self.layout.input_dir)
        if plan.is_dir():  # the run's plan, as a rerun of `curate` into a downloaded output finds it
            for path in plan.iterdir():
                if path.is_file():
                    _link(path, Path(layout.input_dir) / path.name)
        return layout

    def decoded(self, shards: list[str] | None = None) -> list[dict[str, Any]]:
        """Samples of ``shards`` (default all) read and decoded as the DAG reads them."""
        from pipeline.sample_runner import decode_batch, read_shard

        rows: list[dict[str, Any]] = []
        for shard in shards or self.shards:
            raw = read_shard({"shard": shard, "tar": str(self.tar(shard)),
                              "download_part": str(self.layout.part_path("download", shard)), "parts": []})
            decoded = decode_batch({k: [r[k] for r in raw] for k in raw[0]}) if raw else {}
            for i in range(len(raw)):
                rows.append({k: v[i] for k, v in decoded.items()})
        return rows


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_pool(ctx: Context, samples: int, seed: int = 0) -> Pool:
    """Generate ``samples`` embedded pairs, serve them on 127.0.0.1 and download them with the
    pipeline's download step into ``<work>/pool-<n>``: real img2dataset shards and manifests."""
    from manifests.store import RunLayout
    from pipeline.config import load_config
    from pipeline.download_runner import plan_download, run_download
    from pipeline.sample_runner import ok_counts
    from sources import open_source

    started = time.perf_counter()
    ctx.ensure_ray()
    config = load_config()
    # the shipped embedded dataset (and whatever it declares, e.g. its loopback allowance), resized
    dataset = dataclasses.replace(config.dataset("embedded"), samples=samples, seed=seed, port=free_port())
    source = open_source(dataset)
    layout = RunLayout(ctx.work_dir / f"pool-{samples}")
    download = dataclasses.replace(config.download, shard_size=POOL_SHARD_SIZE)
    if hasattr(source, "download_config"):  # the dataset's own additions to the download config
        download = source.download_config(download)
    work = plan_download(source, layout, download)
    report = run_download(source, layout, download, work, progress=False)
    if report.shards_failed:
        raise RuntimeError(f"downloading the benchmark pool failed: {report.shards_failed}")
    counts = ok_counts(layout)
    if sum(counts.values()) < samples:
        import duckdb

        errors = duckdb.sql(
            f"select error_kind, count(*), any_value(error) from read_parquet('{layout.stage_dir('download')}/*.parquet') "
            "where status <> 'ok' group by all").fetchall()
        raise RuntimeError(f"only {sum(counts.values())} of {samples} pool samples downloaded: {errors}")
    pool = Pool(layout, sorted(counts), counts, samples, time.perf_counter() - started, port=dataset.port)
    ctx.log(f"  pool: {pool.ok} of {samples} embedded samples downloaded into {len(pool.shards)} shard(s) "
            f"in {pool.seconds:.1f} s")
    return pool


def synthetic_pool(ctx: Context, samples: int, seed: int = 0) -> Pool:
    """The same shard layout as ``make_pool`` without Ray or HTTP: embedded samples written
    straight into WebDataset tars (``.jpg .txt .json`` per key, as img2dataset writes them, with the
    fixed header fields of curate's own shards) with a download manifest part per shard. For
    --quick runs, where starting Ray and img2dataset would cost more than the benchmark."""
    import datetime
    import hashlib
    import json

    import pyarrow as pa
    import webdataset as wds

    from manifests.schemas import schema_for
    from manifests.store import RunLayout, write_table_atomic
    from pipeline.download_runner import make_uid
    from sources.embedded import generate, sample_url
    from stages.reshard import TAR_MODE, TAR_MTIME, TAR_OWNER

    started = time.perf_counter()
    layout = RunLayout(ctx.work_dir / f"synthetic-{samples}")
    Path(layout.shards_dir).mkdir(parents=True, exist_ok=True)
    generated = generate(samples, seed)
    counts: dict[str, int] = {}
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    for index, lo in enumerate(range(0, samples, POOL_SHARD_SIZE)):
        shard = f"{index:06d}"
        rows = []
        # the header fields curate's own shards carry (canonical_tar, the resharder): an int mtime,
        # so no PAX header per member, which cost a training loader ~12% more CPU to parse
        with wds.TarWriter(str(Path(layout.shards_dir) / f"{shard}.tar"), mtime=TAR_MTIME, user=TAR_OWNER,
                           group=TAR_OWNER, mode=TAR_MODE) as tar:
            for i, sample in enumerate(generated[lo:lo + POOL_SHARD_SIZE]):
                key = f"{index:05d}{i:04d}"
                url = sample_url("http://127.0.0.1:9", sample.sample_id)
                uid = make_uid(url, sample.caption)
                meta = {"uid": uid, "key": key, "url": url, "caption": sample.caption, "status": "success",
                        "width": sample.width, "height": sample.height}
                tar.write({"__key__": key, "jpg": sample.image, "txt": sample.caption,
                           "json": json.dumps(meta).encode()})
                rows.append({"uid": uid, "url": url, "caption": sample.caption, "status": "ok", "shard": shard,
                             "key": key, "width": sample.width, "height": sample.height,
                             "original_width": sample.width, "original_height": sample.height,
                             "sha256": hashlib.sha256(sample.image).hexdigest(),
                             "download_engine": "synthetic (bench, no download)", "downloaded_at": now})
        write_table_atomic(pa.Table.from_pylist(rows, schema=schema_for("download")), layout.part_path("download", shard))
        counts[shard] = len(rows)
    pool = Pool(layout, sorted(counts), counts, samples, time.perf_counter() - started)
    ctx.log(f"  synthetic pool: {samples} embedded samples written into {len(counts)} shard(s) "
            f"in {pool.seconds:.1f} s (no download)")
    return pool


def decode_jpeg(data: bytes) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip() or "?"
        return rev + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def as_jsonable(value: Any) -> Any:
    """Dataclasses, paths and numpy scalars as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return as_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): as_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence the library warnings that repeat on every call (easyocr, torch, open_clip)."""
    import logging
    import warnings

    with warnings.catch_warnings():
        for pattern in (r".*pin_memory.*", r".*quantiz.*deprecated.*", r".*deprecated.*quantiz.*",
                        r".*not meaningful.*", r".*No pretrained weights.*"):
            warnings.filterwarnings("ignore", message=pattern)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            yield
        finally:
            root.setLevel(level)


def standalone_main(run: Callable[[Context], BenchResult], doc: str | None, argv: list[str] | None = None) -> int:
    """``python bench/<name>_bench.py [--quick]``: one benchmark, its rows and section printed;
    BENCHMARKS.md is left alone (``bench/run_all.py --only NAME`` writes it)."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--results-dir", type=Path, default=None, help="where plots go (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clip-bench-") as tmp:
        results = args.results_dir or Path(tmp) / "results"
        results.mkdir(parents=True, exist_ok=True)
        ctx = Context(quick=args.quick, work_dir=Path(tmp), results_dir=results)
        try:
            result = run(ctx)
        finally:
            if ctx.ray_started_here:
                import ray

                ray.shutdown()
    print(result.markdown.replace("{results}", str(results)))
    print()
    for row in result.rows:
        print(f"RESULT {row.bench}: {row.name}: {row.value_text()} (target {row.target or '—'}: {row.met_text()})"
              + (f"  [{row.note}]" if row.note else ""))
    return 0
