# Two commands a fresh clone needs: `make demo` (the main job) and `make test` (the offline suite).
# Each sets up .venv first when it is missing, with the CPU versions pinned in constraints-ci.txt; a .venv that
# already imports this checkout's stepdistill and pytest is used as it is (nothing reinstalled, nothing downloaded).
# On a GPU machine set up your own CUDA torch instead: pip install -e ".[dev]" (pyproject.toml sets lower bounds).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?= --output-dir demo_out
TEST_ARGS ?= -q

.PHONY: demo test setup
demo: setup
	$(PY) -m stepdistill.cli demo $(DEMO_ARGS)

# pytest's exit 5 (no test collected) fails like any other non-zero exit.
test: setup
	$(PY) -m pytest $(TEST_ARGS)

setup:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@(cd / && $(abspath $(PY)) -c "import pathlib, sys, pytest, stepdistill; \
	sys.exit(pathlib.Path(stepdistill.__file__).resolve().parents[1] != pathlib.Path('$(CURDIR)').resolve())") \
	2>/dev/null || $(VENV)/bin/pip install -c constraints-ci.txt -e ".[dev]"
