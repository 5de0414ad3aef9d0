"""A subscriber's recovery: missed items fetched again from their publisher's replay endpoint.

Each message of a publisher with replay on names its replay endpoint (``docs/wire-format.md``);
:class:`Recovery` remembers it per publisher id. When a message shows a gap (``recover``), is
the first heard from a publisher (``history``), or comes from a publisher of a resumed
position, the subscriber's consumer hands it here instead of to the decoder, and a DEALER asks
that publisher for every topic's messages since where this subscriber is (or its newest
``history`` items), in the order the publisher sent them, a chunk at a time, while its later
messages are held back. The replies go through the decoder's own sequence table, so
``process()`` gets the publisher's items in its order, each once (what the held messages
repeat is skipped). Other publishers' messages are not held. A recovery gives up when the
publisher has not answered for ``timeout`` seconds or the held messages pass
``max_held_bytes``: the held messages go on, and what is still missing is counted as dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar, cast

import zmq

from wirebus import _endpoint
from wirebus.security import CurveClient, CurveServer
from wirebus.transport import _wire
from wirebus.transport._base import RateLimitedLog, safe_repr
from wirebus.transport._decoder import MAX_GAP, MAX_TRACKED, Failure, FrameDecoder, SubscriberStats
from wirebus.transport._socket import OwnedSocket

T = TypeVar("T")

_MAX_DEALERS = 16  # replay endpoints connected at once; one in use is never closed
_MAX_REPLIES = 4 * 64  # replies queued for one recovery; a peer sending more is ignored


class _Fetch:
    """One publisher's recovery: every topic's messages after message ``cursor`` of the
    publisher, from ``starts[topic]`` on, or the newest ``history`` items of a topic not in
    ``starts`` (:class:`_wire.Since`)."""

    __slots__ = (
        "cursor",
        "done",
        "endpoint",
        "failed",
        "held",
        "held_bytes",
        "history",
        "progress_at",
        "publisher",
        "replies",
        "request_id",
        "starts",
        "timer",
    )

    def __init__(
        self, publisher: int, endpoint: str, starts: dict[bytes, int], history: int
    ) -> None:
        self.publisher = publisher
        self.endpoint = endpoint
        self.starts = starts
        self.history = history
        self.cursor = 0
        self.request_id = 0
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.replies: collections.deque[tuple[int, bytes]] = collections.deque()
        self.done = False
        self.failed = False
        self.progress_at = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def request(self) -> bytes:
        """The request for what is still wanted."""
        return _wire.pack_since(self.request_id, self.history, self.cursor, self.starts)

    def __str__(self) -> str:
        since = ", ".join(f"{t.rstrip(bytes(1))!r} {seq}" for t, seq in self.starts.items())
        return (
            f"what publisher {self.publisher:#x} sent since [{since}]"
            + (f" and its history of {self.history}" if self.history else "")
            + f" ({self.endpoint})"
        )


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
        endpoints: Mapping[int, str],
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
        # publishers of a resumed position, to catch up on as soon as they are heard
        self._resumed = {publisher for publisher, _topic in resume} if recover else set()
        self._heard: dict[int, None] = dict.fromkeys(self._resumed)  # history asked, or resumed
        for publisher in self._resumed & endpoints.keys():
            self._dealers.learn(publisher, endpoints[publisher].encode())
        self._passing: dict[int, int] = {}  # publisher -> its messages held by a failed recovery

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin; a resumed publisher whose replay endpoint is known is caught up on at once,
        whether or not it sends anything more."""
        self._loop = loop
        self._dealers.loop = loop
        for publisher in [p for p in self._resumed if self._dealers.knows(p)]:
            self._resumed.discard(publisher)
            self._start(publisher, None, self._decoder.topics_of(publisher), self._history)

    def endpoints(self) -> dict[int, str]:
        """The replay endpoint announced by each publisher heard (at most ``MAX_TRACKED``)."""
        return self._dealers.endpoints()

    @property
    def due(self) -> bool:
        """Replies to deliver, or a recovery to end."""
        return any(fetch.replies or fetch.done for fetch in self._fetches.values())

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
        passing = self._passing.pop(publisher, 0)
        if passing:  # after a recovery that failed: its gaps are counted as dropped
            if passing > 1:
                self._passing[publisher] = passing - 1
            return False
        if header.replay:
            self._dealers.learn(publisher, header.replay)
        if not self._dealers.knows(publisher):
            return False
        decoder = self._decoder
        if publisher in self._resumed:  # everything kept since the position, every topic
            self._resumed.discard(publisher)
            return self._start(publisher, frame, decoder.topics_of(publisher), self._history)
        expected = decoder.expected(publisher, header.topic)
        if expected is None:
            if not self._history:
                return False
            if publisher not in self._heard:  # first heard: its history, every topic
                if len(self._heard) >= MAX_TRACKED:
                    del self._heard[next(iter(self._heard))]
                self._heard[publisher] = None
                return self._start(publisher, frame, {}, self._history)
            starts = decoder.topics_of(publisher)  # a new topic of a publisher heard before
            starts[header.topic] = max(0, header.first - self._history)
            return self._start(publisher, frame, starts, 0)
        if not self._recover or not 0 < header.first - expected <= MAX_GAP:
            return False
        return self._start(publisher, frame, decoder.topics_of(publisher), 0)

    def _start(
        self, publisher: int, frame: bytes | None, starts: dict[bytes, int], history: int
    ) -> bool:
        """Start a recovery of ``publisher`` (see :class:`_Fetch`), holding ``frame``; False
        when its replay endpoint cannot be reached."""
        in_use = {fetch.endpoint for fetch in self._fetches.values()}
        endpoint = self._dealers.connect(publisher, in_use)
        if endpoint is None:
            return False
        if len(starts) > _wire.MAX_STARTS:  # more topics than a replay buffer keeps anyway
            starts = dict(itertools.islice(starts.items(), _wire.MAX_STARTS))
        fetch = _Fetch(publisher, endpoint, starts, history)
        self._fetches[publisher] = fetch
        if frame is not None:
            self._hold(fetch, frame)
        self._request(fetch)
        return True

    def deliver(
        self, items: list[T], failures: list[Failure], frames: collections.deque[bytes], limit: int
    ) -> None:
        """Append the replayed items that arrived, until ``items`` holds ``limit`` (the rest
        stay queued for the next batch); end the recoveries that are over, putting their held
        messages back at the front of ``frames``."""
        for fetch in list(self._fetches.values()):
            replies = fetch.replies
            while replies and not fetch.done and len(items) < limit:
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
        with contextlib.suppress(_wire.MalformedFrame):  # else the decoder counts and reports it
            publisher = _wire.unpack(frame).publisher
            if publisher != fetch.publisher:
                self._stats.malformed += 1
                why = f"a replayed message of publisher {publisher:#x}, asked of {fetch}"
                failures.append((ValueError(why), frame))
                return
        self._decoder.decode_replayed(frame, items, failures)

    def _ended(self, fetch: _Fetch, body: bytes) -> None:
        try:
            cursor, more = _wire.unpack_end(body)
        except _wire.MalformedFrame as exc:
            self._give_up(fetch, str(exc))
            return
        if more and cursor > fetch.cursor:
            fetch.cursor = cursor
            self._request(fetch)
        else:
            fetch.done = True

    def _finish(self, fetch: _Fetch, frames: collections.deque[bytes]) -> None:
        del self._fetches[fetch.publisher]
        self._by_request.pop(fetch.request_id, None)
        if fetch.timer is not None:
            fetch.timer.cancel()
        if fetch.failed:
            self._passing[fetch.publisher] = len(fetch.held)
        frames.extendleft(reversed(fetch.held))

    def _hold(self, fetch: _Fetch, frame: bytes) -> None:
        fetch.held.append(frame)
        fetch.held_bytes += len(frame)
        if fetch.held_bytes > self._max_held_bytes and not fetch.done:
            self._give_up(fetch, f"over {self._max_held_bytes} bytes held back meanwhile")

    def _give_up(self, fetch: _Fetch, why: str) -> None:
        fetch.done = fetch.failed = True
        self._log(logging.WARNING, f"{self._owner}: recovering {fetch}: {why}")

    # -- requests and replies ----------------------------------------------------------------

    def _request(self, fetch: _Fetch) -> None:
        assert self._loop is not None
        self._by_request.pop(fetch.request_id, None)
        fetch.request_id = next(self._request_ids) & 0xFFFFFFFF
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

    def endpoints(self) -> dict[int, str]:
        return {p: endpoint.decode(errors="replace") for p, endpoint in self._endpoints.items()}

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
