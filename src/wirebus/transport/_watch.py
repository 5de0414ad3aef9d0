"""A subscriber's watch on its connections: no connection ends without being counted and logged.

libzmq does not reconnect a connecting socket whose connection ended in a protocol error (a
message over ``MAXMSGSIZE``, a failed handshake): without a watch, such a subscriber would never
hear that publisher again and nobody would know. The watch reads the socket's monitor events,
counts them in the subscriber's stats, logs them (rate-limited; a refused handshake at
WARNING, a lost connection at INFO, since every publisher's close looks like one), and has a
connecting socket
connect anew, backing off from 0.1 s to 5 s while the failures go on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from wirebus.transport._base import RateLimitedLog
from wirebus.transport._decoder import SubscriberStats

_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_WATCHED = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED
_FIRST_BACKOFF = 0.1
_MAX_BACKOFF = 5.0


class ConnectionWatch:
    """Watches ``socket`` (connected to ``address`` when ``reconnect``) for ``owner``."""

    def __init__(
        self,
        socket: zmq.Socket[bytes],
        address: str,
        reconnect: bool,
        stats: SubscriberStats,
        owner: str,
    ) -> None:
        self._socket = socket
        self._address = address
        self._reconnect = reconnect
        self._stats = stats
        self._owner = owner
        self._log = RateLimitedLog()
        self._backoff = _FIRST_BACKOFF
        self.due: float | None = None  # time.monotonic() of the next reconnect, if one is due
        self.monitor: zmq.Socket[bytes] = socket.get_monitor_socket(_WATCHED)
        self.fd = cast(int, self.monitor.getsockopt(zmq.FD))

    def read(self) -> None:
        """Drain the monitor's events (its FD is edge-triggered), then reconnect if due."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            self._seen(int(event["event"]), bytes(event["endpoint"]).decode(errors="replace"))
        self.reconnect_if_due()

    def _seen(self, event: int, endpoint: str) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # libzmq reconnected by itself
            self._backoff = _FIRST_BACKOFF
            self.due = None
            return
        if event & _HANDSHAKE_FAILED:
            self._stats.handshake_failures += 1
            what = f"handshake failed ({str(zmq.Event(event).name).rsplit('_', 1)[-1].lower()})"
        else:
            self._stats.disconnects += 1
            what = "connection lost"
        then = "reconnecting" if self._reconnect else "the peer may connect again"
        # A refused handshake is a misconfiguration; a lost connection is also how every
        # publisher's close() looks from here, so it is logged at INFO.
        level = logging.WARNING if event & _HANDSHAKE_FAILED else logging.INFO
        self._log(level, f"{self._owner}: {what} on {endpoint}; {then}")
        if self._reconnect and self.due is None:
            self.due = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, _MAX_BACKOFF)

    def reconnect_if_due(self) -> None:
        """Connect anew if the reconnect that a lost connection asked for is due."""
        if self.due is None or time.monotonic() < self.due:
            return
        self.due = None
        with contextlib.suppress(zmq.ZMQError):  # libzmq may have forgotten the endpoint
            self._socket.disconnect(self._address)
        self._socket.connect(self._address)

    def close(self) -> None:
        self._socket.disable_monitor()
        self.monitor.close(linger=0)
