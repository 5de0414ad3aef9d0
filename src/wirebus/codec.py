"""Codecs: how an item becomes a ``(topic, payload)`` pair on the wire and back.

A codec is any object with ``encode``, ``decode`` and ``on_decode_error`` (the
:class:`MessageCodec` protocol). :class:`MsgspecCodec` covers any ``msgspec.Struct`` type;
a codec for a new message type is usually a one-line subclass of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, overload, runtime_checkable

import msgspec

__all__ = [
    "TOPIC_FRAME_SIZE",
    "MessageCodec",
    "MsgspecCodec",
    "RunEncoding",
    "check_codec",
    "make_topic",
    "run_decoder_of",
    "run_encoding_of",
]

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


@dataclass(frozen=True)
class RunEncoding(Generic[T]):
    """How a codec encodes a whole run of items in one call (the optional run protocol).

    ``topic(item)`` returns the item's padded topic without encoding it, and raises
    ``TypeError`` for an item that is not of the codec's type: the publisher calls it in
    ``publish()``, so it must be cheap. ``encode(items)`` returns one msgpack array holding
    the items in order, each element exactly the payload ``codec.encode(item)`` would give;
    the publisher calls it in its send step, for runs of items that share a topic.

    Two optional shortcuts for the publisher's hot path: with ``item_type``, the publisher
    checks ``isinstance(item, item_type)`` itself (``topic`` may then skip that check); with
    ``fixed_topic``, every item has that topic and ``topic`` is not called.
    """

    topic: Callable[[T], bytes]
    encode: Callable[[Sequence[T]], bytes]
    item_type: Any = None
    fixed_topic: bytes | None = None


def run_encoding_of(codec: MessageCodec[T]) -> RunEncoding[T] | None:
    """The codec's :class:`RunEncoding`, or ``None`` when it encodes item by item only.

    A codec offers run encoding through a ``run_encoding()`` method returning one (or
    ``None``).
    """
    offer = getattr(codec, "run_encoding", None)
    return offer() if callable(offer) else None


def run_decoder_of(codec: MessageCodec[T]) -> Callable[[bytes | memoryview], list[T]] | None:
    """The codec's run decoder (a msgpack array of payloads to a list of items), or ``None``.

    A codec offers it through a ``run_decoder()`` method returning the function (or ``None``).
    """
    offer = getattr(codec, "run_decoder", None)
    return offer() if callable(offer) else None


def type_name(type_: object) -> str:
    """A readable name for any type msgspec accepts (a class, a union, a generic alias)."""
    name = getattr(type_, "__name__", None)
    return name if isinstance(name, str) and not getattr(type_, "__args__", None) else repr(type_)


def _instance_check(type_: object) -> type[Any] | Any | None:
    """``type_`` if ``isinstance`` accepts it (a class or a union of classes), else ``None``."""
    try:
        isinstance(None, type_)  # type: ignore[arg-type]
    except TypeError:
        return None
    return type_


class MsgspecCodec(Generic[T]):
    """A msgpack codec for a ``msgspec.Struct`` type, or any type msgspec can decode.

    ``type_`` may be a struct, a union of tagged structs (``Tick | Quote``, several message
    types on one socket) or anything else msgspec decodes. ``topic`` is either one name for
    every item (``str``/``bytes``, padded with :func:`make_topic`) or a function of the item
    returning a padded topic. The encoder and decoder are built once. A payload that fails to
    decode is re-raised by :meth:`on_decode_error`, so the subscriber counts it and reports it
    through ``on_error``; override that method to substitute a sentinel item or drop silently.

    It offers run encoding and decoding (:meth:`run_encoding`, :meth:`run_decoder`): a
    publisher encodes a run of items in one msgspec call in its send step, a subscriber decodes
    a message's items in one call. A subclass that overrides :meth:`encode` or :meth:`decode`
    gets item-by-item encoding or decoding instead, so that its own method is what runs.
    """

    @overload
    def __init__(self, type_: type[T], topic: str | bytes | Callable[[T], bytes]) -> None: ...

    @overload
    def __init__(self, type_: object, topic: str | bytes | Callable[[T], bytes]) -> None:
        """A union (``Quote | Trade``) or generic alias: annotate the codec's type yourself,
        ``codec: MsgspecCodec[Quote | Trade] = MsgspecCodec(Quote | Trade, ...)``."""

    def __init__(self, type_: Any, topic: str | bytes | Callable[[T], bytes]) -> None:
        self.type = type_
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(
            type_, dec_hook=self._dec_hook
        )
        self._checked_type = _instance_check(type_)
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

    def topic(self, item: T) -> bytes:
        """The topic of ``item``, without encoding it; ``TypeError`` if it is not a ``type_``."""
        checked = self._checked_type
        if checked is not None and not isinstance(item, checked):
            raise TypeError(
                f"{self!r} encodes {type_name(self.type)}, got {type(item).__name__}: {item!r}"
            )
        return self._topic if self._topic_of is None else self._topic_of(item)

    def run_encoding(self) -> RunEncoding[T] | None:
        """Encode runs in one msgspec call, unless a subclass overrides :meth:`encode`."""
        if type(self).encode is not MsgspecCodec.encode:
            return None
        fixed = self._topic if self._topic_of is None else None
        return RunEncoding(self.topic, self._encoder.encode, self._checked_type, fixed)

    def run_decoder(self) -> Callable[[bytes | memoryview], list[T]] | None:
        """Decode a msgpack array of payloads in one call, unless :meth:`decode` is overridden.

        Decoding a run is several times faster than decoding payload by payload.
        """
        if type(self).decode is not MsgspecCodec.decode:
            return None
        decoder: msgspec.msgpack.Decoder[list[T]] = msgspec.msgpack.Decoder(
            list[self.type],  # type: ignore[name-defined]
            dec_hook=self._dec_hook,
        )
        return decoder.decode

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type_name(self.type)})"
