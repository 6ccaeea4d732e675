"""``Pipeline`` on its own: a publisher the test holds and releases, sessions driven by scripted
frames (no sockets), so commit order, shedding and the read gate are checked step by step."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import orjson
import pytest
from pydantic import model_validator

from ingest import models
from ingest.errors import BrokerUnavailable
from ingest.gateway import Gateway
from ingest.messages import TaskMessage, task_id_for
from ingest.pipeline import Pipeline
from ingest.protocol import Opcode
from ingest.routing import DEAD_LETTER_TASK
from ingest.session import Dispatch, SessionLost, SessionState
from ingest.store import FileSessionStore, RedisSessionStore, SessionStore
from ingest.testing.simulator import sample_message_create
from tests.conftest import REDIS_URL
from tests.support import require_broker

T = TypeVar("T")
WANTED = frozenset({"MESSAGE_CREATE", "EXPLODES"})


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


class HeldPublisher:
    """Each ``publish`` waits until the test releases (or fails) it."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[TaskMessage], asyncio.Future[None]]] = []
        self.accepted: list[TaskMessage] = []
        self.answering = True
        self._arrived = asyncio.Event()

    async def connect(self) -> None:
        return None

    async def declare(self, queues: Any) -> None:
        return None

    async def publish(self, messages: Sequence[TaskMessage]) -> None:
        held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.batches.append((list(messages), held))
        self._arrived.set()
        await held
        self.accepted.extend(messages)

    async def ping(self) -> bool:
        return self.answering

    async def close(self) -> None:
        return None

    async def next_batch(self) -> list[TaskMessage]:
        """Wait for the batch in flight that the test has not answered yet."""
        while not self.batches or self.batches[-1][1].done():
            self._arrived.clear()
            await self._arrived.wait()
        return self.batches[-1][0]

    async def release(self) -> list[TaskMessage]:
        messages = await self.next_batch()
        self.batches[-1][1].set_result(None)
        await asyncio.sleep(0)  # let run() take the result
        await asyncio.sleep(0)
        return messages

    async def fail(self) -> None:
        await self.next_batch()
        self.batches[-1][1].set_exception(BrokerUnavailable("held down by the test"))
        await asyncio.sleep(0)


def gateway(session_id: str = "s1") -> Gateway:
    """A gateway that never connects, holding session ``session_id`` (commits apply to it)."""
    return Gateway(
        "token-" + "x" * 20,
        1,
        "ws://127.0.0.1:9",
        compression="none",
        on_dispatch=lambda g, d: None,
        resume_from=SessionState(session_id=session_id, sequence=None, resume_url=None),
    )


def message(sequence: int, session_id: str = "s1", event: str = "MESSAGE_CREATE") -> Dispatch:
    data = sample_message_create(sequence)
    return Dispatch(event, sequence, data, session_id, 0, b"", orjson.dumps(data), "e1")


def committed(g: Gateway) -> int | None:
    return g.session.committed_sequence


def start(pipeline: Pipeline) -> asyncio.Task[None]:
    return asyncio.create_task(pipeline.run())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- commit order ------------------------------------------------------------------------------


def test_sequences_commit_only_when_their_batch_is_accepted_in_arrival_order() -> None:
    async def main() -> None:
        publisher = HeldPublisher()
        pipeline = Pipeline(publisher, subscribed=WANTED, batch_size=2, linger_seconds=0)
        g = gateway()
        pipeline.attach(g)
        task = start(pipeline)
        for sequence in (1, 2, 3):
            pipeline.accept(g, message(sequence))
        first = await publisher.next_batch()
        assert [m.task_id for m in first] == [task_id_for("s1", 0, s, "e1") for s in (1, 2)]
        # An unwanted event behind events in flight waits for them.
        pipeline.accept(g, message(4, event="TYPING_START"))
        await settle()
        assert committed(g) is None
        await publisher.release()
        assert committed(g) == 2
        second = await publisher.release()
        assert [m.task_id for m in second] == [task_id_for("s1", 0, 3, "e1")]
        assert committed(g) == 4
        # Nothing in flight: an unwanted event is done at once.
        pipeline.accept(g, message(5, event="TYPING_START"))
        assert committed(g) == 5
        task.cancel()

    run(main)


