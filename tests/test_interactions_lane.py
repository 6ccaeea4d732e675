"""The fast lane, measured with real processes: the Procfile's own worker lines (on the test's
app, tests/apps/lane.py) drain a backlog of 20,000 MESSAGE_CREATE whose handler takes 500 ms,
while interactions come from the simulator through `python -m ingest`; each must start its
handler within 1 s of the gateway's receipt (Discord gives 3 s to answer).
"""

from __future__ import annotations

import asyncio
import shlex
import statistics
import sys
import time
import uuid

import orjson
import pytest
import redis

from ingest.messages import build_event_message
from ingest.publish import RedisPublisher
from ingest.testing import SimulatorThread
from ingest.testing.simulator import sample_message_create
from tests.support import ROOT, Proc, base_env, gateway_process, redis_url
from tests.test_interactions import interaction_payload

REDIS_DB = 15  # this file's own database on the shared Redis (see conftest)
BACKLOG = 20_000
INTERACTIONS = 50
APP = "tests.apps.lane"


def procfile_worker(line_name: str, env: dict[str, str]) -> Proc:
    """The Procfile's ``line_name`` process as written, on the test's app."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() != line_name:
            continue
        words = shlex.split(command)
        while "=" in words[0]:  # leading VAR=value assignments
            key, _, value = words.pop(0).partition("=")
            env = {**env, key: value}
        assert words[:2] == ["celery", "-A"] and words[2] == "tasks", line
        words = [sys.executable, "-m", "celery", "-A", APP, *words[3:]]
        # One node name per run: other checkouts may run this test at the same time.
        words = [w.replace("@%h", f"-{uuid.uuid4().hex[:8]}@%h") for w in words]
        return Proc(line_name, words, env)
    raise AssertionError(f"no {line_name}: line in the Procfile")


async def _enqueue_backlog(url: str) -> None:
    publisher = RedisPublisher(url)
    await publisher.connect()
    try:
        data = orjson.dumps(sample_message_create(0))
        batch = []
        for sequence in range(1, BACKLOG + 1):
            batch.append(
                build_event_message(
                    "MESSAGE_CREATE",
                    data,
                    shard_id=0,
                    sequence=sequence,
                    session_id="backlog",
                    received_at=time.time(),
                )
            )
            if len(batch) == 1000:
                await publisher.publish(batch)
                batch = []
        await publisher.publish(batch)
    finally:
        await publisher.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_interactions_start_within_1s_behind_a_backlog_of_slow_messages() -> None:
    broker = redis_url(REDIS_DB)
    client = redis.Redis.from_url(broker)
    client.flushdb()
    prefix = f"{uuid.uuid4().hex}:"
    # The backlog is in the broker before any worker starts, as after a burst.
    asyncio.run(_enqueue_backlog(broker))
    assert client.llen("discord.MESSAGE_CREATE") == BACKLOG
    with SimulatorThread(port=0) as sim:
        env = base_env(
            INGEST_CELERY_APP=APP,
            DISCORD_TOKEN="sim-token",
            DISCORD_GATEWAY_URL=sim.url,
            DISCORD_API_URL=sim.api_url,
            CELERY_BROKER_URL=broker,
            LANE_URL=broker,
            LANE_PREFIX=prefix,
            LANE_SLOW_SECONDS="0.5",
        )
        workers = [procfile_worker("worker", env), procfile_worker("interactions", env)]
        gateway = gateway_process(env)
        try:
            gateway.wait_for_line("all 1 shards ready", timeout=30)
            for worker in workers:
                worker.wait_for_line("ready", timeout=30)
            # The general worker is busy with the backlog: every pool process and prefetch.
            deadline = time.monotonic() + 30
            while client.get(f"{prefix}messages") is None and time.monotonic() < deadline:
                time.sleep(0.05)
            sim.emit_many(
                "INTERACTION_CREATE",
                lambda i: interaction_payload("lane", 10**9 + i),
                INTERACTIONS,
                rate=10,  # one every 100 ms
            )
            deadline = time.monotonic() + 30
            while (
                client.hlen(f"{prefix}interactions") < INTERACTIONS and time.monotonic() < deadline
            ):
                time.sleep(0.05)
            started = client.hgetall(f"{prefix}interactions")
            still_queued = client.llen("discord.MESSAGE_CREATE")
        finally:
            gateway.kill()
            for worker in workers:
                worker.kill()
            client.close()

    assert len(started) == INTERACTIONS, workers[1].text()[-3000:]
    ages = sorted(
        float(start) - float(received)
        for received, start in (value.decode().split() for value in started.values())
    )
    p50, p99 = statistics.median(ages), ages[int(0.99 * (len(ages) - 1))]
    print(
        f"\nmeasured: {INTERACTIONS} interactions behind {still_queued} queued MESSAGE_CREATE "
        f"(500 ms each): receipt -> handler start p50 {p50 * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {ages[-1] * 1000:.1f} ms"
    )
    assert still_queued > BACKLOG // 2  # the backlog really was there throughout
    assert ages[-1] < 1.0
    assert p99 <= 0.25
