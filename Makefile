# The README's commands. `make test` installs what the tests need, then runs them all.
PYTHON ?= python3

.PHONY: run test lint

run:
	$(PYTHON) -m pip install -q --root-user-action=ignore .
	docker-on-top

test:
	./scripts/install-test-deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest -ra tests
