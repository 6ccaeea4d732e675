"""How to test a handler: copy this file next to your own handlers.

1. Unit tests run in **eager mode**: with ``task_always_eager`` Celery runs ``.delay()`` /
   ``.apply()`` in this process, through the same pydantic validation a worker does, and
   ``task_eager_propagates`` turns a handler's exception into a test failure. No broker needed.
2. Integration tests run a **real worker** in a thread (``celery.contrib.testing.worker.
   start_worker``) against a real broker, fed exactly as the gateway feeds it.

The last section pins behaviours of ``ingest.handlers`` itself (dedupe, routing).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import orjson
import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from pydantic import ValidationError

from ingest.gateway import Gateway
from ingest.handlers import (
    EventContext,
    EventTask,
    current_event,
    event_handler,
    queues_for,
    subscribed_events,
)
from ingest.messages import build_event_message, handler_task_id
from ingest.models import GuildCreate, MessageCreate
from ingest.pipeline import Pipeline
from ingest.publish import EagerPublisher, RedisPublisher
from ingest.testing import GatewaySimulator
from ingest.testing.simulator import sample_guild_create, sample_message_create
from tests.support import redis_url

REDIS_DB = 6  # this file's own database on the shared Redis (see conftest)
SESSION = "cafebabecafebabecafebabecafebabe"

# The test's own Celery app and handlers, never the bot's shipped examples (a user deletes
# those); a bot's own tests would use its app and its handler modules. Give the app its broker up
# front: Celery keeps the first connection pool it makes, even in eager mode, and the default
# broker (amqp://localhost) would be the wrong one later.
app = Celery("handlers_example", broker=redis_url(REDIS_DB), set_as_current=False)
on = event_handler(app)
log = logging.getLogger("tests.handlers_example")

received: list[tuple[MessageCreate, EventContext]] = []
arrived = threading.Event()
joined: set[int] = set()


@on("MESSAGE_CREATE")
def log_message(message: MessageCreate) -> None:
    event = current_event()
    log.info(
        "message %s in channel %s by %s (shard %s, seq %s)",
        message.id,
        message.channel_id,
        message.author.username,
        event.shard_id,
        event.sequence,
    )


@on("MESSAGE_CREATE")
def remember(message: MessageCreate) -> None:
    received.append((message, current_event()))
    arrived.set()


@on("GUILD_CREATE")
def count_guild(guild: GuildCreate) -> None:
    if guild.unavailable:
        return  # an outage notice, not a join
    joined.add(guild.id)
    log.info("guild %s joined (%s)", guild.id, guild.name)


# Consume every handled event's queue (what the bot's app module does for its app).
app.conf.task_queues = queues_for(app)
# The event's own task: what the gateway publishes; it runs every handler of the event.
message_create = app.tasks["discord.MESSAGE_CREATE"]


# ------------------------------------------------------------------ 1. eager mode (no broker)


@pytest.fixture
def eager() -> Iterator[None]:
    """Run tasks in-process, and let a handler's exception fail the test."""
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    yield
    app.conf.task_always_eager = False
    app.conf.task_eager_propagates = False


@pytest.mark.timeout(10)
def test_log_message_logs_one_line_per_message(
    eager: None, caplog: pytest.LogCaptureFixture
) -> None:
    payload = sample_message_create(1)  # the ``d`` of a MESSAGE_CREATE, as Discord sends it
    with caplog.at_level(logging.INFO, logger=log.name):
        log_message.delay(payload)
    author = payload["author"]["username"]
    assert f"message {payload['id']} in channel {payload['channel_id']} by {author}" in caplog.text


@pytest.mark.timeout(10)
def test_gateway_metadata_reaches_the_handler(
    eager: None, caplog: pytest.LogCaptureFixture
) -> None:
    # The gateway sends shard, sequence and session as message headers; pass them the same way.
    headers = {"discord_shard_id": 3, "discord_sequence": 42, "discord_session_id": SESSION}
    with caplog.at_level(logging.INFO, logger=log.name):
        log_message.apply(args=[sample_message_create(2)], headers=headers)
    assert "(shard 3, seq 42)" in caplog.text


