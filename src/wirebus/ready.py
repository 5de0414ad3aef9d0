"""Ready-check: a started process tells its parent "I am up, and here is where to find me".

A ready signal is one single-frame message from a PUSH socket (the service) to a PULL socket
(the parent): the msgpack map of a :class:`ReadySignal` — ``identity``, ``pid``, ``info`` (what
the service wants the parent to know, e.g. the addresses it bound) and ``token``. A receiver made
with a token ignores signals carrying any other token, so a stale signal from an earlier run
never counts; made with one token per identity (what the launcher does), it also refuses a
signal that claims another party's identity. Unknown identities, wrong tokens and malformed
messages (any bytes, any nesting depth) are logged on the ``wirebus.ready`` logger and skipped.

Waiting never blocks the event loop: the receiver watches its socket's ``zmq.FD`` with
``loop.add_reader`` and drains to ``EAGAIN`` (the FD is edge-triggered).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import zmq

from wirebus._aio import positive_timeout, resolve
from wirebus._endpoint import bind, check_address, connect, new_ipc_address, remove_ipc_dir
from wirebus._resource import Resource
from wirebus.errors import ReadyTimeoutError

if TYPE_CHECKING:  # a service that only reports ready never loads asyncio on our account
    import asyncio

__all__ = [
    "READY_ADDRESS_ENV",
    "READY_TOKEN_ENV",
    "SERVICE_NAME_ENV",
    "ReadyCheckReceiver",
    "ReadySignal",
    "notify_ready",
    "send_ready_signal",
]

READY_ADDRESS_ENV = "WIREBUS_READY_ADDRESS"
"""Environment variable holding the address a launched service sends its ready signal to."""
SERVICE_NAME_ENV = "WIREBUS_SERVICE_NAME"
"""Environment variable holding a launched service's name (its ready-signal identity)."""
READY_TOKEN_ENV = "WIREBUS_READY_TOKEN"
"""Environment variable holding the per-launch token a launched service's signal must carry."""


def _warn(message: str, *args: object) -> None:
    """Log on the ``wirebus.ready`` logger (logging is imported when first needed: a service
    that only reports ready never loads it on our account)."""
    import logging

    logging.getLogger("wirebus.ready").warning(message, *args)


class ReadySignal(msgspec.Struct):
    """One "I am ready" message: who (``identity``, ``pid``), what it wants known (``info``)
    and the launch it belongs to (``token``)."""

    identity: str
    pid: int
    info: dict[str, Any] = msgspec.field(default_factory=dict)
    token: str = ""


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(ReadySignal)


def _expected_names(expected: int | Iterable[str]) -> tuple[frozenset[str] | None, int]:
    """Split ``expected`` into (the names to accept or None for anyone, how many to wait for)."""
    if isinstance(expected, bool):
        raise TypeError(f"expected must be a count or names, got {expected!r}")
    if isinstance(expected, int):
        if expected < 0:
            raise ValueError(f"expected count must be >= 0, got {expected!r}")
        return None, expected
    if isinstance(expected, (str, bytes)):
        raise TypeError(f"expected must be a count or an iterable of names, not {expected!r}")
    names = frozenset(expected)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"expected names must be non-empty str, got {name!r}")
    return names, len(names)


def _accept_signal(
    signal: ReadySignal, names: frozenset[str] | None, ready: dict[str, ReadySignal], where: str
) -> None:
    """Record ``signal`` in ``ready`` unless its identity is not one of ``names`` (logged)."""
    if names is not None and signal.identity not in names:
        _warn(
            "ignoring ready signal from unknown identity %r (pid %d) on %s; expecting %s",
            signal.identity,
            signal.pid,
            where,
            sorted(names),
        )
        return
    ready[signal.identity] = signal


