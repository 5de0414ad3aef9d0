"""A subscriber's recovery: missed items fetched again from their publisher's replay endpoint.

Each message of a publisher with replay on names its replay endpoint (``docs/wire-format.md``);
:class:`Recovery` remembers it per publisher id. When a message shows a gap (``recover``), is
the first heard from a publisher (``history``: every topic, in the order sent), or comes from a
publisher of a resumed position (everything kept after it, topic by topic), the subscriber's
consumer hands it here instead of to the decoder: a DEALER asks the publisher for what is
missing, a chunk at a time, while that publisher's later messages are held back; the replies
reach ``process()`` first, then the held messages (what they repeat is skipped). Other
publishers' messages are not held. A recovery gives up when the publisher has not answered for
``timeout`` seconds or the held messages pass ``max_held_bytes``: what is still missing is
counted as dropped, and the held messages go on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, cast

import zmq

from wirebus import _endpoint
from wirebus.security import CurveClient, CurveServer
from wirebus.transport import _wire
from wirebus.transport._base import RateLimitedLog, safe_repr
from wirebus.transport._decoder import MAX_GAP, MAX_TRACKED, Failure, FrameDecoder, SubscriberStats
from wirebus.transport._socket import OwnedSocket

T = TypeVar("T")

_OPEN_END = 2**64 - 1  # a catch-up asks for everything kept from its start on
_MAX_DEALERS = 16  # replay endpoints connected at once; one in use is never closed
_MAX_REPLIES = 4 * 64  # replies queued for one recovery; a peer sending more is ignored


class _Fetch:
    """One publisher's recovery: items ``next`` up to ``end`` of ``topic`` still wanted; or,
    with ``history``, that many items of each of its topics, in the order sent, from the
    message after cursor ``next`` on."""

    __slots__ = (
        "asked_from",
        "done",
        "end",
        "endpoint",
        "held",
        "held_bytes",
        "history",
        "next",
        "progress_at",
        "publisher",
        "replies",
        "request_id",
        "timer",
        "topic",
    )

    def __init__(
        self, publisher: int, topic: bytes, endpoint: str, first: int, end: int, history: int = 0
    ) -> None:
        self.history = history
        self.publisher = publisher
        self.topic = topic
        self.endpoint = endpoint
        self.next = first
        self.end = end
        self.asked_from = first
        self.request_id = 0
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.replies: collections.deque[tuple[int, bytes]] = collections.deque()
        self.done = False
        self.progress_at = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def request(self) -> bytes:
        """The request for what is still wanted."""
        if self.history:
            return _wire.pack_history_request(self.request_id, self.history, self.next)
        return _wire.pack_request(self.topic, self.request_id, self.next, self.end)

    def __str__(self) -> str:
        what = "its history" if self.history else f"items {self.next}..{self.end - 1}"
        return f"{what} of publisher {self.publisher:#x} from {self.endpoint}"


class Recovery(Generic[T]):
    """The recovery half of one subscriber (its consumer calls :meth:`route` and
    :meth:`deliver`; ``kick`` wakes that consumer when replies or a deadline are due)."""

    def __init__(
        self,
        decoder: FrameDecoder[T],
        stats: SubscriberStats,
        *,
        recover: bool,
        history: int,
        timeout: float,
        max_held_bytes: int,
        context: zmq.Context[Any],
        curve: CurveServer | CurveClient | None,
        main_address: str | None,
        kick: Callable[[], None],
        owner: str,
        resume: Mapping[tuple[int, bytes], int],
    ) -> None:
        self._decoder = decoder
        self._stats = stats
        self._recover = recover
        self._history = history
        self._timeout = timeout
        self._max_held_bytes = max_held_bytes
        self._kick = kick
        self._owner = owner
        self._log = RateLimitedLog()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dealers = _Dealers(context, curve, main_address, self._on_replies, owner, self._log)
        self._fetches: dict[int, _Fetch] = {}  # publisher id -> its recovery
        self._by_request: dict[int, _Fetch] = {}
        self._request_ids = itertools.count(1)
        # publisher id -> (topic, sequence number) of a resumed position still to catch up on
        self._catch_up: dict[int, list[tuple[bytes, int]]] = {}
        if recover:
            for (publisher, topic), seq in resume.items():
                self._catch_up.setdefault(publisher, []).append((topic, seq))
        self._heard: dict[int, None] = dict.fromkeys(self._catch_up)  # history asked, or resumed

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dealers.loop = loop

    @property
    def due(self) -> bool:
        """Replies to deliver, or a recovery to end."""
        return any(fetch.replies or fetch.done for fetch in self._fetches.values())

    def positions(self) -> Iterator[tuple[tuple[int, bytes], int]]:
        """Per recovery under way: its (publisher, topic) and the next item it has to hand
        over (what was handed to ``process()`` so far ends just before it)."""
        for fetch in self._fetches.values():
            if not fetch.history:  # a history goes through the decoder's own table
                yield (fetch.publisher, fetch.topic), fetch.next

    # -- the consumer's side -----------------------------------------------------------------

    def route(self, frame: bytes) -> bool:
        """Take ``frame`` when its publisher is being recovered or it starts a recovery; False
        leaves it to the decoder."""
        try:
            header = _wire.unpack(frame)
        except _wire.MalformedFrame:
            return False  # the decoder counts and reports it
        publisher = header.publisher
        fetch = self._fetches.get(publisher)
        if fetch is not None:
            self._hold(fetch, frame)
            return True
        if header.replay:
            self._dealers.learn(publisher, header.replay)
        if not self._dealers.knows(publisher):
            return False
        if publisher in self._catch_up:  # resumed: everything kept after the position
            pending = self._catch_up[publisher]
            topic, seq = pending.pop()
            if not pending:
                del self._catch_up[publisher]
            return self._start(publisher, frame, topic, seq, _OPEN_END)
        expected = self._decoder.expected(publisher, header.topic)
        if expected is None and self._history and publisher not in self._heard:
            if len(self._heard) >= MAX_TRACKED:
                del self._heard[next(iter(self._heard))]
            self._heard[publisher] = None
            return self._start(publisher, frame, b"", 0, _OPEN_END, history=self._history)
        if expected is None:  # a new topic of a publisher heard before
            if not self._history:
                return False
            first = max(0, header.first - self._history)
        elif self._recover:
            first = expected
        else:
            return False
        if not 0 < header.first - first <= MAX_GAP:
            return False
        started = self._start(publisher, frame, header.topic, first, header.first)
        if started and expected is None:  # what came before the history is missed, as always
            self._decoder.skip_to(publisher, header.topic, first, dropped=first)
        return started

    def _start(
        self, publisher: int, frame: bytes, topic: bytes, first: int, end: int, history: int = 0
    ) -> bool:
        """Start a recovery of ``publisher`` (see :class:`_Fetch`), holding ``frame``; False
        when its replay endpoint cannot be reached (nor will be: no catch-up is left)."""
        in_use = {fetch.endpoint for fetch in self._fetches.values()}
        endpoint = self._dealers.connect(publisher, in_use)
        if endpoint is None:
            self._catch_up.pop(publisher, None)
            return False
        fetch = _Fetch(publisher, topic, endpoint, first, end, history)
        self._fetches[publisher] = fetch
        self._hold(fetch, frame)
        self._request(fetch)
        return True

    def deliver(
        self, items: list[T], failures: list[Failure], frames: collections.deque[bytes]
    ) -> None:
        """Append the replayed items that arrived; end the recoveries that are over, putting
        their held messages back at the front of ``frames``."""
        for fetch in list(self._fetches.values()):
            replies = fetch.replies
            while replies and not fetch.done:
                kind, body = replies.popleft()
                if kind == _wire.KIND_ITEMS:
                    self._replayed(fetch, body, items, failures)
                elif kind == _wire.KIND_END:
                    self._ended(fetch, body)
                else:
                    self._give_up(fetch, f"the publisher answered: {safe_repr(body[:200])}")
            if fetch.done:
                self._finish(fetch, frames)

    def _replayed(
        self, fetch: _Fetch, frame: bytes, items: list[T], failures: list[Failure]
    ) -> None:
        if fetch.history:
            self._historic(fetch, frame, items, failures)
            return
        try:
            header = _wire.unpack(frame)
            if header.publisher != fetch.publisher or header.topic != fetch.topic:
                raise _wire.MalformedFrame(
                    f"a replayed message of publisher {header.publisher:#x} topic "
                    f"{header.topic!r}, asked of {fetch.publisher:#x} {fetch.topic!r}"
                )
            if header.first + header.items <= fetch.next or header.first >= fetch.end:
                return
            if header.first > fetch.next:  # no longer in the buffer
                self._stats.dropped += header.first - fetch.next
                fetch.next = header.first
            self._decoder.decode_replayed(frame, header, fetch.next, fetch.end, items, failures)
        except ValueError as exc:
            self._stats.malformed += 1
            failures.append((ValueError(f"malformed replayed message: {exc}"), frame))
            return
        fetch.next = min(header.first + header.items, fetch.end)

    def _historic(
        self, fetch: _Fetch, frame: bytes, items: list[T], failures: list[Failure]
    ) -> None:
        with contextlib.suppress(_wire.MalformedFrame):  # else the decoder counts and reports it
            publisher = _wire.unpack(frame).publisher
            if publisher != fetch.publisher:
                self._stats.malformed += 1
                why = f"history of publisher {publisher:#x}, asked of {fetch.publisher:#x}"
                failures.append((ValueError(why), frame))
                return
        self._decoder.decode_history(frame, items, failures)

    def _ended(self, fetch: _Fetch, body: bytes) -> None:
        try:
            after, more = _wire.unpack_end(body)
        except _wire.MalformedFrame as exc:
            self._give_up(fetch, str(exc))
            return
        if fetch.history:
            if more and after > fetch.next:
                fetch.next = after
                self._request(fetch)
            else:
                fetch.done = True
        elif more and fetch.asked_from < fetch.next < fetch.end:
            self._request(fetch)
        else:
            fetch.done = True

    def _finish(self, fetch: _Fetch, frames: collections.deque[bytes]) -> None:
        del self._fetches[fetch.publisher]
        self._by_request.pop(fetch.request_id, None)
        if fetch.timer is not None:
            fetch.timer.cancel()
        if not fetch.history:
            end = fetch.next if fetch.end == _OPEN_END else fetch.end
            self._decoder.skip_to(fetch.publisher, fetch.topic, end, dropped=end - fetch.next)
        frames.extendleft(reversed(fetch.held))

    def _hold(self, fetch: _Fetch, frame: bytes) -> None:
        fetch.held.append(frame)
        fetch.held_bytes += len(frame)
        if fetch.held_bytes > self._max_held_bytes and not fetch.done:
            self._give_up(fetch, f"over {self._max_held_bytes} bytes held back meanwhile")

    def _give_up(self, fetch: _Fetch, why: str) -> None:
        fetch.done = True
        self._log(logging.WARNING, f"{self._owner}: recovering {fetch}: {why}; counted as dropped")

    # -- requests and replies ----------------------------------------------------------------

    def _request(self, fetch: _Fetch) -> None:
        assert self._loop is not None
        self._by_request.pop(fetch.request_id, None)
        fetch.request_id = next(self._request_ids) & 0xFFFFFFFF
        fetch.asked_from = fetch.next
        self._by_request[fetch.request_id] = fetch
        fetch.progress_at = self._loop.time()
        try:
            self._dealers.send(fetch.endpoint, fetch.request())
        except zmq.ZMQError as exc:
            self._give_up(fetch, f"the request was not sent ({safe_repr(exc)})")
            return
        if fetch.timer is None:
            fetch.timer = self._loop.call_later(self._timeout, self._check_deadline, fetch)

    def _check_deadline(self, fetch: _Fetch) -> None:
        assert self._loop is not None
        fetch.timer = None
        if self._fetches.get(fetch.publisher) is not fetch or fetch.done:
            return
        left = fetch.progress_at + self._timeout - self._loop.time()
        if left > 0:
            fetch.timer = self._loop.call_later(left, self._check_deadline, fetch)
            return
        self._give_up(fetch, f"no answer for {self._timeout} s")
        self._kick()

    def _on_replies(self, replies: list[tuple[int, int, bytes]]) -> None:
        """Queue replies ``(kind, request id, body)`` to their recoveries; wake the consumer."""
        assert self._loop is not None
        now, woke = self._loop.time(), False
        for kind, request_id, body in replies:
            fetch = self._by_request.get(request_id)
            if fetch is None or fetch.request_id != request_id or len(fetch.replies) > _MAX_REPLIES:
                continue  # a late answer to a request given up on, or a peer sending too much
            fetch.replies.append((kind, body))
            fetch.progress_at = now
            woke = True
        if woke:
            self._kick()

    def close(self) -> None:
        for fetch in self._fetches.values():
            if fetch.timer is not None:
                fetch.timer.cancel()
        self._fetches.clear()
        self._by_request.clear()
        self._dealers.close()


class _Dealers:
    """The replay endpoints of the publishers a subscriber hears, and a DEALER connected to each
    one it asks (at most :data:`_MAX_DEALERS`); replies go to ``on_replies`` in batches."""

    def __init__(
        self,
        context: zmq.Context[Any],
        curve: CurveServer | CurveClient | None,
        main_address: str | None,
        on_replies: Callable[[list[tuple[int, int, bytes]]], None],
        owner: str,
        log: RateLimitedLog,
    ) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._context = context
        self._curve = curve if isinstance(curve, CurveClient) else None
        self._no_keys = isinstance(curve, CurveServer)
        self._main_host = _tcp_host(main_address) if main_address else None
        self._on_replies = on_replies
        self._owner = owner
        self._log = log
        self._endpoints: dict[int, bytes] = {}  # publisher id -> its replay endpoint
        self._dealers: dict[str, OwnedSocket] = {}

    def knows(self, publisher: int) -> bool:
        return publisher in self._endpoints

    def learn(self, publisher: int, endpoint: bytes) -> None:
        """Note the replay endpoint ``publisher`` announced (a bounded table, least recently
        announced out first)."""
        table = self._endpoints
        if table.get(publisher) == endpoint:
            return
        table.pop(publisher, None)
        if len(table) >= MAX_TRACKED:
            del table[next(iter(table))]
        table[publisher] = endpoint

    def connect(self, publisher: int, in_use: set[str]) -> str | None:
        """The connected replay endpoint of ``publisher``, or ``None`` if it cannot be (a
        dealer not ``in_use`` is closed to make room)."""
        endpoint = _reachable(self._endpoints[publisher].decode(errors="replace"), self._main_host)
        if endpoint in self._dealers:
            return endpoint
        if self._no_keys:
            self._log(
                logging.WARNING,
                f"{self._owner}: a CURVE server subscriber has no client keys for the replay "
                f"endpoint {endpoint}; nothing is recovered",
            )
            return None
        if len(self._dealers) >= _MAX_DEALERS:
            idle = [name for name in self._dealers if name not in in_use]
            if not idle:
                return None
            self._close(idle[0])
        try:
            owned = OwnedSocket(
                zmq.DEALER,
                endpoint,
                bind=False,
                context=self._context,
                private_context=False,
                options=[(zmq.LINGER, 0)],
                curve=self._curve,
                heartbeat=0,
                allow_any_interface=False,
                owner=f"{self._owner}: replay from {endpoint}",
            )
        except (ValueError, OSError, zmq.ZMQError) as exc:
            self._log(logging.WARNING, f"{self._owner}: replay endpoint: {safe_repr(exc)}")
            return None
        self._dealers[endpoint] = owned
        assert self.loop is not None
        fd = cast(int, owned.socket.getsockopt(zmq.FD))
        self.loop.add_reader(fd, self._read, endpoint)
        return endpoint

    def send(self, endpoint: str, request: bytes) -> None:
        """Send ``request`` to ``endpoint`` (connected); ``zmq.ZMQError`` if it cannot go."""
        self._dealers[endpoint].socket.send(request, zmq.NOBLOCK)
        assert self.loop is not None
        self.loop.call_soon(self._read, endpoint)  # sending may take the FD's edge

    def _read(self, endpoint: str) -> None:
        """Drain a DEALER's edge-triggered FD to EAGAIN; hand the well-formed replies on."""
        owned = self._dealers.get(endpoint)
        if owned is None:
            return
        replies = []
        while True:
            try:
                parts = owned.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                if len(parts) != 2:
                    raise _wire.MalformedFrame(f"a reply of {len(parts)} frames, expected 2")
                kind, request_id = _wire.unpack_reply(parts[0])
            except _wire.MalformedFrame as exc:
                self._log(logging.WARNING, f"{self._owner}: from {endpoint}: {exc}")
                continue
            replies.append((kind, request_id, parts[1]))
        if replies:
            self._on_replies(replies)

    def _close(self, endpoint: str) -> None:
        owned = self._dealers.pop(endpoint)
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(cast(int, owned.socket.getsockopt(zmq.FD)))
        owned.close(linger=0)

    def close(self) -> None:
        for endpoint in list(self._dealers):
            self._close(endpoint)


def _tcp_host(address: str) -> str | None:
    if not address.startswith("tcp://"):
        return None
    return address[len("tcp://") :].rpartition(":")[0]


def _reachable(endpoint: str, main_host: str | None) -> str:
    """``endpoint``, with a wildcard host (a publisher bound on every interface) replaced by
    the host this subscriber connected to."""
    host = _tcp_host(endpoint)
    if main_host is None or host not in _endpoint._ANY_HOSTS:
        return endpoint
    return f"tcp://{main_host}:{endpoint.rpartition(':')[2]}"
