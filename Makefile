# Two commands on a fresh machine: `make curate` and `make test`. Both create the virtual
# environment first (once: a second `make` does not reinstall unless pyproject/constraints change).

PYTHON   ?= python3
VENV     ?= .venv
URL_LIST ?=
DATASET  ?= $(if $(URL_LIST),laion-subset,embedded)
OUTPUT   ?= output/$(DATASET)
CONFIG   ?=
ARGS     ?=
PY        = $(VENV)/bin/python
STAMP     = $(VENV)/.installed

.PHONY: help setup bytecode curate query train ablation test test-cluster test-kill bench browser clean

help:
	@echo "make curate [DATASET=embedded|laion-subset] [URL_LIST=file] [OUTPUT=dir] [CONFIG=toml] [ARGS=...]"
	@echo "make query SQL='select ...' [OUTPUT=dir]"
	@echo "make train [POLICY=all] [OUTPUT=dir] [ARGS=--steps N]"
	@echo "make ablation [CONFIG=configs/ablation-cpu.toml|configs/ablation-gpu.toml] [ARGS='--samples N --steps N']   (default preset: configs/ablation-reading.toml)"
	@echo "make test          (make test-cluster: two-node Ray + S3 server on this machine)"
	@echo "make test-kill     (SIGKILL a run at 20 seeded moments over every step; rerun; ~10 min)"
	@echo "make bench [ARGS=...]   (writes BENCHMARKS.md)"

setup: $(STAMP) bytecode

# Our modules' bytecode, written ahead (~0.1 s when up to date). pip compiles the packages it
# installs, but not an editable install's own; and where PYTHONDONTWRITEBYTECODE is set (common in
# containers; it is set where this project is developed and benchmarked) Python never caches it, so every
# Ray worker compiled each module it imported, at every start: ~0.2 CPU-s per process (issue 27).
bytecode: $(STAMP)
	@$(PY) -m compileall -q core manifests models stages sources training pipeline

# facenet-pytorch (the faces step's MTCNN, weights inside the wheel) goes in with --no-deps: its
# metadata pins torch<2.3, numpy<2, Pillow<10.3, which are stale (models/faces.py); its version is in constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet --no-deps -c constraints.txt facenet-pytorch
	touch $(STAMP)

curate: $(STAMP) bytecode
	$(PY) -m pipeline curate --dataset $(DATASET) --output $(OUTPUT) \
		$(if $(URL_LIST),--url-list $(URL_LIST)) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

query: $(STAMP) bytecode
	$(PY) -m pipeline query --output $(OUTPUT) "$(SQL)"

POLICY   ?= all
train: $(STAMP) bytecode
	$(PY) -m pipeline train --policy $(POLICY) --output $(OUTPUT) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

# Curate the embedded dataset, train one CLIP per filter policy and seed at equal steps, evaluate all
# (zero-shot, typographic attack, text-only probe, spurious backgrounds, retrieval), mean +- sd over
# the seeds: output/ablation/ablation/. Preset: configs/ablation-reading.toml (every model from a tower
# that can read; ~45 min on 2 cores, its start built once); from scratch: CONFIG=configs/ablation-cpu.toml
# (the CPU null of issue 17, with the masked lines) or CONFIG=configs/ablation-gpu.toml.
ablation: $(STAMP) bytecode
	$(PY) -m pipeline ablation --output output/ablation --config $(or $(CONFIG),configs/ablation-reading.toml) $(ARGS)

test: $(STAMP) bytecode browser
	$(PY) -m pytest -q tests --ignore=tests/test_cluster.py

# A real two-node Ray cluster on this machine (ray start --head + ray start --address), jobs via
# `ray job submit`, output in moto's S3 server on 127.0.0.1, a worker node killed mid-stage (~6 min).
test-cluster: $(STAMP) bytecode
	$(PY) -m pytest -q tests/test_cluster.py

# The driver's process group SIGKILLed at 20 seeded moments spread over every step, each kill
# rerun; outputs must equal an uninterrupted run's (slow: skipped by `make test`).
test-kill: $(STAMP) bytecode
	CURATION_KILL_TESTS=1 $(PY) -m pytest -q tests/test_kill_points.py --timeout 3600

# Benchmarks: side-by-side ratios measured in one run (never absolute targets in tests).
bench: $(STAMP) bytecode
	$(PY) bench/run_all.py $(ARGS)

# Debian's Chromium renders the HTML report in the tests (headless). Installed once, if missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the report test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf output
