# The README's commands. `make test` installs what the tests need, then runs them all.
PYTHON ?= python3

.PHONY: run test bench plugin

run:
	$(PYTHON) -m pip install -q --root-user-action=ignore .
	docker-on-top

# The managed plugin (as root, with dockerd running): builds build/plugin (config.json and a
# Debian rootfs with Python, cached under /var/cache/docker-on-top), then `docker plugin
# create` and `enable`. PLUGIN=NAME installs it under another name; see docs/managed-plugin.md.
PLUGIN ?= docker-on-top

plugin:
	$(PYTHON) packaging/plugin/build.py --install $(PLUGIN)

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
