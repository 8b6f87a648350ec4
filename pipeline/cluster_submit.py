"""Entry point for ``ray submit cluster.yaml pipeline/cluster_submit.py -- <pipeline arguments>``.

``ray submit`` copies this one file to the head node and runs it there with the head's Python, so
it cannot import the project itself: it runs the project's CLI from the checkout that
``cluster.yaml`` synced and set up (``~/clip-curation``, or ``$CURATION_PROJECT``), with
``RAY_ADDRESS=auto`` so the driver joins the running cluster instead of starting a local Ray.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    project = Path(os.environ.get("CURATION_PROJECT", "~/clip-curation")).expanduser()
    python = project / ".venv" / "bin" / "python"
    if not python.exists():
        print(f"cluster_submit: no project environment at {python}; run `make setup` there "
              "(cluster.yaml's setup_commands do) or set CURATION_PROJECT", file=sys.stderr)
        return 2
    if not argv:
        argv = ["--help"]
    os.environ.setdefault("RAY_ADDRESS", "auto")
    os.chdir(project)
    os.execv(str(python), [str(python), "-m", "pipeline", *argv])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
