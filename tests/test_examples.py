"""The tutorial's example (docs/harness.md, examples/harness/) runs, its own tests pass in
pytest-asyncio's strict mode, and the page quotes the example's files word for word."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "harness"


def test_harness_example_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE / "harness.py"), "--requests", "200", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "completed 200 requests, 0 failed" in result.stdout
    for series in ("ttft_ms", "latency_ms", "tpot_ms"):
        assert re.search(rf"^{series} +p50 +\d+\.\d+ +p90 +\d+\.\d+", result.stdout, re.M)
    counts = re.search(
        r"events published (\d+), logged (\d+); responses recorded (\d+)", result.stdout
    )
    assert counts is not None, result.stdout
    published, logged, responses = map(int, counts.groups())
    assert published == logged == 6 * 200 + 4  # six events per request, four for the session
    assert responses == 200
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "event_logger.log", "metrics_aggregator.log", "sink.log",
    ]  # fmt: skip


def test_harness_example_tests_pass_in_strict_mode(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLE), "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path}"],
        capture_output=True, text=True, timeout=60, check=False, cwd=EXAMPLE,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b2 passed\b", result.stdout), result.stdout


FRAGMENTS = re.findall(
    r"^```python fragment\n(.*?)^```", (ROOT / "docs" / "harness.md").read_text(), re.S | re.M
)


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_the_tutorial_quotes_the_example(fragment: str) -> None:
    sources = [path.read_text() for path in EXAMPLE.glob("*.py")]
    assert any(fragment in source for source in sources), fragment


def test_the_tutorial_has_its_fragments() -> None:
    assert len(FRAGMENTS) >= 8
