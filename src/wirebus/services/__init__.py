"""Reference services built on wirebus, each runnable with ``python -m``.

- :mod:`~wirebus.services.event_publisher`: the load side's helper that emits event records.
- :mod:`~wirebus.services.event_logger`: writes every event as a JSON line.
- :mod:`~wirebus.services.metrics_aggregator`: turns events into metrics in a KV store and
  publishes live :class:`~wirebus.services.metrics_aggregator.MetricsSnapshot` messages.

:func:`drain` is for any subscriber that must lose nothing when its service stops.
"""

from wirebus.services._base import drain as drain

__all__ = ["drain"]
