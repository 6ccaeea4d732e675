"""``Gateway`` over loopback against the bundled simulator, both on one event loop.

Each test drives the "Discord" side (zombie, op 7, op 9, drops, bad frames, fatal closes) and
checks what reached the handlers by message index, so a lost or doubled event shows up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from ingest.compression import zstd_available
from ingest.errors import FatalGatewayError, PayloadTooLarge
from ingest.gateway import Gateway
from ingest.identify import LocalIdentifyScheduler
from ingest.protocol import ZLIB_SUFFIX, Intents, Opcode, default_intents
from ingest.session import Dispatch, SessionState, State
from ingest.testing import GatewaySimulator
from ingest.testing.simulator import RESUME_PATH, sample_message_create

TOKEN = "MTA5Njk3.Gx7Qz2.s3cr3tT0k3nV4lu3_9aQzKw"
NONCE_BASE = 10_000_000  # sample_message_create(i) carries nonce str(NONCE_BASE + i)
T = TypeVar("T")

COMPRESSIONS = [
    "zlib-stream",
    "none",
    pytest.param(
        "zstd-stream",
        marks=pytest.mark.skipif(not zstd_available(), reason="zstandard not installed"),
    ),
]


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 25.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


def index_of(message: Any) -> int:
    return int(message.nonce) - NONCE_BASE


@dataclass
class Rig:
    sim: GatewaySimulator
    gateway: Gateway
    task: asyncio.Task[None]
    received: list[int] = field(default_factory=list)

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        if self.task.done():
            self.task.result()  # surface a crash of run() instead of a timeout
        await self.sim.wait_until(lambda: predicate() or self.task.done(), timeout)
        if not predicate():
            self.task.result()
            raise AssertionError("run() returned before the condition held")

    async def ready(self) -> None:
        await self.until(lambda: self.gateway.session.state is State.CONNECTED)

    async def emit(self, start: int, count: int, rate: float | None = None) -> None:
        await self.sim.emit_many(
            "MESSAGE_CREATE", lambda i: sample_message_create(start + i), count, rate
        )

    async def received_all(self, count: int, timeout: float = 10.0) -> None:
        await self.until(lambda: len(self.received) >= count, timeout)
        await asyncio.sleep(0.05)  # a duplicate would land here
        assert self.received == list(range(count))

    def sim_session_sequence(self) -> int:
        assert self.gateway.session_id is not None
        return self.sim.sessions[self.gateway.session_id].sequence


@asynccontextmanager
async def rig(
    *,
    sim_options: dict[str, Any] | None = None,
    token: str = TOKEN,
    start: bool = True,
    **gateway_options: Any,
) -> AsyncIterator[Rig]:
    sim_kwargs: dict[str, Any] = {"token": TOKEN, "heartbeat_interval_ms": 300}
    sim_kwargs.update(sim_options or {})
    async with GatewaySimulator(**sim_kwargs) as sim:
        gateway_options.setdefault("backoff_base", 0.05)
        gateway_options.setdefault(
            "identify_scheduler", LocalIdentifyScheduler(interval=sim.identify_interval)
        )
        gateway = Gateway(token, None, sim.url, **gateway_options)
        received: list[int] = []

        async def on_message(message: Any) -> None:
            received.append(index_of(message))

        gateway.on("MESSAGE_CREATE", on_message)
        task = asyncio.create_task(gateway.run())
        try:
            r = Rig(sim, gateway, task, received)
            if start:
                await r.ready()
            yield r
        finally:
            if not task.done():
                await gateway.stop()
                await asyncio.wait_for(asyncio.shield(task), 10)


# -- connect, identify, dispatch --------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_thousand_messages_reach_on_handlers_in_order(compression: str) -> None:
    threaded: list[int] = []

    async def scenario() -> None:
        async with rig(compression=compression) as r:
            r.gateway.on("MESSAGE_CREATE", lambda m: threaded.append(index_of(m)))
            assert r.gateway.session_id == r.sim.identify_log[0].session_id
            assert r.sim.connections[0].compress == (None if compression == "none" else compression)
            await r.emit(0, 1000)
            await r.received_all(1000)
            await r.until(lambda: len(threaded) >= 1000)
            assert sorted(threaded) == list(range(1000))
            # READY was sequence 1; the messages 2..1001 with nothing in between.
            assert r.gateway.seq == r.sim_session_sequence() == 1001
            assert r.gateway.rejected_count == 0
            assert r.gateway.reconnects == 0
            assert len(r.sim.identify_log) == 1

    run(scenario)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_dispatch_hook_sees_contiguous_sequences(compression: str) -> None:
    sequences: list[int] = []

    def on_dispatch(gateway: Gateway, dispatch: Dispatch) -> None:
        sequences.append(dispatch.sequence)
        gateway.commit(dispatch.sequence, dispatch.session_id)

    async def scenario() -> None:
        async with rig(compression=compression, on_dispatch=on_dispatch) as r:
            await r.emit(0, 1000)
            await r.until(lambda: len(sequences) >= 1001)
            assert sequences == list(range(1, 1002))
            assert r.gateway.session.committed_sequence == 1001

    run(scenario)


# -- reconnects that resume -------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_zombie_connection_is_closed_and_resumed_without_loss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ingest.gateway")

    async def scenario() -> None:
        async with rig() as r:
            await r.emit(0, 50)
            await r.until(lambda: len(r.received) >= 50)
            await r.sim.set_zombie(True)
            # Keep emitting through the zombie period, the close and the reconnect.
            emitting = asyncio.create_task(r.emit(50, 100, rate=150))
            await r.until(lambda: r.sim.connections[0].closed, timeout=5)
            await r.sim.set_zombie(False)
            await emitting
            await r.until(lambda: any(rec.accepted for rec in r.sim.resume_log))
            await r.received_all(150)
            assert [rec.accepted for rec in r.sim.resume_log] == [True]
            assert len(r.sim.identify_log) == 1
            assert r.gateway.resumes == 1
            assert r.gateway.resume_causes == {"zombie": 1}

    run(scenario)
    closing = [m for m in caplog.messages if "closing" in m and "zombie" in m]
    assert closing, caplog.messages
    assert "(1000)" not in closing[0]


@pytest.mark.timeout(30)
def test_op7_reconnect_resumes_on_resume_url_without_loss() -> None:
    async def scenario() -> None:
        async with rig() as r:
            await r.emit(0, 20)
            await r.sim.send_reconnect()
            await r.emit(20, 30)
            await r.until(lambda: any(rec.accepted for rec in r.sim.resume_log))
            await r.emit(50, 10)
            await r.received_all(60)
            resume = r.sim.resume_log[0]
            assert resume.accepted and resume.path == RESUME_PATH
            assert [c.path for c in r.sim.connections] == ["/", RESUME_PATH]
            assert len(r.sim.identify_log) == 1
            assert r.gateway.reconnect_causes == {"op7": 1}
            assert r.gateway.resume_causes == {"op7": 1}

    run(scenario)


@pytest.mark.timeout(30)
def test_op9_resumable_resumes() -> None:
    async def scenario() -> None:
        async with rig() as r:
            session_id = r.gateway.session_id
            await r.emit(0, 10)
            await r.sim.send_invalid_session(True)
            await r.emit(10, 10)
            await r.until(lambda: any(rec.accepted for rec in r.sim.resume_log))
            await r.received_all(20)
            assert r.gateway.session_id == session_id
            assert len(r.sim.identify_log) == 1

    run(scenario)


@pytest.mark.timeout(30)
def test_op9_not_resumable_identifies_anew_after_a_wait() -> None:
    async def scenario() -> None:
        async with rig(sim_options={"identify_interval": 0.2}) as r:
            first_session = r.gateway.session_id
            await r.emit(0, 10)
            await r.until(lambda: len(r.received) >= 10)
            invalidated_at = time.monotonic()
            await r.sim.send_invalid_session(False)
            await r.until(lambda: len(r.sim.identify_log) == 2, timeout=10)
            await r.ready()
            waited = r.sim.identify_log[1].time - invalidated_at
            assert 1.0 <= waited <= 6.0
            assert r.gateway.session_id == r.sim.identify_log[1].session_id != first_session
            assert r.sim.resume_log == []
            await r.emit(10, 10)
            await r.received_all(20)

    run(scenario)


@pytest.mark.timeout(30)
def test_tcp_drop_resumes_and_replays_events_emitted_while_disconnected() -> None:
    gate_open = asyncio.Event()

    async def gate() -> None:
        await gate_open.wait()

    async def scenario() -> None:
        gate_open.set()
        async with rig(connect_gate=gate) as r:
            await r.emit(0, 10)
            await r.until(lambda: len(r.received) >= 10)
            gate_open.clear()  # hold the reconnect until the events are in the replay buffer
            await r.sim.drop_connections()
            await r.until(lambda: not r.sim.ready_shards())
            await r.emit(10, 40)
            assert r.sim.connections_opened == 1
            gate_open.set()
            await r.until(lambda: any(rec.accepted for rec in r.sim.resume_log))
            await r.received_all(50)
            assert r.sim.resume_log[0].replayed == 40
            assert r.gateway.reconnects == 1 and r.gateway.resumes == 1
            assert r.gateway.resume_causes == {"dropped": 1}

    run(scenario)


# -- fatal closes -----------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("code", "token", "intents", "hint"),
    [
        (4004, "not-the-token", None, "DISCORD_TOKEN"),
        (
            4014,
            TOKEN,
            default_intents() | Intents.MESSAGE_CONTENT,
            "Message Content Intent",
        ),
    ],
)
def test_fatal_close_raises_with_a_fix_and_never_reconnects(
    code: int, token: str, intents: int | None, hint: str
) -> None:
    async def scenario() -> None:
        async with GatewaySimulator(token=TOKEN) as sim:
            gateway = Gateway(token, intents, sim.url, backoff_base=0.01)
            with pytest.raises(FatalGatewayError) as caught:
                await gateway.run()
            assert caught.value.close_code == code
            assert hint in str(caught.value)
            await asyncio.sleep(0.2)
            assert sim.connections_opened == 1
            assert gateway.session.finished

    run(scenario)


# -- odd server behaviour ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_reconnect_before_hello_is_handled() -> None:
    async def scenario() -> None:
        async with GatewaySimulator(token=TOKEN, heartbeat_interval_ms=300) as sim:
            sim.reconnect_before_hello()
            gateway = Gateway(TOKEN, None, sim.url, backoff_base=0.05)
            got: list[int] = []

            async def on_message(message: Any) -> None:
                got.append(index_of(message))

            gateway.on("MESSAGE_CREATE", on_message)
            task = asyncio.create_task(gateway.run())
            await sim.wait_until(lambda: gateway.session.state is State.CONNECTED)
            assert sim.connections_opened == 2
            assert len(sim.identify_log) == 1
            await sim.emit_many("MESSAGE_CREATE", sample_message_create, 5)
            await sim.wait_until(lambda: len(got) == 5)
            await gateway.stop()
            await asyncio.wait_for(task, 10)

    run(scenario)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("compression", ["zlib-stream", "none"])
def test_malformed_frames_are_counted_and_the_session_carries_on(compression: str) -> None:
    bad_message = sample_message_create(999)
    del bad_message["channel_id"]

    async def scenario() -> None:
        async with rig(compression=compression) as r:
            await r.emit(0, 10)
            await r.sim.send_raw("{not json", compress=True)
            await r.sim.send_raw('{"op": 99, "d": null}', compress=True)
            await r.sim.emit("MESSAGE_CREATE", bad_message)
            await r.emit(10, 10)
            await r.received_all(20)
            assert r.gateway.rejected_count == 3
            assert r.sim.connections_opened == 1
            assert r.gateway.session.state is State.CONNECTED

    run(scenario)


@pytest.mark.timeout(30)
def test_corrupt_zlib_stream_is_counted_and_the_session_resumes() -> None:
    async def scenario() -> None:
        async with rig(compression="zlib-stream") as r:
            await r.emit(0, 10)
            await r.until(lambda: len(r.received) >= 10)
            await r.sim.send_raw(b"\xde\xad\xbe\xef garbage" + ZLIB_SUFFIX, compress=False)
            await r.emit(10, 10)
            await r.until(lambda: any(rec.accepted for rec in r.sim.resume_log))
            await r.emit(20, 10)
            await r.received_all(30)
            assert r.gateway.rejected_count == 1
            assert len(r.sim.identify_log) == 1

    run(scenario)


# -- heartbeats and commands ------------------------------------------------------------------


def heartbeats_received(sim: GatewaySimulator) -> int:
    return sum(1 for payload in sim.received if payload["op"] == Opcode.HEARTBEAT)


@pytest.mark.timeout(30)
def test_server_requested_heartbeat_is_answered_and_latency_measured() -> None:
    async def scenario() -> None:
        # A long interval: the beat we see must be the answer to the request.
        async with rig(sim_options={"heartbeat_interval_ms": 60_000}) as r:
            before = heartbeats_received(r.sim)
            await r.sim.request_heartbeat()
            await r.until(lambda: heartbeats_received(r.sim) > before, timeout=2)
            await r.until(lambda: r.gateway.latency is not None, timeout=2)
            assert isinstance(r.gateway.latency, float)
            assert 0 <= r.gateway.latency < 1

    run(scenario)


@pytest.mark.timeout(30)
def test_regular_heartbeats_are_acked_and_latency_set() -> None:
    async def scenario() -> None:
        async with rig(sim_options={"heartbeat_interval_ms": 200}) as r:
            await r.until(lambda: heartbeats_received(r.sim) >= 3, timeout=3)
            assert isinstance(r.gateway.latency, float)
            assert r.gateway.reconnects == 0  # every beat was ACKed: no zombie close

    run(scenario)


@pytest.mark.timeout(30)
def test_oversized_payload_raises_and_sends_nothing() -> None:
    async def scenario() -> None:
        async with rig() as r:
            before = len(r.sim.received)
            with pytest.raises(PayloadTooLarge):
                await r.gateway.send_payload(Opcode.PRESENCE_UPDATE, {"blob": "x" * 5000})
            await asyncio.sleep(0.1)
            assert all(p["op"] != Opcode.PRESENCE_UPDATE for p in r.sim.received[before:])
            assert r.gateway.session.state is State.CONNECTED
            # A normal command still goes through afterwards.
            await r.gateway.update_presence(status="idle")
            await r.until(
                lambda: any(p["op"] == Opcode.PRESENCE_UPDATE for p in r.sim.received[before:])
            )

    run(scenario)


# -- secrets ----------------------------------------------------------------------------------


def leaks_token(text: str, fragment: int = 8) -> bool:
    """Any 8 characters of the token count: log formatters truncate long payloads."""
    return any(TOKEN[i : i + fragment] in text for i in range(len(TOKEN) - fragment + 1))


@pytest.mark.timeout(30)
def test_token_never_logged_nor_in_repr(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    reprs: list[str] = []

    async def scenario() -> None:
        async with rig() as r:
            reprs.extend([repr(r.gateway), repr(r.gateway.session), repr(r.gateway.session.config)])
            await r.emit(0, 5)
            await r.sim.send_reconnect()
            await r.until(lambda: len(r.sim.resume_log) == 1)
            await r.ready()
            await r.sim.drop_connections()
            await r.until(lambda: len(r.sim.resume_log) == 2)
            await r.ready()
            await r.emit(5, 5)
            await r.received_all(10)
            reprs.append(repr(r.gateway))
        # A wrong token too: the fatal message must not echo it.
        async with GatewaySimulator(token=TOKEN) as sim:
            with pytest.raises(FatalGatewayError) as caught:
                await Gateway(TOKEN + "-wrong", None, sim.url).run()
            reprs.append(str(caught.value))

    run(scenario)
    # The simulator's own websockets server stands for Discord: what it logs is not ours.
    ours = [r for r in caplog.records if not r.name.startswith("websockets.server")]
    assert any(r.name == "ingest.gateway" and r.levelno == logging.INFO for r in ours)
    assert any(r.levelno == logging.DEBUG for r in ours)  # the capture did see DEBUG
    for record in ours:
        text = record.getMessage() + (record.exc_text or "")
        assert not leaks_token(text), f"{record.name}: {text}"
    for text in reprs:
        assert not leaks_token(text), text


# -- stop and resume in a new process ---------------------------------------------------------


@pytest.mark.timeout(30)
def test_stop_then_new_gateway_resumes_from_snapshot() -> None:
    async def scenario() -> None:
        async with GatewaySimulator(token=TOKEN, heartbeat_interval_ms=300) as sim:
            first_got: list[int] = []
            first = Gateway(TOKEN, None, sim.url, backoff_base=0.05)

            async def on_first(message: Any) -> None:
                first_got.append(index_of(message))

            first.on("MESSAGE_CREATE", on_first)
            task = asyncio.create_task(first.run())
            await sim.wait_until(lambda: first.session.state is State.CONNECTED)
            await sim.emit_many("MESSAGE_CREATE", sample_message_create, 10)
            await sim.wait_until(lambda: len(first_got) == 10)
            await first.stop()
            await asyncio.wait_for(task, 5)  # returns, does not raise
            assert task.exception() is None
            snapshot = first.session.snapshot()
            assert isinstance(snapshot, SessionState)
            assert snapshot.sequence == 11

            await sim.wait_until(lambda: not sim.ready_shards())
            await sim.emit_many("MESSAGE_CREATE", lambda i: sample_message_create(10 + i), 15)

            second_got: list[int] = []
            second = Gateway(TOKEN, None, sim.url, backoff_base=0.05, resume_from=snapshot)

            async def on_second(message: Any) -> None:
                second_got.append(index_of(message))

            second.on("MESSAGE_CREATE", on_second)
            task = asyncio.create_task(second.run())
            await sim.wait_until(lambda: len(second_got) >= 15)
            await asyncio.sleep(0.05)
            assert second_got == list(range(10, 25))
            assert len(sim.identify_log) == 1
            resume = sim.resume_log[-1]
            assert resume.accepted and resume.session_id == snapshot.session_id
            assert resume.sequence == 11 and resume.replayed == 15
            assert resume.path == RESUME_PATH
            assert second.session_id == snapshot.session_id
            await second.stop()
            await asyncio.wait_for(task, 5)

    run(scenario)


@pytest.mark.timeout(30)
def test_stop_during_the_handshake_ends_run() -> None:
    async def scenario() -> None:
        async with GatewaySimulator(token=TOKEN, heartbeat_interval_ms=300) as sim:
            gateway = Gateway(TOKEN, None, sim.url, backoff_base=0.05)
            task = asyncio.create_task(gateway.run())
            await asyncio.sleep(0)  # run() is inside connect() now
            await gateway.stop()
            await asyncio.wait_for(task, 5)
            assert gateway.session.finished
            assert sim.identify_log == []

    run(scenario)


@pytest.mark.timeout(30)
def test_a_peer_that_never_says_hello_is_left_and_redialled() -> None:
    # A handshake that succeeds, then silence: the HELLO deadline must have a timer of its own.
    from websockets.asyncio.server import ServerConnection, serve

    connections = 0

    async def silent(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.wait_closed()

    async def scenario() -> None:
        async with serve(silent, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            gateway = Gateway(
                "sim-token",
                gateway_url=f"ws://127.0.0.1:{port}",
                compression="none",
                backoff_base=0.05,
                hello_timeout=0.3,
            )
            running = asyncio.create_task(gateway.run())
            deadline = asyncio.get_running_loop().time() + 10
            while connections < 3 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            await gateway.stop()
            await asyncio.wait_for(running, 10)
            assert gateway.reconnect_causes["hello_timeout"] >= 2

    asyncio.run(scenario())
    assert connections >= 3


# -- the gateway and its pipeline against servers that are not Discord (issue #10) -------------


class RecordingPublisher:
    """Accepts every batch at once and keeps what it was given."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def connect(self) -> None:
        return None

    async def declare(self, queues: Any) -> None:
        return None

    async def publish(self, messages: Any) -> None:
        self.messages.extend(messages)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    def named(self, task_name: str) -> list[Any]:
        return [m for m in self.messages if m.task_name == task_name]


