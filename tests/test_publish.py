"""Publishers return only once the broker accepted every message, and fail fast and clearly
(``BrokerUnavailable``) when it cannot: Redis, RabbitMQ with confirms, embedded, eager."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiormq
import orjson
import pamqp.frame
import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange, Queue
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from ingest.brokers import (
    broker_url_from_env,
    ensure_embedded_broker,
    redis_py_url,
    stop_embedded_broker,
)
from ingest.errors import BrokerUnavailable, ConfigError
from ingest.handlers import current_event, event_handler
from ingest.messages import TaskMessage, build_dead_letter_message, build_event_message
from ingest.models import MessageCreate
from ingest.publish import (
    AmqpPublisher,
    EagerPublisher,
    Publisher,
    RedisPublisher,
    _content_frames,
    publisher_for,
)
from ingest.testing.processes import free_port
from ingest.testing.simulator import sample_message_create
from tests.brokers import PrivateRabbitMQ, rabbitmq_available
from tests.support import ROOT, short_tempdir

REDIS_DB = 7  # this file's own database on the shared Redis (see conftest)
SESSION = "feedfacefeedfacefeedfacefeedface"


def _messages(event: str, count: int, shard_id: int = 0) -> list[TaskMessage]:
    return [
        build_event_message(
            event,
            orjson.dumps({"i": i, "pad": "x" * 900}),
            shard_id=shard_id,
            sequence=i,
            session_id=SESSION,
        )
        for i in range(count)
    ]


# ------------------------------------------------------------------------------------ Redis


@pytest.fixture
def redis_db(redis_server: str, unique_event: str) -> Iterator[str]:
    url = f"{redis_server}/{REDIS_DB}"
    yield url
    client = redis.Redis.from_url(url)
    client.delete(f"discord.{unique_event}", f"state:{unique_event}")
    client.close()


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_redis_batch_lands_in_order_in_one_transaction_with_extra_commands(
    redis_db: str, unique_event: str
) -> None:
    queue = f"discord.{unique_event}"
    messages = _messages(unique_event, 1200)
    publisher = RedisPublisher(
        redis_db, extra_commands=lambda pipe: pipe.hset(f"state:{unique_event}", "seq", 1199)
    )

    async def run() -> None:
        await publisher.connect()
        assert await publisher.ping()
        for start in range(0, len(messages), 500):
            await publisher.publish(messages[start : start + 500])
        await publisher.close()

    asyncio.run(run())
    client = redis.Redis.from_url(redis_db)
    try:
        assert client.llen(queue) == 1200
        # The worker BRPOPs: the right end must be the first message published.
        first = orjson.loads(client.lindex(queue, -1) or b"")
        assert first["headers"]["id"] == messages[0].task_id
        last = orjson.loads(client.lindex(queue, 0) or b"")
        assert last["headers"]["id"] == messages[-1].task_id
        assert client.hget(f"state:{unique_event}", "seq") == b"1199"
    finally:
        client.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "make, bound",
    [
        (lambda port: RedisPublisher(f"redis://127.0.0.1:{port}/0", timeout=1.0), 10),
        (lambda port: AmqpPublisher(f"amqp://guest:guest@127.0.0.1:{port}//", timeout=2.0), 15),
    ],
    ids=["redis", "amqp"],
)
def test_broker_down_raises_broker_unavailable_without_hanging(
    make: Callable[[int], Publisher], bound: float
) -> None:
    publisher = make(free_port())

    async def run() -> None:
        assert not await publisher.ping()
        with pytest.raises(BrokerUnavailable):
            await publisher.connect()
        with pytest.raises(BrokerUnavailable):
            await publisher.publish(_messages("MESSAGE_CREATE", 3))
        await publisher.close()

    started = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - started < bound


def test_kombu_socket_urls_translate_to_redis_py() -> None:
    assert redis_py_url("redis+socket:///tmp/x/broker.sock") == "unix:///tmp/x/broker.sock"
    assert redis_py_url("socket:///s.sock?virtual_host=2") == "unix:///s.sock?db=2"
    assert redis_py_url("redis://:pw@h:1/3") == "redis://:pw@h:1/3"


# ------------------------------------------------------------------------------------ RabbitMQ


@pytest.fixture
def amqp_queue(rabbitmq_url: str, unique_event: str) -> Iterator[str]:
    queue = f"discord.{unique_event}"
    yield queue

    async def delete() -> None:
        async with aiormq.connect(rabbitmq_url) as connection:
            channel = await connection.channel()
            await channel.queue_delete(queue)
            await channel.exchange_delete(queue)

    asyncio.run(delete())


async def _drain(url: str, queue: str) -> list[aiormq.abc.DeliveredMessage]:
    received = []
    async with aiormq.connect(url) as connection:
        channel = await connection.channel()
        while True:
            message = await channel.basic_get(queue, no_ack=True)
            if message.delivery_tag is None:
                return received
            received.append(message)


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
def test_amqp_confirmed_batch_is_all_in_the_queue_with_celery_properties(
    rabbitmq_url: str, amqp_queue: str, unique_event: str
) -> None:
    messages = _messages(unique_event, 1000, shard_id=5)
    publisher = AmqpPublisher(rabbitmq_url)

    async def run() -> list[aiormq.abc.DeliveredMessage]:
        await publisher.connect()
        assert publisher._bulk, "this aiormq lacks what the batch path needs: slow path"
        for start in range(0, len(messages), 500):
            await publisher.publish(messages[start : start + 500])
        assert await publisher.ping()
        await publisher.close()
        return await _drain(rabbitmq_url, amqp_queue)

    received = asyncio.run(run())
    assert [m.header.properties.correlation_id for m in received] == [m.task_id for m in messages]
    first = received[0].header.properties
    assert first.content_type == "application/json"
    assert first.content_encoding == "utf-8"
    assert first.delivery_mode == 2
    assert first.headers is not None
    assert first.headers["task"] == f"discord.{unique_event}"
    assert first.headers["discord_shard_id"] == 5
    assert received[0].body == messages[0].body


@pytest.mark.parametrize("size", [10, 1500, 5000])
@pytest.mark.parametrize("frame_payload_max", [131064, 1000, 100])
def test_amqp_frames_are_what_pamqp_marshals(size: int, frame_payload_max: int) -> None:
    """The hand-spliced content header + body frames equal pamqp's, body split at frame_max."""
    messages = [
        build_event_message(
            "MESSAGE_CREATE",
            orjson.dumps({"x": "y" * size}),
            shard_id=7,
            sequence=99_999,
            session_id=SESSION,
        ),
        build_dead_letter_message(
            reason="r", raw=b"x" * size, event=None, shard_id=1, sequence=None, session_id="s"
        ),
    ]
    for message in messages:
        properties = Basic.Properties(
            content_type="application/json",
            content_encoding="utf-8",
            headers=message.headers,
            delivery_mode=2,
            correlation_id=message.task_id,
            reply_to="",
            message_id="mid.1",
        )
        expected = pamqp.frame.marshal(ContentHeader(0, len(message.body), properties), 3)
        body = message.body
        for start in range(0, len(body), frame_payload_max):
            piece = body[start : start + frame_payload_max]
            expected += pamqp.frame.marshal(ContentBody(piece), 3)
        assert _content_frames(message, "mid.1", 3, frame_payload_max) == expected


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
def test_amqp_body_larger_than_a_frame_arrives_whole(
    rabbitmq_url: str, amqp_queue: str, unique_event: str
) -> None:
    # A 50 KB GUILD_CREATE is common; 300 KB spans three frames at RabbitMQ's 128 KB frame_max.
    big = build_event_message(
        unique_event,
        orjson.dumps({"pad": "g" * 300_000}),
        shard_id=0,
        sequence=1,
        session_id=SESSION,
    )
    small = _messages(unique_event, 3)
    publisher = AmqpPublisher(rabbitmq_url)

    async def run() -> list[aiormq.abc.DeliveredMessage]:
        await publisher.publish([small[0], big, small[1]])
        await publisher.publish([small[2]])
        await publisher.close()
        return await _drain(rabbitmq_url, amqp_queue)

    received = asyncio.run(run())
    assert [m.body for m in received] == [small[0].body, big.body, small[1].body, small[2].body]


