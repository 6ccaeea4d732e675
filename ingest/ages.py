"""Receipt -> handler start, on the worker: how old each event was when its handler began.

The gateway stamps its receipt time on every task message (``discord_received_at_us``); each
handler start is observed here, per event type, as a histogram a Prometheus exporter reads.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any, Final

from ingest.metrics import cumulative_buckets

AGE_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 10.0, 60.0)


class StartAges:
    """Per event type: bucket counts (the last one +Inf), sum and count of ages in seconds."""

    def __init__(self) -> None:
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, event: str, age: float) -> None:
        counts = self.buckets.get(event)
        if counts is None:
            counts = self.buckets[event] = [0] * (len(AGE_BUCKETS) + 1)
            self.sums[event] = 0.0
        # On every handler start: a bisect, not a scan (le semantics: age == bound counts in).
        counts[bisect_left(AGE_BUCKETS, age)] += 1
        self.sums[event] += age

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(
            "discord_ingest_handler_start_age_seconds",
            "Gateway receipt to handler start, per event type",
            labels=["event"],
        )
        for event, counts in sorted(self.buckets.items()):
            family.add_metric([event], cumulative_buckets(AGE_BUCKETS, counts), self.sums[event])
        yield family


# This process's ages: register it as a Prometheus collector in a worker's exporter.
start_ages: Final = StartAges()