@dataclass
class Piped:
    sim: GatewaySimulator
    gateway: Gateway
    pipeline: Any
    publisher: RecordingPublisher
    task: asyncio.Task[None]

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        await self.sim.wait_until(lambda: predicate() or self.task.done(), timeout)
        if self.task.done():
            self.task.result()  # run() must never end (nor raise) for one bad event
            raise AssertionError("run() returned")

    def events(self) -> list[Any]:
        return self.publisher.named("discord.MESSAGE_CREATE")

    def dead_letters(self) -> list[Any]:
        from ingest.routing import DEAD_LETTER_TASK

        return self.publisher.named(DEAD_LETTER_TASK)


@asynccontextmanager
async def piped(
    *,
    subscribed: frozenset[str] = frozenset({"MESSAGE_CREATE"}),
    compression: str = "zlib-stream",
    **sim_options: Any,
) -> AsyncIterator[Piped]:
    from ingest.pipeline import Pipeline

    options: dict[str, Any] = {"token": TOKEN, "heartbeat_interval_ms": 300}
    options.update(sim_options)
    async with GatewaySimulator(**options) as sim:
        publisher = RecordingPublisher()
        pipeline = Pipeline(publisher, subscribed=subscribed, linger_seconds=0)
        gateway = Gateway(
            TOKEN,
            None,
            sim.url,
            compression=compression,
            backoff_base=0.05,
            identify_scheduler=LocalIdentifyScheduler(interval=sim.identify_interval),
            on_dispatch=pipeline.accept,
            on_rejected=pipeline.reject,
            connect_gate=pipeline.wait_until_healthy,
            read_gate=pipeline.has_room,
        )
        pipeline.attach(gateway)
        publishing = asyncio.create_task(pipeline.run())
        task = asyncio.create_task(gateway.run())
        p = Piped(sim, gateway, pipeline, publisher, task)
        try:
            await p.until(lambda: gateway.session.state is State.CONNECTED)
            yield p
        finally:
            if not task.done():
                await gateway.stop()
                await asyncio.wait_for(asyncio.shield(task), 10)
            await pipeline.drain(2)
            publishing.cancel()


