# The two commands a fresh machine needs (python3 and make only): `make demo` and `make test`.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo bench lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[dev,tui]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy --strict src tests/typing

test: lint
	$(PYTHON) -m pytest

demo: $(STAMP)
	$(VENV)/bin/wirebus demo

bench: $(STAMP)
	$(VENV)/bin/wirebus bench

clean:
	rm -rf $(VENV) build dist .mypy_cache .pytest_cache .ruff_cache
