"""Command line: ``python -m pipeline {curate,query,stats,ocr-accuracy,train,evaluate,ablation,datasets,export} ...``.

``train``, ``evaluate`` and ``ablation`` are training's (training/cli.py): training imports pipeline,
never the reverse, so they come in through the ``clip_curation.commands`` entry point that
pyproject.toml declares, and pipeline never names the package that adds them.

Every problem the user can fix (bad config, bad URL list, busy port) is one line on stderr and
exit code 2; a run that could not finish every shard exits 1 and says which shards to rerun; a
step that made no progress for ``watchdog.stall_timeout_s`` exits 4 naming what it waited on.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import signal
import sys
import threading
from collections.abc import Callable
from importlib.metadata import distributions
from pathlib import Path

from core import timeline
from core.errors import Stalled, raise_terminated, sigterm_received
from pipeline.config import ConfigError, load_config

EPILOG = """examples:
  python -m pipeline curate                                  # embedded offline dataset -> output/embedded
  python -m pipeline curate --dataset laion-subset --url-list my.parquet --output out/laion
  python -m pipeline query "select status, error_kind, count(*) from download group by all"
  python -m pipeline query --output out/laion "select * from samples limit 5"
"""


COMMANDS_GROUP = "clip_curation.commands"  # entry points: packages above pipeline add their subcommands
Handler = Callable[[argparse.Namespace], int]


def default_output(dataset: str) -> str:
    return str(Path("output") / dataset)


def _add_registered_commands(sub: argparse._SubParsersAction) -> None:
    """Subcommands of the packages above pipeline, found by entry point (pipeline imports none of
    them): each entry is ``add(sub)``, which adds its parsers with ``set_defaults(handler=...)``.

    Every distribution's metadata is read, not only the first of a name as ``entry_points()`` does:
    a stale ``clip_curation.egg-info`` in the working directory (left by ``pip install .``) would
    otherwise hide the installed one's commands."""
    found = {(e.name, e.value): e for d in distributions() for e in d.entry_points.select(group=COMMANDS_GROUP)}
    for entry in sorted(found.values(), key=lambda e: e.name):
        entry.load()(sub)