@pytest.mark.timeout(30)
def test_a_poison_event_is_dead_lettered_and_the_shard_carries_on() -> None:
    counts: dict[str, int] = {}

    async def scenario() -> None:
        async with piped() as p:
            await p.sim.emit_many("MESSAGE_CREATE", sample_message_create, 10)
            await p.sim.emit_poison(depth=400)
            await p.sim.emit_many("MESSAGE_CREATE", lambda i: sample_message_create(10 + i), 10)
            last = p.sim.sessions[p.gateway.session_id or ""].sequence
            await p.until(lambda: p.gateway.session.committed_sequence == last)
            counts.update(
                sent=p.sim.emitted_count(),
                published=len(p.events()),
                dead_lettered=len(p.dead_letters()),
            )
            (dead,) = p.dead_letters()
            _args, kwargs, _embed = orjson.loads(dead.body)
            assert "deeper than" in kwargs["reason"] and kwargs["event"] == "MESSAGE_CREATE"
            assert kwargs["raw"].count("[") > 400  # the frame as received
            assert [index_of_body(m) for m in p.events()] == list(range(20))
            assert p.gateway.reconnects == 0

    run(scenario)
    print("poison:", counts)
    assert counts == {"sent": 21, "published": 20, "dead_lettered": 1}


def index_of_body(message: Any) -> int:
    (data,), _kwargs, _embed = orjson.loads(message.body)
    return int(data["nonce"]) - NONCE_BASE