class ReadyCheckReceiver(Resource):
    """A bound PULL socket that collects ready signals.

    ``address`` None binds a fresh ``ipc://`` endpoint in a private directory (removed on
    close); ``address`` tells the endpoint actually bound. With a ``token``, signals carrying any
    other token are ignored; with a mapping of identities to tokens, a signal counts only with
    the token of the identity it claims (and only for an identity in the mapping); with
    ``token=None`` every token is accepted. Without a ``context``
    the receiver uses a private one and terminates it on close, so every fd it opened is closed
    when :meth:`close` returns. Close it (or use it as a context manager, sync or async).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        context: zmq.Context[Any] | None = None,
        token: str | Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(token, Mapping):
            token = dict(token)
            if not all(isinstance(key, str) and isinstance(t, str) for key, t in token.items()):
                raise TypeError(f"tokens must map str identities to str tokens, got {token!r}")
        elif token is not None and not isinstance(token, str):
            raise TypeError(f"token must be a str, a mapping or None, got {token!r}")
        owned = address is None
        if address is None:
            address = new_ipc_address("ready")
        else:
            check_address(address, bind=True)
        own_context = context is None
        if context is None:
            context = zmq.Context()
        elif _is_asyncio_context(context):
            context = zmq.Context.shadow(context.underlying)
        try:
            sock: zmq.Socket[bytes] = context.socket(zmq.PULL)
            try:
                sock.setsockopt(zmq.LINGER, 0)
                bound = bind(sock, address)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            if own_context:
                context.term()
            if owned:
                remove_ipc_dir(address)
            raise
        self._context = context if own_context else None
        self.address = bound
        self.token: str | dict[str, str] | None = token
        self._sock = sock
        fd = sock.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self._fd = fd
        self._owned_address = address if owned else None
        self._pending: collections.deque[ReadySignal] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def owns_address(self) -> bool:
        """True when the receiver made its ``ipc://`` address (and removes its directory)."""
        return self._owned_address is not None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    async def receive(self, timeout: float) -> ReadySignal:
        """Return the next ready signal that carries this receiver's token.

        ``TimeoutError`` naming the address when none arrives within ``timeout`` seconds;
        ``RuntimeError`` when the receiver is (or gets) closed or another call is waiting.
        """
        import asyncio

        positive_timeout("timeout", timeout)
        if self._waiter is not None:
            raise RuntimeError(f"another receive() is already waiting on {self.address!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._drain()
            if self._pending:
                return self._pending.popleft()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no ready signal arrived on {self.address!r} in {timeout} s")
            await self._readable(loop, remaining)

    async def wait(self, expected: int | Iterable[str], timeout: float) -> dict[str, ReadySignal]:
        """Wait until ``expected`` parties are ready and return their signals by identity.

        ``expected`` is a count of distinct identities or the identities themselves (others
        are then logged and ignored). ``ReadyTimeoutError`` names who is still missing when
        ``timeout`` seconds pass first.
        """
        import asyncio

        names, count = _expected_names(expected)
        positive_timeout("timeout", timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ready: dict[str, ReadySignal] = {}
        while len(ready) < count:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                signal = await self.receive(remaining)
            except TimeoutError:
                raise self._timeout_error(names, count, ready, timeout) from None
            _accept_signal(signal, names, ready, self.address)
        return ready

    def _timeout_error(
        self,
        names: frozenset[str] | None,
        count: int,
        ready: dict[str, ReadySignal],
        timeout: float,
    ) -> ReadyTimeoutError:
        if names is None:
            return ReadyTimeoutError(
                f"{len(ready)} of {count} ready signals arrived on {self.address!r} in "
                f"{timeout} s (from {sorted(ready)})"
            )
        missing = sorted(names - ready.keys())
        return ReadyTimeoutError(
            f"not ready within {timeout} s on {self.address!r}: {missing} (ready: {sorted(ready)})",
            missing=missing,
        )

    async def _readable(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self._fd, resolve, waiter)
        timer = loop.call_later(timeout, resolve, waiter)
        self._waiter = waiter
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
            if not self._closed:
                loop.remove_reader(self._fd)

    def _drain(self) -> None:
        if self._closed:
            raise RuntimeError(f"ReadyCheckReceiver on {self.address!r} is closed")
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            signal = self._decode(frame)
            if signal is not None:
                self._pending.append(signal)

    def _decode(self, frame: bytes) -> ReadySignal | None:
        try:
            signal = _DECODER.decode(frame)
        except Exception as exc:  # any bytes: msgspec errors, RecursionError, MemoryError...
            _warn(
                "ignoring a malformed message of %d bytes on %s: %s: %.200s",
                len(frame),
                self.address,
                type(exc).__name__,
                exc,
            )
            return None
        expected = self.token
        if isinstance(expected, dict):
            expected = expected.get(signal.identity)
            if expected is None:
                _warn(
                    "ignoring ready signal from unknown identity %r (pid %d) on %s",
                    signal.identity,
                    signal.pid,
                    self.address,
                )
                return None
        if expected is not None and signal.token != expected:
            _warn(
                "ignoring ready signal from %r (pid %d) on %s: token %r is stale or not its own",
                signal.identity,
                signal.pid,
                self.address,
                signal.token,
            )
            return None
        return signal

    def close(self) -> None:
        """Close the socket and remove the ipc directory it made; idempotent.

        A :meth:`receive` or :meth:`wait` in progress raises ``RuntimeError``.
        """
        if self._closed:
            return
        self._closed = True
        waiter = self._waiter
        if waiter is not None:
            waiter.get_loop().remove_reader(self._fd)
            resolve(waiter)
        self._sock.close(linger=0)
        if self._context is not None:
            self._context.term()
        if self._owned_address is not None:
            remove_ipc_dir(self._owned_address)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ReadyCheckReceiver {self.address!r} {state}>"


def _is_asyncio_context(context: zmq.Context[Any]) -> bool:
    """True for a ``zmq.asyncio.Context`` (without importing zmq.asyncio, which pulls in asyncio
    machinery a service that only reports ready never needs)."""
    module = sys.modules.get("zmq.asyncio")
    return module is not None and isinstance(context, module.Context)


def _encode_signal(identity: str, info: Mapping[str, Any] | None, token: str) -> bytes:
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"identity must be a non-empty str, got {identity!r}")
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, got {token!r}")
    if info is not None and not isinstance(info, Mapping):
        raise TypeError(f"info must be a mapping, got {info!r}")
    signal = ReadySignal(identity, os.getpid(), dict(info or {}), token)
    try:
        payload = _ENCODER.encode(signal)
        _DECODER.decode(payload)
    except (TypeError, msgspec.MsgspecError) as exc:
        raise TypeError(f"info {info!r} is not a map of str to msgpack values: {exc}") from None
    return payload


def send_ready_signal(
    address: str,
    identity: str,
    info: Mapping[str, Any] | None = None,
    *,
    timeout: float = 5.0,
    token: str = "",
) -> None:
    """Send one ready signal to the receiver at ``address``, waiting for it up to ``timeout``.

    Returns once the signal has been handed to a connected receiver's socket. When nobody
    takes it within ``timeout`` seconds, ``TimeoutError`` names the address; the call never
    lingers past its timeout. ``info`` must map str keys to msgpack-encodable values.
    """
    check_address(address, bind=False)
    positive_timeout("timeout", timeout)
    payload = _encode_signal(identity, info, token)
    deadline = time.monotonic() + timeout
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = context.socket(zmq.PUSH)
        sent = False
        try:
            sock.setsockopt(zmq.IMMEDIATE, 1)
            connect(sock, address)
            if sock.poll(math.ceil(timeout * 1000), zmq.POLLOUT) & zmq.POLLOUT:
                with contextlib.suppress(zmq.Again):
                    sock.send(payload, zmq.NOBLOCK)
                    sent = True
            if not sent:
                raise TimeoutError(
                    f"nobody received the ready signal of {identity!r} at {address!r} "
                    f"within {timeout} s"
                )
        finally:
            remaining_ms = math.ceil((deadline - time.monotonic()) * 1000)
            sock.close(linger=max(1, remaining_ms) if sent else 0)
    finally:
        context.term()


class _Launch(NamedTuple):
    """What a launched process needs to report ready: where, as whom, with which token."""

    address: str
    identity: str
    token: str


_taken: _Launch | None = None


def _take_launch_env() -> _Launch | None:
    """Remove the launcher's variables from ``os.environ`` (so this process's own children do
    not take themselves for launched services) and keep them for :func:`notify_ready`."""
    global _taken
    address = os.environ.pop(READY_ADDRESS_ENV, "")
    identity = os.environ.pop(SERVICE_NAME_ENV, "")
    token = os.environ.pop(READY_TOKEN_ENV, "")
    if address and identity:
        _taken = _Launch(address, identity, token)
    return _taken


def notify_ready(info: Mapping[str, Any] | None = None, *, timeout: float = 5.0) -> None:
    """Tell the :class:`~wirebus.ServiceLauncher` that started this process that it is ready.

    Reads the address, identity and token from ``WIREBUS_READY_ADDRESS``,
    ``WIREBUS_SERVICE_NAME`` and ``WIREBUS_READY_TOKEN`` (inside :func:`~wirebus.run_service`,
    which takes them out of the environment, from what it took); a no-op when the process was
    not started by a launcher. See :func:`send_ready_signal`.
    """
    address = os.environ.get(READY_ADDRESS_ENV)
    identity = os.environ.get(SERVICE_NAME_ENV)
    if address and identity:
        token = os.environ.get(READY_TOKEN_ENV, "")
    elif _taken is not None:
        address, identity, token = _taken.address, _taken.identity, _taken.token
    else:
        return
    send_ready_signal(address, identity, info, timeout=timeout, token=token)
