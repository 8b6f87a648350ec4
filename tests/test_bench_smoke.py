"""`make bench` smoke test: the driver runs the cheap benchmarks small and writes BENCHMARKS.md.

No number is checked against a target here (machines are noisy; that is what the report is for):
only that the suite runs, prints its table and writes a report with the machine and ratio rows.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "bench" / "run_all.py"


def test_help_lists_every_benchmark() -> None:
    proc = subprocess.run([sys.executable, str(RUN_ALL), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("ocr", "clip", "train", "masking", "duckdb", "reshard", "dag", "--quick", "--only", "--output"):
        assert name in proc.stdout


def test_unknown_benchmark_is_refused() -> None:
    proc = subprocess.run([sys.executable, str(RUN_ALL), "--only", "nope"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown benchmark" in proc.stderr


def test_quick_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--quick", "--only", "duckdb,reshard", "--output", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the table of ratios, printed at the end
    assert re.search(r"^reshard\s+ReshardStage MB/s / raw tar-to-tar copy MB/s\s+\d+\.\d+x\s+>= 0\.5\s+(met|NOT met)",
                     proc.stdout, re.M), proc.stdout[-2000:]
    assert re.search(r"^duckdb\s+slowest policy filter\+count, 200k rows", proc.stdout, re.M)
    assert "targets met" in proc.stdout

    text = out.read_text()
    assert text.startswith("# Benchmarks")
    assert "## Machine" in text and "load average" in text and "GPU:" in text
    rows = re.findall(r"^\| (reshard|duckdb) \| .+ \| (\d+\.\d+x|\d+\.\d+ s|\d+ MiB) \| .+ \| (met|NOT met) \|", text, re.M)
    assert {r[0] for r in rows} == {"reshard", "duckdb"}, text[:3000]
    assert "## Projected cost to curate 100M samples" in text
    # results beside the report, not in the repository's bench/results
    data = json.loads((tmp_path / "results" / "reshard.json").read_text())
    assert data["quick"] is True and data["rows"][0]["value"] > 0
    assert (tmp_path / "results" / "machine.json").is_file()
