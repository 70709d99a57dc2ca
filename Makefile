# The two commands of the README, plus a few conveniences. Every target sets itself up.
.PHONY: setup demo test test-all lint

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@bash scripts/test.sh

test-all: setup
	@OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n "$${TEST_WORKERS:-2}" tests -m "not cluster"
	@OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n 0 -m cluster tests/cluster

lint: setup
	@.venv/bin/ruff check .
