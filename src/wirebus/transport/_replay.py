"""The publisher's replay: a buffer of the messages it sent, served on an endpoint of its own.

:class:`ReplayBuffer` keeps, per topic, the messages holding at least the newest ``items``
items of that topic (whole messages, as sent), within ``max_bytes`` per topic. The send step
adds each message it sends; :class:`ReplayServer`, a thread with a ROUTER socket, answers
requests for ranges of sequence numbers with those same messages, a chunk at a time, and an
end marker (``docs/wire-format.md``). It never takes the send lock: the buffer has a lock of
its own, held for an append or for copying out one chunk's references.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import logging
import os
import select
import threading
import time
from typing import Any

import zmq

from wirebus import _endpoint
from wirebus.security import CurveClient, CurveServer
from wirebus.transport import _wire
from wirebus.transport._base import LastOneOut, RateLimitedLog, safe_repr
from wirebus.transport._socket import OwnedSocket

MAX_TOPICS = 1024
"""Topics a replay buffer keeps; a new topic beyond them evicts the topic written first."""
CHUNK_FRAMES = 64
"""The most messages one request is answered with; the end marker says if more is there."""
# Budget of the replay thread per window: requests read, messages sent. Past it the thread
# stops reading until the next window (ZMQ's RCVHWM holds or refuses what comes meanwhile).
_WINDOW = 0.1
_REQUESTS_PER_WINDOW = 200
_FRAMES_PER_WINDOW = 5000
_SNDHWM = 4 * CHUNK_FRAMES  # per peer: a flood of requests that never reads is cut off here
_RCVHWM = 256


class _Topic:
    """One topic's messages, oldest first: ``firsts[i]`` numbers message ``frames[i]``, and
    ``orders[i]`` says where it was sent among the messages of every topic (from 1).

    Evicted entries stay in the lists before ``start`` until compaction (amortised O(1))."""

    __slots__ = ("counts", "firsts", "frames", "items", "nbytes", "orders", "start")

    def __init__(self) -> None:
        self.firsts: list[int] = []
        self.counts: list[int] = []
        self.frames: list[bytes] = []
        self.orders: list[int] = []
        self.start = 0
        self.items = 0
        self.nbytes = 0

    def index_of(self, seq: int) -> int:
        """The index of the first message kept that holds item ``seq`` or a later one."""
        firsts, start = self.firsts, self.start
        # The message before the first that starts after ``seq``, unless it ends before it.
        index = max(start, bisect.bisect_right(firsts, seq, lo=start) - 1)
        if index < len(firsts) and firsts[index] + self.counts[index] <= seq:
            index += 1
        return index


class ReplayBuffer:
    """The newest ``items`` items (and at most ``max_bytes`` bytes) of each topic, as sent."""

    def __init__(self, items: int, max_bytes: int) -> None:
        self._limit = items
        self._max_bytes = max_bytes
        self._topics: dict[bytes, _Topic] = {}
        self._lock = threading.Lock()
        self._sent = 0  # messages added, of every topic

    def add(self, topic: bytes, first: int, count: int, frame: bytes) -> None:
        """Keep a message just sent; evict the oldest ones beyond the bounds."""
        with self._lock:
            entry = self._topics.get(topic)
            if entry is None:
                if len(self._topics) >= MAX_TOPICS:
                    del self._topics[next(iter(self._topics))]
                entry = self._topics[topic] = _Topic()
            self._sent += 1
            entry.firsts.append(first)
            entry.counts.append(count)
            entry.frames.append(frame)
            entry.orders.append(self._sent)
            entry.items += count
            entry.nbytes += len(frame)
            start, last = entry.start, len(entry.frames) - 1
            while start < last and (
                entry.items - entry.counts[start] >= self._limit or entry.nbytes > self._max_bytes
            ):
                entry.items -= entry.counts[start]
                entry.nbytes -= len(entry.frames[start])
                start += 1
            if start > 64 and 2 * start > len(entry.frames):
                del entry.firsts[:start], entry.counts[:start], entry.frames[:start]
                del entry.orders[:start]
                start = 0
            entry.start = start

    def chunk(self, topic: bytes, first: int, end: int) -> tuple[list[bytes], int, bool]:
        """The messages holding items ``first`` up to ``end`` (at most ``CHUNK_FRAMES``), the
        sequence number after the last item they hold, and whether more of the range is kept.
        """
        with self._lock:
            entry = self._topics.get(topic)
            if entry is None:
                return [], first, False
            firsts = entry.firsts
            index = entry.index_of(first)
            stop = min(bisect.bisect_left(firsts, end, lo=index), index + CHUNK_FRAMES)
            frames = entry.frames[index:stop]
            after = firsts[stop - 1] + entry.counts[stop - 1] if frames else first
            more = stop < len(firsts) and firsts[stop] < end
        return frames, max(after, first), more

    def since(self, request: _wire.Since) -> tuple[list[bytes], int, bool]:
        """The messages ``request`` asks for (see :class:`_wire.Since`), in the order sent, at
        most ``CHUNK_FRAMES``; the cursor after the last of them, and whether more is kept."""
        cursor = request.cursor
        with self._lock:
            heads: list[tuple[int, int, _Topic]] = []
            for topic, entry in self._topics.items():
                start = request.starts.get(topic)
                if start is None:
                    if not request.history or not entry.frames:
                        continue
                    start = entry.firsts[-1] + entry.counts[-1] - request.history
                index = max(
                    entry.index_of(start),
                    bisect.bisect_right(entry.orders, cursor, lo=entry.start),
                )
                if index < len(entry.frames):
                    heads.append((entry.orders[index], index, entry))
            heapq.heapify(heads)  # orders are unique: the entries themselves never compare
            frames: list[bytes] = []
            while heads and len(frames) < CHUNK_FRAMES:
                cursor, index, entry = heapq.heappop(heads)
                frames.append(entry.frames[index])
                if index + 1 < len(entry.frames):
                    heapq.heappush(heads, (entry.orders[index + 1], index + 1, entry))
        return frames, cursor, bool(heads)


class ReplayServer:
    """A thread answering replay requests from ``buffer`` on a ROUTER bound to ``address``,
    with the publisher's security settings; :attr:`announce` is what each message carries to
    name it (:func:`_wire.announcement`). :meth:`close` ends it."""

    def __init__(
        self,
        buffer: ReplayBuffer,
        address: str,
        *,
        context: zmq.Context[Any] | None,
        curve: CurveServer | CurveClient | None,
        heartbeat: int,
        allow_any_interface: bool,
        owner: str,
    ) -> None:
        self.buffer = buffer
        self._owned = OwnedSocket(
            zmq.ROUTER,
            address,
            bind=True,
            context=context,
            private_context=context is None,
            options=[(zmq.LINGER, 0), (zmq.SNDHWM, _SNDHWM), (zmq.RCVHWM, _RCVHWM)],
            curve=curve,
            heartbeat=heartbeat,
            allow_any_interface=allow_any_interface,
            owner=f"replay endpoint of {owner}",
        )
        self.address = self._owned.address
        try:
            self.announce = _wire.announcement(self.address)
        except ValueError:
            self._owned.close(linger=0)
            raise
        self._owner = owner
        self._log = RateLimitedLog()
        self.served = 0  # messages sent in answers
        self.refused = 0  # requests answered with an error
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._last_one_out = LastOneOut(self._release)
        self._thread = threading.Thread(
            target=self._last_one_out.run,
            args=(self._serve,),
            name=f"wirebus-replay {self.address}",
            daemon=True,
        )
        self._thread.start()

    @classmethod
    def next_to(
        cls,
        main: OwnedSocket,
        address: str | None,
        bind: bool,
        publisher_id: int,
        items: int,
        max_bytes: int,
    ) -> ReplayServer:
        """The replay server of the publisher ``publisher_id`` whose socket is ``main`` (bound
        or connected as ``bind`` says), keeping ``items`` items (at most ``max_bytes`` bytes)
        per topic: at ``address``, or where :func:`_default_address` picks next to ``main``; in
        ``main``'s context when that is an inproc one; with ``main``'s security settings."""
        inproc = main.address.startswith("inproc://")
        return cls(
            ReplayBuffer(items, max_bytes),
            address or _default_address(main.address, bind, publisher_id),
            context=main.context if inproc else None,
            curve=main.curve,
            heartbeat=main.heartbeat,
            allow_any_interface=main.allow_any_interface,
            owner=f"publisher for {main.address}",
        )

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread; its pipe and socket are closed now, or by the thread as it ends
        if it does not end within ``timeout``."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")
        self._thread.join(timeout)
        self._last_one_out.stopper_waited()

    def _release(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._owned.close(linger=0)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._owned.socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        window_end, requests, frames = 0.0, 0, 0
        while not self._stopping:
            now = time.monotonic()
            if now >= window_end:
                window_end, requests, frames = now + _WINDOW, 0, 0
            if requests >= _REQUESTS_PER_WINDOW or frames >= _FRAMES_PER_WINDOW:
                select.select([self._wake_r], [], [], window_end - now)  # over budget: rest
                continue
            poller.poll()
            try:
                message = self._owned.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            except Exception as exc:  # the socket is gone: nothing left to serve
                self._log(logging.ERROR, f"{self._owner}: replay: {safe_repr(exc)}", exc)
                return
            requests += 1
            try:
                frames += self._answer(message)
            except zmq.ZMQError as exc:
                self._log(logging.WARNING, f"{self._owner}: replay reply: {safe_repr(exc)}")

    def _answer(self, message: list[bytes]) -> int:
        """Answer one request (``[peer, request]``); the number of messages sent."""
        send = self._owned.socket.send_multipart
        peer = message[0]
        try:
            if len(message) != 2:
                raise _wire.MalformedFrame(f"a request of {len(message) - 1} frames, expected 1")
            request = _wire.unpack_request(message[1])
        except _wire.MalformedFrame as exc:
            self.refused += 1
            header = _wire.reply_header(_wire.KIND_ERROR, 0)
            send([peer, header, str(exc).encode()], zmq.NOBLOCK)
            return 1
        if isinstance(request, _wire.Since):
            frames, after, more = self.buffer.since(request)
        else:
            frames, after, more = self.buffer.chunk(request.topic, request.first, request.end)
        items = _wire.reply_header(_wire.KIND_ITEMS, request.request_id)
        for frame in frames:
            send([peer, items, frame], zmq.NOBLOCK)
        end = _wire.reply_header(_wire.KIND_END, request.request_id)
        send([peer, end, _wire.pack_end(after, more)], zmq.NOBLOCK)
        self.served += len(frames)
        return len(frames) + 1


def check_settings(
    replay: int, replay_bytes: int, conflate: bool, curve: CurveServer | CurveClient | None
) -> None:
    """``ValueError`` for a publisher's replay settings that cannot work, before any socket."""
    if isinstance(replay, bool) or not isinstance(replay, int) or replay < 0:
        raise ValueError(f"replay must be an int >= 0 items (0: off), got {replay!r}")
    if isinstance(replay_bytes, bool) or not isinstance(replay_bytes, int) or replay_bytes < 1:
        raise ValueError(f"replay_bytes must be an int >= 1, got {replay_bytes!r}")
    if replay and conflate:
        raise ValueError("replay with conflate=True: a conflating publisher skips items on purpose")
    if replay and isinstance(curve, CurveClient):
        raise ValueError(
            "replay on a CURVE client publisher: its replay endpoint would need server keys of "
            "its own; bind the publisher as the CurveServer, or leave replay off"
        )


def _default_address(address: str, bind: bool, publisher_id: int) -> str:
    """The replay endpoint picked next to a publisher's ``address``.

    ipc: next to the main path, ``PATH.replay`` when the publisher binds it, else (fan-in)
    ``PATH.<publisher id>.replay`` (a fresh private path if that is too long); tcp: the same
    host, a free port (a publisher that connects must be on that host's loopback, else it
    needs a ``replay_address``); inproc: the main name plus the publisher id.
    """
    scheme, _, rest = address.partition("://")
    if scheme == "ipc":
        suffix = ".replay" if bind else f".{publisher_id:016x}.replay"
        with contextlib.suppress(ValueError):  # too long a path
            return _endpoint.check_address(address + suffix, bind=True)
        return _endpoint.new_ipc_address(f"replay-{publisher_id:016x}")
    if scheme == "tcp":
        host = rest.rpartition(":")[0]
        if not bind and host not in ("127.0.0.1", "localhost", "[::1]"):
            raise ValueError(
                f"a publisher that connects to {address!r} needs a replay_address that its "
                "subscriber can reach (tcp://THIS-HOST:0)"
            )
        return f"tcp://{host}:0"
    return f"{address}.replay-{publisher_id:016x}"
