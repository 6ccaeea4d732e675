"""Many handlers per event: each runs once per event, in registration order, and one that fails
or retries never re-runs or stops the others; the gateway publishes one message per event plus
one per handler with a queue of its own. Pinned with a stock worker (a real process on a real
Redis) and in eager mode, with the test's own app (tests/handler_app), not the shipped tasks/.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson
import pytest
import redis
from celery import Celery
from celery._state import _task_stack

from ingest.fanout import FanoutPublisher, fan_out
from ingest.handlers import (
    EventDispatcher,
    current_event,
    event_handler,
    handlers_of,
    published_tasks,
    queues_for,
)
from ingest.messages import TaskMessage, build_event_message, handler_task_id
from ingest.models import MessageCreate
from ingest.publish import EagerPublisher, RedisPublisher
from ingest.testing.simulator import sample_message_create
from tests.handler_app import app as handler_app
from tests.handler_app.audit import HEAVY_QUEUE, index
from tests.support import RABBITMQ_URL, base_env, redis_url, worker_process

REDIS_DB = 8  # this file's own database on the shared Redis (see conftest)
SESSION = "feedfacefeedfacefeedfacefeedface"
EVENTS = 1000


def _content(i: int) -> str:
    # Every 10th message makes ``flaky`` fail once; every 100th makes ``audit`` .delay() a task.
    if i % 100 == 0:
        return f"notify {i}"
    return f"flaky {i}" if i % 10 == 0 else f"hello {i}"


def _messages(count: int) -> list[TaskMessage]:
    """The gateway's messages for ``count`` MESSAGE_CREATEs, sequences 1..count."""
    messages = []
    for i in range(count):
        payload = sample_message_create(i)
        payload["content"] = _content(i)
        messages.append(
            build_event_message(
                "MESSAGE_CREATE",
                orjson.dumps(payload),
                shard_id=0,
                sequence=i + 1,
                session_id=SESSION,
            )
        )
    return messages