@pytest.mark.rabbitmq
@pytest.mark.timeout(30)
def test_amqp_queue_declaration_matches_what_kombu_declares(
    rabbitmq_url: str, amqp_queue: str
) -> None:
    asyncio.run(_declare(rabbitmq_url, amqp_queue))
    # The worker declares the same queue through kombu; any difference in flags or arguments
    # would be a PRECONDITION_FAILED channel error here.
    with Connection(rabbitmq_url) as conn:
        Queue(amqp_queue, Exchange(amqp_queue, type="direct"), routing_key=amqp_queue)(
            conn.channel()
        ).declare()


async def _declare(url: str, queue: str) -> None:
    publisher = AmqpPublisher(url)
    await publisher.declare([queue])
    await publisher.close()


@pytest.mark.rabbitmq
@pytest.mark.timeout(30)
def test_amqp_unroutable_message_is_an_error_not_a_silent_loss(
    rabbitmq_url: str, amqp_queue: str, unique_event: str
) -> None:
    publisher = AmqpPublisher(rabbitmq_url)

    async def run() -> None:
        await publisher.declare([amqp_queue])
        # The queue vanishes behind the publisher's back: the exchange now routes nowhere.
        async with aiormq.connect(rabbitmq_url) as connection:
            channel = await connection.channel()
            await channel.queue_delete(amqp_queue)
        with pytest.raises(BrokerUnavailable):
            await publisher.publish(_messages(unique_event, 3))
        # The failure reset the publisher: the next batch declares again and goes through.
        await publisher.publish(_messages(unique_event, 3))
        await publisher.close()

    asyncio.run(run())


