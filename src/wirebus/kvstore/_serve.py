"""An HTTP endpoint for Prometheus: a store's text format on ``/metrics``.

The standard library's ``http.server`` in a thread of its own, bound to the loopback interface
unless told otherwise (PITFALLS 10).
"""

from __future__ import annotations

import http.server
import os
import threading
from typing import Any

from wirebus._resource import Resource
from wirebus.errors import KVStoreError
from wirebus.kvstore._export import CONTENT_TYPE
from wirebus.kvstore._reader import KVStoreReader


class MetricsServer(Resource):
    """Serves a store's Prometheus text on ``http://HOST:PORT/metrics`` from a thread.

    ``port`` 0 picks a free port (``port`` and ``url`` tell which). ``host`` defaults to the
    loopback interface: exposing metrics on other interfaces is a choice to make explicitly.
    The store is opened with a :class:`KVStoreReader` (``owner`` as there) and read afresh on
    every request; a store that turns corrupt answers 500 with the error. ``close()`` stops
    the thread and closes the socket and the reader.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 9464,
        prefix: str = "",
        owner: int | None = None,
    ) -> None:
        self._reader = KVStoreReader(path, owner=owner)
        self._lock = threading.Lock()  # a reader is not thread-safe: one request at a time
        try:
            self._server = http.server.HTTPServer((host, port), self._handler(prefix))
        except BaseException:
            self._reader.close()
            raise
        self.host = host
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(0.1,),  # how often it looks for close(): close() waits at most that long
            name=f"wirebus-metrics-{self.port}",
            daemon=True,
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """The address of the metrics page."""
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the socket and the reader. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        self._reader.close()

    def _render(self, prefix: str) -> bytes:
        with self._lock:
            return self._reader.to_prometheus(prefix).encode()

    def _handler(self, prefix: str) -> type[http.server.BaseHTTPRequestHandler]:
        render = self._render

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served")
                    return
                try:
                    body, status, kind = render(prefix), 200, CONTENT_TYPE
                except (KVStoreError, RuntimeError) as exc:
                    body, status, kind = f"{exc}\n".encode(), 500, "text/plain; charset=utf-8"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: a scrape every few seconds is not news."""

        return Handler
