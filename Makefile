# Setup is idempotent: the venv is created once and the project re-installed only when
# pyproject.toml or constraints.txt change. Everything installs under constraints.txt,
# which pins torch==2.13.0 (the CPU wheel available locally; any other version would pull
# gigabytes of CUDA packages), and the install is checked not to have replaced it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokenprune-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-long test-long-budget test-compat bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@$(BIN)/python -c "import sys, torch; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '2.13.0' else f'torch {torch.__version__} got installed; constraints.txt pins 2.13.0')"
	$(BIN)/tokenprune compat install
	@touch $@

demo: $(STAMP)
	$(BIN)/tokenprune run

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The compat-marked tests against every transformers version in .ci/compat-versions, each in
# a venv cached under ~/.cache/tokenprune-compat (TOKENPRUNE_COMPAT_CACHE) that borrows torch
# and the rest from $(VENV). COMPAT_VERSIONS="5.0.0 5.25.0" picks some.
test-compat: $(STAMP)
	.ci/compat $(COMPAT_VERSIONS)

test-long: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Nightly-style: the long hypothesis profile (5000 examples) on the budget properties only
# (about 12 minutes); the CI profile's 500 examples never reached issue 11.13's case.
test-long-budget: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests/test_apportion.py tests/test_invariants.py tests/test_budget.py

bench: $(STAMP)
	@for script in benchmarks/[!_]*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
