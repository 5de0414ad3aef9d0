"""CurveZMQ authentication and encryption, and limits against hostile or broken peers."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from _peers import build_frame
from _support import Tick, tick_codec
from wirebus import TOPIC_FRAME_SIZE, MsgspecCodec, make_topic
from wirebus.security import (
    CurveClient,
    CurveServer,
    generate_curve_keypair,
    load_curve_keys,
    load_curve_public_keys,
    save_curve_keypair,
)
from wirebus.testing import CollectingSubscriber
from wirebus.transport import ZmqMessagePublisher, ZmqMessageSubscriber

TCP = "tcp://127.0.0.1:*"
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")


class Collector(CollectingSubscriber[Any]):
    """The plugin's collecting subscriber, for any item type."""


async def handshake_failures(
    subscriber: Collector, caplog: pytest.LogCaptureFixture, timeout: float = 10.0
) -> set[str]:
    """The kinds ("auth", "protocol", "detail") of the handshake failures logged at
    ``subscriber``'s address, once it counted one (its connection watch reports every one)."""
    await subscriber.wait_until(lambda: subscriber.stats.handshake_failures > 0, timeout=timeout)
    pattern = re.compile(rf"for {re.escape(subscriber.address)}: handshake failed \((\w+)\)")
    kinds = {m[1] for r in caplog.records if (m := pattern.search(r.getMessage()))}
    assert kinds, [r.getMessage() for r in caplog.records]
    return kinds


@pytest.fixture
def keys() -> dict[str, tuple[bytes, bytes]]:
    return {name: generate_curve_keypair() for name in ("server", "client", "intruder")}


def client(keys: dict[str, tuple[bytes, bytes]], who: str) -> CurveClient:
    return CurveClient(keys["server"][0], *keys[who])


def server(keys: dict[str, tuple[bytes, bytes]], *allowed: str) -> CurveServer:
    return CurveServer(*keys["server"], allowed_clients=[keys[who][0] for who in allowed])


def free_tcp_address() -> str:
    """A tcp address nobody listens on yet, so that peers can connect before it is bound."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def auth_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if type(t).__name__ == "AuthenticationThread"]


# -- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
async def test_only_allowed_subscribers_receive(
    keys: dict[str, tuple[bytes, bytes]],
    wirebus_address: str,
    scheme: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = free_tcp_address() if scheme == "tcp" else wirebus_address
    n = 2000
    # the subscribers connect before the publisher binds: their watch misses no event
    allowed = Collector(tick_codec(), address, curve=client(keys, "client"))
    intruder = Collector(tick_codec(), address, curve=client(keys, "intruder"))
    plain = Collector(tick_codec(), address)
    try:
        with ZmqMessagePublisher(tick_codec(), address, curve=server(keys, "client")) as publisher:
            for subscriber in (allowed, intruder, plain):
                await subscriber.start()
            await publisher.wait_for_subscribers(1, timeout=10)
            # both were turned away at the handshake (only a CURVE client can fail on auth)
            await handshake_failures(plain, caplog)
            assert "auth" in await handshake_failures(intruder, caplog)
            for seq in range(n):
                publisher.publish(Tick(seq))
            await allowed.wait_until(lambda: len(allowed.items) == n)
            assert publisher.subscriptions == 1
            await publisher.flush(timeout=10)
            # a bounded look for anything arriving late at the two others
            with pytest.raises(TimeoutError):
                await intruder.wait_until(lambda: intruder.stats.messages > 0, timeout=0.3)
    finally:
        for subscriber in (allowed, intruder, plain):
            await subscriber.aclose()
    assert allowed.items == [Tick(seq) for seq in range(n)]
    assert allowed.stats.dropped == 0
    assert intruder.items == plain.items == []
    assert intruder.stats.messages == plain.stats.messages == 0
    intruder_key = keys["intruder"][0].decode()
    assert any(intruder_key in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert auth_threads() == []  # the authenticator was stopped with the publisher


async def test_encryption_only_server_admits_any_curve_client(
    keys: dict[str, tuple[bytes, bytes]],
) -> None:
    curve = CurveServer(*keys["server"])  # no allow-list: anyone who knows the server key
    with ZmqMessagePublisher(tick_codec(), TCP, curve=curve) as publisher:
        assert auth_threads() == []
        curve_client = client(keys, "intruder")
        async with Collector(tick_codec(), publisher.address, curve=curve_client) as anyone:
            await publisher.wait_for_subscribers(1, timeout=10)
            publisher.publish(Tick(1))
            await anyone.wait_until(lambda: anyone.items == [Tick(1)])


async def test_a_subscriber_with_the_wrong_server_key_gets_nothing(
    keys: dict[str, tuple[bytes, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    address = free_tcp_address()
    wrong = CurveClient(keys["intruder"][0], *keys["client"])  # an allowed key, the wrong server
    async with Collector(tick_codec(), address, curve=wrong) as subscriber:
        with ZmqMessagePublisher(tick_codec(), address, curve=server(keys, "client")) as publisher:
            await handshake_failures(subscriber, caplog)
            with pytest.raises(TimeoutError):
                await publisher.wait_for_subscribers(1, timeout=0.3)


async def test_a_bound_curve_subscriber_admits_only_allowed_publishers(
    keys: dict[str, tuple[bytes, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """Fan-in with CURVE: the aggregator is the server, the load generators are clients."""
    curve = server(keys, "client")
    async with Collector(tick_codec(), TCP, connect=False, curve=curve) as aggregator:
        assert len(auth_threads()) == 1
        publishers: list[ZmqMessagePublisher[Tick]] = []
        try:
            good, bad = (
                ZmqMessagePublisher(
                    tick_codec(), aggregator.address, bind=False, curve=client(keys, who)
                )
                for who in ("client", "intruder")
            )
            publishers += [good, bad]
            await good.wait_for_subscribers(1, timeout=10)
            assert await handshake_failures(aggregator, caplog) == {"auth"}
            with pytest.raises(TimeoutError, match="0 of 1 subscriptions"):
                await bad.wait_for_subscribers(1, timeout=0.3)
            for seq in range(100):
                bad.publish(Tick(1000 + seq))  # immediate=True: dropped, never queued
                good.publish(Tick(seq))
            await aggregator.wait_until(lambda: len(aggregator.items) == 100)
            await bad.flush(timeout=10)
            with pytest.raises(TimeoutError):
                await aggregator.wait_until(lambda: len(aggregator.items) > 100, timeout=0.3)
        finally:
            for publisher in publishers:
                publisher.close(timeout=5)
    assert aggregator.items == [Tick(seq) for seq in range(100)]
    assert auth_threads() == []  # stopped with the subscriber, its private context terminated


# -- encryption ----------------------------------------------------------------------------


class Tap:
    """A TCP proxy in front of a publisher that records every byte it forwards downstream."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.seen = bytearray()
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> Tap:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.address = f"tcp://127.0.0.1:{port}"
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.append(task)
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers += [writer, up_writer]

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: bool
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if record:
                        self.seen += data
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        for writer in self._writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self.server.wait_closed()


