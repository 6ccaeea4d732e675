"""The whole product with real processes: simulator -> `python -m ingest` -> broker -> a stock
`celery worker` -> handler, on Redis, RabbitMQ and the embedded broker. The handlers are the
suite's own (tests.apps.recorder), which record every run in Redis."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ingest.brokers import embedded_url, redis_py_url
from ingest.testing import SimulatorThread
from ingest.testing.simulator import sample_message_create, sample_typing_start
from tests.support import (
    RABBITMQ_URL,
    REDIS_HOST,
    REDIS_PORT,
    Record,
    base_env,
    gateway_process,
    redis_url,
    require_broker,
    short_tempdir,
    worker_process,
)

EVENTS = 1000
REDIS_DB = 11
RABBIT_URL = RABBITMQ_URL
QUEUES = ("discord.MESSAGE_CREATE", "discord.GUILD_CREATE", "discord.invalid")


def _broker_env(kind: str, data_dir: Path) -> dict[str, str]:
    if kind == "redis":
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
        client.flushdb()
        client.close()
        return {"CELERY_BROKER_URL": redis_url(REDIS_DB)}
    if kind == "rabbitmq":
        from kombu import Connection

        with Connection(RABBIT_URL) as conn:
            channel = conn.channel()
            for queue in (*QUEUES, "discord.TYPING_START"):
                with contextlib.suppress(Exception):
                    channel.queue_purge(queue)
        return {"CELERY_BROKER_URL": RABBIT_URL}
    return {}  # embedded: nothing configured


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with short_tempdir() as path:
        yield path
        from ingest.brokers import stop_embedded_broker

        stop_embedded_broker(path)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "broker",
    [
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
        "embedded",
    ],
)
def test_every_event_reaches_its_handler_once_with_its_metadata(
    broker: str, data_dir: Path, request: pytest.FixtureRequest
) -> None:
    require_broker(broker)
    if broker == "embedded":
        # No server to rely on: the record lives in the embedded broker itself.
        record = Record(redis_py_url(embedded_url(data_dir)), f"{uuid.uuid4().hex}:")
    else:
        record = request.getfixturevalue("record")
    with SimulatorThread() as sim:
        env = base_env(
            DISCORD_TOKEN="sim-token",
            DISCORD_GATEWAY_URL=sim.url,
            DISCORD_API_URL=sim.api_url,
            INGEST_DATA_DIR=str(data_dir),
            **_broker_env(broker, data_dir),
            **record.env(),
        )
        worker = worker_process(env)
        gateway = gateway_process(env)
        try:
            gateway.wait_for_line("all 1 shards ready", timeout=30)
            expected = {int(sample_message_create(i)["id"]) for i in range(EVENTS)}
            sim.emit_many("MESSAGE_CREATE", sample_message_create, EVENTS)
            # No handler for TYPING_START: counted and dropped, never queued.
            sim.emit("TYPING_START", sample_typing_start(1))
            # A MESSAGE_CREATE without channel_id fails validation: dead-lettered with why.
            broken = sample_message_create(EVENTS + 1)
            del broken["channel_id"]
            sim.emit("MESSAGE_CREATE", broken)
            record.wait_handled(expected, 120, worker, gateway)
            worker.wait_for_line("dead letter: MESSAGE_CREATE failed validation", timeout=30)
            assert gateway.stop() == 0
        finally:
            gateway.kill()
            worker.stop()

    runs = record.runs()
    deliveries = record.deliveries()
    assert set(runs) == expected
    assert set(runs.values()) == {1}, "a message was handled twice"
    assert len(deliveries) == EVENTS and len({d.task_id for d in deliveries}) == EVENTS
    assert {d.shard_id for d in deliveries} == {0}
    # READY is sequence 1; the messages follow it in order.
    assert sorted(d.sequence or 0 for d in deliveries) == list(range(2, EVENTS + 2))
    dead = [line for line in worker.output() if "dead letter:" in line]
    assert len(dead) == 1 and "channel_id" in dead[0]
    assert "TYPING_START" not in worker.text()
    stopped = [line for line in gateway.output() if "stopped:" in line]
    # READY, the messages, TYPING_START and the broken one; READY and TYPING_START have no
    # handler in the app.
    assert stopped and f"{EVENTS + 3} received, {EVENTS} published" in stopped[0]
    assert "2 dropped" in stopped[0] and "1 invalid" in stopped[0]
    print(f"\n{broker}: emitted {EVENTS}, handled {len(runs)}; gateway: {stopped[0]}")
    if broker == "redis":
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
        assert client.exists("discord.TYPING_START") == 0
        client.close()
    if broker == "embedded":
        record.close()
