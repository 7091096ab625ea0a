# Two commands do all the set-up on a fresh machine:
#   make demo   # audit the embedded default (scikit-learn digits with planted label noise)
#   make test   # the test suite, without the tests marked slow (make test-all: every test, as CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU machines this project is built on ship torch 2.14.1 / torchvision 0.29.1 on disk.
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,docs

.PHONY: setup demo test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/nnsim audit --out nnsim-demo --overwrite

# The fast suite (minutes on 2 cores): the tests marked @pytest.mark.slow (more than about
# 2 s each: real models, training runs, subprocesses, torchrun) are left to test-all.
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

# Benchmarks write their tables to benchmarks/results/ (minutes each; run on a quiet machine).
bench: setup
	$(BIN)/python benchmarks/bench_gradients.py --out benchmarks/results/gradients_cpu.md
	$(BIN)/python benchmarks/bench_index.py
	$(BIN)/python benchmarks/bench_label_issues.py --seeds 3

# The documentation site, from docs/ and the docstrings of this checkout, into site/.
# --strict: a warning (a broken link or anchor, a docstring it cannot read) is an error.
.PHONY: docs
docs: setup
	NO_MKDOCS_2_WARNING=1 PYTHONPATH=$(CURDIR) $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) nnsim-demo .pytest_cache site
