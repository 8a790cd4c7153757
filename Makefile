# Conveniences only: the README's commands need no make. `make run` and `make test` are
# exactly the README's two set-up commands.
PYTHON ?= python3

.PHONY: run test deb bench plugin

run:
	$(PYTHON) -m docker_on_top

test:
	./scripts/test

# dist/docker-on-top_VERSION_all.deb (dpkg-deb only); see packaging/deb/build.py.
deb:
	$(PYTHON) packaging/deb/build.py

# The managed plugin (as root, with dockerd running): builds build/plugin (config.json and a
# Debian rootfs with Python, cached under /var/cache/docker-on-top), then `docker plugin
# create` and `enable`. PLUGIN=NAME installs it under another name; see docs/managed-plugin.md.
PLUGIN ?= docker-on-top

plugin:
	$(PYTHON) packaging/plugin/build.py --install $(PLUGIN)

# Benchmarks (needs root): prints a table and issue 16's targets (met / MISSED / n/a),
# writes bench/results/latest.json; never fails on the figures. The docker-level part uses
# the dockerd that answers `docker info`, else it skips; BENCH_ARGS=--private-dockerd lets
# it start its own, --quick makes it short, "--compare SOCK --compare-state-dir DIR"
# measures the Go original serving on SOCK in the same run (docs/performance.md).
bench:
	$(PYTHON) bench/run_all.py $(BENCH_ARGS)
