# The two commands a fresh machine needs (python3 and make only): `make demo` and `make test`.
# `make demo` installs only what the demo runs (pyzmq, msgspec, rich); `make test` adds the
# dev tools (pytest, mypy, ruff, ...) to the same .venv.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
PIP    := $(PYTHON) -m pip install --quiet --disable-pip-version-check
RUNTIME := $(VENV)/.runtime
STAMP  := $(VENV)/.installed

.PHONY: test demo bench lint clean

# The demo's dependencies (pyproject's runtime ones and the tui extra; a test keeps them equal)
# with src/ on the path: building wirebus itself costs a build environment (hatchling), and
# compiling what is installed costs more than compiling the part the demo imports, on use.
DEMO_DEPS := pyzmq>=25 msgspec>=0.18 rich>=13

$(RUNTIME): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) --no-compile $(foreach dep,$(DEMO_DEPS),'$(dep)')
	$(PYTHON) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], \
	  "wirebus-src.pth").write_text("$(CURDIR)/src\n")'
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
	$(PYTHON) -m wirebus demo

bench: $(STAMP)
	$(PYTHON) -m wirebus bench

clean:
	rm -rf $(VENV) build dist .mypy_cache .pytest_cache .ruff_cache
