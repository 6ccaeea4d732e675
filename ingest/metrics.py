"""Counters of the gateway process, cheap on the hot path and scrapeable by Prometheus.

The hot path bumps plain dict counters; a custom collector turns them into Prometheus metric
families only when scraped, so counting costs nothing like a labelled ``Counter.inc()``.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("ingest.metrics")


class Metrics:
    def __init__(self) -> None:
        self.events_received: Counter[str] = Counter()
        self.events_published: Counter[str] = Counter()
        self.events_dropped: Counter[str] = Counter()
        self.events_invalid: Counter[str] = Counter()
        self.events_shed = 0
        self.batches = 0
        self.broker_available = True
        self.publish_latencies: deque[float] = deque(maxlen=10_000)
        self.publish_latency_sum = 0.0
        self.reconnects: Counter[str] = Counter()
        self.resumes: Counter[str] = Counter()
        self.sessions_lost = 0
        # Per-shard readings, filled in by whoever owns the shards.
        self.shard_readers: list[Callable[[], list[dict[str, Any]]]] = []
        self.identify_budget_remaining: int | None = None

    # -- hot path ------------------------------------------------------------------------------

    def received(self, event: str) -> None:
        self.events_received[event] += 1

    def dropped(self, event: str) -> None:
        self.events_dropped[event] += 1

    def invalid(self, event: str) -> None:
        self.events_invalid[event] += 1

    def published(self, event: str, latency: float) -> None:
        self.events_published[event] += 1
        self.publish_latencies.append(latency)
        self.publish_latency_sum += latency

    def batch(self, size: int, seconds: float) -> None:
        self.batches += 1

    def shed(self, count: int) -> None:
        self.events_shed += count

    def broker_up(self, up: bool) -> None:
        self.broker_available = up

    def reconnected(self, cause: str) -> None:
        self.reconnects[cause] += 1

    def resumed(self, cause: str) -> None:
        self.resumes[cause] += 1

    # -- readings ------------------------------------------------------------------------------

    def shards(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for reader in self.shard_readers:
            rows.extend(reader())
        return rows

    def summary(self) -> dict[str, Any]:
        return {
            "received": sum(self.events_received.values()),
            "published": sum(self.events_published.values()),
            "dropped": sum(self.events_dropped.values()),
            "invalid": sum(self.events_invalid.values()),
            "shed": self.events_shed,
        }

    def collect(self) -> Iterator[Any]:
        """The Prometheus collector protocol: metric families built at scrape time."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, counts, help_text in (
            ("discord_ingest_events_received", self.events_received, "Dispatches received"),
            ("discord_ingest_events_published", self.events_published, "Tasks accepted by broker"),
            ("discord_ingest_events_dropped", self.events_dropped, "Dispatches with no handler"),
            ("discord_ingest_events_invalid", self.events_invalid, "Payloads dead-lettered"),
        ):
            counter = CounterMetricFamily(name, help_text, labels=["event"])
            for event, count in sorted(counts.items()):
                counter.add_metric([event], count)
            yield counter
        yield CounterMetricFamily(
            "discord_ingest_events_shed",
            "Uncommitted events dropped in a broker outage (replayed by Discord)",
            value=self.events_shed,
        )
        latency = GaugeMetricFamily(
            "discord_ingest_publish_latency_seconds",
            "Receipt to broker acceptance, recent quantiles",
            labels=["quantile"],
        )
        recent = sorted(self.publish_latencies)
        for q in (0.5, 0.99):
            if recent:
                latency.add_metric([str(q)], recent[min(len(recent) - 1, int(q * len(recent)))])
        yield latency
        yield GaugeMetricFamily(
            "discord_ingest_broker_up",
            "1 while the broker accepts events",
            value=1 if self.broker_available else 0,
        )
        for name, counts, help_text in (
            ("discord_ingest_reconnects", self.reconnects, "Reconnects by cause"),
            ("discord_ingest_resumes", self.resumes, "Resumed sessions by cause"),
        ):
            causes = CounterMetricFamily(name, help_text, labels=["cause"])
            for cause, count in sorted(counts.items()):
                causes.add_metric([cause], count)
            yield causes
        yield CounterMetricFamily(
            "discord_ingest_sessions_lost",
            "Sessions Discord would not resume",
            value=self.sessions_lost,
        )
        shards = self.shards()
        for key, help_text in (
            ("received_sequence", "Highest sequence received"),
            ("committed_sequence", "Highest sequence the broker holds, with all before it"),
            ("heartbeat_latency_seconds", "Last heartbeat round trip"),
        ):
            family = GaugeMetricFamily(f"discord_ingest_shard_{key}", help_text, labels=["shard"])
            for row in shards:
                if row.get(key) is not None:
                    family.add_metric([str(row["shard_id"])], float(row[key]))
            yield family
        if self.identify_budget_remaining is not None:
            yield GaugeMetricFamily(
                "discord_ingest_identify_budget_remaining",
                "session_start_limit.remaining at start",
                value=self.identify_budget_remaining,
            )


def serve_metrics(metrics: Metrics, port: int, host: str = "0.0.0.0") -> int:
    """Expose ``metrics`` on ``/metrics``; returns the bound port (``0`` picks a free one)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(metrics)  # type: ignore[arg-type,unused-ignore]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound: int = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
