"""Codecs: how an item becomes a ``(topic, payload)`` pair on the wire and back.

A codec is any object with ``encode``, ``decode`` and ``on_decode_error`` (the
:class:`MessageCodec` protocol). :class:`MsgspecCodec` covers any ``msgspec.Struct`` type;
a codec for a new message type is usually a one-line subclass of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import msgspec

__all__ = ["TOPIC_FRAME_SIZE", "MessageCodec", "MsgspecCodec", "check_codec", "make_topic"]

TOPIC_FRAME_SIZE = 32
"""Fixed width in bytes of every topic on the wire (names are NUL-padded to it)."""

T = TypeVar("T")


def make_topic(name: str | bytes) -> bytes:
    """Return ``name`` NUL-padded to :data:`TOPIC_FRAME_SIZE` bytes.

    Trailing NULs are padding, so an already padded topic is returned unchanged. Raises
    ``ValueError`` when the name is empty, longer than the topic width, or contains a NUL byte
    (which would make two names share one padded topic); ``TypeError`` when it is neither
    ``str`` nor ``bytes``.
    """
    if isinstance(name, str):
        raw = name.encode().rstrip(b"\0")
    elif isinstance(name, bytes):
        raw = name.rstrip(b"\0")
    else:
        raise TypeError(f"topic name must be str or bytes, got {type(name).__name__}: {name!r}")
    if not raw:
        raise ValueError("topic name must not be empty")
    if len(raw) > TOPIC_FRAME_SIZE:
        raise ValueError(
            f"topic name {name!r} is {len(raw)} bytes, longer than TOPIC_FRAME_SIZE "
            f"({TOPIC_FRAME_SIZE})"
        )
    if b"\0" in raw:
        raise ValueError(f"topic name {name!r} contains a NUL byte")
    return raw.ljust(TOPIC_FRAME_SIZE, b"\0")


@runtime_checkable
class MessageCodec(Protocol[T]):
    """Turns items of type ``T`` into ``(topic, payload)`` and payloads back into items."""

    def encode(self, item: T) -> tuple[bytes, bytes]:
        """Return ``(topic, payload)``; ``topic`` is exactly :data:`TOPIC_FRAME_SIZE` bytes."""
        ...

    def decode(self, payload: bytes | memoryview) -> T:
        """Decode one payload. May raise anything; the subscriber routes failures to
        :meth:`on_decode_error`."""
        ...

    def on_decode_error(self, payload: bytes | memoryview, exc: Exception) -> T | None:
        """Fallback for a payload that failed to decode: return a sentinel item, ``None`` to
        drop it, or raise to signal a bug (the subscriber reports it through ``on_error``)."""
        ...


def check_codec(codec: object) -> None:
    """Raise ``TypeError`` naming ``codec`` when it does not satisfy :class:`MessageCodec`."""
    missing = [
        name
        for name in ("encode", "decode", "on_decode_error")
        if not callable(getattr(codec, name, None))
    ]
    if missing:
        raise TypeError(f"{codec!r} is not a MessageCodec: it has no callable {', '.join(missing)}")


class MsgspecCodec(Generic[T]):
    """A msgpack codec for a ``msgspec.Struct`` type (or any type msgspec can decode).

    ``topic`` is either one name for every item (``str``/``bytes``, padded with
    :func:`make_topic`) or a function of the item returning a padded topic. The encoder and
    decoder are built once. A payload that fails to decode is re-raised by
    :meth:`on_decode_error`, so the subscriber counts it and reports it through ``on_error``;
    override that method to substitute a sentinel item or drop silently.
    """

    def __init__(self, type_: type[T], topic: str | bytes | Callable[[T], bytes]) -> None:
        self.type = type_
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(
            type_, dec_hook=self._dec_hook
        )
        if callable(topic):
            self._topic_of: Callable[[T], bytes] | None = topic
            self._topic = b""
        else:
            self._topic_of = None
            self._topic = make_topic(topic)

    def _dec_hook(self, type_: type[Any], obj: Any) -> Any:
        """Decode custom types; subclasses extend it. The default supports none."""
        raise NotImplementedError(f"cannot decode {type_!r}")

    def encode(self, item: T) -> tuple[bytes, bytes]:
        topic = self._topic if self._topic_of is None else self._topic_of(item)
        return topic, self._encoder.encode(item)

    def decode(self, payload: bytes | memoryview) -> T:
        return self._decoder.decode(payload)

    def on_decode_error(self, payload: bytes | memoryview, exc: Exception) -> T | None:
        raise exc

    def concatenated_decoder(self) -> Callable[[bytes, int], list[T]] | None:
        """Return a function decoding ``count`` payloads laid end to end, in one call.

        An optional codec method the subscriber uses when present: msgpack payloads laid end
        to end after an array header are one msgpack array, which msgspec decodes several
        times faster than payload by payload. Returns ``None`` when a subclass overrides
        :meth:`decode`, so that its ``decode`` is what runs.
        """
        if type(self).decode is not MsgspecCodec.decode:
            return None
        decoder = msgspec.msgpack.Decoder(list[self.type], dec_hook=self._dec_hook)  # type: ignore[name-defined]

        def decode_concatenated(payloads: bytes, count: int) -> list[T]:
            header = bytes((0x90 | count,)) if count < 16 else b"\xdc" + count.to_bytes(2, "big")
            return decoder.decode(header + payloads)

        return decode_concatenated

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.type.__name__})"
