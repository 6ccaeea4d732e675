"""Counters of the gateway process, cheap on the hot path and scrapeable by Prometheus.

The hot path bumps plain dict counters and one histogram bucket; a custom collector turns them
into Prometheus metric families only when scraped, so counting costs nothing like a labelled
``Counter.inc()``. Readings that live elsewhere (per-shard sequences, queue depths) are read
at scrape time through callables.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

from ingest.brokers import is_redis_url, sync_redis

log = logging.getLogger("ingest.metrics")

# Receipt-to-broker-acceptance latency buckets (seconds): a batch normally lands in a few ms;
# the top buckets are for broker trouble.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# How long a scrape may wait for the broker's queue lengths.
QUEUE_DEPTH_TIMEOUT: Final = 1.0

ShardReader = Callable[[], list[dict[str, Any]]]
QueueDepthReader = Callable[[], Mapping[str, int]]


def cumulative_buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, int]]:
    """Prometheus histogram buckets (upper bound, cumulative count) from per-bucket counts; the
    last count is the +Inf bucket's."""
    cumulative, buckets = 0, []
    for bound, count in zip((*(repr(b) for b in bounds), "+Inf"), counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return buckets


class Metrics:
    def __init__(self) -> None:
        self.events_received: Counter[str] = Counter()
        self.events_published: Counter[str] = Counter()
        self.events_dropped: Counter[str] = Counter()
        self.events_invalid: Counter[str] = Counter()
        self.events_shed = 0
        self.batches = 0
        self.batch_messages = 0
        self.broker_available = True
        # Histogram of publish latency: counts per bucket (the last one is +Inf), sum, count.
        self.publish_latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.publish_latency_sum = 0.0
        self.publish_latency_count = 0
        # The last 10,000 latencies, for exact recent quantiles (the benchmark reads them).
        self.publish_latencies: deque[float] = deque(maxlen=10_000)
        self.reconnects: Counter[str] = Counter()
        self.resumes: Counter[str] = Counter()
        # Per-shard (reconnects by cause, resumes by cause), read at scrape time.
        self.cause_readers: list[Callable[[], list[tuple[Counter[str], Counter[str]]]]] = []
        self.sessions_lost = 0
        # Per-shard readings, filled in by whoever owns the shards.
        self.shard_readers: list[ShardReader] = []
        self.queue_depths: QueueDepthReader | None = None
        self.identify_budget_remaining: int | None = None
        # (events, bytes) held for the broker, read at scrape time from the pipeline.
        self.buffered: Callable[[], tuple[int, int]] | None = None
        # Other collectors of the process (e.g. gateway commands), scraped with these.
        self.collectors: list[Any] = []

    # -- hot path ------------------------------------------------------------------------------

    def received(self, event: str) -> None:
        self.events_received[event] += 1

    def dropped(self, event: str) -> None:
        self.events_dropped[event] += 1

    def invalid(self, event: str) -> None:
        self.events_invalid[event] += 1

    def published(self, event: str, latency: float) -> None:
        self.events_published[event] += 1
        self.publish_latency_buckets[bisect_left(LATENCY_BUCKETS, latency)] += 1
        self.publish_latency_sum += latency
        self.publish_latency_count += 1
        self.publish_latencies.append(latency)

    def batch(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.batch_messages += size

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
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        from ingest.logs import suppressed_warnings

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
        yield HistogramMetricFamily(
            "discord_ingest_publish_latency_seconds",
            "Receipt of a dispatch to the broker accepting its task",
            buckets=cumulative_buckets(LATENCY_BUCKETS, self.publish_latency_buckets),
            sum_value=self.publish_latency_sum,
        )
        recent = GaugeMetricFamily(
            "discord_ingest_publish_latency_recent_seconds",
            "Publish latency quantiles over the last 10,000 events",
            labels=["quantile"],
        )
        window = sorted(self.publish_latencies)
        if window:
            for q in (0.5, 0.9, 0.99):
                recent.add_metric([str(q)], window[min(len(window) - 1, int(q * len(window)))])
        yield recent
        yield CounterMetricFamily(
            "discord_ingest_publish_batches", "Batches the broker accepted", value=self.batches
        )
        yield GaugeMetricFamily(
            "discord_ingest_broker_up",
            "1 while the broker accepts events",
            value=1 if self.broker_available else 0,
        )
        reconnects, resumes = Counter(self.reconnects), Counter(self.resumes)
        for reader in self.cause_readers:
            for shard_reconnects, shard_resumes in reader():
                reconnects.update(shard_reconnects)
                resumes.update(shard_resumes)
        for name, counts, help_text in (
            ("discord_ingest_reconnects", reconnects, "Reconnects by cause"),
            ("discord_ingest_resumes", resumes, "Resumed sessions by the cause of the reconnect"),
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
        yield from _shard_families(self.shards())
        if self.buffered is not None:
            events, size = self.buffered()
            yield GaugeMetricFamily(
                "discord_ingest_buffered_events",
                "Events held for the broker (INGEST_MAX_BUFFERED_EVENTS bounds it)",
                value=events,
            )
            yield GaugeMetricFamily(
                "discord_ingest_buffered_bytes",
                "Task bytes held for the broker (INGEST_MAX_BUFFERED_BYTES bounds it)",
                value=size,
            )
        if self.identify_budget_remaining is not None:
            yield GaugeMetricFamily(
                "discord_ingest_identify_budget_remaining",
                "session_start_limit.remaining at start",
                value=self.identify_budget_remaining,
            )
        for collector in self.collectors:
            yield from collector.collect()
        yield CounterMetricFamily(
            "discord_ingest_log_warnings_suppressed",
            "Repeated warnings counted instead of logged (rate limit)",
            value=suppressed_warnings(),
        )
        if self.queue_depths is not None:
            depth = GaugeMetricFamily(
                "discord_ingest_queue_depth",
                "Messages waiting in the broker, per queue (read at scrape time)",
                labels=["queue"],
            )
            try:
                depths = self.queue_depths()
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail for the broker
                log.debug("queue depths unavailable: %r", exc)
            else:
                for queue, count in sorted(depths.items()):
                    depth.add_metric([queue], count)
            yield depth


_SHARD_GAUGES: Final = (
    ("received_sequence", "Highest sequence received"),
    ("committed_sequence", "Highest sequence the broker holds, with all before it"),
    ("heartbeat_latency_seconds", "Last heartbeat round trip"),
    ("closes_before_ready", "Connections in a row closed before READY (token? intents?)"),
)
_SHARD_COUNTERS: Final = (
    ("reconnects", "Connections lost or replaced, per shard"),
    ("resumes", "Sessions resumed, per shard"),
    ("rejected", "Frames the session could not use, per shard"),
)


def _shard_families(rows: list[dict[str, Any]]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    for key, help_text in _SHARD_GAUGES:
        family = GaugeMetricFamily(f"discord_ingest_shard_{key}", help_text, labels=["shard"])
        for row in rows:
            if row.get(key) is not None:
                family.add_metric([str(row["shard_id"])], float(row[key]))
        yield family
    for key, help_text in _SHARD_COUNTERS:
        present = [row for row in rows if row.get(key) is not None]
        if present:
            counter = CounterMetricFamily(
                f"discord_ingest_shard_{key}", help_text, labels=["shard"]
            )
            for row in present:
                counter.add_metric([str(row["shard_id"])], float(row[key]))
            yield counter


def redis_queue_depths(
    url: str, queues: Iterable[str], timeout: float = QUEUE_DEPTH_TIMEOUT
) -> QueueDepthReader | None:
    """A reader of LLEN per queue on the Redis broker at ``url``; None for other brokers.

    The scrape thread calls it, so it is synchronous and bounded by ``timeout``.
    """
    if not is_redis_url(url):
        return None

    names = sorted(set(queues))
    client = sync_redis(url, timeout=timeout)

    def read() -> Mapping[str, int]:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.llen(name)
        return dict(zip(names, (int(n) for n in pipe.execute()), strict=True))

    return read


def serve_metrics(
    metrics: Metrics,
    port: int,
    host: str = "0.0.0.0",
    *,
    queue_depths: QueueDepthReader | None = None,
) -> int:
    """Expose ``metrics`` on ``/metrics``; returns the bound port (``0`` picks a free one)."""
    from prometheus_client import CollectorRegistry, start_http_server

    if queue_depths is not None:
        metrics.queue_depths = queue_depths
    registry = CollectorRegistry()
    registry.register(metrics)  # type: ignore[arg-type,unused-ignore]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound: int = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
