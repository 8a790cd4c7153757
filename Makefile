# The README's commands. `make test` installs what the tests need, then runs them all.
PYTHON ?= python3

.PHONY: run test lint bench

run:
	$(PYTHON) -m pip install -q --root-user-action=ignore .
	docker-on-top

test:
	./scripts/install-test-deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest -ra tests

# Benchmarks (needs root): prints a table, writes bench/results/latest.json; never fails on
# the figures. The docker-level part uses the dockerd that answers `docker info`, else it
# skips; BENCH_ARGS=--private-dockerd lets it start its own, --quick makes it short.
bench:
	$(PYTHON) bench/run_all.py $(BENCH_ARGS)
