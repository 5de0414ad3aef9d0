# The two commands a fresh machine needs (python3 and make only): `make demo` and `make test`.
# `make demo` installs only what the demo runs (pyzmq, msgspec, rich); `make test` adds the
# dev tools (pytest, mypy, ruff, ...) to the same .venv.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
PIP    := $(PYTHON) -m pip install --quiet --disable-pip-version-check
RUNTIME := $(VENV)/.runtime
STAMP  := $(VENV)/.installed

.PHONY: test demo bench lint clean

# --no-compile: the demo imports a fraction of what it installs; Python compiles that on use.
$(RUNTIME): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) --no-compile -e '.[tui]'
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PIP) -e '.[dev,tui]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy --strict src tests/typing

test: lint
	$(PYTHON) -m pytest

demo: $(RUNTIME)
	$(VENV)/bin/wirebus demo

bench: $(RUNTIME)
	$(VENV)/bin/wirebus bench

clean:
	rm -rf $(VENV) build dist .mypy_cache .pytest_cache .ruff_cache
