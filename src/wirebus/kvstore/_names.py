"""Key names: a name, optionally with labels, written one canonical way.

``key("requests", {"model": "a", "api": "chat"})`` and ``key('requests{model="a",api="chat"}')``
are both ``'requests{api="chat",model="a"}'``: the Prometheus form with the labels sorted and
their values escaped. That string is the key in the store (at most 255 bytes of UTF-8), and the
exporter splits it back into a metric name and a label set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from wirebus.kvstore._layout import MAX_KEY_BYTES

Labels = tuple[tuple[str, str], ...]

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)', re.DOTALL)
_UNESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def key(name: object, labels: Mapping[str, str] | None = None) -> str:
    """The canonical key of ``name`` with ``labels`` (merged with any in ``name``'s ``{}``).

    ``TypeError`` for a name that is not a ``str`` or a label value that is not one;
    ``ValueError`` for an empty name, bad label syntax or names, or a label given twice.
    """
    if not isinstance(name, str):
        raise TypeError(f"key name must be a str, got {type(name).__name__}: {name!r}")
    if not labels and not name.endswith("}"):
        return name
    base, found = split(name, strict=True)
    merged = dict(found)
    for label, value in (labels or {}).items():
        if not isinstance(label, str) or not _LABEL_NAME.fullmatch(label):
            raise ValueError(f"key {name!r}: label name {label!r} is not [a-zA-Z_][a-zA-Z0-9_]*")
        if not isinstance(value, str):
            raise TypeError(
                f"key {name!r}: label {label!r} has a {type(value).__name__} value {value!r}, "
                "not a str"
            )
        if label in merged:
            raise ValueError(f"key {name!r}: label {label!r} is given twice")
        merged[label] = value
    return join(base, tuple(sorted(merged.items())))


def join(base: str, labels: Labels) -> str:
    """``base{name="value",...}`` with values escaped as Prometheus does; ``base`` alone."""
    if not labels:
        return base
    return base + "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels) + "}"


def escape(value: str) -> str:
    """A label value escaped for the Prometheus text format."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def split(name: str, *, strict: bool = False) -> tuple[str, Labels]:
    """``(base, labels)`` of a key. A name not in the ``base{...}`` form is all base, unless
    ``strict`` and it ends with ``}``: then bad label syntax is a ``ValueError``."""
    brace = name.find("{")
    if brace <= 0 or not name.endswith("}"):
        if strict and name.endswith("}"):
            raise ValueError(f"key {name!r} ends with '}}' but has no name before its labels")
        return name, ()
    body = name[brace + 1 : -1]
    labels: list[tuple[str, str]] = []
    at = 0
    while at < len(body):
        match = _LABEL.match(body, at)
        if match is None or match.end() == at:
            if strict:
                raise ValueError(f"key {name!r}: cannot read labels from {body[at:]!r}")
            return name, ()
        value = re.sub(r"\\.", lambda m: _UNESCAPES.get(m.group(), m.group()), match.group(2))
        labels.append((match.group(1), value))
        at = match.end()
    names = [label for label, _ in labels]
    if len(set(names)) != len(names):
        if strict:
            raise ValueError(f"key {name!r}: a label is given twice")
        return name, ()
    return name[:brace], tuple(sorted(labels))


def encode(key: str) -> bytes:
    """The key in UTF-8, checked: not empty, encodable, at most 255 bytes."""
    if not key:
        raise ValueError("key name must not be empty")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"key name {key!r} is not valid UTF-8 (lone surrogate)") from None
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError(
            f"key name {key!r} is {len(raw)} bytes in UTF-8, longer than {MAX_KEY_BYTES}"
        )
    return raw
