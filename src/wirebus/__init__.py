"""wirebus: typed messages and live metrics between the processes of a benchmark harness.

codec → transport → kvstore / ready / launcher → services → cli. Every public name is
re-exported here.
"""

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
from wirebus.launcher import ServiceContext as ServiceContext
from wirebus.launcher import ServiceLauncher as ServiceLauncher
from wirebus.launcher import ServiceSpec as ServiceSpec
from wirebus.launcher import run_service as run_service
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
from wirebus.transport import MessagePublisher as MessagePublisher
from wirebus.transport import MessageSubscriber as MessageSubscriber
from wirebus.transport import PublisherStats as PublisherStats
from wirebus.transport import SubscriberStats as SubscriberStats
from wirebus.transport import ZmqMessagePublisher as ZmqMessagePublisher
from wirebus.transport import ZmqMessageSubscriber as ZmqMessageSubscriber

__version__ = "0.1.0"
