"""Gateway commands end to end (issue #13): real gateway processes (`python -m ingest`) against
the simulator, commands issued from another process through the state Redis, the answers
(GUILD_MEMBERS_CHUNK) handled by a real worker of the suite's own app."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from ingest.commands import (
    Commands,
    encode_command,
    pending_key,
    processing_key,
    shard_for,
)
from ingest.protocol import Opcode
from ingest.testing import SimulatorThread
from ingest.testing.processes import free_port
from tests.support import (
    REDIS_PORT,
    ROOT,
    Proc,
    Record,
    base_env,
    connections_to,
    gateway_process,
    redis_url,
    require_broker,
    short_tempdir,
    worker_process,
)

REDIS_DB = 4  # see conftest.py (shared with test_commands.py, which uses key prefixes)
REDIS_URL = redis_url(REDIS_DB)
CHUNKS_APP = "tests.apps.chunks"
# The README's "Connection budget" for one gateway process whose state Redis is its broker:
# publisher, session store, identify lease, session start budget, the cache writer and the
# command relay's two (bells, short calls); the four pools capped at 2 each, the cache at 1,
# the relay at 2, whatever the shards.
GATEWAY_REDIS_CONNECTIONS = 7
GATEWAY_REDIS_CONNECTIONS_MAX = 11

# The separate process that issues commands: a script, as a web app or a handler would.
ISSUER = """
import json, sys, time
from ingest.commands import request_guild_members, update_presence
for guild_id in map(int, sys.argv[1:]):
    issued_at = time.time()
    nonce = request_guild_members(guild_id)
    print(json.dumps({"guild_id": guild_id, "nonce": nonce, "issued_at": issued_at}))
