"""`make bench`: every benchmark side by side in one run, a table of ratios, and BENCHMARKS.md.

    .venv/bin/python bench/run_all.py [--quick] [--only NAME[,NAME]] [--output BENCHMARKS.md]
    make bench ARGS="--only dag,reshard"

Each benchmark measures two things in the same run, on the same inputs, taking turns so that load
from other processes falls on both alike, and reports their ratio, never an absolute rate: a
machine is noisy, a ratio measured side by side much less so. A target is a bound on a ratio (or,
for DuckDB, on seconds at a stated size); the table says which are met.

Benchmarks (run in this order; --only picks some):
  ocr      OcrStage (easyocr, batched, CRAFT on onnxruntime) vs a naive easyocr readtext loop, at equal F1
  clip     ClipScoreStage vs the bare open_clip forward on the same tensors
  train    training samples/s from WebDataset shards vs the same model on in-memory tensors
  masking  training step time with CLIP-PGS / FLIP patch dropout vs no masking
  duckdb   policy filter + count over a synthetic manifest (10M rows; --quick: 200k)
  reshard  ReshardStage MB/s vs a raw tar-to-tar copy of the same bytes
  dedup-quality  precision and recall of the dedup tiers (exact bytes, pHash, CLIP embedding) per planted
           transform on ~30 real photographs (not a ratio: a quality table; ~1.5 CPU-minutes)
  dedup-scale  the dup_group step's semantic tier and pHash (radius 4; radius 10 up to 10^6) on synthetic pools of 10^6 and 10^7 rows
           (seconds, driver and worker peak RSS, growth vs linear; --quick: 2*10^4 and 2*10^5)
  dag      the shipped DAG run as `curate` vs a stock readtext loop at 128 and 1,024 images,
           start-up (seconds to the first processed image, broken down) apart from the steady
           rate (~45 min: the loop reads 1,024 images at <1 img/s); the fused Ray Data DAG
           (decode->ocr->parrot->clip_score) vs its slowest stage alone, and its scaling at
           1x/2x/4x input (time linear, peak memory flat; plot)
  ocr-real recognition on the real scene text in ../shared/realdata per engine and setting: word
           crops read (exact, within one edit), CER, receipt words, text-free photos, CPU s/image
  parrot-real parrot captions on real LAION alt-texts rendered onto real photos (two styles), per
           OCR engine: recall, false parrots, the stats' CoTR lines (~4 min)
  million  plan and download a 1,000,000-row URL list (shard 10,000) from 127.0.0.1: planning
           rows/s, download samples/s, driver peak RSS, no-op rerun seconds (--quick: 20,000 rows);
           about an hour on 2 cores: `make bench ARGS="--only million"`
  sources  a 1,000,000-row list with 10 LAION/DataComp columns vs the same list without: plan seconds,
           driver peak RSS, catalog build, policy inputs (each side a fresh process; ~3 min)

Writes BENCHMARKS.md (the machine, the load average at start and end, the table, one section per
benchmark, the projected cost of curating 100M samples) and bench/results/ (plots, raw JSON).
A full run takes about an hour on 2 cores (the dag section ~38 min) plus about an hour for `million` (leave it out with
--only); --quick runs every benchmark small, in a few minutes.
Exit status: 0 when every benchmark ran (targets met or not: that is what the report says),
1 when one raised, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    ROOT,
    BenchResult,
    Context,
    as_jsonable,
    busy_processes,
    git_revision,
    load_average,
    machine_info,
)

# name -> module; the order is the run order (cheap, Ray-free ones first; Ray is started once, late)
BENCHMARKS: dict[str, str] = {
    "ocr": "bench.ocr_bench",
    "clip": "bench.clip_bench",
    "train": "bench.train_data_bench",
    "masking": "bench.train_bench",
    "duckdb": "bench.duckdb_bench",
    "reshard": "bench.reshard_bench",
    "dedup-quality": "bench.dedup_quality",
    "dedup-scale": "bench.dedup_bench",
    "dag": "bench.dag_bench",
    "ocr-real": "bench.ocr_real_bench",
    "parrot-real": "bench.parrot_real_bench",
    "million": "bench.million_bench",
    "sources": "bench.source_columns_bench",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run_all.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="every benchmark at a small size: a smoke run of the suite, numbers not meaningful")
    parser.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                        help=f"run only these benchmarks (repeatable, comma-separated): {', '.join(BENCHMARKS)}")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md",
                        help="the report to write (default: BENCHMARKS.md at the repository root)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="plots and raw JSON (default: bench/results, or results/ beside --output when "
                             "--output is given)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="scratch folder for inputs and run roots (default: a new temporary folder)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (default: removed)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    args.names = [n for n in BENCHMARKS if n in names] if names else list(BENCHMARKS)
    if args.results_dir is None:
        default_output = (ROOT / "BENCHMARKS.md").resolve()
        args.results_dir = (ROOT / "bench" / "results" if args.output.resolve() == default_output
                            else args.output.resolve().parent / "results")
    return args


def _log(message: str) -> None:
    print(message, flush=True)


def run_one(name: str, ctx: Context) -> BenchResult:
    started = time.perf_counter()
    try:
        module = importlib.import_module(BENCHMARKS[name])
        result = module.run(ctx)
    except Exception as err:  # noqa: BLE001 - one broken benchmark must not lose the others' numbers
        traceback.print_exc()
        result = BenchResult(name, name, error=f"{type(err).__name__}: {err}")
    result.seconds = time.perf_counter() - started
    return result


def format_table(results: list[BenchResult]) -> str:
    rows = [("benchmark", "ratio", "value", "target", "met", "note")]
    for res in results:
        if res.error:
            rows.append((res.name, "(failed)", "—", "—", "ERROR", res.error[:80]))
        for r in res.rows:
            rows.append((r.bench, r.name, r.value_text(), r.target or "—", r.met_text(), r.note))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    out = []
    for k, row in enumerate(rows):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5])
        if k == 0:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    return "\n".join(out)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def write_markdown(path: Path, results: list[BenchResult], meta: dict) -> None:
    from bench import cost

    machine = meta["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    load_start, load_end = meta["load_start"], meta["load_end"]
    rel = os.path.relpath(meta["results_dir"], path.resolve().parent)
    targets = [r for res in results for r in res.rows if r.met is not None]
    met = sum(1 for r in targets if r.met)
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`bench/run_all.py{' --quick' if meta['quick'] else ''}"
        f"{' --only ' + ','.join(meta['names']) if meta['names'] != list(BENCHMARKS) else ''}`) "
        f"on {machine['date']}, revision {meta['revision']}, in {meta['seconds'] / 60:.1f} minutes.",
        "Every number below is a ratio of two things measured side by side in this one run, on the same inputs, "
        "taking turns so that load from other processes falls on both: machines are noisy, ratios much less so. "
        + ("**This was a --quick run: sizes are too small for the numbers to mean much.**" if meta["quick"] else ""),
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']} ({machine['cpu_flags']}), {machine['cores']} cores "
        f"({machine['cores_usable']} usable by this process)",
        f"- RAM: {machine['ram_gib']} GiB; GPU: {machine['gpu']}",
        f"- {machine['os']}, Python {machine['python']}",
        f"- {versions}",
        f"- load average (1/5/15 min) at start: {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}; "
        f"at end: {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}"
        + (" (the machine is shared: other processes were running, see below)" if max(load_start[0], load_end[0]) > 1.0
           else ""),
    ]
    if meta["busy"]:
        lines.append("- busy processes outside this run at start: " + "; ".join(f"`{b}`" for b in meta["busy"]))
    lines += [
        "",
        f"## Results: {met} of {len(targets)} targets met",
        "",
        "| benchmark | ratio | value | target | met | note |",
        "|---|---|---:|---|---|---|",
    ]
    for res in results:
        if res.error:
            lines.append(f"| {res.name} | (failed) | — | — | ERROR | {_md_escape(res.error[:200])} |")
        for r in res.rows:
            lines.append(f"| {r.bench} | {_md_escape(r.name)} | {r.value_text()} | {r.target or '—'} | "
                         f"{r.met_text()} | {_md_escape(r.note)} |")
    for res in results:
        lines += ["", f"## {res.name}: {res.title}", "", f"_{res.seconds:.0f} s._", ""]
        if res.error:
            lines.append(f"Failed: `{res.error}`")
        lines.append(res.markdown.replace("{results}", rel))
    optimisations = ROOT / "bench" / "OPTIMISATIONS.md"
    if optimisations.is_file():
        lines += ["", optimisations.read_text().strip()]
    lines += ["", cost.section(results, machine).strip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, module in BENCHMARKS.items():
            print(f"{name:8s} {module}")
        return 0
    started = time.perf_counter()
    load_start = load_average()
    machine = machine_info()
    busy = busy_processes()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="clip-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(quick=args.quick, work_dir=work, results_dir=args.results_dir.resolve(), log=_log)
    _log(f"make bench: {', '.join(args.names)}{' (quick)' if args.quick else ''} on {machine['cpu']}, "
         f"{machine['cores']} cores, GPU: {machine['gpu']}; load average {load_start[0]:.2f}; work in {work}")
    results: list[BenchResult] = []
    try:
        for name in args.names:
            _log(f"== {name}")
            result = run_one(name, ctx)
            results.append(result)
            (args.results_dir / f"{name}.json").write_text(json.dumps(as_jsonable(
                {"rows": result.rows, "data": result.data, "seconds": result.seconds, "error": result.error,
                 "quick": args.quick}), indent=2))
            for row in result.rows:
                _log(f"   {row.name}: {row.value_text()} (target {row.target or '—'}: {row.met_text()})")
            _log(f"   ({result.seconds:.0f} s{', FAILED: ' + result.error if result.error else ''})")
    finally:
        if ctx.ray_started_here:
            import ray

            ray.shutdown()
        if not args.keep_work and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    load_end = load_average()
    seconds = time.perf_counter() - started
    meta = {"machine": machine, "load_start": load_start, "load_end": load_end, "busy": busy, "quick": args.quick,
            "names": args.names, "results_dir": args.results_dir.resolve(), "seconds": seconds,
            "revision": git_revision()}
    write_markdown(args.output, results, meta)
    (args.results_dir / "machine.json").write_text(json.dumps(as_jsonable(
        {**meta, "results_dir": str(meta["results_dir"])}), indent=2))
    print()
    print(format_table(results))
    targets = [r for res in results for r in res.rows if r.met is not None]
    print(f"\n{sum(1 for r in targets if r.met)} of {len(targets)} targets met; load average "
          f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end; {seconds / 60:.1f} min; wrote {args.output}")
    return 1 if any(res.error for res in results) else 0


if __name__ == "__main__":
    sys.exit(main())