@pytest.mark.timeout(40)
@pytest.mark.parametrize("first_sequence", [1, 0])
def test_a_server_reusing_its_session_id_gets_distinct_task_ids(first_sequence: int) -> None:
    counts: dict[str, int] = {}

    async def scenario() -> None:
        subscribed = frozenset({"MESSAGE_CREATE", "READY"})
        async with piped(
            subscribed=subscribed,
            reuse_session_id=True,
            first_sequence=first_sequence,
            identify_interval=0.2,
        ) as p:
            first = p.gateway.session_id
            await p.sim.emit_many("MESSAGE_CREATE", sample_message_create, 25)
            await p.until(lambda: len(p.events()) == 25)
            await p.sim.send_invalid_session(False)  # the server "restarts": IDENTIFY again
            await p.until(lambda: len(p.sim.identify_log) == 2)
            await p.until(lambda: p.gateway.session.state is State.CONNECTED)
            assert p.gateway.session_id == first  # same id, sequences started over
            await p.sim.emit_many("MESSAGE_CREATE", lambda i: sample_message_create(25 + i), 25)
            await p.until(lambda: len(p.events()) == 50)
            readies = p.publisher.named("discord.READY")
            assert [m.headers["discord_sequence"] for m in readies] == [first_sequence] * 2
            ids = [m.task_id for m in p.events() + readies]
            counts.update(
                sent=p.sim.emitted_count(),
                published=len(p.events()),
                distinct_task_ids=len(set(ids)),
                dead_lettered=len(p.dead_letters()),
            )
            assert len(set(ids)) == len(ids) == 52

    run(scenario, timeout=35)
    print(f"session-id reuse (first sequence {first_sequence}):", counts)
    assert counts["published"] == 50 and counts["dead_lettered"] == 0


