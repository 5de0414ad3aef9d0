"""Frames to items on the subscriber's side: parsing, decoding, and counting what is missing.

:class:`FrameDecoder` decodes a run-form message in one codec call where it can, item by item
otherwise (so that each bad payload reaches ``on_decode_error``), and keeps, per publisher and
topic, the next sequence number it expects: a bounded table, in which a jump no real publisher
could make counts as a new incarnation rather than as items dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec

from wirebus.codec import TOPIC_FRAME_SIZE, MessageCodec, run_decoder_of
from wirebus.transport import _wire
from wirebus.transport._base import RateLimitedLog

T = TypeVar("T")

MAX_TRACKED = 4096
"""(publisher, topic) pairs whose sequence numbers a subscriber tracks; the least recently
heard is forgotten first."""
MAX_GAP = 2**32
"""A larger jump in sequence numbers is not a count of dropped items but a new incarnation."""

_split_run = msgspec.msgpack.Decoder(list[msgspec.Raw]).decode
Failure = tuple[Exception, bytes | None]
Position = dict[tuple[int, bytes], int]
"""Per (publisher id, topic): the sequence number of the next item due from that publisher."""


@dataclass
class SubscriberStats:
    """Counters of one subscriber.

    ``received`` counts items that arrived (whether or not they decoded), ``dropped`` the items
    known to be missing from sequence gaps, ``recovered`` the items fetched again from a
    publisher's replay buffer, ``decode_errors`` payloads the codec rejected,
    ``process_errors`` failed ``process()`` calls, ``malformed`` ZMQ messages that are not in
    the wirebus wire format, ``resets`` sequence jumps too large to be drops (a forged frame or
    a publisher's new incarnation), ``duplicates`` items that arrived again after a replay had
    delivered them (skipped, not in ``received``), ``disconnects`` connections lost and
    ``handshake_failures`` connections refused (each logged; a connecting subscriber connects
    anew).
    """

    received: int = 0
    dropped: int = 0
    recovered: int = 0
    decode_errors: int = 0
    process_errors: int = 0
    malformed: int = 0
    resets: int = 0
    duplicates: int = 0
    disconnects: int = 0
    handshake_failures: int = 0
    messages: int = 0


class FrameDecoder(Generic[T]):
    """Decodes frames into items for one subscriber, updating its :class:`SubscriberStats`."""

    def __init__(self, codec: MessageCodec[T], stats: SubscriberStats, conflate: bool) -> None:
        self._codec = codec
        self._decode_run: Callable[[bytes | memoryview], list[T]] | None = run_decoder_of(codec)
        self._stats = stats
        self._conflate = conflate
        self._next_seq: dict[tuple[int, bytes], int] = {}
        self._log = RateLimitedLog()

    @property
    def tracked(self) -> int:
        """How many (publisher, topic) pairs are tracked now (at most :data:`MAX_TRACKED`)."""
        return len(self._next_seq)

    def decode(self, frame: bytes, items: list[T], failures: list[Failure]) -> None:
        """Append ``frame``'s items to ``items``; what failed, with its payload, to
        ``failures`` (for ``on_error``)."""
        stats = self._stats
        stats.messages += 1
        try:
            header = _wire.unpack(frame)
            decoded, payloads = self._split(frame, header)
        except ValueError as exc:
            stats.malformed += 1
            failures.append((ValueError(f"malformed message of {len(frame)} bytes: {exc}"), frame))
            return
        seen = self._count(header)
        if seen:
            stats.duplicates += seen
            if seen == header.items:
                return
            if decoded is not None:
                decoded = decoded[seen:]
            payloads = payloads[seen:]
        if self._conflate and header.items > 1:  # only the newest item of the message
            stats.dropped += header.items - 1
            if decoded is not None:
                decoded = decoded[-1:]
            payloads = payloads[-1:]
        stats.received += 1 if self._conflate else header.items - seen
        if decoded is not None:
            items.extend(decoded)
            return
        self._decode_payloads(payloads, items, failures)

    def _decode_payloads(
        self, payloads: list[memoryview], items: list[T], failures: list[Failure]
    ) -> None:
        stats = self._stats
        decode = self._codec.decode
        for payload in payloads:
            try:
                items.append(decode(payload))
            except Exception as exc:
                stats.decode_errors += 1
                try:
                    fallback = self._codec.on_decode_error(payload, exc)
                except Exception as raised:
                    failures.append((raised, bytes(payload)))
                    continue
                if fallback is not None:
                    items.append(fallback)

    def expected(self, publisher: int, topic: bytes) -> int | None:
        """The next sequence number due from ``publisher`` on ``topic``; ``None`` when that
        pair is not tracked (never heard, or forgotten)."""
        return self._next_seq.get((publisher, topic))

    def position(self) -> Position:
        """A copy of the table: the next sequence number due per (publisher, topic)."""
        return dict(self._next_seq)

    def resume(self, position: Mapping[tuple[int, bytes], int]) -> None:
        """Start from ``position`` (before any frame): expect, per (publisher, topic) of it,
        its sequence number next, as if everything before it had arrived. ``ValueError`` naming
        an entry that cannot be one."""
        for key, seq in position.items():
            if not (
                isinstance(key, tuple)
                and len(key) == 2
                and isinstance(key[0], int)
                and 0 <= key[0] < 2**64
                and isinstance(key[1], bytes)
                and len(key[1]) == TOPIC_FRAME_SIZE
                and isinstance(seq, int)
                and 0 <= seq < 2**64
            ):
                raise ValueError(
                    f"resume maps (publisher id, {TOPIC_FRAME_SIZE}-byte topic) to a "
                    f"sequence number >= 0, got {key!r}: {seq!r}"
                )
        self._next_seq = dict(list(position.items())[-MAX_TRACKED:])

    def topics_of(self, publisher: int) -> dict[bytes, int]:
        """The next sequence number due from ``publisher`` on each of its topics tracked."""
        return {topic: seq for (p, topic), seq in self._next_seq.items() if p == publisher}

    def decode_replayed(self, frame: bytes, items: list[T], failures: list[Failure]) -> None:
        """:meth:`decode` a message a publisher's replay endpoint sent, counting its items as
        recovered (and not as a message of the subscriber's socket)."""
        stats = self._stats
        before = stats.received
        self.decode(frame, items, failures)
        stats.messages -= 1
        stats.recovered += stats.received - before

    def _split(self, frame: bytes, header: _wire.Frame) -> tuple[list[T] | None, list[memoryview]]:
        """The items decoded in one call, or ``None`` and the payloads to decode one by one.

        ``ValueError`` when the body does not hold ``count`` items.
        """
        body = memoryview(frame)[header.offset :]
        count = header.items
        if header.lengths is not None:  # the table form: its lengths are the boundaries
            payloads, offset = [], 0
            for length in header.lengths:
                payloads.append(body[offset : offset + length])
                offset += length
            return None, payloads
        if self._decode_run is not None:
            try:
                decoded = self._decode_run(body)
            except Exception:
                pass  # some item is bad: split the run, so each failure is handled
            else:
                if len(decoded) == count:
                    return decoded, []
        try:
            raws = _split_run(body)
        except msgspec.DecodeError as exc:
            raise ValueError(f"the run is not a msgpack array: {exc}") from None
        if len(raws) != count:
            raise ValueError(f"the run holds {len(raws)} items, the header says {count}")
        return None, [memoryview(raw) for raw in raws]

    def _count(self, header: _wire.Frame) -> int:
        """Update the expected sequence number of the frame's publisher and topic; return how
        many of its first items were delivered already (a message behind what a replay
        delivered), to be skipped."""
        key = (header.publisher, header.topic)
        table = self._next_seq
        expected = table.pop(key, None)  # re-inserted below: the table is least recently used
        if expected is None:
            expected = 0
            if len(table) >= MAX_TRACKED:
                del table[next(iter(table))]
        gap = header.first - expected
        end = header.first + header.items
        if 0 < gap <= MAX_GAP:
            self._stats.dropped += gap
        elif -MAX_GAP <= gap < 0:
            table[key] = max(expected, end)
            return min(header.items, -gap)
        elif gap:
            self._stats.resets += 1
            self._log(
                logging.WARNING,
                f"publisher {header.publisher:#x} topic {_show(header.topic)}: sequence number "
                f"{header.first} where {expected} was due; counted as a reset, not as drops",
            )
        table[key] = end
        return 0


def _show(topic: bytes) -> str:
    return repr(topic.rstrip(b"\0"))