def _ids(count: int) -> list[int]:
    return [int(sample_message_create(i)["id"]) for i in range(count)]


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def record(redis_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    """The Redis db of this file (broker and record store), flushed, with a fresh prefix."""
    url = redis_url(REDIS_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    monkeypatch.setenv("HANDLER_RECORD_URL", url)
    monkeypatch.setenv("HANDLER_RECORD_PREFIX", f"{uuid.uuid4().hex[:8]}:")
    yield client
    client.flushdb()
    client.close()


def _assert_each_handler_ran_once_per_event(client: redis.Redis, prefix: str) -> None:
    ids = _ids(EVENTS)
    for handler in ("audit", "index", "flaky"):
        distinct = {int(m) for m in client.smembers(f"{prefix}{handler}")}
        assert distinct == set(ids), f"{handler}: {len(set(ids) - distinct)} events missing"
        # Exactly once: as many successful runs as distinct events.
        assert int(client.get(f"{prefix}{handler}:runs") or 0) == EVENTS, handler
    attempts = {int(k): int(v) for k, v in client.hgetall(f"{prefix}flaky:attempts").items()}
    flaky_ids = {ids[i] for i in range(EVENTS) if _content(i).startswith("flaky")}
    assert {i for i, n in attempts.items() if n == 2} == flaky_ids  # failed once, retried once
    assert {i for i, n in attempts.items() if n == 1} == set(ids) - flaky_ids
    # A retry, and the own-queue handler's message, carried the event's headers: each saw
    # the event's own sequence.
    for handler in ("flaky", "index"):
        recorded = client.hgetall(f"{prefix}{handler}:sequence")
        sequences = {int(k): int(v) for k, v in recorded.items()}
        assert sequences == {ids[i]: i + 1 for i in range(EVENTS)}, handler
    notified = {int(m) for m in client.smembers(f"{prefix}notified")}
    assert notified == {ids[i] for i in range(EVENTS) if _content(i).startswith("notify")}


# ------------------------------------------------------------------ a stock worker


@pytest.mark.redis
@pytest.mark.timeout(240)
def test_a_stock_worker_runs_every_handler_once_per_event_while_one_retries(
    record: redis.Redis,
) -> None:
    url = redis_url(REDIS_DB)
    prefix = os.environ["HANDLER_RECORD_PREFIX"]

    async def publish() -> None:
        # What the gateway process does: the event messages, fanned out to the tasks the app
        # asked for (the heavy handler's own queue), in one publish per batch.
        publisher = fan_out(RedisPublisher(url), published_tasks(handler_app))
        assert isinstance(publisher, FanoutPublisher)
        await publisher.connect()
        messages = _messages(EVENTS)
        for start in range(0, len(messages), 500):
            await publisher.publish(messages[start : start + 500])
        await publisher.close()

    asyncio.run(publish())
    assert record.llen("discord.MESSAGE_CREATE") == EVENTS  # one message per event ...
    assert record.llen(HEAVY_QUEUE) == EVENTS  # ... plus one for the handler with its own queue

    env = base_env(
        CELERY_BROKER_URL=url,
        HANDLER_RECORD_URL=url,
        HANDLER_RECORD_PREFIX=prefix,
        INGEST_LOG_LEVEL="INFO",
    )
    worker = worker_process(env, app="tests.handler_app", concurrency=4)  # no -Q: every queue
    try:
        started = time.monotonic()
        _wait(
            lambda: (
                all(record.scard(f"{prefix}{h}") == EVENTS for h in ("audit", "index", "flaky"))
                and record.scard(f"{prefix}notified") == EVENTS // 100
            ),
            180,
            "every handler to see every event",
        )
        elapsed = time.monotonic() - started
    except AssertionError:
        worker.stop()
        raise AssertionError(worker.text()[-4000:]) from None
    worker.stop()
    print(f"\nstock worker: {EVENTS} events x 3 handlers (+retries) in {elapsed:.1f} s")
    _assert_each_handler_ran_once_per_event(record, prefix)
    assert "handler discord.MESSAGE_CREATE:tests.handler_app.flaky.flaky retrying" in worker.text()


# ------------------------------------------------------------------ eager mode


@pytest.fixture
def eager_handler_app() -> Iterator[Celery]:
    handler_app.conf.task_always_eager = True
    handler_app.conf.task_eager_propagates = True
    yield handler_app
    handler_app.conf.task_always_eager = False
    handler_app.conf.task_eager_propagates = False


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_eager_mode_runs_every_handler_once_per_event_while_one_retries(
    record: redis.Redis, eager_handler_app: Celery
) -> None:
    prefix = os.environ["HANDLER_RECORD_PREFIX"]
    # The eager publisher is what a test's gateway uses: the event task runs every handler,
    # the own-queue one included, and Celery's eager retry re-runs only the flaky one.
    asyncio.run(EagerPublisher(eager_handler_app, propagate=True).publish(_messages(EVENTS)))
    _assert_each_handler_ran_once_per_event(record, prefix)
    first = [m.decode() for m in record.lrange(f"{prefix}order", 0, 1)]
    # Registration order: modules as tasks/ imports them (alphabetically), then in the file.
    assert first == [f"audit:{_ids(1)[0]}", f"flaky:{_ids(1)[0]}"]


def test_the_gateway_publishes_one_message_per_event_plus_one_per_own_queue_handler() -> None:
    assert [h.task_name.rsplit(".", 1)[1] for h in handlers_of(handler_app, "MESSAGE_CREATE")] == [
        "audit",
        "index",
        "flaky",
    ]
    assert published_tasks(handler_app) == {
        "MESSAGE_CREATE": (
            ("discord.MESSAGE_CREATE", "discord.MESSAGE_CREATE"),
            (index.name, HEAVY_QUEUE),
        )
    }
    [event_message] = _messages(1)
    sent: list[TaskMessage] = []

    class Recording:
        async def connect(self) -> None: ...

        async def declare(self, queues: Any) -> None: ...

        async def publish(self, messages: Sequence[TaskMessage]) -> None:
            sent.extend(messages)

        async def ping(self) -> bool:
            return True

        async def close(self) -> None: ...

    asyncio.run(fan_out(Recording(), published_tasks(handler_app)).publish([event_message]))
    dispatcher, own = sent
    assert dispatcher is event_message
    assert (own.task_name, own.queue) == (index.name, HEAVY_QUEUE)
    assert own.task_id == handler_task_id(event_message.task_id, index.name)
    assert own.body == event_message.body
    assert own.headers["task"] == index.name
    assert {k: v for k, v in own.headers.items() if k.startswith("discord_")} == {
        k: v for k, v in event_message.headers.items() if k.startswith("discord_")
    }
    # The eager publisher's event task runs every handler itself: no copies for it.
    eager = EagerPublisher(handler_app)
    assert fan_out(eager, published_tasks(handler_app)) is eager


def test_a_worker_without_q_consumes_every_queue_celerys_default_included() -> None:
    assert [q.name for q in queues_for(handler_app)] == [
        "discord.MESSAGE_CREATE",
        HEAVY_QUEUE,
        "discord.invalid",
        "celery",
    ]


# ------------------------------------------------------------------ order and isolation

order_app = Celery("order", set_as_current=False)
order_on = event_handler(order_app)
ran: list[str] = []


@order_on("MESSAGE_CREATE")
def first(message: MessageCreate) -> None:
    ran.append(f"first {current_event().sequence}")


@order_on("MESSAGE_CREATE")
def boom(message: MessageCreate) -> None:
    ran.append("boom")
    raise ValueError("boom")


@order_on("MESSAGE_CREATE")
def last(message: dict[str, Any]) -> None:  # not a model: gets the payload as sent
    ran.append(f"last {type(message).__name__}")


@pytest.fixture
def eager_order() -> Iterator[Celery]:
    ran.clear()
    order_app.conf.task_always_eager = True
    yield order_app
    order_app.conf.task_always_eager = False
    order_app.conf.task_eager_propagates = False


def test_handlers_run_in_registration_order_and_a_failure_stops_none_of_them(
    eager_order: Celery,
) -> None:
    event_task = order_app.tasks["discord.MESSAGE_CREATE"]
    before = EventDispatcher.handler_failures[boom.name]
    event_task.apply(args=[sample_message_create(1)], headers={"discord_sequence": 7})
    assert ran == ["first 7", "boom", "last dict"]
    assert EventDispatcher.handler_failures[boom.name] - before == 1
    # With task_eager_propagates the failure reaches the test, after every handler ran.
    ran.clear()
    order_app.conf.task_eager_propagates = True
    with pytest.raises(ValueError, match="boom"):
        event_task.delay(sample_message_create(2))
    assert ran == ["first None", "boom", "last dict"]


def test_a_handler_is_still_a_plain_function() -> None:
    ran.clear()
    payload = sample_message_create(3)
    first(MessageCreate.model_validate(payload))
    first(payload)
    with pytest.raises(ValueError):
        boom(payload)
    assert ran == ["first None", "first None", "boom"]


# ------------------------------------------------------------------ dedupe per handler


def _as_worker_delivers(task: Any, message: TaskMessage, *, redelivered: bool) -> None:
    """Run ``message`` through ``task`` as a worker's tracer does: its request, then __call__."""
    args, kwargs, _ = orjson.loads(message.body)
    headers = {k: v for k, v in message.headers.items() if k.startswith("discord_")}
    _task_stack.push(task)
    task.push_request(
        id=message.task_id,
        task=task.name,
        args=args,
        kwargs=kwargs,
        called_directly=False,
        headers=headers,
        delivery_info={"exchange": "", "routing_key": message.queue, "redelivered": redelivered},
    )
    try:
        task(*args, **kwargs)
    finally:
        task.pop_request()
        _task_stack.pop()


@pytest.mark.redis
@pytest.mark.timeout(20)
def test_dedupe_skips_completed_handlers_of_a_redelivered_event(
    record: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    dedupe_app = Celery("dedupe_per_handler", set_as_current=False)
    dedupe_app.conf.ingest_dedupe = True
    dedupe_app.conf.ingest_dedupe_url = redis_url(REDIS_DB)
    dedupe_on = event_handler(dedupe_app)
    runs: list[str] = []

    @dedupe_on("MESSAGE_CREATE")
    def one(message: MessageCreate) -> None:
        runs.append("one")

    @dedupe_on("MESSAGE_CREATE")
    def two(message: MessageCreate) -> None:
        runs.append("two")

    [message] = _messages(1)
    event_task = dedupe_app.tasks["discord.MESSAGE_CREATE"]
    _as_worker_delivers(event_task, message, redelivered=False)
    assert runs == ["one", "two"]
    # A worker lost after both ran: the broker hands the whole message back.
    _as_worker_delivers(event_task, message, redelivered=True)
    # The gateway replays the event after a resume: same task id.
    _as_worker_delivers(event_task, message, redelivered=False)
    assert runs == ["one", "two"]
    # A lost worker mid-handler: ``two`` claimed but never finished; its redelivery runs it.
    record.set(f"ingest:dedupe:{handler_task_id(message.task_id, two.name)}", b"1")
    record.delete(f"ingest:dedupe:{handler_task_id(message.task_id, one.name)}")
    record.set(f"ingest:dedupe:{handler_task_id(message.task_id, one.name)}", b"done")
    _as_worker_delivers(event_task, message, redelivered=True)
    assert runs == ["one", "two", "two"]


class Transient(Exception):
    pass


@pytest.mark.redis
@pytest.mark.timeout(20)
def test_dedupe_remembers_an_event_whose_handler_succeeded_on_a_retry(
    record: redis.Redis,
) -> None:
    dedupe_app = Celery("dedupe_retry", set_as_current=False)
    dedupe_app.conf.ingest_dedupe = True
    dedupe_app.conf.ingest_dedupe_url = redis_url(REDIS_DB)
    attempts: list[int] = []
    succeeded: list[int] = []

    @event_handler(dedupe_app)("MESSAGE_CREATE", autoretry_for=(Transient,))
    def fails_once(message: MessageCreate) -> None:
        attempts.append(message.id)
        if len(attempts) == 1:
            raise Transient
        succeeded.append(message.id)

    [message] = _messages(1)
    publisher = EagerPublisher(dedupe_app, propagate=True)
    asyncio.run(publisher.publish([message]))  # fails, retried eagerly, succeeds
    asyncio.run(publisher.publish([message]))  # a replay of the same event
    assert len(attempts) == 2
    assert len(succeeded) == 1


# ------------------------------------------------------------------ worker boot


@pytest.mark.timeout(60)
def test_a_worker_with_dedupe_and_no_redis_for_it_refuses_to_start() -> None:
    env = base_env(CELERY_BROKER_URL=RABBITMQ_URL, INGEST_DEDUPE="1")
    worker = worker_process(env, app="tests.handler_app", concurrency=1)
    try:
        code = worker.popen.wait(timeout=45)
    finally:
        worker.kill()
    output = worker.output()
    assert code == 2, worker.text()
    problems = [line for line in output if "INGEST_DEDUPE" in line]
    assert problems == [
        "discord-ingest worker: INGEST_DEDUPE needs a Redis: the broker is not Redis, "
        "set INGEST_DEDUPE_URL"
    ]
    assert "Traceback" not in worker.text()


# ------------------------------------------------------------------ per-message options

options_app = Celery("options", set_as_current=False)
options_on = event_handler(options_app)


@options_on("MESSAGE_CREATE")
def plain(message: MessageCreate) -> None:
    pass


@options_on("MESSAGE_CREATE", time_limit=5)
def bounded(message: MessageCreate) -> None:
    pass


@options_on("MESSAGE_CREATE", autoretry_for=(ValueError,), max_retries=None)
def never_gives_up(message: MessageCreate) -> None:
    raise ValueError("still failing")


def test_a_handler_with_a_per_message_option_gets_a_message_of_its_own() -> None:
    # A time limit only holds for a message the worker runs; inline in the dispatcher it would
    # silently not apply (and hold up every later handler of the event).
    assert published_tasks(options_app)["MESSAGE_CREATE"] == (
        ("discord.MESSAGE_CREATE", "discord.MESSAGE_CREATE"),
        (bounded.name, "discord.MESSAGE_CREATE"),
    )


def test_eager_mode_ends_a_handler_that_retries_for_ever() -> None:
    options_app.conf.task_always_eager = True
    options_app.conf.task_eager_propagates = True
    try:
        with pytest.raises(ValueError, match="still failing"):
            options_app.tasks["discord.MESSAGE_CREATE"].delay(sample_message_create(1))
    finally:
        options_app.conf.task_always_eager = False
        options_app.conf.task_eager_propagates = False