@pytest.mark.timeout(240)
@pytest.mark.skipif(
    not rabbitmq_available() and not os.environ.get("CI"), reason="rabbitmq-server not installed"
)
def test_amqp_broker_stopped_mid_batch_fails_fast_then_resumes_keeping_every_confirmed_message(
    unique_event: str,
) -> None:
    # A private node: stop_app closes every connection mid-batch (the broker resets the socket
    # under frames and confirms in flight), the port goes away for a while, then start_app.
    broker = PrivateRabbitMQ()
    broker.start()
    try:
        outcome = asyncio.run(_publish_through_outage(broker, unique_event))
        received = asyncio.run(_drain(broker.url, f"discord.{unique_event}"))
    finally:
        broker.close()
    assert outcome.failures, "the outage never reached the publisher"
    # Never hangs: every call returned (or raised) within its timeout plus closing the old
    # connection, including the batch the broker died under.
    assert max(outcome.durations) < _OUTAGE_TIMEOUT + 2.0 + 1.5, max(outcome.durations)
    assert outcome.resumed_batches >= 3, "publishing did not resume after start_app"
    # Durable queue + delivery_mode 2 + confirms: what the broker confirmed survived the restart
    # (unconfirmed batches may be there too: the caller retries them, at-least-once).
    ids = {m.header.properties.correlation_id for m in received}
    missing = outcome.confirmed - ids
    assert not missing, f"{len(missing)} confirmed messages lost"


_OUTAGE_TIMEOUT = 3.0


class _Outcome:
    def __init__(self) -> None:
        self.confirmed: set[str] = set()
        self.durations: list[float] = []
        self.failures: list[BrokerUnavailable] = []
        self.resumed_batches = 0


async def _publish_through_outage(broker: PrivateRabbitMQ, event: str) -> _Outcome:
    outcome = _Outcome()
    publisher = AmqpPublisher(broker.url, timeout=_OUTAGE_TIMEOUT)
    await publisher.connect()
    sequence = 0

    async def one_batch() -> bool:
        nonlocal sequence
        batch = [
            build_event_message(
                event,
                orjson.dumps({"i": sequence + i, "pad": "x" * 300}),
                shard_id=0,
                sequence=sequence + i,
                session_id=SESSION,
            )
            for i in range(250)
        ]
        sequence += len(batch)
        started = time.monotonic()
        try:
            await publisher.publish(batch)
        except BrokerUnavailable as exc:  # anything else fails the test
            outcome.failures.append(exc)
            return False
        finally:
            outcome.durations.append(time.monotonic() - started)
        outcome.confirmed.update(m.task_id for m in batch)
        return True

    for _ in range(4):  # the broker takes batches before the outage
        assert await one_batch()
    stopping = asyncio.create_task(asyncio.to_thread(broker.stop_app))
    while not stopping.done():  # publishing continuously while the node goes down
        await one_batch()
    await stopping
    assert not await publisher.ping()
    for _ in range(3):  # down: refused at once, not after the timeout
        assert not await one_batch()
    await asyncio.to_thread(broker.start_app)
    deadline = time.monotonic() + 60
    while not await one_batch():
        assert time.monotonic() < deadline, "publishing did not resume after start_app"
        await asyncio.sleep(0.2)
    for _ in range(3):
        assert await one_batch()
        outcome.resumed_batches += 1
    assert await publisher.ping()
    await publisher.close()
    return outcome


