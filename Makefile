# The two commands a fresh machine needs (python3 and make only): `make demo` and `make test`.
# `make demo` installs only what the demo runs (pyzmq, msgspec, rich); `make test` adds wirebus
# itself (editable, with its entry points) and the dev tools (pytest, mypy, ruff, ...).
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime
STAMP   := $(VENV)/.installed

# python3's own pip installs into the venv when it can (pip >= 22.3: --python): giving the venv
# a pip of its own (ensurepip) takes 8-15 s on a 2-core machine, longer than the whole install.
# Where python3 has no such pip, the venv gets its own after all.
ifeq ($(shell python3 -m pip --python "$$(command -v python3)" --version >/dev/null 2>&1 && echo yes),yes)
VENV_ARGS := --without-pip
PIP       := python3 -m pip --python $(PYTHON)
else
VENV_ARGS :=
PIP       := $(PYTHON) -m pip
endif
INSTALL := $(PIP) install --quiet --disable-pip-version-check

# The demo's dependencies: pyproject's runtime ones and the tui extra (tests/test_cli.py keeps
# them equal), with src/ put on the path instead of building wirebus (a build environment
# costs seconds); installed without compiling: Python compiles what the demo imports, on use.
DEMO_DEPS := pyzmq>=25 msgspec>=0.18 rich>=13

.PHONY: test demo bench lint clean

$(RUNTIME): pyproject.toml
	python3 -m venv $(VENV_ARGS) $(VENV)
	$(INSTALL) --no-compile $(foreach dep,$(DEMO_DEPS),'$(dep)')
	$(PYTHON) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], \
	  "wirebus-src.pth").write_text("$(CURDIR)/src\n")'
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(INSTALL) -e '.[dev,tui]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy --strict src tests/typing examples/harness

test: lint
	$(PYTHON) -m pytest

demo: $(RUNTIME)
	$(PYTHON) -m wirebus demo

bench: $(STAMP)
	$(PYTHON) -m wirebus bench

clean:
	rm -rf $(VENV) build dist .mypy_cache .pytest_cache .ruff_cache
