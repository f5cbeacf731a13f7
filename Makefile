# make demo   set up .venv if needed, train the demo model, write runs/demo/report.html
# make test   set up .venv if needed, run the whole test suite
# make bench  set up .venv if needed, run the benchmarks (results in benchmarks/results/)
# make circuits  retrain the shipped presets and rewrite circuits/
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mechgrok-installed

export WANDB_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export MPLBACKEND ?= Agg

.PHONY: install demo test bench circuits clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mechgrok demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_capture.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_measures.py
	$(PY) benchmarks/bench_circuits.py  # auto-circuit side: see benchmarks/README_autocircuit.md
	$(PY) benchmarks/bench_overlap.py

circuits: $(STAMP)
	$(PY) circuits/regenerate.py

clean:
	rm -rf runs .pytest_cache
