"""The package's public surface: ``wirebus.__all__`` is exactly what it exports (as httpx's
test_exported_members), and its names are imported on first use, so that a service pays only
for what it uses."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import wirebus

INIT = Path(wirebus.__file__)


def _type_checking_imports() -> dict[str, str]:
    """``{name: module}`` of the re-exports mypy sees (the ``if TYPE_CHECKING:`` block)."""
    tree = ast.parse(INIT.read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If))
    found = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            assert alias.asname == alias.name, f"{alias.name} is not re-exported as itself"
            found[alias.name] = node.module
    return found


def test_all_is_sorted_and_is_what_the_package_exports() -> None:
    names = wirebus.__all__
    constants = [name for name in names if name.isupper()]
    assert names == sorted(constants) + sorted(n for n in names if n not in constants)
    assert len(set(names)) == len(names)
    assert sorted(name for name in dir(wirebus) if not name.startswith("_")) == sorted(names)
    assert _type_checking_imports() == wirebus._SOURCES
    assert sorted(wirebus._SOURCES) == sorted(names)


def test_every_exported_name_is_the_object_of_its_module() -> None:
    for name, module in wirebus._SOURCES.items():
        assert getattr(wirebus, name) is getattr(importlib.import_module(module), name), name
        assert name in importlib.import_module(module).__all__, f"{module}.__all__ lacks {name}"


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        wirebus.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    return set(result.stdout.split())


def test_reporting_ready_loads_neither_asyncio_nor_the_transport_nor_the_store() -> None:
    loaded = _loaded_after("import wirebus.ready")
    assert "wirebus.ready" in loaded
    heavy = {"asyncio", "logging", "wirebus.transport", "wirebus.kvstore", "wirebus.launcher"}
    assert loaded & heavy == set()


def test_a_service_does_not_load_the_parent_side() -> None:
    loaded = _loaded_after("import wirebus.service")
    assert loaded & {"wirebus.launcher", "wirebus.transport", "wirebus.kvstore"} == set()


def test_the_watchdog_imports_only_the_standard_library() -> None:
    loaded = _loaded_after("import wirebus._watchdog") - _loaded_after("pass")
    assert {name for name in loaded if name.split(".")[0] in ("zmq", "msgspec")} == set()
    assert {name for name in loaded if name.startswith("wirebus")} == {
        "wirebus",
        "wirebus._watchdog",
    }


@pytest.mark.parametrize("module", ["wirebus.service", "wirebus.services", "wirebus._watchdog"])
def test_the_new_modules_are_documented(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__doc__, f"{module} has no docstring"
    for name in getattr(mod, "__all__", ()):
        assert getattr(mod, name).__doc__, f"{module}.{name} has no docstring"
