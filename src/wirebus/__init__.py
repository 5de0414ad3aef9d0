"""wirebus: typed messages and live metrics between the processes of a benchmark harness.

codec → transport → kvstore / ready / launcher (parent side) and service (child side) →
services → cli. Every public name is re-exported here, imported on first use: a process that
only reports ready (``import wirebus.ready``) does not pay for the transport or the store.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wirebus.codec import TOPIC_FRAME_SIZE as TOPIC_FRAME_SIZE
    from wirebus.codec import MessageCodec as MessageCodec
    from wirebus.codec import MsgspecCodec as MsgspecCodec
    from wirebus.codec import make_topic as make_topic
    from wirebus.errors import KVStoreError as KVStoreError
    from wirebus.errors import ReadyTimeoutError as ReadyTimeoutError
    from wirebus.errors import ServiceStartupError as ServiceStartupError
    from wirebus.errors import WirebusError as WirebusError
    from wirebus.kvstore import BasicKVStore as BasicKVStore
    from wirebus.kvstore import Counter as Counter
    from wirebus.kvstore import Gauge as Gauge
    from wirebus.kvstore import KVStore as KVStore
    from wirebus.kvstore import KVStoreReader as KVStoreReader
    from wirebus.kvstore import Series as Series
    from wirebus.kvstore import SeriesSummary as SeriesSummary
    from wirebus.kvstore import SeriesView as SeriesView
    from wirebus.kvstore import cleanup_stale as cleanup_stale
    from wirebus.launcher import ServiceLauncher as ServiceLauncher
    from wirebus.launcher import ServiceSpec as ServiceSpec
    from wirebus.ready import ReadyCheckReceiver as ReadyCheckReceiver
    from wirebus.ready import ReadySignal as ReadySignal
    from wirebus.ready import notify_ready as notify_ready
    from wirebus.ready import send_ready_signal as send_ready_signal
    from wirebus.record import ErrorData as ErrorData
    from wirebus.record import ErrorEventType as ErrorEventType
    from wirebus.record import EventRecord as EventRecord
    from wirebus.record import EventRecordCodec as EventRecordCodec
    from wirebus.record import PromptData as PromptData
    from wirebus.record import SampleEventType as SampleEventType
    from wirebus.record import SessionEventType as SessionEventType
    from wirebus.record import TextModelOutput as TextModelOutput
    from wirebus.security import CurveClient as CurveClient
    from wirebus.security import CurveServer as CurveServer
    from wirebus.security import generate_curve_keypair as generate_curve_keypair
    from wirebus.security import load_curve_keys as load_curve_keys
    from wirebus.security import load_curve_public_keys as load_curve_public_keys
    from wirebus.security import save_curve_keypair as save_curve_keypair
    from wirebus.service import ServiceContext as ServiceContext
    from wirebus.service import run_service as run_service
    from wirebus.services.event_publisher import EventPublisherService as EventPublisherService
    from wirebus.transport import MessagePublisher as MessagePublisher
    from wirebus.transport import MessageSubscriber as MessageSubscriber
    from wirebus.transport import PublisherStats as PublisherStats
    from wirebus.transport import SubscriberStats as SubscriberStats
    from wirebus.transport import ZmqMessagePublisher as ZmqMessagePublisher
    from wirebus.transport import ZmqMessageSubscriber as ZmqMessageSubscriber

__all__ = [
    "TOPIC_FRAME_SIZE",
    "BasicKVStore",
    "Counter",
    "CurveClient",
    "CurveServer",
    "ErrorData",
    "ErrorEventType",
    "EventPublisherService",
    "EventRecord",
    "EventRecordCodec",
    "Gauge",
    "KVStore",
    "KVStoreError",
    "KVStoreReader",
    "MessageCodec",
    "MessagePublisher",
    "MessageSubscriber",
    "MsgspecCodec",
    "PromptData",
    "PublisherStats",
    "ReadyCheckReceiver",
    "ReadySignal",
    "ReadyTimeoutError",
    "SampleEventType",
    "Series",
    "SeriesSummary",
    "SeriesView",
    "ServiceContext",
    "ServiceLauncher",
    "ServiceSpec",
    "ServiceStartupError",
    "SessionEventType",
    "SubscriberStats",
    "TextModelOutput",
    "WirebusError",
    "ZmqMessagePublisher",
    "ZmqMessageSubscriber",
    "cleanup_stale",
    "generate_curve_keypair",
    "load_curve_keys",
    "load_curve_public_keys",
    "make_topic",
    "notify_ready",
    "run_service",
    "save_curve_keypair",
    "send_ready_signal",
]

_SOURCES = {
    "BasicKVStore": "wirebus.kvstore",
    "CurveClient": "wirebus.security",
    "CurveServer": "wirebus.security",
    "ErrorData": "wirebus.record",
    "ErrorEventType": "wirebus.record",
    "EventPublisherService": "wirebus.services.event_publisher",
    "EventRecord": "wirebus.record",
    "EventRecordCodec": "wirebus.record",
    "Counter": "wirebus.kvstore",
    "Gauge": "wirebus.kvstore",
    "KVStore": "wirebus.kvstore",
    "KVStoreError": "wirebus.errors",
    "KVStoreReader": "wirebus.kvstore",
    "MessageCodec": "wirebus.codec",
    "MessagePublisher": "wirebus.transport",
    "MessageSubscriber": "wirebus.transport",
    "MsgspecCodec": "wirebus.codec",
    "PromptData": "wirebus.record",
    "PublisherStats": "wirebus.transport",
    "ReadyCheckReceiver": "wirebus.ready",
    "ReadySignal": "wirebus.ready",
    "ReadyTimeoutError": "wirebus.errors",
    "SampleEventType": "wirebus.record",
    "Series": "wirebus.kvstore",
    "SeriesSummary": "wirebus.kvstore",
    "SeriesView": "wirebus.kvstore",
    "ServiceContext": "wirebus.service",
    "ServiceLauncher": "wirebus.launcher",
    "ServiceSpec": "wirebus.launcher",
    "ServiceStartupError": "wirebus.errors",
    "SessionEventType": "wirebus.record",
    "SubscriberStats": "wirebus.transport",
    "TOPIC_FRAME_SIZE": "wirebus.codec",
    "TextModelOutput": "wirebus.record",
    "WirebusError": "wirebus.errors",
    "ZmqMessagePublisher": "wirebus.transport",
    "ZmqMessageSubscriber": "wirebus.transport",
    "cleanup_stale": "wirebus.kvstore",
    "generate_curve_keypair": "wirebus.security",
    "load_curve_keys": "wirebus.security",
    "load_curve_public_keys": "wirebus.security",
    "make_topic": "wirebus.codec",
    "notify_ready": "wirebus.ready",
    "run_service": "wirebus.service",
    "save_curve_keypair": "wirebus.security",
    "send_ready_signal": "wirebus.ready",
}

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'wirebus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, *(name for name in globals() if name.startswith("__"))])