@pytest.mark.timeout(30)
@pytest.mark.skipif(not zstd_available(), reason="zstandard not installed")
def test_zstd_one_frame_per_message_server_delivers_every_event() -> None:
    counts: dict[str, int] = {}

    async def scenario() -> None:
        async with piped(zstd_frame_per_message=True, compression="zstd-stream") as p:
            assert p.sim.connections[0].compress == "zstd-stream"
            await p.sim.emit_many("MESSAGE_CREATE", sample_message_create, 50)
            await p.until(lambda: len(p.events()) == 50)
            counts.update(
                sent=p.sim.emitted_count(),
                published=len(p.events()),
                dead_lettered=len(p.dead_letters()),
                reconnects=p.gateway.reconnects,
            )

    run(scenario)
    print("zstd one frame per message:", counts)
    assert counts == {"sent": 50, "published": 50, "dead_lettered": 0, "reconnects": 0}


@pytest.mark.timeout(30)
def test_an_identify_that_raises_closes_and_retries_the_shard() -> None:
    class FlakyScheduler(LocalIdentifyScheduler):
        failures = 1

        async def acquire(self, shard_id: int) -> None:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("scheduler backend down")
            await super().acquire(shard_id)

    async def scenario() -> None:
        async with rig(identify_scheduler=FlakyScheduler(interval=0.0)) as r:
            assert r.gateway.reconnect_causes["identify_failed"] == 1
            assert len(r.sim.identify_log) == 1
            await r.emit(0, 5)
            await r.received_all(5)

    run(scenario)


