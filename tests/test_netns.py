"""Pub/sub between hosts: three network namespaces on a bridge, a link cut mid-stream.

Host ``a`` runs a publisher bound to its bridge address, hosts ``b`` and ``c`` each run a
subscriber process connected over tcp. Mid-stream ``b``'s cable is pulled (``ip link set
down`` on its bridge port) and plugged in again: ``b`` notices (ZMTP heartbeats), reconnects,
goes on receiving and counts what it missed (or, with replay on the publisher and recovery on
the subscribers, gets it back); ``c`` loses nothing. Needs root and ``ip netns``;
skipped otherwise. Every namespace (and with it every veth and the bridge) is deleted
afterwards, pass or fail.

This file is also the peer script: ``python tests/test_netns.py publish|subscribe ...``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from _peers import Peer, stdin_says_stop
from _support import Tick

SUBNET = "10.201.7"  # private test range, exists only inside the namespaces made here
PORT = 5701
HEARTBEAT_MS = 150  # a silent peer is dropped after 3x this


# -- the test side ---------------------------------------------------------------------------


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def _must(*args: str) -> None:
    result = _ip(*args)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr.strip()}"


def _wire(names: dict[str, str]) -> None:
    a = names["a"]
    _must("-n", a, "link", "add", "br0", "type", "bridge")
    _must("-n", a, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
    _must("-n", a, "link", "set", "br0", "up")
    for host, number in (("b", 2), ("c", 3)):
        port = f"to-{host}"  # a's end of the cable to this host
        _must("-n", a, "link", "add", port, "type", "veth", "peer", "eth0", "netns", names[host])
        _must("-n", a, "link", "set", port, "master", "br0")
        _must("-n", a, "link", "set", port, "up")
        _must("-n", names[host], "addr", "add", f"{SUBNET}.{number}/24", "dev", "eth0")
        _must("-n", names[host], "link", "set", "eth0", "up")


@pytest.fixture
def hosts() -> Iterator[dict[str, str]]:
    """Namespaces a, b, c; a has a bridge (SUBNET.1) with one veth to each of b (.2), c (.3)."""
    if shutil.which("ip") is None:
        pytest.skip("needs root and ip netns: the ip command (iproute2) is not installed")
    names = {host: f"wbtest-{os.getpid()}-{host}" for host in "abc"}
    made: list[str] = []
    try:
        for name in names.values():
            result = _ip("netns", "add", name)
            if result.returncode != 0:
                pytest.skip(f"needs root and ip netns: `ip netns add` failed: {result.stderr}")
            made.append(name)
        try:
            _wire(names)
        except AssertionError as exc:  # e.g. no bridge or veth support in this kernel
            pytest.skip(f"needs root and ip netns: cannot build the test network: {exc}")
        yield names
    finally:
        for name in made:
            _ip("netns", "del", name)  # takes its veth ends and the bridge with it
        leftover = _ip("netns", "list").stdout
        assert not any(name in leftover for name in made), leftover


@pytest.fixture
def procs() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.close()


def _peer(procs: list[Peer], namespace: str, *args: str) -> Peer:
    peer = Peer(__file__, *args, prefix=["ip", "netns", "exec", namespace])
    procs.append(peer)
    return peer


@pytest.mark.parametrize("replay", [False, True], ids=["counted", "recovered"])
async def test_link_cut_between_hosts_is_survived_and_counted(
    hosts: dict[str, str], procs: list[Peer], replay: bool
) -> None:
    address = f"tcp://{SUBNET}.1:{PORT}"
    mode = "replay" if replay else "plain"
    publisher = _peer(procs, hosts["a"], "publish", address, "2", mode)
    await publisher.wait_for(lambda s: "address" in s, timeout=15)
    assert publisher.state["address"] == address  # bound to a's own address, not 0.0.0.0
    b = _peer(procs, hosts["b"], "subscribe", address, mode)
    c = _peer(procs, hosts["c"], "subscribe", address, mode)
    await publisher.wait_for(lambda s: s.get("publishing", False), timeout=15)
    await b.wait_for(lambda s: s.get("received", 0) >= 200, timeout=10)

    _must("-n", hosts["a"], "link", "set", "to-b", "down")  # pull b's cable
    before_cut = b.state["last"]
    # b's heartbeat times out and it drops the dead connection; c is not affected
    await b.wait_for(lambda s: s["disconnects"] >= 1, timeout=10)
    during = c.state["last"]
    await c.wait_for(lambda s: s["last"] >= during + 200, timeout=10)
    assert b.state["last"] < c.state["last"]

    _must("-n", hosts["a"], "link", "set", "to-b", "up")  # plug it in again
    restored = publisher.state["published"]
    await b.wait_for(lambda s: s["last"] >= restored + 200, timeout=15)  # b resumed

    assert c.state["disconnects"] == 0, c.describe()
    publisher.send("stop")  # (closing it disconnects everyone)
    await publisher.wait_for(lambda s: "final" in s, timeout=10)
    final = publisher.state["final"]
    for subscriber in (b, c):
        await subscriber.wait_for(lambda s, f=final: s["last"] == f, timeout=10)  # type: ignore[misc]
        subscriber.send("stop")
    for peer in procs:
        await peer.finish()

    got_b, got_c = b.state, c.state
    assert got_b["ordered"]
    assert got_c["ordered"]
    assert got_c["received"] == final + 1, got_c
    assert got_c["dropped"] == 0, got_c
    assert got_b["received"] + got_b["dropped"] == final + 1, got_b
    if replay:  # b got back what was published while it was cut off, in order
        assert got_b["contiguous"], got_b
        assert got_b["dropped"] == 0, got_b
        assert got_b["recovered"] > 0, got_b
    else:  # b lost what was published while it was cut off and counted it
        assert got_b["dropped"] > 0, got_b
    # its watch counted the lost connection, and it came back
    assert got_b["disconnects"] >= 1, got_b
    assert got_b["received"] > before_cut + 1


# -- the peers (run in the namespaces) -------------------------------------------------------


def _report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def _publish(address: str, subscribers: int, replay: bool) -> None:
    from wirebus import MsgspecCodec
    from wirebus.transport import ZmqMessagePublisher

    stop = stdin_says_stop()
    codec = MsgspecCodec(Tick, topic="tick")
    publisher = ZmqMessagePublisher(
        codec, address, heartbeat=HEARTBEAT_MS, replay=100_000 if replay else 0
    )
    _report(address=publisher.address)
    await publisher.wait_for_subscribers(subscribers, timeout=30)
    _report(publishing=True)
    seq = 0
    while not stop.is_set():  # about 4000 items/s, in bursts of 20
        for _ in range(20):
            publisher.publish(Tick(seq))
            seq += 1
        _report(published=seq - 1)
        await asyncio.sleep(0.005)  # pacing the load, not synchronisation
    await publisher.flush(timeout=10)
    _report(final=seq - 1)
    await publisher.aclose(timeout=5)


async def _subscribe(address: str, recover: bool) -> None:
    from wirebus import MsgspecCodec
    from wirebus.transport import ZmqMessageSubscriber

    stop = stdin_says_stop()

    class Checker(ZmqMessageSubscriber[Tick]):
        last = -1
        ordered = True
        contiguous = True

        async def process(self, items: list[Tick]) -> None:
            for item in items:
                self.ordered = self.ordered and item.seq > self.last
                self.contiguous = self.contiguous and item.seq == self.last + 1
                self.last = item.seq

    codec = MsgspecCodec(Tick, topic="tick")
    async with Checker(codec, address, heartbeat=HEARTBEAT_MS, recover=recover) as subscriber:

        def status() -> None:
            stats = subscriber.stats
            _report(
                received=stats.received,
                dropped=stats.dropped,
                recovered=stats.recovered,
                last=subscriber.last,
                ordered=subscriber.ordered,
                contiguous=subscriber.contiguous,
                disconnects=stats.disconnects,
            )

        while not stop.is_set():
            status()
            await asyncio.sleep(0.02)  # the reporting period
        status()


if __name__ == "__main__":
    role, peer_address, *rest = sys.argv[1:]
    if role == "publish":
        asyncio.run(_publish(peer_address, int(rest[0]), rest[1] == "replay"))
    else:
        asyncio.run(_subscribe(peer_address, rest[0] == "replay"))
