"""A subscriber's recovery: missed items fetched again from their publisher's replay endpoint.

Each message of a publisher with replay on names its replay endpoint (``docs/wire-format.md``);
:class:`Recovery` remembers it per publisher id. When a message shows a gap (``recover``), or
is the first heard from a publisher on a topic (``history``), the subscriber's consumer hands
it here instead of to the decoder: a DEALER asks the publisher for the missing range, a chunk
at a time, while that publisher's later messages are held back; the replies reach
``process()`` first, then the held messages, in the publisher's order. Other publishers'
messages are not held. A recovery gives up when the publisher has not answered for
``timeout`` seconds or the held messages pass ``max_held_bytes``: what is still missing is
counted as dropped, and the held messages go on.
"""

from __future__ import annotations

import asyncio
import collections
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
    """One publisher's recovery: items ``next`` up to ``end`` of ``topic`` still wanted."""

    __slots__ = (
        "asked_from",
        "done",
        "end",
        "endpoint",
        "held",
        "held_bytes",
        "next",
        "progress_at",
        "publisher",
        "replies",
        "request_id",
        "timer",
        "topic",
    )

    def __init__(self, publisher: int, topic: bytes, endpoint: str, first: int, end: int) -> None:
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
        self._context = context
        self._curve = curve if isinstance(curve, CurveClient) else None
        self._no_keys = isinstance(curve, CurveServer)
        self._main_host = _tcp_host(main_address) if main_address else None
        self._kick = kick
        self._owner = owner
        self._log = RateLimitedLog()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._endpoints: dict[int, bytes] = {}  # publisher id -> its replay endpoint
        self._dealers: dict[str, OwnedSocket] = {}
        self._fetches: dict[int, _Fetch] = {}  # publisher id -> its recovery
        self._by_request: dict[int, _Fetch] = {}
        self._request_ids = itertools.count(1)
        # publisher id -> (topic, sequence number) of a resumed position still to catch up on
        self._catch_up: dict[int, list[tuple[bytes, int]]] = {}
        if recover:
            for (publisher, topic), seq in resume.items():
                self._catch_up.setdefault(publisher, []).append((topic, seq))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def due(self) -> bool:
        """Replies to deliver, or a recovery to end."""
        return any(fetch.replies or fetch.done for fetch in self._fetches.values())

    def positions(self) -> Iterator[tuple[tuple[int, bytes], int]]:
        """Per recovery under way: its (publisher, topic) and the next item it has to hand
        over (what was handed to ``process()`` so far ends just before it)."""
        for fetch in self._fetches.values():
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
        if header.replay and self._endpoints.get(publisher) != header.replay:
            self._learn(publisher, header.replay)
        if publisher in self._catch_up and publisher in self._endpoints:
            return self._start_catch_up(publisher, frame)
        expected = self._decoder.expected(publisher, header.topic)
        if expected is None:
            if not self._history:
                return False
            first = max(0, header.first - self._history)
        elif self._recover:
            first = expected
        else:
            return False
        if not 0 < header.first - first <= MAX_GAP or publisher not in self._endpoints:
            return False
        endpoint = self._dealer(publisher)
        if endpoint is None:
            return False
        if expected is None:  # what came before the history asked for is missed, as always
            self._decoder.skip_to(publisher, header.topic, first, dropped=first)
        fetch = _Fetch(publisher, header.topic, endpoint, first, header.first)
        self._fetches[publisher] = fetch
        self._hold(fetch, frame)
        self._request(fetch)
        return True

    def _start_catch_up(self, publisher: int, frame: bytes) -> bool:
        """Fetch everything kept after a resumed position of ``publisher`` (on any of its
        topics: the last items of a topic before a restart show no gap later), holding
        ``frame``; False when that cannot be done."""
        pending = self._catch_up[publisher]
        topic, seq = pending.pop()
        if not pending:
            del self._catch_up[publisher]
        endpoint = self._dealer(publisher)
        if endpoint is None:
            self._catch_up.pop(publisher, None)
            return False
        fetch = _Fetch(publisher, topic, endpoint, seq, _OPEN_END)
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

    def _ended(self, fetch: _Fetch, body: bytes) -> None:
        try:
            _after, more = _wire.unpack_end(body)
        except _wire.MalformedFrame as exc:
            self._give_up(fetch, str(exc))
            return
        if more and fetch.asked_from < fetch.next < fetch.end:
            self._request(fetch)
        else:
            fetch.done = True

    def _finish(self, fetch: _Fetch, frames: collections.deque[bytes]) -> None:
        del self._fetches[fetch.publisher]
        self._by_request.pop(fetch.request_id, None)
        if fetch.timer is not None:
            fetch.timer.cancel()
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
        self._log(
            logging.WARNING,
            f"{self._owner}: recovering items {fetch.next}..{fetch.end - 1} of publisher "
            f"{fetch.publisher:#x} from {fetch.endpoint}: {why}; counted as dropped",
        )

    # -- requests and replies ----------------------------------------------------------------

    def _learn(self, publisher: int, endpoint: bytes) -> None:
        table = self._endpoints
        table.pop(publisher, None)
        if len(table) >= MAX_TRACKED:
            del table[next(iter(table))]
        table[publisher] = endpoint

    def _dealer(self, publisher: int) -> str | None:
        """The connected replay endpoint of ``publisher``, or ``None`` if it cannot be."""
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
            in_use = {fetch.endpoint for fetch in self._fetches.values()}
            idle = [name for name in self._dealers if name not in in_use]
            if not idle:
                return None
            self._close_dealer(idle[0])
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
        assert self._loop is not None
        fd = cast(int, owned.socket.getsockopt(zmq.FD))
        self._loop.add_reader(fd, self._on_replies, endpoint)
        return endpoint

    def _close_dealer(self, endpoint: str) -> None:
        owned = self._dealers.pop(endpoint)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(cast(int, owned.socket.getsockopt(zmq.FD)))
        owned.close(linger=0)

    def _request(self, fetch: _Fetch) -> None:
        assert self._loop is not None
        self._by_request.pop(fetch.request_id, None)
        fetch.request_id = next(self._request_ids) & 0xFFFFFFFF
        fetch.asked_from = fetch.next
        self._by_request[fetch.request_id] = fetch
        fetch.progress_at = self._loop.time()
        request = _wire.pack_request(fetch.topic, fetch.request_id, fetch.next, fetch.end)
        try:
            self._dealers[fetch.endpoint].socket.send(request, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._give_up(fetch, f"the request was not sent ({safe_repr(exc)})")
            return
        self._loop.call_soon(self._on_replies, fetch.endpoint)  # sending may take the edge
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

    def _on_replies(self, endpoint: str) -> None:
        """Drain a DEALER's edge-triggered FD to EAGAIN; queue the replies to recoveries."""
        owned = self._dealers.get(endpoint)
        if owned is None:
            return
        assert self._loop is not None
        now, woke = self._loop.time(), False
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
            fetch = self._by_request.get(request_id)
            if fetch is None or fetch.request_id != request_id or len(fetch.replies) > _MAX_REPLIES:
                continue  # a late answer to a request given up on, or a peer sending too much
            fetch.replies.append((kind, parts[1]))
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
        for endpoint in list(self._dealers):
            self._close_dealer(endpoint)


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