class Note(msgspec.Struct):
    text: str


@pytest.mark.parametrize("secure", [False, True])
async def test_curve_traffic_is_encrypted_on_the_wire(
    keys: dict[str, tuple[bytes, bytes]], secure: bool
) -> None:
    codec = MsgspecCodec(Note, topic="note")
    secret = "wirebus-plaintext-marker-7f3a"
    with ZmqMessagePublisher(
        codec, TCP, curve=server(keys, "client") if secure else None
    ) as publisher:
        async with Tap(publisher.address) as tap:
            curve = client(keys, "client") if secure else None
            async with Collector(codec, tap.address, curve=curve) as subscriber:
                await publisher.wait_for_subscribers(1, timeout=10)
                for _ in range(10):
                    publisher.publish(Note(secret))
                await subscriber.wait_until(lambda: len(subscriber.items) == 10)
    assert subscriber.items == [Note(secret)] * 10  # it went through the tap either way
    assert (secret.encode() in tap.seen) is not secure
    assert (make_topic("note") in tap.seen) is not secure  # topics are hidden too


# -- keys ------------------------------------------------------------------------------------


async def test_keys_from_files(tmp_path: Path) -> None:
    server_public_file, server_secret_file = save_curve_keypair(tmp_path, "server")
    clients = tmp_path / "clients"
    clients.mkdir()
    client_public_file, client_secret_file = save_curve_keypair(clients, "loadgen-1")
    save_curve_keypair(clients, "loadgen-2")
    assert stat.S_IMODE(server_secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(client_secret_file.stat().st_mode) == 0o600
    client_secret_file.rename(tmp_path / client_secret_file.name)  # only public keys stay there
    with pytest.raises(FileExistsError):
        save_curve_keypair(tmp_path, "server")

    public, secret = load_curve_keys(server_secret_file)
    assert secret is not None
    assert load_curve_keys(server_public_file) == (public, None)
    allowed = load_curve_public_keys(clients)
    assert len(allowed) == 2
    assert load_curve_keys(client_public_file)[0] in allowed
    client_public, client_secret = load_curve_keys(tmp_path / client_secret_file.name)
    assert client_secret is not None
    curve_server = CurveServer(public, secret, allowed_clients=allowed)
    curve_client = CurveClient(load_curve_keys(server_public_file)[0], client_public, client_secret)
    with ZmqMessagePublisher(tick_codec(), TCP, curve=curve_server) as publisher:
        async with Collector(tick_codec(), publisher.address, curve=curve_client) as subscriber:
            await publisher.wait_for_subscribers(1, timeout=10)
            publisher.publish(Tick(7))
            await subscriber.wait_until(lambda: subscriber.items == [Tick(7)])


def test_bad_keys_and_settings_are_refused(
    keys: dict[str, tuple[bytes, bytes]], wirebus_address: str
) -> None:
    public, secret = keys["server"]
    with pytest.raises(ValueError, match="40-character Z85"):
        CurveServer(public[:-1], secret)
    for bad in (b"~" * 40, "#" * 40, b"\0" * 40):  # not Z85 chars; a value over 2**32
        with pytest.raises(ValueError, match="not valid Z85"):
            CurveServer(public, bad)
    with pytest.raises(ValueError, match="not the public half"):
        CurveServer(keys["client"][0], secret)
    with pytest.raises(ValueError, match="not the public half"):
        CurveClient(public, keys["client"][0], keys["intruder"][1])
    with pytest.raises(TypeError, match="not a single key"):
        CurveServer(public, secret, allowed_clients=keys["client"][0])
    assert secret.decode() not in repr(CurveServer(public, secret))
    assert keys["client"][1].decode() not in repr(client(keys, "client"))
    raw = zmq.utils.z85.decode(public)
    assert CurveServer(raw, secret.decode()).public_key == public  # raw bytes and str work too

    with pytest.raises(ValueError, match="inproc"):
        ZmqMessagePublisher(tick_codec(), "inproc://x", curve=CurveServer(public, secret))
    with pytest.raises(ValueError, match="do not pass context"):
        ZmqMessageSubscriber(
            tick_codec(),
            wirebus_address,
            connect=False,
            context=zmq.Context.instance(),
            curve=server(keys, "client"),
        )
    with pytest.raises(TypeError, match="CurveServer or a CurveClient"):
        ZmqMessagePublisher(tick_codec(), TCP, curve=public)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every interface"):  # CURVE is no reason to listen on all
        ZmqMessagePublisher(tick_codec(), "tcp://*:*", curve=CurveServer(public, secret))
    with pytest.raises(ValueError, match="heartbeat"):
        ZmqMessageSubscriber(tick_codec(), wirebus_address, heartbeat=-1)
    assert auth_threads() == []


def test_a_failed_bind_stops_the_authenticator(keys: dict[str, tuple[bytes, bytes]]) -> None:
    with ZmqMessagePublisher(tick_codec(), TCP) as taken:
        with pytest.raises(OSError, match="address in use"):
            ZmqMessagePublisher(tick_codec(), taken.address, curve=server(keys, "client"))
        with pytest.raises(OSError, match="address in use"):
            ZmqMessageSubscriber(
                tick_codec(), taken.address, connect=False, curve=server(keys, "client")
            )
    assert auth_threads() == []


# -- limits against hostile or broken peers ----------------------------------------------------


@pytest.fixture
async def raw_peer(wirebus_address: str) -> AsyncIterator[zmq.Socket[bytes]]:
    """A raw pyzmq XPUB that connects to ``wirebus_address`` and reports (un)subscriptions."""
    sock = zmq.Context.instance().socket(zmq.XPUB)
    sock.setsockopt(zmq.XPUB_VERBOSER, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(wirebus_address)
    yield sock
    sock.close(linger=0)


async def _next_subscription(sock: zmq.Socket[bytes], timeout: float = 10.0) -> None:
    """Wait for the next subscribe message on a raw XPUB (skipping unsubscribes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while sock.poll(0):
            if sock.recv()[:1] == b"\x01":
                return
        await asyncio.sleep(0.01)  # polling the socket, with a deadline
    raise TimeoutError("no subscription arrived")


async def test_an_oversized_message_drops_only_its_sender(
    wirebus_address: str, raw_peer: zmq.Socket[bytes]
) -> None:
    limit = 4096
    topic = make_topic("tick")
    encode = tick_codec().encode
    async with Collector(
        tick_codec(), wirebus_address, connect=False, max_message_size=limit
    ) as subscriber:
        with ZmqMessagePublisher(tick_codec(), wirebus_address, bind=False) as good:
            await good.wait_for_subscribers(timeout=10)
            await _next_subscription(raw_peer)
            for seq in range(10):
                good.publish(Tick(seq))
            await subscriber.wait_until(lambda: len(subscriber.items) == 10)

            huge = encode(Tick(-1))[1] + b"\0" * limit  # seq 0 of raw publisher 77, too big
            raw_peer.send(build_frame(topic, 77, 0, [huge]))
            # ZMQ drops the raw peer's connection; the peer reconnects and subscribes again
            await _next_subscription(raw_peer)
            for seq in range(10, 20):
                good.publish(Tick(seq))
            raw_peer.send(build_frame(topic, 77, 1, [encode(Tick(-2))[1]]))
            await subscriber.wait_until(lambda: len(subscriber.items) == 21)
    assert [t.seq for t in subscriber.items if t.seq >= 0] == list(range(20))
    assert Tick(-2) in subscriber.items
    assert Tick(-1) not in subscriber.items
    assert subscriber.stats.dropped == 1  # the oversized item shows up as a gap
    assert subscriber.stats.malformed == 0
    assert subscriber.errors == []


class RawBytes:
    """A codec that puts bytes on the wire as they are."""

    topic = make_topic("raw")

    def encode(self, item: bytes) -> tuple[bytes, bytes]:
        return self.topic, item

    def decode(self, payload: bytes | memoryview) -> bytes:
        return bytes(payload)

    def on_decode_error(self, payload: bytes | memoryview, exc: Exception) -> bytes | None:
        return None


async def test_an_oversized_batch_from_a_wirebus_publisher_is_counted_as_dropped(
    wirebus_address: str,
) -> None:
    async with Collector(
        RawBytes(), wirebus_address, connect=False, max_message_size=4096
    ) as subscriber:
        with ZmqMessagePublisher(RawBytes(), wirebus_address, bind=False) as publisher:
            await publisher.wait_for_subscribers(timeout=10)
            publisher.publish(b"0".ljust(8000, b"."))  # item 0: alone in a message, too big
            index = 1
            while not subscriber.items:  # the connection drops, reconnects, flows again
                assert index < 20_000, subscriber.stats
                publisher.publish(str(index).encode())
                index += 1
                await asyncio.sleep(0.001)  # pacing the load, not synchronisation
            publisher.publish(b"last")
            await subscriber.wait_until(lambda: subscriber.items[-1] == b"last")
    numbers = [int(item) for item in subscriber.items[:-1]]
    assert numbers == sorted(numbers)
    assert 0 not in numbers
    stats = subscriber.stats
    assert stats.received + stats.dropped == index + 1  # items 0 .. index ("last")
    assert stats.dropped >= 1
    assert stats.malformed == 0


async def test_garbage_and_multipart_frames_are_counted_and_never_stall(
    wirebus_address: str, raw_peer: zmq.Socket[bytes]
) -> None:
    topic = make_topic("tick")
    payload = tick_codec().encode(Tick(5))[1]
    async with Collector(tick_codec(), wirebus_address, connect=False) as subscriber:
        await _next_subscription(raw_peer)
        raw_peer.send_multipart([topic, payload])  # a naive two-frame publisher: two messages
        lying = bytearray(build_frame(topic, 9, 0, [payload]))
        lying[TOPIC_FRAME_SIZE + 4 : TOPIC_FRAME_SIZE + 8] = (128).to_bytes(4, "little")
        raw_peer.send(bytes(lying))  # claims 128 payloads it does not carry
        raw_peer.send(b"\xff" * 100_000)  # noise, under the size limit
        raw_peer.send(build_frame(topic, 9, 0, [payload]))
        await subscriber.wait_until(lambda: subscriber.items == [Tick(5)])
    assert subscriber.stats.malformed == 4
    assert len(subscriber.errors) == 4
    assert subscriber.stats.received == 1


def test_default_message_size_limit_is_set(wirebus_address: str) -> None:
    with ZmqMessageSubscriber(tick_codec(), wirebus_address) as subscriber:
        assert subscriber._socket.getsockopt(zmq.MAXMSGSIZE) == 64 * 1024 * 1024
    with ZmqMessageSubscriber(tick_codec(), wirebus_address, max_message_size=1000) as subscriber:
        assert subscriber._socket.getsockopt(zmq.MAXMSGSIZE) == 1000


def test_only_the_key_api_is_public() -> None:
    from wirebus import security

    defined_here = {
        name
        for name, value in vars(security).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == security.__name__
    }
    assert defined_here == set(security.__all__)
    assert {"check_curve", "configure", "needs_authenticator", "Authenticator"}.isdisjoint(
        vars(security)
    )
    assert "ZAP_DOMAIN" not in vars(security)
