"""The publisher's send step: queued entries to messages on the socket.

:class:`SendStep` takes runs of one topic, encodes them in one call where the codec offers it
(else takes the payloads ``publish()`` encoded), numbers the items per topic, frames them
(:mod:`~wirebus.transport._wire`) and sends, keeping each message in the replay buffer when
there is one; and it keeps every counter of what happened to them. Whoever holds the
publisher's send lock calls it.
"""

from __future__ import annotations

import collections
import itertools
import logging
import operator
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import zmq

from wirebus.codec import MessageCodec, RunEncoding
from wirebus.transport import _wire
from wirebus.transport._base import RateLimitedLog, safe_repr
from wirebus.transport._intake import Entry
from wirebus.transport._replay import ReplayServer

T = TypeVar("T")

_TOPIC = operator.itemgetter(0)
_VALUE = operator.itemgetter(1)


class SendStep(Generic[T]):
    """Encodes and sends queued entries; every counter of what happened to them.

    ``on_error(exc, item)`` hears of each item that failed to encode (the item is dropped
    alone). An error of the socket loses the rest of the run being sent (counted in ``lost``)
    and is raised; what follows that run stays queued. With ``replay``, each message sent is
    kept in its buffer and names its endpoint.
    """

    def __init__(
        self,
        socket: zmq.Socket[bytes],
        publisher_id: int,
        codec: MessageCodec[T],
        run_encoding: RunEncoding[T] | None,
        conflate: bool,
        max_batch_bytes: int,
        on_error: Callable[[BaseException, T], None],
        owner: str,
        replay: ReplayServer | None = None,
    ) -> None:
        self._socket = socket
        self._replay = None if replay is None else replay.buffer
        self._announce = b"" if replay is None else replay.announce
        self._publisher_id = publisher_id
        self._codec = codec
        self._encode_run = run_encoding.encode if run_encoding is not None else None
        self._conflate = conflate
        self._max_batch_bytes = max_batch_bytes
        self._on_error = on_error
        self._owner = owner
        self._seqs: dict[bytes, int] = {}
        self._error_log = RateLimitedLog()
        self.sent = 0
        self.messages = 0
        self.conflated = 0
        self.encode_errors = 0
        self.lost = 0
        self.subscriptions = 0

    @property
    def handled(self) -> int:
        """Items whose fate is settled: sent, superseded, failed to encode, or lost."""
        return self.sent + self.conflated + self.encode_errors + self.lost

    def send(self, queue: collections.deque[Entry], deadline: float | None = None) -> None:
        """Send ``queue``, batching runs of one topic (under the send lock): all of it, or
        the runs begun before ``deadline`` (``time.monotonic()``); the rest stays queued."""
        popleft = queue.popleft
        while queue:
            runs = itertools.groupby(
                itertools.starmap(popleft, itertools.repeat((), len(queue))), _TOPIC
            )
            for topic, run in runs:
                if deadline is not None and time.monotonic() >= deadline:
                    queue.extendleft(reversed([*run, *(e for _, r in runs for e in r)]))
                    return
                values = list(map(_VALUE, run))
                try:
                    self._send_run(topic, values)
                except Exception:
                    queue.extendleft(reversed([e for _, r in runs for e in r]))
                    raise

    def _send_run(self, topic: bytes, values: list[Any]) -> None:
        """Send one run; on an error, what of it is not settled yet is counted as lost."""
        settled_before, total = self.handled, len(values)
        try:
            superseded = 0
            if self._conflate:
                superseded = len(values) - 1
                values = values[-1:]
            step = _wire.MAX_ITEMS
            for start in range(0, len(values), step):
                chunk = values[start : start + step]
                if self._encode_run is None:
                    self._send_payloads(topic, chunk, superseded)
                else:
                    self._send_items(topic, chunk, superseded)
                superseded = 0
                if self.messages % 64 == 0:  # a long queue: keep the subscription count current
                    self.read_subscriptions()
        except Exception:
            self.lost += total - (self.handled - settled_before)
            raise

    def _send_items(self, topic: bytes, items: list[T], superseded: int) -> None:
        """Encode ``items`` in one call and send them in one message (or more, if too big)."""
        assert self._encode_run is not None
        try:
            body = self._encode_run(items)
        except Exception:
            items, body = self._encode_one_by_one(items)
            if not items:
                self._socket_send_nothing(topic, superseded)
                return
        if len(body) > self._max_batch_bytes and len(items) > 1:
            half = len(items) // 2
            self._send_items(topic, items[:half], superseded)
            self._send_items(topic, items[half:], 0)
            return
        count = len(items)
        first = self._number(topic, count, superseded)
        frame = _wire.pack_run(topic, self._publisher_id, first, count, body, self._announce)
        self._send_frame(topic, first, count, superseded, frame)

    def _number(self, topic: bytes, count: int, superseded: int) -> int:
        """The first sequence number of the next ``count`` items of ``topic``, after skipping
        the ``superseded`` ones (so that subscribers count them as dropped)."""
        first = self._seqs.get(topic, 0) + superseded
        self._seqs[topic] = first + count
        return first

    def _send_frame(
        self, topic: bytes, first: int, count: int, superseded: int, frame: bytes
    ) -> None:
        self._socket.send(frame)
        if self._replay is not None:
            self._replay.add(topic, first, count, frame)
        self.sent += count
        self.conflated += superseded
        self.messages += 1

    def _socket_send_nothing(self, topic: bytes, superseded: int) -> None:
        """Every item of a run failed to encode: only the superseded ones still need counting
        (their sequence numbers are skipped, so subscribers see them as dropped)."""
        self._number(topic, 0, superseded)
        self.conflated += superseded

    def _encode_one_by_one(self, items: list[T]) -> tuple[list[T], bytes]:
        """Encode item by item after a run failed: report and drop the ones that fail."""
        good, payloads = [], []
        for item in items:
            try:
                payloads.append(self._codec.encode(item)[1])
            except Exception as exc:
                self.encode_errors += 1
                self._report(exc, item)
                continue
            good.append(item)
        return good, _wire.array_header(len(good)) + b"".join(payloads)

    def _report(self, exc: Exception, item: T) -> None:
        try:
            self._on_error(exc, item)
        except Exception as raised:
            self._error_log(
                logging.ERROR,
                f"{self._owner}: on_error raised {safe_repr(raised)} while handling "
                f"{safe_repr(exc)}",
                raised,
            )

    def _send_payloads(self, topic: bytes, payloads: list[bytes], superseded: int) -> None:
        """Send encoded payloads in table-form messages within ``max_batch_bytes``."""
        start = 0
        while start < len(payloads):
            end = _fit(payloads, start, self._max_batch_bytes)
            count = end - start
            first = self._number(topic, count, superseded)
            frame = _wire.pack_table(
                topic, self._publisher_id, first, payloads[start:end], self._announce
            )
            self._send_frame(topic, first, count, superseded, frame)
            superseded = 0
            start = end

    def read_subscriptions(self) -> None:
        """Count the subscribe (+1) and unsubscribe (-1) messages waiting on the socket."""
        recv = self._socket.recv
        while True:
            try:
                message = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message[:1] == b"\x01":
                self.subscriptions += 1
            elif message[:1] == b"\x00":
                self.subscriptions -= 1


def _fit(payloads: list[bytes], start: int, max_bytes: int) -> int:
    """The end of the longest run from ``start`` (at least one payload, at most
    ``MAX_ITEMS``) whose sizes add up to at most ``max_bytes``."""
    size = len(payloads[start])
    end = start + 1
    limit = min(len(payloads), start + _wire.MAX_ITEMS)
    while end < limit:
        size += len(payloads[end])
        if size > max_bytes:
            break
        end += 1
    return end