def _dag_table() -> str:
    from pipeline.dag import describe

    return "\n".join("  " + line for line in describe().splitlines())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Curate CLIP training data: download with img2dataset into WebDataset shards, "
        "write Parquet manifests and a DuckDB catalog over them, on a local or remote Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    curate = sub.add_parser(
        "curate",
        help="run the curation DAG for a dataset (resumable: finished shards are skipped)",
        description="Run the curation DAG for one dataset into one output folder. Rerunning with the "
        "same output does only the work that is missing.",
        epilog="the DAG (pipeline/dag.py), in order:\n" + _dag_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    curate.add_argument(
        "--dataset",
        default=None,
        help="name of a dataset in the config (see `datasets`); default: 'embedded', or 'laion-subset' "
        "when --url-list is given",
    )
    curate.add_argument("--url-list", default="", help="parquet/csv/jsonl of URLs and captions, path or fsspec URL")
    curate.add_argument("--url-column", default=None, help="name of the URL column in the list (default: url)")
    curate.add_argument(
        "--caption-column", default=None, help="name of the caption column in the list (default: caption)"
    )
    curate.add_argument(
        "--drop-columns", default=None, metavar="COL[,COL]",
        help="columns of the URL list NOT to keep; every other column besides the URL and caption is kept with "
        "its type as a source column (catalog views `source` and `samples`; policies may name them); a list's "
        "`uid` column is kept as source_uid, which exports use",
    )
    curate.add_argument(
        "--rename-columns", default=None, metavar="OLD=NEW[,OLD=NEW]",
        help="rename source columns on the way in, e.g. status=source_status: a column named like one the "
        "pipeline writes (case-insensitive, as DuckDB) must be renamed or dropped",
    )
    curate.add_argument("--output", default=None, help="output root of the run: a folder, or an fsspec URL such as s3://bucket/prefix (default: output/<dataset>)")
    curate.add_argument("--config", default=None, help="TOML file merged over pipeline/default.toml")
    curate.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray on this machine)",
    )
    curate.add_argument("--port", type=int, default=None, help="port of the embedded dataset's server on 127.0.0.1")
    curate.add_argument("--samples", type=int, default=None, help="number of generated samples (embedded dataset)")
    curate.add_argument("--shard-size", type=int, default=None, help="samples per downloaded shard")
    curate.add_argument(
        "--policies",
        default=None,
        help="comma-separated filter policies to select and reshard (default: the dataset's list in the config)",
    )
    curate.add_argument(
        "--stages",
        default=None,
        metavar="STEP[,STEP]",
        help="do only these steps of the DAG (below), e.g. 'download' on CPU nodes, then "
        "'ocr,parrot,clip_score' on GPU nodes, then the rest (dedup,dup_group,filter,reshard,report), "
        "each with the same --dataset/--url-list/--output; each step works on what earlier steps left on "
        "disk, and a pool or policy step waits (exit 1) until every shard is through what it reads. "
        "Default: every step",
    )
    curate.add_argument(
        "--retry",
        default=None,
        metavar="REASON[,REASON]",
        help="fetch again the samples whose latest download attempt failed with one of these error_kind "
        "values (as the download manifest records them: timeout, connection_error, http_503, ...; http_5xx "
        "for any 5xx; all-transient for timeouts, connection errors, 429 and 5xx), in new shards; the "
        "earlier attempt is kept as history (catalog view download_history) and every later step is "
        "brought up to date",
    )
    curate.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")

    query = sub.add_parser(
        "query",
        help="run SQL on a run's DuckDB catalog and print the result",
        description="Run one SQL statement against <output>/catalog.duckdb (views: one per stage, "
        "and `samples` joining them on uid).",
    )
    query.add_argument("sql", help='the SQL, e.g. "select status, count(*) from download group by 1"')
    query.add_argument("--output", default=default_output("embedded"), help="the run's output folder")

    stats = sub.add_parser(
        "stats",
        help="parrot statistics of a run (share of text images, CoTR, parrot-score histogram, vs CLIP score)",
        description="Parrot statistics of a run, computed with DuckDB over its manifests the way the "
        "Parrot Captions paper measured LAION-2B.",
    )
    stats.add_argument("--output", default=default_output("embedded"), help="the run's output folder")

    accuracy = sub.add_parser(
        "ocr-accuracy",
        help="score a run's OCR manifest against ground truth (embedded dataset)",
        description="Text-region precision/recall/F1 (polygon IoU >= 0.5), has-text accuracy and word "
        "recall of the OCR stage against <output>/ground_truth.parquet.",
    )
    accuracy.add_argument("--output", default=default_output("embedded"), help="the run's output folder")

    _add_registered_commands(sub)  # train, evaluate, ablation: training/cli.py
    datasets = sub.add_parser("datasets", help="list the datasets the config knows")
    datasets.add_argument("--config", default=None, help="TOML file merged over pipeline/default.toml")
    from pipeline.export import add_export_parser

    add_export_parser(sub, default_output("embedded"))
    return parser


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(n.strip() for n in text.split(",") if n.strip())


def _renames(text: str) -> dict[str, str]:
    """``--rename-columns old=new,...`` as a dict; a pair without '=' is one ConfigError."""
    pairs = {}
    for item in _names(text) or ():
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ConfigError(f"--rename-columns: {item!r} is not OLD=NEW")
        pairs[old.strip()] = new.strip()
    return pairs


