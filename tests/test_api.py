"""The public surface: every name the API contract lists is importable from ``wirebus``,
and every module's ``__all__`` names things that exist (as anyio's test_all_attributes)."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import wirebus

DOCS = Path(__file__).parents[1] / "docs"

CONTRACT = {
    "wirebus.codec": ["TOPIC_FRAME_SIZE", "make_topic", "MessageCodec", "MsgspecCodec"],
    "wirebus.record": [
        "SessionEventType",
        "SampleEventType",
        "ErrorEventType",
        "ErrorData",
        "PromptData",
        "TextModelOutput",
        "EventRecord",
        "EventRecordCodec",
    ],
    "wirebus.transport": [
        "MessagePublisher",
        "MessageSubscriber",
        "ZmqMessagePublisher",
        "ZmqMessageSubscriber",
    ],
    "wirebus.kvstore": ["KVStore", "BasicKVStore", "KVStoreReader"],
    "wirebus.ready": ["ReadySignal", "ReadyCheckReceiver", "send_ready_signal", "notify_ready"],
    "wirebus.launcher": ["ServiceSpec", "ServiceLauncher"],
    "wirebus.errors": [
        "WirebusError",
        "ServiceStartupError",
        "ReadyTimeoutError",
        "KVStoreError",
    ],
}
MODULES = [
    *CONTRACT,
    "wirebus.security",
    "wirebus.testing",
    "wirebus.demo",
    "wirebus.cli",
    "wirebus.services.event_logger",
    "wirebus.services.event_publisher",
    "wirebus.services.metrics_aggregator",
]


@pytest.mark.parametrize(("module", "names"), CONTRACT.items())
def test_contract_names_are_top_level_and_the_same_objects(module: str, names: list[str]) -> None:
    mod = importlib.import_module(module)
    for name in names:
        assert getattr(wirebus, name) is getattr(mod, name), f"wirebus.{name}"
        assert name in mod.__all__, f"{module}.__all__ lacks {name}"


@pytest.mark.parametrize("module", MODULES)
def test_all_lists_existing_documented_names(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__doc__, f"{module} has no docstring"
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{module}.{name} has no docstring"


def test_error_tree() -> None:
    assert issubclass(wirebus.ReadyTimeoutError, TimeoutError)
    for error in (wirebus.ServiceStartupError, wirebus.ReadyTimeoutError, wirebus.KVStoreError):
        assert issubclass(error, wirebus.WirebusError)


def test_py_typed_is_shipped() -> None:
    from importlib.resources import files

    assert files("wirebus").joinpath("py.typed").is_file()


def test_readme_example_runs(tmp_path: Path) -> None:
    readme = DOCS.parent.joinpath("README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(example)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Tick(seq=2, price=102.0)" in result.stdout
    assert "received=3, dropped=0" in result.stdout


# Every ```python block in docs/ runs, unless tagged ```python fragment (a fenced block may be
# indented, inside a list item). Any other word after "python" is a typo: see the test below.
_PYTHON_FENCE = re.compile(r"^( *)```python( fragment)?\n(.*?)^\1```", re.DOTALL | re.MULTILINE)
DOC_EXAMPLES = [
    pytest.param(textwrap.dedent(block), id=f"{page.name}-{i}")
    for page in sorted(DOCS.glob("*.md"))
    for i, (_, fragment, block) in enumerate(_PYTHON_FENCE.findall(page.read_text()))
    if not fragment
]


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda page: page.name)
def test_doc_python_blocks_are_runnable_or_fragments(page: Path) -> None:
    text = page.read_text()
    fences = re.findall(r"^ *```python.*$", text, re.MULTILINE)
    assert len(fences) == len(_PYTHON_FENCE.findall(text)), (
        f"{page.name}: a python block is tagged neither ```python nor ```python fragment: {fences}"
    )


@pytest.mark.parametrize("example", DOC_EXAMPLES)
def test_doc_example_runs(example: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(example)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_make_demo_installs_the_runtime_deps_and_rich() -> None:
    """``make demo`` lists its dependencies itself (it does not build wirebus): they are
    pyproject's runtime dependencies and the tui extra, nothing more, nothing less."""
    import tomllib

    project = tomllib.loads(DOCS.parent.joinpath("pyproject.toml").read_text())["project"]
    makefile = DOCS.parent.joinpath("Makefile").read_text()
    demo_deps = re.search(r"^DEMO_DEPS := (.*)$", makefile, re.MULTILINE)
    assert demo_deps is not None
    expected = project["dependencies"] + project["optional-dependencies"]["tui"]
    assert sorted(demo_deps.group(1).split()) == sorted(expected)
