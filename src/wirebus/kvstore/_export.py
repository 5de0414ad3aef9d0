"""A store in the Prometheus text format (0.0.4).

Keys with labels (``name{k="v"}``) become samples of one metric family per name and kind.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from wirebus.kvstore import _names
from wirebus.kvstore._interface import SeriesSummary

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "series": ("", "_sum", "_count")}


def render_prometheus(
    snapshot: Mapping[str, float | SeriesSummary], kinds: Mapping[str, str], prefix: str = ""
) -> str:
    """The text format of a store's ``snapshot`` (``kinds``: key → counter, gauge or series).

    Counters become ``<name>_total`` counters, gauges gauges, and series summaries with the
    0.5, 0.9 and 0.99 quantiles plus ``_sum`` and ``_count`` (of the non-NaN values). Keys that
    differ only by labels are samples of one family. Names are ``prefix + name`` with every
    character outside ``[a-zA-Z0-9_:]`` replaced by ``_`` (and ``_`` put before a leading
    digit); families whose names collide get a ``_2``, ``_3``... suffix.
    """
    families: dict[tuple[str, str], list[tuple[_names.Labels, float | SeriesSummary]]] = {}
    for key, value in snapshot.items():
        base, labels = _names.split(key)
        families.setdefault((base, kinds[key]), []).append((labels, value))
    lines: list[str] = []
    used: set[str] = set()
    for (base, kind), samples in families.items():
        metric = _metric_name(prefix + base, kind, used)
        family = f"{metric}_total" if kind == "counter" else metric
        help_text = f"wirebus {kind} {base!r}".replace("\\", "\\\\")
        lines.append(f"# HELP {family} {help_text}")
        lines.append(f"# TYPE {family} {'summary' if kind == 'series' else kind}")
        for labels, value in samples:
            if isinstance(value, SeriesSummary):
                for q, v in (("0.5", value.p50), ("0.9", value.p90), ("0.99", value.p99)):
                    quantile = _names.join(metric, (*labels, ("quantile", q)))
                    lines.append(f"{quantile} {_number(v)}")
                lines.append(f"{_names.join(metric + '_sum', labels)} {_number(value.sum)}")
                count = value.count - value.nan_count
                lines.append(f"{_names.join(metric + '_count', labels)} {count}")
            else:
                lines.append(f"{_names.join(family, labels)} {_number(value)}")
    return "\n".join(lines) + "\n" if lines else ""


def _metric_name(name: str, kind: str, used: set[str]) -> str:
    base = _NAME_INVALID.sub("_", name)
    if not re.match(r"[a-zA-Z_:]", base):
        base = "_" + base
    if kind == "counter" and base.endswith("_total"):
        base = base[: -len("_total")]
    candidate, n = base, 1
    while any(candidate + s in used for s in _SUFFIXES[kind]) or candidate in used:
        n += 1
        candidate = f"{base}_{n}"
    used.update(candidate + s for s in _SUFFIXES[kind])
    used.add(candidate)
    return candidate


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
