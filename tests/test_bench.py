"""The benchmark's smoke run: ``python -m bench --quick --json`` completes and moves every event.

Structure and counts only: timings on a shared two-core machine are not something a test can
assert on.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT, base_env, require_broker

pytestmark = [pytest.mark.redis, pytest.mark.rabbitmq]

ROW_KEYS = {
    "pipeline",
    "broker",
    "events",
    "delivered",
    "events_per_s",
    "p50_ms",
    "p99_ms",
    "peak_rss_mb",
    "cpu_seconds",
    "error",
}


@pytest.mark.timeout(120)
def test_quick_benchmark_moves_every_event_for_each_pipeline_and_broker() -> None:
    require_broker("redis")
    require_broker("rabbitmq")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json"],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)

    rows = {(r["pipeline"], r["broker"]): r for r in report["results"]}
    assert set(rows) == {
        ("ours", "redis"),
        ("naive", "redis"),
        ("ours", "rabbitmq"),
        ("ours", "embedded"),
    }
    for key, row in rows.items():
        assert set(row) >= ROW_KEYS, key
        assert row["error"] is None, (key, row["error"])
        assert row["delivered"] == row["events"] == report["options"]["events"], key
        assert row["latency_delivered"] == row["latency_events"] > 0, key
        assert row["events_per_s"] > 0 and row["p50_ms"] is not None, key
        assert row["peak_rss_mb"] > 0 and row["cpu_seconds"] > 0, key

    bursts = {b["broker"]: b for b in report["bursts"]}
    assert set(bursts) == {"redis", "rabbitmq", "embedded"}
    for broker, burst in bursts.items():
        assert burst["error"] is None, (broker, burst["error"])
        assert burst["delivered"] == burst["payloads"] == report["options"]["burst"], broker

    assert report["ratio_ours_over_naive"] > 0
    assert set(report["targets"]) == {
        "redis_events_per_s",
        "ratio_vs_naive",
        "p99_ms_at_rate",
        "rabbitmq_events_per_s",
        "burst_seconds",
    }
