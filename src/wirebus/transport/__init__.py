"""Pub/sub: typed publishers and subscribers over ZeroMQ, asyncio native, batching.

A :class:`ZmqMessagePublisher` queues items in ``publish()`` (which never blocks) and sends
them in runs: consecutive items of one topic go out in one single-frame ZMQ message, encoded in
one call when the codec offers run encoding. A :class:`ZmqMessageSubscriber` drains its socket
in a reader callback and hands decoded batches to ``process()``. Every message carries the
publisher's id and per-topic sequence numbers, so a subscriber counts what the transport
dropped (``stats.dropped``).

Behind this module: ``_wire`` (the bytes of a message, docs/wire-format.md), ``_socket``
(socket set-up and release for both sides), ``_publisher``, ``_intake``, ``_sender`` and
``_sendstep`` (``publish()``, what it accepts, who sends, how a run is sent), ``_subscriber``,
``_consumer`` and ``_decoder`` (reading, handing batches to ``process()``, frames to items),
``_replay`` (the publisher's replay buffer and endpoint) and ``_recovery`` (a subscriber
fetching what it missed).
"""

from wirebus.transport._base import MessagePublisher, MessageSubscriber
from wirebus.transport._decoder import Position, SubscriberStats
from wirebus.transport._publisher import PublisherStats, ZmqMessagePublisher
from wirebus.transport._subscriber import ZmqMessageSubscriber
from wirebus.transport._wire import WIRE_VERSION

__all__ = [
    "WIRE_VERSION",
    "MessagePublisher",
    "MessageSubscriber",
    "Position",
    "PublisherStats",
    "SubscriberStats",
    "ZmqMessagePublisher",
    "ZmqMessageSubscriber",
]
