# The two set-up commands of the README, `make demo` and `make test`, both start here:
# create .venv, install the local CPU torch wheel, then the project with its dev extra.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The migration dry run on the bundled pipelines; its exit code 1 means "changes pending".
demo: $(STAMP)
	$(VENV)/bin/mtp-migrate diff fixtures/pipelines/before; test $$? -le 1

test: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest

bench: $(STAMP)
	$(PYTHON) benchmarks/bench_loss.py --width 0 --reps 3 --threads 1
	$(PYTHON) benchmarks/bench_loss.py --reps 3 --threads 1
	$(PYTHON) benchmarks/bench_codemod.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