def test_a_presence_over_4096_bytes_is_refused_when_the_gateway_is_built() -> None:
    from ingest.errors import ConfigError

    presence = {"status": "online", "activities": [{"name": "x" * 5000, "type": 0}]}
    with pytest.raises(ConfigError, match="presence"):
        Gateway(TOKEN, None, "ws://127.0.0.1:9", presence=presence)


def test_closes_before_ready_show_in_status_until_the_shard_gets_a_session(
    tmp_path: Path,
) -> None:
    from ingest.config import load_config
    from ingest.process import GatewayProcess
    from ingest.session import ClosedBeforeReady, SessionStarted
    from ingest.status import collect_status, format_table
    from ingest.store import FileSessionStore

    env = {
        "DISCORD_TOKEN": TOKEN,
        "CELERY_BROKER_URL": "eager",
        "INGEST_STATE_URL": f"file://{tmp_path}",
    }

    async def scenario() -> None:
        process = GatewayProcess(load_config(env))
        process.store = FileSessionStore(tmp_path)
        gateway = Gateway(TOKEN, None, "ws://127.0.0.1:9")
        process._on_lifecycle(gateway, ClosedBeforeReady(3, 4000))
        await asyncio.gather(*process._reports)
        status = await collect_status(env)
        (problem,) = status["problems"]
        assert problem["shard"] == "0/1" and "DISCORD_TOKEN" in problem["problem"]
        assert "4000" in format_table(status)
        process._on_lifecycle(gateway, SessionStarted("s", None))
        await asyncio.gather(*process._reports)
        assert (await collect_status(env))["problems"] == []

    run(scenario)


