"""The ``wirebus kv`` commands, run as real subprocesses: bad input and closed pipes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from wirebus.kvstore import BasicKVStore

KV = [sys.executable, "-m", "wirebus.cli", "kv"]


@pytest.fixture
def store_path() -> Iterator[str]:
    with BasicKVStore() as store:
        store.counter("requests").inc(7)
        store.series("latency_ms").extend([1.0, 2.0, 3.0])
        yield store.path


@pytest.mark.parametrize("period", ["-1", "0", "nan", "inf"])
def test_kv_show_refuses_a_watch_period_that_is_not_positive(store_path: str, period: str) -> None:
    result = subprocess.run(
        [*KV, "show", store_path, f"--watch={period}"], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"argument --watch: must be a positive number of seconds, got {period}" in result.stderr


def test_kv_show_watch_into_a_closed_pipe_exits_quietly(store_path: str) -> None:
    """``wirebus kv show --watch | head -n 1``: head reads a line and goes away."""
    with subprocess.Popen(
        [*KV, "show", store_path, "--watch", "0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "\n"  # not a terminal: a blank line between tables
            assert proc.stdout.readline().split()[0] == "name"
            proc.stdout.close()
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert (proc.returncode, err) == (0, "")