def test_a_failed_batch_is_retried_and_commits_nothing_until_accepted() -> None:
    async def main() -> None:
        publisher = HeldPublisher()
        pipeline = Pipeline(publisher, subscribed=WANTED, batch_size=10, linger_seconds=0)
        g = gateway()
        pipeline.attach(g)
        task = start(pipeline)
        pipeline.accept(g, message(1))
        await publisher.fail()
        assert committed(g) is None and pipeline.buffered == 1
        retried = await publisher.release()
        assert [m.task_id for m in retried] == [task_id_for("s1", 0, 1, "e1")]
        assert committed(g) == 1 and pipeline.buffered == 0
        task.cancel()

    run(main)


# -- outage: shedding and the read gate --------------------------------------------------------


@pytest.mark.parametrize("bound", ["events", "bytes"])
def test_an_outage_past_the_buffer_bound_sheds_it_and_waits_for_the_broker(bound: str) -> None:
    async def main() -> None:
        publisher = HeldPublisher()
        one = len(orjson.dumps(sample_message_create(1))) + 100
        limits = (
            {"max_buffered_events": 3}
            if bound == "events"
            else {"max_buffered_bytes": 3 * one, "max_buffered_events": 1000}
        )
        pipeline = Pipeline(publisher, subscribed=WANTED, batch_size=1, linger_seconds=0, **limits)
        g = gateway()
        pipeline.attach(g)
        task = start(pipeline)
        pipeline.accept(g, message(1))
        await publisher.fail()  # the broker is down: an outage begins
        pipeline.accept(g, message(2))
        assert pipeline.buffered == 2 and pipeline.buffered_bytes > 0
        for sequence in range(3, 6):
            pipeline.accept(g, message(sequence))
            if pipeline.buffered == 0:
                break
        assert pipeline.buffered == 0 and pipeline.buffered_bytes == 0
        assert pipeline.metrics.events_shed >= 3
        assert committed(g) is None  # nothing shed ever counts as done
        gate = asyncio.ensure_future(pipeline.wait_until_healthy())
        await settle()
        assert not gate.done()  # no reconnect while the broker refuses events
        publisher.answering = True
        await asyncio.wait_for(gate, 2)
        task.cancel()

    run(main)


def test_a_slow_broker_pauses_reads_instead_of_dropping() -> None:
    async def main() -> None:
        publisher = HeldPublisher()
        one = len(orjson.dumps(sample_message_create(1))) + 100
        pipeline = Pipeline(
            publisher,
            subscribed=WANTED,
            batch_size=4,
            linger_seconds=0,
            max_buffered_bytes=4 * one,
        )
        g = gateway()
        pipeline.attach(g)
        task = start(pipeline)
        for sequence in range(1, 6):
            pipeline.accept(g, message(sequence))
        assert not pipeline.has_room.is_set()  # the byte bound, not the event bound (100,000)
        assert pipeline.metrics.events_shed == 0
        await publisher.release()
        await publisher.release()
        assert pipeline.has_room.is_set()
        assert committed(g) == 5 and len(publisher.accepted) == 5
        task.cancel()

    run(main)


# -- sessions ----------------------------------------------------------------------------------