def test_closes_before_ready_are_a_per_shard_metric() -> None:
    from ingest.metrics import Metrics

    metrics = Metrics()
    metrics.shard_readers.append(lambda: [{"shard_id": 0, "closes_before_ready": 4}])
    families = {f.name: f for f in metrics.collect()}
    (sample,) = families["discord_ingest_shard_closes_before_ready"].samples
    assert sample.value == 4 and sample.labels == {"shard": "0"}


@pytest.mark.timeout(30)
def test_a_dead_resume_url_falls_back_to_the_gateway_url_and_resumes_there() -> None:
    import dataclasses
    import socket

    async def scenario() -> None:
        async with GatewaySimulator(token=TOKEN, heartbeat_interval_ms=300) as sim:
            first = Gateway(TOKEN, None, sim.url, backoff_base=0.05)
            task = asyncio.create_task(first.run())
            await sim.wait_until(lambda: first.session.state is State.CONNECTED)
            await sim.emit_many("MESSAGE_CREATE", sample_message_create, 5)
            await sim.wait_until(lambda: first.seq == 6)  # READY + 5 received
            await first.stop()
            await asyncio.wait_for(task, 5)
            snapshot = first.session.snapshot()
            assert snapshot is not None
            # The stored resume URL now points at a port nothing listens on (a past run's).
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                dead_port = probe.getsockname()[1]
            stale = dataclasses.replace(snapshot, resume_url=f"ws://127.0.0.1:{dead_port}")
            await sim.wait_until(lambda: not sim.ready_shards())
            await sim.emit_many("MESSAGE_CREATE", lambda i: sample_message_create(5 + i), 5)

            got: list[int] = []
            second = Gateway(TOKEN, None, sim.url, backoff_base=0.05, resume_from=stale)

            async def on_message(message: Any) -> None:
                got.append(index_of(message))

            second.on("MESSAGE_CREATE", on_message)
            task = asyncio.create_task(second.run())
            await sim.wait_until(lambda: len(got) >= 5, timeout=15)
            assert got == list(range(5, 10))
            assert second.reconnect_causes["connect_failed"] == 3
            resume = sim.resume_log[-1]
            assert resume.accepted and resume.session_id == snapshot.session_id
            assert len(sim.identify_log) == 1  # resumed, not identified again
            await second.stop()
            await asyncio.wait_for(task, 5)

    run(scenario)