# ------------------------------------------------------------------------------------ embedded


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with short_tempdir() as path:
        try:
            yield path
        finally:
            stop_embedded_broker(path)


@pytest.mark.timeout(60)
def test_embedded_broker_starts_once_for_many_processes_and_persists_what_it_accepts(
    data_dir: Path,
) -> None:
    starter = (
        "import sys; from ingest.brokers import ensure_embedded_broker; "
        "print(ensure_embedded_broker(sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", starter, str(data_dir)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    urls = {racer.communicate(timeout=30)[0].strip() for racer in racers}
    assert urls == {f"redis+socket://{data_dir.resolve()}/broker.sock"}
    url = urls.pop()
    pid = (data_dir / "broker.pid").read_text().strip()
    # Idempotent: a later call finds the running server instead of starting another.
    assert ensure_embedded_broker(data_dir) == url
    assert (data_dir / "broker.pid").read_text().strip() == pid
    assert broker_url_from_env({"INGEST_DATA_DIR": str(data_dir)}) == url

    publisher = publisher_for(url)
    assert isinstance(publisher, RedisPublisher)

    async def run() -> None:
        await publisher.connect()
        await publisher.publish(_messages("MESSAGE_CREATE", 10))
        await publisher.close()

    asyncio.run(run())
    client = redis.Redis.from_url(redis_py_url(url))
    try:
        assert client.llen("discord.MESSAGE_CREATE") == 10
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("port") == {"port": "0"}
    finally:
        client.close()


def test_broker_url_prefers_celery_broker_url_then_redis_url() -> None:
    env = {"CELERY_BROKER_URL": "amqp://a//", "REDIS_URL": "redis://b/0"}
    assert broker_url_from_env(env) == "amqp://a//"
    assert broker_url_from_env({"REDIS_URL": "redis://b/0"}) == "redis://b/0"


def test_publisher_for_picks_by_scheme() -> None:
    app = Celery("schemes", set_as_current=False)
    assert isinstance(publisher_for("redis://h/0"), RedisPublisher)
    assert isinstance(publisher_for("rediss://h/0"), RedisPublisher)
    assert isinstance(publisher_for("redis+socket:///tmp/s.sock"), RedisPublisher)
    assert isinstance(publisher_for("amqp://h//"), AmqpPublisher)
    assert isinstance(publisher_for("pyamqp://h//"), AmqpPublisher)
    assert isinstance(publisher_for("eager", app), EagerPublisher)
    with pytest.raises(ConfigError):
        publisher_for("eager")
    with pytest.raises(ConfigError):
        publisher_for("sqs://queue")


def test_publisher_repr_hides_the_broker_password() -> None:
    assert "s3cret" not in repr(RedisPublisher("redis://:s3cret@h:6379/0"))
    assert "s3cret" not in repr(AmqpPublisher("amqp://user:s3cret@h//"))


# ------------------------------------------------------------------------------------ eager


@pytest.mark.timeout(20)
def test_eager_publisher_runs_the_handler_inline_with_model_and_metadata() -> None:
    app = Celery("eager-publish", set_as_current=False)
    on = event_handler(app)
    seen: list[tuple[MessageCreate, int | None, int | None]] = []

    @on("MESSAGE_CREATE")
    def record(message: MessageCreate) -> None:
        event = current_event()
        seen.append((message, event.shard_id, event.sequence))

    @on("GUILD_DELETE")
    def broken(guild: object) -> None:
        raise RuntimeError("handler bug")

    payload = sample_message_create(3)
    message = build_event_message(
        "MESSAGE_CREATE", orjson.dumps(payload), shard_id=2, sequence=77, session_id=SESSION
    )
    failing = build_event_message(
        "GUILD_DELETE", b'{"id": "1"}', shard_id=0, sequence=78, session_id=SESSION
    )
    unhandled = build_event_message(
        "TYPING_START", b"{}", shard_id=0, sequence=79, session_id=SESSION
    )
    publisher = EagerPublisher(app)
    asyncio.run(publisher.publish([message, failing, unhandled]))

    assert len(seen) == 1
    model, shard_id, sequence = seen[0]
    assert isinstance(model, MessageCreate)
    assert model.id == int(payload["id"])
    assert (shard_id, sequence) == (2, 77)
    # Like a worker, a handler's failure is the handler's, not the publisher's.
    assert (publisher.failed, publisher.unhandled) == (1, 1)
    with pytest.raises(RuntimeError, match="handler bug"):
        asyncio.run(EagerPublisher(app, propagate=True).publish([failing]))