def test_a_new_sessions_events_commit_without_waiting_for_the_old_ones() -> None:
    async def main() -> None:
        publisher = HeldPublisher()
        pipeline = Pipeline(publisher, subscribed=WANTED, batch_size=10, linger_seconds=0)
        g = gateway("old")
        pipeline.attach(g)
        task = start(pipeline)
        pipeline.accept(g, message(7, session_id="old"))
        await publisher.next_batch()  # held in flight
        # Discord replaces the session: the new one's READY (unwanted) is done at once.
        session = g.session
        hello = orjson.dumps({"op": Opcode.HELLO, "d": {"heartbeat_interval": 1000}})
        session.next_connection(0.0)
        session.connection_made(0.0)
        session.receive_frame(hello, 0.0)  # RESUME "old"...
        session.receive_frame(orjson.dumps({"op": Opcode.INVALID_SESSION, "d": False}), 0.0)
        session.connection_lost(1000, 0.0)  # ...refused
        session.next_connection(0.0)
        session.connection_made(0.0)
        session.receive_frame(hello, 0.0)
        session.identify(0.0)
        ready = {"session_id": "new", "resume_gateway_url": None}
        session.receive_frame(orjson.dumps({"op": 0, "t": "READY", "s": 1, "d": ready}), 0.0)
        for event in session.events_received():
            if isinstance(event, Dispatch):
                pipeline.accept(g, event)
        assert (g.session_id, committed(g)) == ("new", 1)
        await publisher.release()  # the old session's late commit changes nothing
        assert (g.session_id, committed(g)) == ("new", 1)
        task.cancel()

    run(main)


# -- poison events -----------------------------------------------------------------------------


class Explodes(models.DiscordModel):
    @model_validator(mode="before")
    @classmethod
    def explode(cls, data: Any) -> Any:
        raise RuntimeError("a validator bug")


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"deeper": [value]}
    return value


@pytest.mark.parametrize("poison", ["deep payload", "validator raises RuntimeError"])
def test_a_poison_event_becomes_a_dead_letter_and_the_sequence_moves_on(
    poison: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        models, "EVENT_MODELS", MappingProxyType({**models.EVENT_MODELS, "EXPLODES": Explodes})
    )

    async def main() -> None:
        publisher = HeldPublisher()
        pipeline = Pipeline(publisher, subscribed=WANTED, batch_size=10, linger_seconds=0)
        g = gateway()
        pipeline.attach(g)
        task = start(pipeline)
        if poison == "deep payload":
            data = sample_message_create(2) | {"embeds": [nested(400)]}
            frame = orjson.dumps({"t": "MESSAGE_CREATE", "s": 2, "op": 0}).rstrip(b"}")
            raw = frame + b',"d":' + b'{"embeds":[' + b'{"deeper":[' * 400 + b'"bottom"'
            raw += b"]}" * 400 + b"]}}"
            bad = Dispatch(
                "MESSAGE_CREATE", 2, data, "s1", 0, raw, raw[raw.index(b'"d":') + 4 : -1]
            )
        else:
            raw = b'{"t":"EXPLODES","s":2,"op":0,"d":{}}'
            bad = Dispatch("EXPLODES", 2, {}, "s1", 0, raw, b"{}")
        pipeline.accept(g, message(1))
        pipeline.accept(g, bad)
        pipeline.accept(g, message(3))
        published = await publisher.release()
        names = [m.task_name for m in published]
        assert names == ["discord.MESSAGE_CREATE", DEAD_LETTER_TASK, "discord.MESSAGE_CREATE"]
        _args, kwargs, _embed = orjson.loads(published[1].body)
        assert kwargs["raw"].encode() == raw  # the frame as received
        assert kwargs["event"] == bad.event
        assert ("deeper than" if poison == "deep payload" else "RuntimeError") in kwargs["reason"]
        assert committed(g) == 3
        assert pipeline.metrics.events_invalid[bad.event] == 1
        task.cancel()

    run(main)


def test_the_task_argument_is_the_frames_own_data_bytes() -> None:
    async def main() -> None:
        publisher = HeldPublisher()
        pipeline = Pipeline(publisher, subscribed=WANTED, batch_size=10, linger_seconds=0)
        g = gateway()
        pipeline.attach(g)
        task = start(pipeline)
        data_json = orjson.dumps(sample_message_create(1), option=orjson.OPT_INDENT_2)
        dispatch = Dispatch(
            "MESSAGE_CREATE", 1, orjson.loads(data_json), "s1", 0, b"", data_json, "e1"
        )
        pipeline.accept(g, dispatch)
        (published,) = await publisher.release()
        assert data_json in published.body  # spliced as sent, not serialised again
        task.cancel()

    run(main)