@pytest.mark.timeout(30)
def test_closes_4000_before_every_ready_are_logged_as_an_error_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with rig(
            sim_options={"refuse_identify_with": 4000, "identify_interval": 0.0},
            identify_scheduler=LocalIdentifyScheduler(interval=0.0),
            start=False,
        ) as r:
            await r.until(lambda: r.gateway.session.closes_before_ready >= 4)
            assert not r.task.done()  # 4000 is not fatal: still retrying
            assert r.gateway.reconnect_causes["close_4000"] >= 4

    with caplog.at_level(logging.ERROR, logger="ingest.gateway"):
        run(scenario)
    alarms = [rec for rec in caplog.records if "closed before READY" in rec.getMessage()]
    assert len(alarms) == 1 and alarms[0].levelno == logging.ERROR
    assert "DISCORD_TOKEN" in alarms[0].getMessage() and "intents" in alarms[0].getMessage()


PROCESS_REDIS_DB = 1  # this test's database on the test Redis (see conftest)


@pytest.mark.timeout(90)
@pytest.mark.redis
def test_python_m_ingest_survives_a_poison_event_and_commits_past_it() -> None:
    """The issue's reproduction: a deep payload used to raise out of run(), exit 1, resume,
    get the same event replayed, and crash again forever."""
    import redis

    from ingest.testing import SimulatorThread
    from tests.support import (
        REDIS_HOST,
        REDIS_PORT,
        base_env,
        gateway_process,
        redis_url,
        require_broker,
        short_tempdir,
    )

    require_broker("redis")
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=PROCESS_REDIS_DB)
    client.flushdb()
    with short_tempdir() as data_dir, SimulatorThread() as sim:
        env = base_env(
            DISCORD_TOKEN="sim-token",
            DISCORD_GATEWAY_URL=sim.url,
            DISCORD_API_URL=sim.api_url,
            INGEST_DATA_DIR=str(data_dir),
            CELERY_BROKER_URL=redis_url(PROCESS_REDIS_DB),
        )
        gateway = gateway_process(env)
        try:
            gateway.wait_for_line("all 1 shards ready", timeout=30)
            sim.emit_many("MESSAGE_CREATE", sample_message_create, 10)
            sim.emit_poison(depth=400)
            sim.emit_many("MESSAGE_CREATE", lambda i: sample_message_create(10 + i), 10)
            gateway.wait_for(
                lambda _: (
                    client.llen("discord.MESSAGE_CREATE") == 20
                    and client.llen("discord.invalid") == 1
                ),
                timeout=30,
                what="20 events and 1 dead letter in Redis",
            )
            assert gateway.popen.poll() is None
            assert gateway.stop() == 0
        finally:
            gateway.kill()
    stored = orjson.loads(client.get("ingest:session:1:0") or b"{}")
    client.close()
    stopped = next(line for line in gateway.output() if "stopped:" in line)
    print(f"\npython -m ingest, poison event: sent 21; gateway: {stopped}")
    assert "21 published" not in stopped and "1 invalid" in stopped
    assert stored["sequence"] == 22  # READY, 10, the poison event, 10: all committed
    assert "Traceback" not in gateway.text()


def test_spacebar_shaped_payloads_are_published_not_dead_lettered() -> None:
    """The four dispatch shapes an independent server (Spacebar) sent that the first models
    refused, through simulator -> gateway -> pipeline: all published, none dead-lettered."""
    from ingest.routing import route_for
    from ingest.testing.spacebar import SPACEBAR_PAYLOADS

    counts: dict[str, int] = {}

    async def scenario() -> None:
        async with piped(subscribed=frozenset(SPACEBAR_PAYLOADS)) as p:
            for event, data in SPACEBAR_PAYLOADS.items():
                await p.sim.emit(event, data)
            last = p.sim.sessions[p.gateway.session_id or ""].sequence
            await p.until(lambda: p.gateway.session.committed_sequence == last)
            published = {
                event: len(p.publisher.named(route_for(event).task_name))
                for event in SPACEBAR_PAYLOADS
            }
            counts.update(
                sent=len(SPACEBAR_PAYLOADS),
                published=sum(published.values()),
                dead_lettered=len(p.dead_letters()),
            )
            assert published == dict.fromkeys(SPACEBAR_PAYLOADS, 1), published

    run(scenario)
    print("spacebar shapes:", counts)
    assert counts == {"sent": 4, "published": 4, "dead_lettered": 0}