update_presence(status="idle", activities=[{"name": "the tests", "type": 0}])
"""


@pytest.fixture
def state_redis() -> Iterator[redis.Redis]:
    require_broker("redis")
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()  # sessions and command queues of an earlier run must not be resumed
    yield client
    client.close()


def _env(sim: SimulatorThread, data_dir: Path, shard_ids: str, shard_count: int) -> dict[str, str]:
    return base_env(
        DISCORD_TOKEN="sim-token",
        DISCORD_API_URL=sim.api_url,
        DISCORD_SHARD_COUNT=str(shard_count),
        DISCORD_SHARD_IDS=shard_ids,
        CELERY_BROKER_URL=REDIS_URL,
        INGEST_DATA_DIR=str(data_dir / shard_ids),
        INGEST_CELERY_APP=CHUNKS_APP,
    )


def _close_codes(sim: SimulatorThread) -> list[int | None]:
    return sim.read(lambda s: [c.close_code for c in s.connections])


def _wait(predicate: Callable[[], bool], timeout: float, what: str, *procs: Proc) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n" + "\n".join(p.output()[-30:]) for p in procs)
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.05)


def _heartbeats(sim: SimulatorThread) -> int:
    return sum(len(session.heartbeats) for session in sim.sessions.values())


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_commands_from_another_process_reach_the_shard_that_owns_the_guild(
    state_redis: redis.Redis, record: Record, measured: Callable[[str], None]
) -> None:
    # Guild k lives on shard k % 4 ((1_000_000 + k) >> 0 ... as Discord shards: id >> 22).
    guild_ids = [((1_000_000 + k) << 22) | 5 for k in range(40)]
    assert Counter(shard_for(g, 4) for g in guild_ids) == {0: 10, 1: 10, 2: 10, 3: 10}
    # A command a crashed gateway had taken but not sent: the next owner of shard 1 sends it.
    voice_guild = ((1_000_000 + 1) << 22) | 7
    voice = {"guild_id": str(voice_guild), "channel_id": None, "self_mute": False}
    voice["self_deaf"] = False
    state_redis.lpush(
        processing_key(1, 4), encode_command(Opcode.VOICE_STATE_UPDATE, voice, time.time(), 120)
    )

    with SimulatorThread(shard_count=4, max_concurrency=4) as sim, short_tempdir() as data_dir:
        worker = worker_process(
            {**_env(sim, data_dir, "0-3", 4), **record.env()}, app=CHUNKS_APP, name="worker"
        )
        metrics_port = free_port()
        low = gateway_process(
            {**_env(sim, data_dir, "0-1", 4), "INGEST_METRICS_PORT": str(metrics_port)},
            name="gateway 0-1",
        )
        high = gateway_process(_env(sim, data_dir, "2-3", 4), name="gateway 2-3")
        procs = [low, high, worker]
        try:
            low.wait_for_line("all 2 shards ready", timeout=60)
            high.wait_for_line("all 2 shards ready", timeout=60)
            issuer = subprocess.run(
                [sys.executable, "-c", ISSUER, *map(str, guild_ids)],
                env=base_env(CELERY_BROKER_URL=REDIS_URL),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert issuer.returncode == 0, issuer.stderr
            issued = [json.loads(line) for line in issuer.stdout.splitlines()]
            nonces = {i["nonce"]: i for i in issued}
            assert len(nonces) == 40

            def arrived() -> bool:
                ops = Counter(c.op for c in sim.commands())
                return ops[Opcode.REQUEST_GUILD_MEMBERS] >= 40 and ops[Opcode.PRESENCE_UPDATE] >= 4

            _wait(arrived, 30, "40 member requests and 4 presences on the simulator", *procs)
            chunks_key = record.key("GUILD_MEMBERS_CHUNK:nonces")
            _wait(
                lambda: record.client.scard(chunks_key) >= 40,
                60,
                "40 GUILD_MEMBERS_CHUNK tasks",
                *procs,
            )
            time.sleep(0.5)  # anything sent twice or late would show now
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as page:
                scraped = page.read().decode()
            commands = sim.commands()
            chunks = {raw.decode() for raw in record.client.smembers(chunks_key)}
            for proc in (low, high):
                assert proc.stop() == 0, proc.text()
        finally:
            for proc in procs:
                proc.kill()
        closes = _close_codes(sim)

    member_requests = [c for c in commands if c.op == Opcode.REQUEST_GUILD_MEMBERS]
    assert sorted(c.data["nonce"] for c in member_requests) == sorted(nonces)
    for request in member_requests:
        assert request.shard_id == shard_for(int(request.data["guild_id"]), 4)
        assert int(request.data["guild_id"]) == nonces[request.data["nonce"]]["guild_id"]
    presences = [c for c in commands if c.op == Opcode.PRESENCE_UPDATE]
    assert sorted(c.shard_id for c in presences) == [0, 1, 2, 3]
    assert all(c.data["status"] == "idle" for c in presences)
    voices = [c for c in commands if c.op == Opcode.VOICE_STATE_UPDATE]
    assert [(c.shard_id, c.data["guild_id"]) for c in voices] == [(1, str(voice_guild))]
    assert 4008 not in closes
    # Each chunk came back as a task carrying its nonce, from the shard that asked.
    assert chunks == {f"{nonce} {shard_for(i['guild_id'], 4)}" for nonce, i in nonces.items()}
    # The process of shards 0-1 counts what it received and sent, by op and shard.
    for op, shard, count in ((8, 0, 10), (8, 1, 10), (3, 0, 1), (3, 1, 1), (4, 1, 1)):
        for what in ("received", "sent"):
            line = f'discord_ingest_commands_{what}_total{{op="{op}",shard="{shard}"}} {count}.0'
            assert line in scraped.splitlines(), line
    assert "discord_ingest_command_wait_seconds_count 23.0" in scraped.splitlines()
    assert "discord_ingest_commands_expired_total{op=" not in scraped
    buckets = {
        line.split('"')[1]: int(float(line.split()[-1]))
        for line in scraped.splitlines()
        if line.startswith("discord_ingest_command_wait_seconds_bucket")
    }
    latencies = [c.time - nonces[c.data["nonce"]]["issued_at"] for c in member_requests]
    measured(
        f"issue->sent latency of 40 member requests over 2 processes: p50 "
        f"{sorted(latencies)[20] * 1000:.1f} ms, p99 {_p99(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms; the relay's own issue->socket histogram "
        f"(shards 0-1, 23 commands, one waiting for READY): {buckets['0.005']} <= 5 ms, "
        f"{buckets['0.01']} <= 10 ms, {buckets['0.025']} <= 25 ms"
    )
    assert _p99(latencies) <= 0.25


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_a_burst_of_500_commands_to_one_shard_queues_in_the_budget_and_survives_a_crash(
    state_redis: redis.Redis, measured: Callable[[str], None]
) -> None:
    guild_id = 1 << 22
    # Beats every 2 s, so some fall while the budget is spent (Discord's 41 s would not).
    with (
        SimulatorThread(shard_count=1, heartbeat_interval_ms=2000) as sim,
        short_tempdir() as data_dir,
    ):
        env = _env(sim, data_dir, "0", 1)
        first = gateway_process(env, name="gateway")
        second: Proc | None = None
        try:
            first.wait_for_line("all 1 shards ready", timeout=60)
            caller = Commands(redis.Redis.from_url(REDIS_URL))
            started = time.monotonic()
            for i in range(500):
                caller.request_guild_members(guild_id, query="a", limit=1, nonce=str(i), ttl=600)
            caller.close()

            def requests() -> list[str]:
                return [
                    c.data["nonce"] for c in sim.commands() if c.op == Opcode.REQUEST_GUILD_MEMBERS
                ]

            # IDENTIFY and heartbeats share the 120; 5 slots stay free for heartbeats.
            _wait(lambda: len(requests()) >= 110, 20, "the first window's commands", first)
            burst_seconds = time.monotonic() - started
            beats_before = _heartbeats(sim)
            time.sleep(3.0)  # the budget is spent: nothing more may go out, but heartbeats do
            sent_first = requests()
            assert _heartbeats(sim) - beats_before >= 1
            assert 110 <= len(sent_first) <= 114
            assert sim.ready_shards() == [0]  # still connected: no 4008, no reconnect
            assert _close_codes(sim) == [None] and sim.connections_opened == 1
            held = state_redis.llen(pending_key(0, 1)) + state_redis.llen(processing_key(0, 1))
            assert held == 500 - len(sent_first)

            first.kill()  # kill -9 with ~390 commands taken into its processing list
            second = gateway_process(env, name="gateway again")
            second.wait_for_line("all 1 shards ready", timeout=60)
            _wait(lambda: len(requests()) >= len(sent_first) + 110, 20, "the next window", second)
            time.sleep(1.0)
            sent = requests()
            # What the killed process had taken went back to the head of the queue, in order.
            assert any("re-queued" in line for line in second.output()), second.text()
            assert second.stop() == 0, second.text()
        finally:
            first.kill()
            if second is not None:
                second.kill()
        closes = _close_codes(sim)

    # In issue order, none twice, none lost: the rest still waits in Redis.
    assert sent == [str(i) for i in range(len(sent))]
    assert 4008 not in closes
    held = state_redis.llen(pending_key(0, 1)) + state_redis.llen(processing_key(0, 1))
    assert held == 500 - len(sent)
    measured(
        f"500-command burst to one shard: {len(sent_first)} sent in {burst_seconds:.2f} s "
        f"(the first window), the rest queued; after kill -9 and restart {len(sent)} sent in "
        f"order, {held} still queued, no close"
    )


def _connections_and_latencies(shard_count: int) -> tuple[int, list[float]]:
    """Run one gateway process of ``shard_count`` shards, send a member request to each shard
    and a presence to all: the most Redis connections it held meanwhile, and each request's
    issue->sent time. Asserts every command reached the shard it was for."""
    guild_ids = [((1_000_000 + k) << 22) | 5 for k in range(shard_count)]
    assert sorted(shard_for(g, shard_count) for g in guild_ids) == list(range(shard_count))
    with (
        SimulatorThread(shard_count=shard_count, max_concurrency=shard_count) as sim,
        short_tempdir() as data_dir,
    ):
        gateway = gateway_process(
            _env(sim, data_dir, f"0-{shard_count - 1}", shard_count),
            name=f"gateway of {shard_count}",
        )
        try:
            gateway.wait_for_line(f"all {shard_count} shards ready", timeout=60)
            seen = [connections_to(REDIS_PORT, gateway)]
            caller = Commands(redis.Redis.from_url(REDIS_URL))
            issued_at = {}
            for guild_id in guild_ids:
                issued_at[caller.request_guild_members(guild_id)] = time.time()
                seen.append(connections_to(REDIS_PORT, gateway))
            caller.update_presence(status="dnd")
            caller.close()

            def arrived() -> bool:
                seen.append(connections_to(REDIS_PORT, gateway))
                ops = Counter(c.op for c in sim.commands())
                wanted = (Opcode.REQUEST_GUILD_MEMBERS, Opcode.PRESENCE_UPDATE)
                return all(ops[op] >= shard_count for op in wanted)

            _wait(arrived, 20, f"a command on each of {shard_count} shards", gateway)
            commands = sim.commands()
            assert gateway.stop() == 0, gateway.text()
        finally:
            gateway.kill()
    requests = [c for c in commands if c.op == Opcode.REQUEST_GUILD_MEMBERS]
    assert sorted(c.shard_id for c in requests) == list(range(shard_count))
    for request in requests:
        assert request.shard_id == shard_for(int(request.data["guild_id"]), shard_count)
    presences = [c for c in commands if c.op == Opcode.PRESENCE_UPDATE]
    assert sorted(c.shard_id for c in presences) == list(range(shard_count))
    return max(seen), [c.time - issued_at[c.data["nonce"]] for c in requests]


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_a_gateway_of_8_shards_holds_no_more_redis_connections_than_one_of_1(
    state_redis: redis.Redis, measured: Callable[[str], None]
) -> None:
    # Each shard once waited in a blocking pop of its own, on a connection of its own: 64
    # shards were 64 more connections, over a hosted plan's cap (Heroku mini: 20).
    one, one_latencies = _connections_and_latencies(1)
    eight, eight_latencies = _connections_and_latencies(8)
    latencies = one_latencies + eight_latencies
    measured(
        f"Redis connections of one gateway process (most seen): {one} with 1 shard, {eight} "
        f"with 8; issue->sent of one member request per shard: max "
        f"{max(latencies) * 1000:.1f} ms"
    )
    assert one <= GATEWAY_REDIS_CONNECTIONS
    # A connection per shard would be 4 + 8 at the least.
    assert eight <= GATEWAY_REDIS_CONNECTIONS_MAX
    assert max(latencies) <= 0.25
