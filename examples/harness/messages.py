"""The harness's own messages: three types on one socket, told apart by a tag."""

from __future__ import annotations

import msgspec

from wirebus import MsgspecCodec, make_topic


class Request(msgspec.Struct, tag="request", frozen=True):
    """A prompt sent to the model under test."""

    uuid: str
    prompt: str
    max_tokens: int


class Response(msgspec.Struct, tag="response", frozen=True):
    """What the model answered."""

    uuid: str
    text: str
    n_tokens: int


class Done(msgspec.Struct, tag="done", frozen=True):
    """The last message of a run: whoever reads it has everything published before it."""

    requests: int


HarnessMessage = Request | Response | Done

# One topic per type, so that a subscriber can take only the types it wants.
TOPICS: dict[type[HarnessMessage], bytes] = {
    Request: make_topic("request"),
    Response: make_topic("response"),
    Done: make_topic("done"),
}

CODEC: MsgspecCodec[HarnessMessage] = MsgspecCodec(
    HarnessMessage, topic=lambda message: TOPICS[type(message)]
)