@pytest.mark.timeout(10)
def test_a_model_instance_works_as_the_argument_too(
    eager: None, caplog: pytest.LogCaptureFixture
) -> None:
    message = MessageCreate.model_validate(sample_message_create(3))
    with caplog.at_level(logging.INFO, logger=log.name):
        log_message.apply(args=[message.model_dump(mode="json")])
        log_message(message)  # or call it as the plain function it is: no Celery involved
    assert caplog.text.count(f"message {message.id} ") == 2


@pytest.mark.timeout(10)
def test_a_payload_that_is_not_a_message_is_refused(eager: None) -> None:
    with pytest.raises(ValidationError):
        log_message.delay({"id": "1", "content": "no author, no channel"})


@pytest.mark.timeout(10)
def test_guild_joins_are_counted(eager: None, caplog: pytest.LogCaptureFixture) -> None:
    guild = sample_guild_create(90, size_kb=2)
    with caplog.at_level(logging.INFO, logger=log.name):
        count_guild.delay(guild)
        count_guild.delay({"id": guild["id"], "unavailable": True})  # an outage, not a join
    assert caplog.text.count(f"guild {guild['id']} joined ({guild['name']})") == 1


@pytest.mark.timeout(10)
def test_the_event_task_runs_every_handler_of_the_event(
    eager: None, caplog: pytest.LogCaptureFixture
) -> None:
    received.clear()
    payload = sample_message_create(8)
    with caplog.at_level(logging.INFO, logger=log.name):
        message_create.delay(payload)
    assert f"message {payload['id']} " in caplog.text
    assert [model.id for model, _ in received] == [int(payload["id"])]


@pytest.fixture
def recorder() -> Iterator[list[tuple[MessageCreate, EventContext]]]:
    received.clear()
    arrived.clear()
    yield received
    app.conf.task_always_eager = False


@pytest.mark.timeout(10)
def test_the_handler_gets_a_validated_model_not_a_dict(
    recorder: list[tuple[MessageCreate, EventContext]],
) -> None:
    app.conf.task_always_eager = True
    payload = sample_message_create(4)
    remember.delay(payload)
    [(message, context)] = recorder
    assert isinstance(message, MessageCreate)
    assert message.id == int(payload["id"])  # snowflakes arrive as ints
    assert context.event == "MESSAGE_CREATE"


@pytest.mark.timeout(30)
def test_simulator_gateway_and_handler_in_one_process(
    recorder: list[tuple[MessageCreate, EventContext]],
) -> None:
    # The whole pipeline in this process, no broker: the bundled simulator plays Discord, a
    # Gateway validates and hands each dispatch to a Pipeline whose publisher runs the handler
    # task inline (``send_task`` would ignore eager mode; EagerPublisher does not).
    payloads = [sample_message_create(i) for i in range(3)]

    async def scenario() -> None:
        async with GatewaySimulator() as sim:
            pipeline = Pipeline(
                EagerPublisher(app, propagate=True),
                subscribed=subscribed_events(app),
            )
            gateway = Gateway("sim-token", gateway_url=sim.url, on_dispatch=pipeline.accept)
            pipeline.attach(gateway)
            running = asyncio.gather(gateway.run(), pipeline.run())
            await sim.wait_until(lambda: bool(sim.ready_shards()))
            for payload in payloads:
                await sim.emit("MESSAGE_CREATE", payload)
            await sim.wait_until(lambda: len(recorder) == len(payloads))
            await gateway.stop()
            await pipeline.drain(timeout=5)
            await running

    asyncio.run(scenario())
    assert [model.id for model, _ in recorder] == [int(p["id"]) for p in payloads]
    assert [context.sequence for _, context in recorder] == [2, 3, 4]  # READY was 1
    assert {context.shard_id for _, context in recorder} == {0}


@pytest.mark.timeout(10)
def test_a_gateway_message_runs_the_handler_inline_with_the_eager_publisher(
    recorder: list[tuple[MessageCreate, EventContext]],
) -> None:
    # What the gateway does with every dispatch, then the eager path instead of a broker.
    payload = sample_message_create(5)
    message = build_event_message(
        "MESSAGE_CREATE", orjson.dumps(payload), shard_id=1, sequence=9, session_id=SESSION
    )
    asyncio.run(EagerPublisher(app, propagate=True).publish([message]))
    [(model, context)] = recorder
    assert model.id == int(payload["id"])
    # task_id is the handler's own: derived from the event's, the same for a replay of it.
    own_id = handler_task_id(message.task_id, remember.name)
    assert context == EventContext("MESSAGE_CREATE", 1, 9, SESSION, own_id)