# -- dead sessions leave the store -------------------------------------------------------------


def store_for_test(kind: str, tmp_path: Path, redis_base: str | None) -> SessionStore:
    if kind == "file":
        return FileSessionStore(tmp_path)
    assert redis_base is not None
    return RedisSessionStore(f"{redis_base}/0", prefix=f"test:{uuid.uuid4().hex}")


async def stored(store: SessionStore) -> SessionState | None:
    return await store.load(0, 1)


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.01)


@pytest.fixture(params=["file", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        require_broker("redis")
    return str(request.param)


def test_a_session_discord_invalidates_is_forgotten_in_the_store_at_once(
    store_kind: str, tmp_path: Path
) -> None:
    async def main() -> None:
        store = store_for_test(store_kind, tmp_path, REDIS_URL)
        publisher = HeldPublisher()
        # A long save interval: only session_ended() may make the forgetting prompt.
        pipeline = Pipeline(
            publisher, subscribed=WANTED, store=store, linger_seconds=0, save_interval=30.0
        )
        g = gateway("doomed")
        pipeline.attach(g)
        task = start(pipeline)
        pipeline.accept(g, message(1, session_id="doomed"))
        await publisher.release()
        await pipeline._save_if_due(force=True)
        assert (await stored(store)) is not None
        session = g.session
        session.next_connection(0.0)
        session.connection_made(0.0)
        session.receive_frame(orjson.dumps({"op": 10, "d": {"heartbeat_interval": 1000}}), 0.0)
        session.receive_frame(orjson.dumps({"op": Opcode.INVALID_SESSION, "d": False}), 0.0)
        assert any(isinstance(e, SessionLost) for e in session.events_received())
        pipeline.session_ended(g)

        async def gone() -> bool:
            return await stored(store) is None

        await wait_for(gone)
        task.cancel()
        await store.close()

    run(main)


def test_a_non_resumable_stop_leaves_nothing_to_resume(store_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        store = store_for_test(store_kind, tmp_path, REDIS_URL)
        publisher = HeldPublisher()
        pipeline = Pipeline(publisher, subscribed=WANTED, store=store, linger_seconds=0)
        g = gateway("ending")
        pipeline.attach(g)
        task = start(pipeline)
        pipeline.accept(g, message(1, session_id="ending"))
        await publisher.release()
        await pipeline._save_if_due(force=True)
        assert (await stored(store)) is not None
        await g.stop(resumable=False)
        await pipeline.drain(1.0)
        assert await stored(store) is None
        task.cancel()
        await store.close()

    run(main)


def test_the_process_counts_a_lost_session_once_and_forgets_it_at_once(tmp_path: Path) -> None:
    from ingest.config import load_config
    from ingest.process import GatewayProcess

    env = {
        "DISCORD_TOKEN": "token-" + "x" * 20,
        "CELERY_BROKER_URL": "eager",
        "INGEST_MAX_BUFFERED_BYTES": "1048576",
    }

    async def main() -> None:
        config = load_config(env)
        assert config.max_buffered_bytes == 1 << 20
        process = GatewayProcess(config)
        store = FileSessionStore(tmp_path)
        publisher = HeldPublisher()
        process.pipeline = pipeline = Pipeline(
            publisher, subscribed=WANTED, store=store, linger_seconds=0, save_interval=30.0
        )
        g = gateway("lost")
        pipeline.attach(g)
        task = start(pipeline)
        await store.save([SessionState("lost", 3, None)])
        session = g.session
        session.next_connection(0.0)
        session.connection_made(0.0)
        session.receive_frame(orjson.dumps({"op": 10, "d": {"heartbeat_interval": 1000}}), 0.0)
        session.receive_frame(orjson.dumps({"op": Opcode.INVALID_SESSION, "d": False}), 0.0)
        for event in session.events_received():
            process._on_lifecycle(g, event)

        async def gone() -> bool:
            return await stored(store) is None

        await wait_for(gone)
        assert process.metrics.sessions_lost == 1
        task.cancel()

    run(main)
