"""Task messages built by ``ingest.messages`` are stock Celery protocol-2 messages: kombu decodes
them, and a stock ``celery worker`` (of the suite's recorder app) runs each with its shard and
sequence."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import Iterator

import orjson
import pytest
import redis
from celery import Celery
from kombu import Connection
from pamqp import encode as pamqp_encode

from ingest.messages import (
    TASK_ID_NAMESPACE,
    TaskMessage,
    amqp_header_table,
    build_dead_letter_message,
    build_event_message,
    redis_envelope,
    task_id_for,
    unique_ids,
)
from ingest.publish import AmqpPublisher, RedisPublisher
from ingest.routing import DEAD_LETTER_QUEUE, DEAD_LETTER_TASK
from ingest.testing.simulator import sample_guild_create, sample_message_create
from tests.support import Record, base_env, worker_process

REDIS_DB = 5  # this file's own database on the shared Redis (see conftest)
QUEUES = ("discord.MESSAGE_CREATE", "discord.GUILD_CREATE", DEAD_LETTER_QUEUE)
SESSION = "0123456789abcdef0123456789abcdef"


def test_task_id_is_uuid5_of_session_shard_and_sequence() -> None:
    expected = str(uuid.uuid5(TASK_ID_NAMESPACE, f"{SESSION}/3/1234"))
    assert task_id_for(SESSION, 3, 1234) == expected
    assert task_id_for(SESSION, 3, 1234) == task_id_for(SESSION, 3, 1234)
    assert task_id_for(SESSION, 3, 1235) != expected
    assert task_id_for(SESSION, 4, 1234) != expected
    assert task_id_for("other", 3, 1234) != expected


def test_task_id_matches_uuid5_across_sessions_shards_and_sequences() -> None:
    # task_id_for caches the hash of "<session>/<shard>/": the cache must not mix them up.
    for session in (SESSION, "other", ""):
        for shard in (0, 7, 1023):
            for sequence in (0, 1, 99, 2**40):
                name = f"{session}/{shard}/{sequence}"
                expected = str(uuid.uuid5(TASK_ID_NAMESPACE, name))
                assert task_id_for(session, shard, sequence) == expected


def test_task_id_includes_the_identify_epoch_so_a_reused_session_id_cannot_collide() -> None:
    # A server that reuses session ids and restarts sequences: a new IDENTIFY, a new epoch.
    expected = str(uuid.uuid5(TASK_ID_NAMESPACE, f"{SESSION}@e1/3/7"))
    assert task_id_for(SESSION, 3, 7, "e1") == expected
    assert task_id_for(SESSION, 3, 7, "e2") != expected
    # A replay within one IDENTIFY keeps its id; no epoch (a session stored by an older
    # version) keeps the old id, so replays across the upgrade are still recognised.
    assert task_id_for(SESSION, 3, 7, "e1") == expected
    assert task_id_for(SESSION, 3, 7) == str(uuid.uuid5(TASK_ID_NAMESPACE, f"{SESSION}/3/7"))
    message = build_event_message(
        "MESSAGE_CREATE", b"{}", shard_id=3, sequence=7, session_id=SESSION, epoch="e1"
    )
    assert message.task_id == expected
    assert message.headers["discord_session_id"] == SESSION  # handlers still see Discord's id
    dead = [
        build_dead_letter_message(
            reason="r", raw=b"{}", event="X", shard_id=3, sequence=7, session_id=SESSION, epoch=e
        ).task_id
        for e in ("e1", "e2")
    ]
    assert dead[0] != dead[1]


# Event names and session ids that would break naive splicing into JSON or AMQP tables.
_ODD = [
    ("MESSAGE_CREATE", SESSION, 3, 5),
    ('ODD"EVENT\\\u00e9', 'se"ss\u2603ion', 0, 10**12),
    ("GUILD_CREATE", "", 65535, 0),
    ("X", "s", 200, 40000),
]


@pytest.mark.parametrize(("event", "session", "shard", "sequence"), _ODD)
def test_spliced_redis_envelope_is_the_json_of_kombus_envelope(
    event: str, session: str, shard: int, sequence: int
) -> None:
    data = orjson.dumps({"d": 'x"\\\u0000'})
    message = build_event_message(
        event, data, shard_id=shard, sequence=sequence, session_id=session
    )
    envelope = orjson.loads(redis_envelope(message))
    tag = envelope["properties"].pop("delivery_tag")
    assert envelope == {
        "body": base64.b64encode(message.body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": message.headers,
        "properties": {
            "correlation_id": message.task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": message.queue},
            "priority": 0,
            "body_encoding": "base64",
        },
    }
    assert message.headers["argsrepr"] == f"[<{event} {len(data)} bytes>]"
    # A delivery tag is unique per delivery: the same message pushed twice gets two.
    assert orjson.loads(redis_envelope(message))["properties"]["delivery_tag"] != tag


@pytest.mark.parametrize(("event", "session", "shard", "sequence"), _ODD)
def test_spliced_amqp_header_table_is_what_pamqp_encodes(
    event: str, session: str, shard: int, sequence: int
) -> None:
    message = build_event_message(
        event, b"{}", shard_id=shard, sequence=sequence, session_id=session
    )
    assert amqp_header_table(message) == pamqp_encode.field_table(message.headers)
    dead = build_dead_letter_message(
        reason="r", raw=b"\xff", event=None, shard_id=1, sequence=None, session_id=session
    )
    assert amqp_header_table(dead) == pamqp_encode.field_table(dead.headers)


def test_unique_ids_differ_in_a_forked_child() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, unique_ids.next())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 200)
    os.close(read)
    parent = unique_ids.next()
    assert child.split(b".")[0] != parent.split(b".")[0]


def test_event_body_carries_the_payload_bytes_untouched() -> None:
    data = orjson.dumps(sample_message_create(1))
    message = build_event_message(
        "MESSAGE_CREATE", data, shard_id=2, sequence=7, session_id=SESSION
    )
    assert data in message.body
    args, kwargs, embed = orjson.loads(message.body)
    assert args == [orjson.loads(data)]
    assert kwargs == {}
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert (message.task_name, message.queue) == ("discord.MESSAGE_CREATE",) * 2
    assert message.task_id == task_id_for(SESSION, 2, 7)


def test_headers_are_celerys_protocol_2_headers_plus_ours() -> None:
    app = Celery("headers", set_as_current=False)
    celery_headers = app.amqp.as_task_v2("tid", "discord.MESSAGE_CREATE", args=[{}]).headers
    data = orjson.dumps(sample_message_create(1))
    message = build_event_message(
        "MESSAGE_CREATE", data, shard_id=2, sequence=7, session_id=SESSION
    )
    ours = {"discord_shard_id", "discord_sequence", "discord_session_id", "discord_event"}
    ours |= {"discord_received_at_us"}  # the gateway's receipt time (issue 14)
    assert set(message.headers) == set(celery_headers) | ours
    assert message.headers["task"] == "discord.MESSAGE_CREATE"
    assert message.headers["id"] == message.headers["root_id"] == message.task_id
    assert message.headers["discord_shard_id"] == 2
    assert message.headers["discord_sequence"] == 7
    assert message.headers["discord_session_id"] == SESSION
    assert message.headers["discord_event"] == "MESSAGE_CREATE"
    # The payload is ~1 KB; worker logs show argsrepr, which must not repeat it.
    assert len(message.headers["argsrepr"]) < 64


def test_dead_letter_keeps_reason_text_and_exact_bytes() -> None:
    garbage = b"\x78\x9c\xff\x00not json"
    message = build_dead_letter_message(
        reason="corrupt zlib stream",
        raw=garbage,
        event=None,
        shard_id=1,
        sequence=None,
        session_id=SESSION,
    )
    assert (message.task_name, message.queue) == (DEAD_LETTER_TASK, DEAD_LETTER_QUEUE)
    args, kwargs, _ = orjson.loads(message.body)
    assert args == []
    assert kwargs["reason"] == "corrupt zlib stream"
    assert "not json" in kwargs["raw"]
    assert base64.b64decode(kwargs["raw_base64"]) == garbage

    text = build_dead_letter_message(
        reason="bad",
        raw=b'{"t": 1}',
        event="MESSAGE_CREATE",
        shard_id=1,
        sequence=5,
        session_id=SESSION,
    )
    _, kwargs, _ = orjson.loads(text.body)
    assert kwargs["raw"] == '{"t": 1}' and kwargs["raw_base64"] is None
    # A replayed bad payload gets the same id, but never the id of a real event.
    assert text.task_id != task_id_for(SESSION, 1, 5)


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_redis_envelope_has_the_shape_kombu_pushes_and_kombu_decodes_it(
    redis_server: str, unique_event: str
) -> None:
    url = f"{redis_server}/{REDIS_DB}"
    queue = f"discord.{unique_event}"
    client = redis.Redis.from_url(url)
    try:
        # What kombu itself pushes for send_task, to compare shapes with.
        app = Celery("shape", broker=url, set_as_current=False)
        app.send_task(queue, args=[{}], queue=queue, task_id="reference")
        reference = orjson.loads(client.rpop(queue) or b"")
        ours = orjson.loads(
            redis_envelope(
                build_event_message(
                    unique_event, b'{"a":1}', shard_id=0, sequence=1, session_id=SESSION
                )
            )
        )
        assert set(ours) == set(reference)
        assert set(ours["properties"]) == set(reference["properties"])
        assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": queue}

        message = build_event_message(
            unique_event, b'{"a":1}', shard_id=4, sequence=9, session_id=SESSION
        )
        asyncio.run(_publish(RedisPublisher(url), [message]))
        with Connection(url) as conn:
            received = conn.SimpleQueue(queue).get(timeout=5)
            assert received.decode() == [[{"a": 1}], {}, orjson.loads(message.body)[2]]
            assert received.headers["id"] == message.task_id
            assert received.headers["discord_sequence"] == 9
            assert received.properties["correlation_id"] == message.task_id
            received.ack()
    finally:
        client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        client.close()


async def _publish(publisher: RedisPublisher | AmqpPublisher, messages: list[TaskMessage]) -> None:
    await publisher.connect()
    try:
        await publisher.publish(messages)
    finally:
        await publisher.close()


def _batch() -> tuple[list[TaskMessage], list[tuple[int, int, int]]]:
    # Expected: (message id, shard id, sequence) of each MESSAGE_CREATE.
    """20 MESSAGE_CREATE, 2 GUILD_CREATE and one dead letter, as the gateway would build them."""
    messages = []
    expected = []
    for i in range(20):
        payload = sample_message_create(i)
        messages.append(
            build_event_message(
                "MESSAGE_CREATE",
                orjson.dumps(payload),
                shard_id=i % 2,
                sequence=100 + i,
                session_id=SESSION,
            )
        )
        expected.append((int(payload["id"]), i % 2, 100 + i))
    for i in range(2):
        messages.append(
            build_event_message(
                "GUILD_CREATE",
                orjson.dumps(sample_guild_create(i)),
                shard_id=0,
                sequence=200 + i,
                session_id=SESSION,
            )
        )
    messages.append(
        build_dead_letter_message(
            reason="MESSAGE_CREATE failed validation: id: missing",
            raw=b'{"content": "no id"}',
            event="MESSAGE_CREATE",
            shard_id=1,
            sequence=300,
            session_id=SESSION,
        )
    )
    return messages, expected


@pytest.fixture
def clean_redis_db(redis_server: str) -> Iterator[str]:
    url = f"{redis_server}/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def purged_rabbitmq(rabbitmq_url: str) -> str:
    # The task queues are fixed names on the shared vhost: start from empty ones.
    with Connection(rabbitmq_url) as conn:
        channel = conn.channel()
        for queue in QUEUES:
            try:
                channel.queue_purge(queue)
            except Exception:  # noqa: BLE001 - a queue not declared yet is already empty
                channel = conn.channel()
    return rabbitmq_url


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "broker",
    [
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    ],
)
def test_stock_worker_runs_every_published_event_with_its_metadata(
    broker: str, request: pytest.FixtureRequest, record: Record
) -> None:
    if broker == "redis":
        url = request.getfixturevalue("clean_redis_db")
        publisher: RedisPublisher | AmqpPublisher = RedisPublisher(url)
    else:
        url = request.getfixturevalue("purged_rabbitmq")
        publisher = AmqpPublisher(url)
    messages, expected = _batch()
    # Published before the worker starts: the messages must wait in the queue for it.
    asyncio.run(_publish(publisher, messages))

    worker = worker_process(base_env(CELERY_BROKER_URL=url, **record.env()))
    guilds = {int(sample_guild_create(i)["id"]) for i in range(2)}
    try:
        record.wait_handled({m for m, _, _ in expected}, 60, worker)
        record.wait_handled(guilds, 20, worker, event="GUILD_CREATE")
        worker.wait_for_line("dead letter: MESSAGE_CREATE failed validation", timeout=20)
    finally:
        worker.stop()
    handled = sorted((d.id, d.shard_id, d.sequence) for d in record.deliveries())
    assert handled == sorted(expected)
    assert set(record.runs().values()) == {1}
    assert {(d.id, d.shard_id, d.sequence) for d in record.deliveries("GUILD_CREATE")} == {
        (int(sample_guild_create(i)["id"]), 0, 200 + i) for i in range(2)
    }
    assert len({d.task_id for d in record.deliveries()}) == len(expected)
    # The dead letter's headers reached the dead-letter task too.
    assert "shard 1, seq 300" in worker.text()