# ------------------------------------------------------------------ 2. a real worker


@pytest.fixture
def worker(redis_server: str, recorder: list[tuple[MessageCreate, EventContext]]) -> Iterator[str]:
    """A real worker in a thread, consuming every handled event's queue on a real Redis."""
    url = app.conf.broker_url
    client = redis.Redis.from_url(url)
    client.flushdb()
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        yield url
    client.flushdb()
    client.close()


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_a_real_worker_runs_what_the_gateway_publishes(
    worker: str, recorder: list[tuple[MessageCreate, EventContext]]
) -> None:
    payload = sample_message_create(6)
    message = build_event_message(
        "MESSAGE_CREATE", orjson.dumps(payload), shard_id=2, sequence=1234, session_id=SESSION
    )

    async def publish() -> None:
        publisher = RedisPublisher(worker)
        await publisher.publish([message])
        await publisher.close()

    asyncio.run(publish())
    assert arrived.wait(30), "the worker did not run the handler"
    [(model, context)] = recorder
    assert isinstance(model, MessageCreate)
    assert model.id == int(payload["id"])
    own_id = handler_task_id(message.task_id, remember.name)
    assert context == EventContext("MESSAGE_CREATE", 2, 1234, SESSION, own_id)


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_delay_routes_a_handler_to_its_event_queue(
    worker: str, recorder: list[tuple[MessageCreate, EventContext]]
) -> None:
    remember.delay(sample_message_create(7))
    assert arrived.wait(30), "the worker did not run the handler"
    [(model, context)] = recorder
    assert isinstance(model, MessageCreate)
    # Called by hand, not by the gateway: no shard or sequence to report.
    assert (context.event, context.shard_id, context.sequence) == ("MESSAGE_CREATE", None, None)


# ------------------------------------------------------------------ 3. ingest.handlers itself


def test_subscribed_events_and_queues_come_from_the_registered_handlers() -> None:
    assert subscribed_events(app) == {"MESSAGE_CREATE", "GUILD_CREATE"}
    assert [q.name for q in queues_for(app)] == [
        "discord.GUILD_CREATE",
        "discord.MESSAGE_CREATE",
        "discord.invalid",
        "celery",  # Celery's default queue: plain @app.task functions
    ]
    assert remember.name == "discord.MESSAGE_CREATE:tests.test_handlers.remember"
    for task in (message_create, remember):
        assert isinstance(task, EventTask)
        assert task.acks_late and task.reject_on_worker_lost


@pytest.mark.redis
@pytest.mark.timeout(20)
def test_dedupe_runs_a_replayed_task_id_once(
    redis_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    dedupe_app = Celery("dedupe", set_as_current=False)
    url = f"{redis_server}/{REDIS_DB}"
    dedupe_app.conf.ingest_dedupe = True
    dedupe_app.conf.ingest_dedupe_url = url
    ran: list[int] = []

    @event_handler(dedupe_app)("MESSAGE_CREATE")
    def handle(message: MessageCreate) -> None:
        ran.append(message.id)

    payloads = [sample_message_create(i) for i in (10, 11)]
    first, second = (
        build_event_message(
            "MESSAGE_CREATE", orjson.dumps(p), shard_id=0, sequence=i, session_id=SESSION
        )
        for i, p in enumerate(payloads)
    )
    client = redis.Redis.from_url(url)
    keys = [f"ingest:dedupe:{handler_task_id(m.task_id, handle.name)}" for m in (first, second)]
    client.delete(*keys)
    before = EventTask.duplicates_suppressed
    try:
        with caplog.at_level(logging.INFO, logger="ingest.handlers"):
            # A resumed session replays ``first``: same session, shard, sequence, so same id.
            asyncio.run(EagerPublisher(dedupe_app).publish([first, first, second, first]))
    finally:
        client.delete(*keys)
        client.close()
    assert ran == [int(payloads[0]["id"]), int(payloads[1]["id"])]
    assert EventTask.duplicates_suppressed - before == 2
    assert caplog.text.count("duplicate suppressed") == 2
