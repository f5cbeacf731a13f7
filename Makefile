# make demo   set up .venv if needed, train the demo model, write runs/demo/report.html
# make test   set up .venv if needed, run the whole test suite
# make bench  set up .venv if needed, run the benchmarks (results in benchmarks/results/)
# make circuits  retrain the shipped presets and rewrite circuits/
# make docs  the API reference from the docstrings (docs/api/index.html)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mechgrok-installed

# pip installs with --no-compile, so Python caches the modules it imports in .venv as it goes; where
# the environment sets PYTHONDONTWRITEBYTECODE (many container images do), nothing would be cached and
# every process (each demo worker, pytest worker, notebook kernel) would compile torch & co. again:
# 36 s instead of 14 s per import on the slow 2-core machine (2026-12-01).
unexport PYTHONDONTWRITEBYTECODE
export WANDB_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export MPLBACKEND ?= Agg

.PHONY: install demo test bench circuits clean browser docs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off --no-compile -e '.[dev]'
	# --no-compile: Python compiles what it imports on first use (saves byte-compiling all of torch)
	# kronfluence (tests/benchmarks only) without its dependencies: its torchvision requirement breaks
	# imports here; what it really imports is in the dev extra of pyproject.toml
	$(PY) -m pip install --quiet --progress-bar off --no-compile --no-deps 'kronfluence==1.0.1'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mechgrok demo --out runs/demo

# one pytest worker per core (pytest-xdist; an idle worker takes tests from a busy one)
test: $(STAMP) browser
	$(PY) -m pytest -q -n auto --dist worksteal

# The real-browser test needs Chromium: install Debian's package where we can (root with apt-get);
# elsewhere tests/test_browser.py skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
	     (apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1)) ; } || \
	  echo "chromium could not be installed; tests/test_browser.py will skip"

bench: $(STAMP)
	$(PY) benchmarks/bench_capture.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_measures.py
	$(PY) benchmarks/bench_circuits.py  # auto-circuit side: see benchmarks/README_autocircuit.md
	$(PY) benchmarks/bench_overlap.py
	$(PY) benchmarks/bench_sae.py
	$(PY) benchmarks/bench_influence.py
	$(PY) benchmarks/bench_memorization.py

# API reference (HTML from the docstrings) in docs/api/, with pdoc
docs: $(STAMP)
	$(PY) docs/api.py docs/api

circuits: $(STAMP)
	$(PY) circuits/regenerate.py

clean:
	rm -rf runs .pytest_cache
