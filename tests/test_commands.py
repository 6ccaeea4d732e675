"""Gateway commands from any process (issue #13): payloads checked at the caller, the relay's
decisions on an explicit clock against a real session core (budget, TTL, order, op 8 limits),
routing through Redis, and real gateway processes against the simulator."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from ingest.command_relay import ShardCommands
from ingest.commands import (
    Commands,
    QueuedCommand,
    bell_key,
    checked_payload,
    encode_command,
    pending_key,
    shard_count_key,
    shard_for,
)
from ingest.compression import Compression
from ingest.errors import CommandError, NotConnected, PayloadTooLarge
from ingest.protocol import COMMAND_WINDOW_SECONDS, COMMANDS_PER_WINDOW, Opcode
from ingest.session import Close, Session, SessionConfig, State
from tests.support import (
    redis_url,
    require_broker,
)

REDIS_DB = 4  # see conftest.py
REDIS_URL = redis_url(REDIS_DB)
HEARTBEAT_INTERVAL = 41.25  # Discord's usual, in seconds


# --------------------------------------------------------------------------------------------
# Payloads are checked before they leave the caller
# --------------------------------------------------------------------------------------------


def test_payloads_come_out_in_discords_form() -> None:
    assert checked_payload(8, {"guild_id": 41771983444115456, "query": "", "limit": 0}) == {
        "guild_id": "41771983444115456",
        "query": "",
        "limit": 0,
        "presences": False,
    }
    assert checked_payload(4, {"guild_id": "1", "channel_id": None}) == {
        "guild_id": "1",
        "channel_id": None,
        "self_mute": False,
        "self_deaf": False,
    }


@pytest.mark.parametrize(
    ("op", "d", "says"),
    [
        (1, 5, "not a command an application sends"),
        (2, {}, "not a command an application sends"),
        (3, {"status": "sleeping"}, "status"),
        (4, {"guild_id": "x", "channel_id": None}, "guild_id"),
        (8, {"guild_id": 1, "query": "a", "user_ids": [1], "limit": 1}, "exactly one of"),
        (8, {"guild_id": 1, "user_ids": list(range(1, 102)), "limit": 0}, "user_ids"),
        (8, {"guild_id": 1, "query": "", "limit": 0, "nonce": "n" * 33}, "32 bytes"),
        (8, {"guild_id": 1, "query": "", "limit": -1}, "limit"),
    ],
)
def test_bad_payloads_are_refused_before_anything_is_queued(op: int, d: Any, says: str) -> None:
    with pytest.raises(CommandError, match=says):
        checked_payload(op, d)


def test_a_payload_over_4096_bytes_is_refused_at_the_caller() -> None:
    activities = [{"name": "x" * 4100, "type": 0}]
    with pytest.raises(PayloadTooLarge, match="4096"):
        checked_payload(3, {"status": "online", "activities": activities})


# --------------------------------------------------------------------------------------------
# The relay's decisions: a real session core, an explicit clock
# --------------------------------------------------------------------------------------------


def _session() -> Session:
    config = SessionConfig(
        token="t", intents=0, gateway_url="ws://sim", compression=Compression.NONE
    )
    return Session(config, rng=lambda: 0.5)


def _connect(session: Session, now: float, heartbeat_ms: float = HEARTBEAT_INTERVAL * 1000) -> None:
    """HELLO, IDENTIFY, READY: the session is CONNECTED at ``now``."""
    session.connection_made(now)
    session.receive_frame(json.dumps({"op": 10, "d": {"heartbeat_interval": heartbeat_ms}}), now)
    session.identify(now)
    ready = {"op": 0, "t": "READY", "s": 1, "d": {"session_id": "s1", "resume_gateway_url": None}}
    session.receive_frame(json.dumps(ready), now)
    assert session.state is State.CONNECTED
    session.events_received()


def _command(op: int, d: Any, issued_at: float, ttl: float = 60.0) -> QueuedCommand:
    d = checked_payload(op, d)
    return QueuedCommand(op, d, issued_at, ttl, encode_command(op, d, issued_at, ttl))


def _member_request(nonce: str, guild_id: int = 1, **fields: Any) -> dict[str, Any]:
    return {"guild_id": guild_id, "query": "a", "limit": 1, "nonce": nonce, **fields}


def _ops(frames: list[str]) -> list[tuple[int, Any]]:
    return [(payload["op"], payload["d"]) for payload in map(orjson.loads, frames)]


def test_a_burst_of_500_commands_goes_out_in_the_budgets_time_with_heartbeats_on_time() -> None:
    session = _session()
    _connect(session, 0.0)
    sent: list[tuple[float, int]] = [(0.0, Opcode.IDENTIFY)]
    session.data_to_send()
    held = ShardCommands(0)
    for i in range(500):
        held.push(_command(8, _member_request(str(i), guild_id=i + 1), 0.0, ttl=600.0))
    now = 0.0
    nonces: list[str] = []
    closes: list[Close] = []
    while len(held) and now < 1000:
        pumped = held.pump(session, now, wall_now=now)
        assert not pumped.expired and not pumped.invalid
        session.tick(now)
        for op, d in _ops(session.data_to_send()):
            sent.append((now, op))
            if op == Opcode.HEARTBEAT:
                session.receive_frame('{"op": 11, "d": null}', now)
            else:
                nonces.append(d["nonce"])
        closes += [e for e in session.events_received() if isinstance(e, Close)]
        deadline = session.next_deadline()
        wakes = [w for w in (deadline, None if pumped.wait is None else now + pumped.wait) if w]
        now = min(wakes)

    assert nonces == [str(i) for i in range(500)]  # all of them, in issue order
    assert closes == [] and session.state is State.CONNECTED
    # 115 per window (5 kept for heartbeats): the 500th goes in the 5th window, at 240 s.
    finished = max(t for t, op in sent if op == Opcode.REQUEST_GUILD_MEMBERS)
    assert finished == pytest.approx(4 * COMMAND_WINDOW_SECONDS)
    for t, _ in sent:
        in_window = [s for s, _ in sent if t - COMMAND_WINDOW_SECONDS < s <= t]
        assert len(in_window) <= COMMANDS_PER_WINDOW
    beats = [t for t, op in sent if op == Opcode.HEARTBEAT]
    assert len(beats) >= 5
    assert beats[0] == pytest.approx(HEARTBEAT_INTERVAL * 0.5)  # the jittered first beat
    for a, b in itertools.pairwise(beats):
        assert b - a == pytest.approx(HEARTBEAT_INTERVAL)  # never late, never dropped
    assert session.commands_dropped == 0


def test_commands_wait_for_the_connection_and_go_out_in_issue_order() -> None:
    session = _session()
    held = ShardCommands(0)
    for nonce in ("a", "b", "c"):
        held.push(_command(8, _member_request(nonce), issued_at=100.0))
    waiting = held.pump(session, 0.0, wall_now=110.0)  # reconnecting: nothing goes
    assert waiting.sent == [] and waiting.wait == pytest.approx(50.0)
    _connect(session, 1.0)
    session.data_to_send()
    pumped = held.pump(session, 1.0, wall_now=111.0)
    assert [c.d["nonce"] for c in pumped.sent] == ["a", "b", "c"]
    assert [d["nonce"] for _, d in _ops(session.data_to_send())] == ["a", "b", "c"]


def test_a_command_not_sent_within_its_ttl_is_dropped_and_never_sent_late() -> None:
    session = _session()
    held = ShardCommands(0)
    held.push(_command(8, _member_request("short"), issued_at=100.0, ttl=60.0))
    held.push(_command(8, _member_request("long"), issued_at=100.0, ttl=120.0))
    assert held.pump(session, 0.0, wall_now=159.9).expired == []
    pumped = held.pump(session, 0.0, wall_now=160.0)
    assert [c.d["nonce"] for c in pumped.expired] == ["short"]
    _connect(session, 5.0)
    session.data_to_send()
    pumped = held.pump(session, 5.0, wall_now=165.0)
    assert [c.d["nonce"] for c in pumped.sent] == ["long"]
    assert [d["nonce"] for _, d in _ops(session.data_to_send())] == ["long"]


def test_a_command_the_budget_cannot_fit_within_its_ttl_is_dropped_at_once() -> None:
    session = _session()
    _connect(session, 0.0)
    held = ShardCommands(0)
    for i in range(115):
        held.push(_command(8, _member_request(str(i)), issued_at=0.0, ttl=30.0))
    pumped = held.pump(session, 0.0, wall_now=0.0)
    # 114 fit beside the IDENTIFY (5 slots kept for heartbeats); the next slot frees at 60 s,
    # past the last one's 30 s TTL.
    assert len(pumped.sent) == 114 and [c.d["nonce"] for c in pumped.expired] == ["114"]


def test_a_full_member_list_of_one_guild_is_asked_at_most_once_per_30_seconds() -> None:
    session = _session()
    _connect(session, 0.0)
    held = ShardCommands(0)
    full = {"guild_id": 7, "query": "", "limit": 0}
    held.push(_command(8, {**full, "nonce": "first"}, issued_at=0.0))
    held.push(_command(8, {**full, "nonce": "again"}, issued_at=0.0))
    held.push(_command(8, {**full, "guild_id": 8, "nonce": "other"}, issued_at=0.0))
    pumped = held.pump(session, 0.0, wall_now=0.0)
    assert [c.d["nonce"] for c in pumped.sent] == ["first"]
    assert pumped.wait == pytest.approx(30.0)
    pumped = held.pump(session, 30.0, wall_now=30.0)
    assert [c.d["nonce"] for c in pumped.sent] == ["again", "other"]


# --------------------------------------------------------------------------------------------
# The caller: routing through Redis
# --------------------------------------------------------------------------------------------


@pytest.fixture
def state_redis() -> Iterator[redis.Redis]:
    require_broker("redis")
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def commands(state_redis: redis.Redis) -> Iterator[Commands]:
    prefix = f"test-commands-{uuid.uuid4().hex}"
    found = Commands(redis.Redis.from_url(REDIS_URL), prefix=prefix)
    yield found
    keys = list(state_redis.scan_iter(match=f"{prefix}*"))
    if keys:
        state_redis.delete(*keys)
    found.close()


def test_without_a_gateway_having_run_a_command_is_a_clear_error(commands: Commands) -> None:
    with pytest.raises(NotConnected, match="no gateway process has run"):
        commands.request_guild_members(1 << 22)


def test_commands_are_queued_for_the_shard_that_owns_the_guild(
    commands: Commands, state_redis: redis.Redis
) -> None:
    state_redis.set(shard_count_key(commands.prefix), 4)
    guild = (123456 << 22) | 99
    nonce = commands.request_guild_members(guild, query="ab", limit=5)
    commands.update_voice_state(guild, None)
    commands.update_presence(status="idle")
    with pytest.raises(PayloadTooLarge):
        commands.update_presence(activities=[{"name": "x" * 5000, "type": 0}])

    queued = {
        shard: [
            orjson.loads(raw)
            for raw in state_redis.lrange(pending_key(shard, 4, commands.prefix), 0, -1)
        ]
        for shard in range(4)
    }
    owner = shard_for(guild, 4)
    assert owner == 123456 % 4
    assert [c["op"] for c in reversed(queued[owner])] == [8, 4, 3]
    assert queued[owner][-1]["d"]["nonce"] == nonce and len(nonce) == 32
    for shard in set(range(4)) - {owner}:
        assert [(c["op"], c["d"]["status"]) for c in queued[shard]] == [(3, "idle")]
    # Every shard's bell rang, and holds one token however many commands rang it.
    for shard in range(4):
        assert state_redis.lrange(bell_key(shard, 4, commands.prefix), 0, -1) == [b"1"]


def test_an_unreachable_state_redis_is_a_command_error_not_a_silent_loss() -> None:
    unreachable = Commands(redis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=1))
    with pytest.raises(CommandError, match="not queued: the state Redis did not answer"):
        unreachable.update_presence(status="dnd")
