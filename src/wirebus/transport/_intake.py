"""What ``publish()`` accepts: the checks made at the call, and the queue entry it makes.

An :data:`Entry` is ``(topic, item)`` for a codec with run encoding (the send step encodes the
item later, :mod:`~wirebus.transport._sendstep`), else ``(topic, payload)``, encoded at the
call by :func:`encode_now`. What needs no encoding is checked at the call: an item that is not
of the codec's type (:func:`check_type`), a topic that is not ``TOPIC_FRAME_SIZE`` bytes
(:func:`bad_topic`). ``publish()`` inlines the cheap part of these checks and calls here for
the rest; :func:`entries` makes the entries of ``publish_many()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from wirebus.codec import TOPIC_FRAME_SIZE, MessageCodec, RunEncoding, type_name
from wirebus.transport._base import safe_repr

T = TypeVar("T")

Entry = tuple[bytes, Any]  # (topic, item) with run encoding, else (topic, payload bytes)


def shortcuts(
    run_encoding: RunEncoding[T] | None,
) -> tuple[Callable[[T], bytes] | None, Any, bytes | None]:
    """What ``publish()`` inlines: the codec's topic function, item type and fixed topic
    (each ``None`` when the codec has none, as without run encoding)."""
    if run_encoding is None:
        return None, None, None
    return run_encoding.topic, run_encoding.item_type, run_encoding.fixed_topic


def check_type(codec: MessageCodec[T], item_type: object, item: object) -> None:
    """``TypeError`` naming ``codec`` and ``item`` unless ``item`` is an ``item_type``."""
    if not isinstance(item, cast(type, item_type)):
        raise TypeError(
            f"{safe_repr(codec)} encodes {type_name(item_type)}, got "
            f"{type(item).__name__}: {safe_repr(item)}"
        )


def encode_now(codec: MessageCodec[T], item: T) -> Entry:
    """Encode with a codec that has no run encoding, checking what it returned."""
    entry: object = codec.encode(item)
    try:
        topic, payload = cast("tuple[object, object]", entry)
    except (TypeError, ValueError):
        raise ValueError(
            f"{safe_repr(codec)} encoded {safe_repr(item)} as {safe_repr(entry)}, "
            "not a (topic, payload) pair"
        ) from None
    if topic.__class__ is not bytes or len(topic) != TOPIC_FRAME_SIZE:
        raise bad_topic(codec, item, topic)
    if payload.__class__ is not bytes:
        if isinstance(payload, memoryview):
            payload = payload.tobytes()  # its bytes, whatever its item size
        elif isinstance(payload, bytearray):
            payload = bytes(payload)
        else:
            raise TypeError(
                f"{safe_repr(codec)} encoded {safe_repr(item)} with a payload of type "
                f"{type(payload).__name__}; payloads must be bytes-like"
            )
    return topic, payload


def entries(
    codec: MessageCodec[T], run_encoding: RunEncoding[T] | None, items: Iterable[T]
) -> list[Entry]:
    """The entries of ``items``, in order, once every item passed every check."""
    if run_encoding is None:
        return [encode_now(codec, item) for item in items]
    items = list(items)
    item_type = run_encoding.item_type
    if item_type is not None:
        for item in items:
            if item.__class__ is not item_type:
                check_type(codec, item_type, item)
    fixed = run_encoding.fixed_topic
    if fixed is not None:
        return [(fixed, item) for item in items]
    made = [(run_encoding.topic(item), item) for item in items]
    for topic, item in made:
        if topic.__class__ is not bytes or len(topic) != TOPIC_FRAME_SIZE:
            raise bad_topic(codec, item, topic)
    return made


def bad_topic(codec: object, item: object, topic: object) -> Exception:
    """The error for ``topic``, given to ``item`` by ``codec``: not bytes, or the wrong width."""
    if not isinstance(topic, bytes):
        return TypeError(
            f"{safe_repr(codec)} gave {safe_repr(item)} the topic {safe_repr(topic)} of type "
            f"{type(topic).__name__}; topics are bytes (use make_topic)"
        )
    return ValueError(
        f"{safe_repr(codec)} gave {safe_repr(item)} the topic {topic!r} of {len(topic)} bytes; "
        f"topics must be exactly TOPIC_FRAME_SIZE ({TOPIC_FRAME_SIZE}) bytes (use make_topic)"
    )