def cmd_curate(args: argparse.Namespace) -> int:
    from manifests.store import RunLayout
    from pipeline.curate import curate
    from pipeline.dag import select_steps
    from pipeline.summary import run_summary
    from sources import open_source

    config = load_config(args.config)
    stages = select_steps(args.stages) if args.stages else None  # None: every step the config switches on
    dataset_name = args.dataset or ("laion-subset" if args.url_list else "embedded")
    dataset = config.dataset(dataset_name)
    overrides = {
        k: v
        for k, v in {
            "port": args.port,
            "samples": args.samples,
            "url_column": args.url_column,
            "caption_column": args.caption_column,
            "drop_columns": _names(args.drop_columns),
            "rename_columns": None if args.rename_columns is None else {**dataset.rename_columns, **_renames(args.rename_columns)},
        }.items()
        if v is not None
    }
    if overrides:
        dataset = dataclasses.replace(dataset, **overrides)
        dataset.validate()
    download = config.download
    if args.shard_size is not None:
        download = dataclasses.replace(download, shard_size=args.shard_size)
        download.validate()
    layout = RunLayout(args.output or default_output(dataset_name))
    source = open_source(dataset, url_list=args.url_list, slow_seconds=download.timeout_s + 2.0)
    source.fingerprint()  # reads and checks a URL list now, before Ray starts: bad input fails fast
    policies = (tuple(p.strip() for p in args.policies.split(",") if p.strip()) if args.policies
                else source.policies_for(dataset.policies))
    for name in policies:
        config.policy(name)
    result = curate(source, layout, config, download, policies, address=args.address, progress=not args.no_progress,
                    stages=stages, retry=args.retry)
    print(run_summary(result))
    return 0 if result.ok else 1


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from manifests.catalog import format_table, run_query
    from manifests.store import RunLayout

    layout = RunLayout(args.output)
    try:
        columns, rows = run_query(layout, args.sql)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    except duckdb.Error as err:
        raise ConfigError(f"query failed: {err}") from None
    print(format_table(columns, rows))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from manifests.store import RunLayout
    from pipeline.stats import parrot_stats

    layout = RunLayout(args.output)
    present = layout.stages_present()
    if not layout.catalog_path.exists() or "parrot" not in present or "ocr" not in present:
        raise ConfigError(f"{layout.root} has no ocr and parrot manifests yet: run `make curate` first")
    print(parrot_stats(layout).format())
    return 0


def cmd_ocr_accuracy(args: argparse.Namespace) -> int:
    from manifests.store import RunLayout
    from pipeline.summary import ocr_accuracy_lines

    layout = RunLayout(args.output)
    text = ocr_accuracy_lines(layout)
    if text is None:
        raise ConfigError(f"{layout.root} has no ground_truth.parquet or no ocr manifest (embedded dataset runs have both)")
    print(text.replace("; ", "\n"))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    for name, ds in sorted(config.datasets.items()):
        print(f"{name:16s} {ds.source:9s} {ds.description}")
    return 0


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _is_write_error(err: BaseException) -> bool:
    """Disk full, quota, file too large, read-only, permission: pyarrow and DuckDB report some
    without an errno, so their message decides."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return True
    text = str(err).lower()
    return any(n in text for n in ("no space left", "file too large", "read-only file system", "disk quota",
                                   "permission denied"))


def main(argv: list[str] | None = None) -> int:
    """Run one command; SIGTERM (``kill``, a batch scheduler) stops it like Ctrl-C: one line, the
    finished work kept, exit 143 (130 for Ctrl-C)."""
    timeline.mark("command_start")  # the interpreter is up and pipeline.cli imported
    in_main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, raise_terminated) if in_main_thread else None
    try:
        return _run(argv)
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def _quiet_after_interrupt(unraisable: object) -> None:
    """``sys.unraisablehook`` once a run is interrupted: the interrupt can land inside a library's
    constructor (Ray Data's ``Dataset``), whose half-built object then fails in ``__del__`` and would
    print a traceback after the one-line message. The run is over; such errors are not the user's."""


def _run(argv: list[str] | None) -> int:
    from pipeline.export import cmd_export

    args = build_parser().parse_args(argv)
    handlers = {
        "curate": cmd_curate,
        "query": cmd_query,
        "stats": cmd_stats,
        "ocr-accuracy": cmd_ocr_accuracy,
        "datasets": cmd_datasets,
        "export": cmd_export,
    }
    handler: Handler = handlers.get(args.command) or args.handler  # a registered command set its own
    try:
        return handler(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Stalled as err:
        print(f"stalled: {err}\nfinished shards are kept: fix the cause (or raise watchdog.stall_timeout_s), then "
              "rerun the same command to resume", file=sys.stderr)
        return 4
    except Exception as err:  # noqa: BLE001 - only write failures (OSError, DuckDB's IOException) are turned into a message
        if not _is_write_error(err):
            raise
        print(f"error: cannot write the run's files: {err}\n"
              "nothing partial is marked done (finished shards are kept): free space or fix the output, "
              "then rerun the same command to resume", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (core.errors.Terminated, which Ray may re-raise as this)
        sys.unraisablehook = _quiet_after_interrupt
        how, code = ("terminated (SIGTERM)", 143) if sigterm_received() else ("interrupted", 130)
        print(f"{how}: rerun the same command to resume; finished shards are kept", file=sys.stderr)
        return code
