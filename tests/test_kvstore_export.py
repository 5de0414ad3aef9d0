"""Labels, the Prometheus text of a store, and the HTTP endpoint that serves it.

The endpoint is tested with real HTTP requests (urllib) against a real server thread or a real
``wirebus kv serve`` process, and the text is parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wirebus.errors import KVStoreError
from wirebus.kvstore import BasicKVStore, KVStoreReader, MetricsServer


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET ``url`` and parse it: sample name -> sorted label pairs -> value."""
    with urllib.request.urlopen(url, timeout=20) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.fixture
def store() -> Iterator[BasicKVStore]:
    with BasicKVStore() as s:
        yield s


def test_labels_name_one_key_in_either_form(store: BasicKVStore) -> None:
    by_argument = store.counter("requests", labels={"model": "a", "api": "chat"})
    assert store.counter('requests{model="a",api="chat"}') is by_argument
    assert store.counter('requests{api="chat"}', labels={"model": "a"}) is by_argument
    assert store.counter("requests", labels={"model": "b"}) is not by_argument
    by_argument.inc(3)
    odd = store.gauge("depth", labels={"queue": 'say "hi"\\n\n'})
    odd.set(2.0)
    with KVStoreReader(store.path) as reader:
        assert reader.keys() == [
            'requests{api="chat",model="a"}',
            'requests{model="b"}',
            'depth{queue="say \\"hi\\"\\\\n\\n"}',
        ]
        assert reader.get("requests", labels={"api": "chat", "model": "a"}) == 3.0
        assert reader.get('requests{model="a", api="chat"}') == 3.0
        assert reader.get("depth", labels={"queue": 'say "hi"\\n\n'}) == 2.0
        assert reader.kind("requests", labels={"model": "b"}) == "counter"
        with pytest.raises(KeyError, match="requests"):
            reader.get("requests")


@pytest.mark.parametrize(
    ("name", "labels", "error", "match"),
    [
        ("r", {"1x": "v"}, ValueError, "label name '1x'"),
        ("r", {"a-b": "v"}, ValueError, "label name 'a-b'"),
        ("r", {"model": 7}, TypeError, "'model' has a int value 7"),
        ('r{model="a"}', {"model": "b"}, ValueError, "label 'model' is given twice"),
        ('r{model="a",model="b"}', None, ValueError, "given twice"),
        ("r{model=a}", None, ValueError, "cannot read labels from 'model=a'"),
        ('{model="a"}', None, ValueError, "no name before its labels"),
    ],
)
def test_bad_labels_are_refused_with_what_is_wrong(
    store: BasicKVStore, name: str, labels: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        store.counter(name, labels=labels)  # type: ignore[arg-type]
    with KVStoreReader(store.path) as reader:
        assert reader.keys() == []


def test_labelled_keys_export_as_label_sets_of_one_family(store: BasicKVStore) -> None:
    for model, n in (("a", 1.0), ("b", 2.0)):
        store.counter("requests", labels={"model": model}).inc(n)
        store.series("latency_ms", labels={"model": model}).extend([n, n * 10, n * 100])
    store.counter("requests").inc(5)  # the same family without labels
    store.gauge("requests", labels={"model": "c"}).set(9)  # another kind: another family
    with KVStoreReader(store.path) as reader:
        text = reader.to_prometheus(prefix="bench_")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert sorted(families) == ["bench_latency_ms", "bench_requests", "bench_requests_2"]
    assert text.count("# TYPE bench_requests_total counter") == 1
    requests = {tuple(s.labels.items()): s.value for s in families["bench_requests"].samples}
    assert requests == {(("model", "a"),): 1.0, (("model", "b"),): 2.0, (): 5.0}
    assert families["bench_requests_2"].type == "gauge"
    latency = families["bench_latency_ms"]
    assert latency.type == "summary"
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in latency.samples}
    assert values[("bench_latency_ms_count", (("model", "b"),))] == 3
    assert values[("bench_latency_ms_sum", (("model", "a"),))] == 111.0
    p99 = values[("bench_latency_ms", (("model", "b"), ("quantile", "0.99")))]
    assert math.isclose(p99, 20.0, rel_tol=0.01)  # numpy "lower": the 2nd of 3


def test_metrics_server_serves_the_live_store_on_loopback(store: BasicKVStore) -> None:
    requests = store.counter("requests", labels={"model": "a"})
    requests.inc(2)
    with MetricsServer(store.path, port=0, prefix="wb_") as server:
        assert server.host == "127.0.0.1"
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        assert scrape(server.url)["wb_requests_total"] == {(("model", "a"),): 2.0}
        requests.inc(3)
        store.gauge("depth").set(4)
        samples = scrape(server.url)
        assert samples["wb_requests_total"] == {(("model", "a"),): 5.0}
        assert samples["wb_depth"] == {(): 4.0}
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=20)


def test_metrics_server_refuses_what_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(KVStoreError, match="not a store"):
        MetricsServer(tmp_path, port=0)


def test_kv_serve_command_serves_until_stopped(store: BasicKVStore) -> None:
    store.series("latency_ms").extend([1.0, 2.0, 3.0])
    with subprocess.Popen(
        [sys.executable, "-m", "wirebus.cli", "kv", "serve", store.path, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith(f"serving {store.path} on http://127.0.0.1:"), line
            samples = scrape(line.split()[-1])
            assert samples["latency_ms_count"] == {(): 3.0}
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "argument --port: must be a port number in [0, 65535], got 70000"),
        (["--port", "-1"], "argument --port: must be a port number in [0, 65535], got -1"),
        (["--host", "256.0.0.1"], "cannot serve"),
    ],
)
def test_kv_serve_bad_input_is_one_line(store: BasicKVStore, args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wirebus.cli", "kv", "serve", store.path, *args],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
