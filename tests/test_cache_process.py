"""The shared cache with real processes: simulator -> `python -m ingest` -> Redis -> a stock
`celery worker` whose handler (tests.apps.cache_reader) reads the cache. The gateway writes
each event's cache entry before it publishes the event, so a handler never reads older state;
a non-resumed reconnect rebuilds; INGEST_CACHE=none writes nothing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from ingest.cache import Cache
from ingest.testing import SimulatorThread
from ingest.testing.simulator import (
    DEFAULT_CHANNEL_ID,
    DEFAULT_GUILD_ID,
    _guild_id,
    sample_guild_create,
    sample_message_create,
)
from tests.support import (
    RECORD_DB,
    Proc,
    base_env,
    gateway_process,
    redis_url,
    require_broker,
    short_tempdir,
    worker_process,
)

REDIS_DB = 0  # shared with test_cache.py: run the two one after the other (see conftest)
APP = "tests.apps.cache_reader"
ROUNDS = 50


@pytest.fixture
def broker() -> Iterator[str]:
    require_broker("redis")
    url = redis_url(REDIS_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    yield url


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with short_tempdir() as path:
        yield path


def _env(sim: SimulatorThread, broker: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return base_env(
        DISCORD_TOKEN="sim-token",
        DISCORD_GATEWAY_URL=sim.url,
        DISCORD_API_URL=sim.api_url,
        CELERY_BROKER_URL=broker,
        INGEST_CELERY_APP=APP,
        INGEST_DATA_DIR=str(data_dir),
        **extra,
    )


def _wait(predicate: Callable[[], bool], timeout: float, what: str, *procs: Proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    tails = "\n".join(f"--- {p.name}\n" + "\n".join(p.output()[-40:]) for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_a_handler_reads_the_state_its_event_left_50_times_out_of_50(
    broker: str, data_dir: Path
) -> None:
    record = redis.Redis.from_url(redis_url(RECORD_DB))
    prefix = f"{uuid.uuid4().hex}:"
    gid, cid = DEFAULT_GUILD_ID, DEFAULT_CHANNEL_ID
    guild = sample_guild_create(1, size_kb=50, guild_id=gid)
    guild["channels"].append({"id": cid, "type": 0, "name": "start", "position": 9})
    with SimulatorThread() as sim:
        env = _env(
            sim,
            broker,
            data_dir,
            INGEST_CACHE="guilds,channels,roles,members",
            RECORD_URL=redis_url(RECORD_DB),
            RECORD_PREFIX=prefix,
        )
        worker = worker_process(env, app=APP, name="cache-worker")
        gateway = gateway_process(env)
        try:
            gateway.wait_for_line("all 1 shards ready", timeout=30)
            assert any("same transaction as the broker" in line for line in gateway.output())
            # The handlers run while later events are still being written.
            worker.wait_for_line("ready.", timeout=60)
            sim.emit("GUILD_CREATE", guild)
            for i in range(ROUNDS):
                role_id = str(1190000000000000000 + i)
                message = sample_message_create(i)
                del message["member"]  # the member must come from GUILD_MEMBER_UPDATE
                message["content"] = f"check {i} {role_id}"
                # None of these three has a handler: cached, never published.
                channel = {"id": cid, "guild_id": gid, "type": 0, "name": f"name-{i}"}
                sim.emit("CHANNEL_UPDATE", channel)
                sim.emit(
                    "GUILD_ROLE_CREATE",
                    {"guild_id": gid, "role": {"id": role_id, "name": f"role-{i}", "position": i}},
                )
                sim.emit(
                    "GUILD_MEMBER_UPDATE",
                    {
                        "guild_id": gid,
                        "user": message["author"],
                        "roles": [role_id],
                        "nick": f"nick-{i}",
                        "joined_at": "2025-01-01T00:00:00+00:00",
                    },
                )
                sim.emit("MESSAGE_CREATE", message)
            _wait(
                lambda: record.llen(f"{prefix}seen") >= ROUNDS,
                120,
                f"{ROUNDS} handler runs",
                worker,
                gateway,
            )
            sim.emit("GUILD_DELETE", {"id": gid})
            gone = sample_message_create(ROUNDS)
            gone["content"] = "gone"
            del gone["member"]
            sim.emit("MESSAGE_CREATE", gone)
            _wait(
                lambda: record.llen(f"{prefix}seen") >= ROUNDS + 1,
                60,
                "the handler run after GUILD_DELETE",
                worker,
                gateway,
            )
            assert gateway.stop() == 0
        finally:
            gateway.kill()
            worker.stop()
    seen = [orjson.loads(raw) for raw in record.lrange(f"{prefix}seen", 0, -1)]
    record.delete(f"{prefix}seen")
    record.close()
    by_round: dict[int, dict[str, Any]] = {}
    last = None
    for entry in seen:
        words = entry["content"].split()
        if words[0] == "gone":
            last = entry
        else:
            by_round[int(words[1])] = entry
    assert sorted(by_round) == list(range(ROUNDS))
    stale = []
    for i, entry in by_round.items():
        # The channel may already carry a later round's name, never an earlier one.
        channel_round = int(entry["channel"].split("-")[1]) if entry["channel"] else -1
        if not (
            entry["guild"]
            and channel_round >= i
            and entry["role"] == f"role-{i}"
            and entry["nick"] == f"nick-{i}"
            and entry["member_roles"] == [str(1190000000000000000 + i)]
        ):
            stale.append((i, entry))
    assert not stale, f"{len(stale)} of {ROUNDS} handlers read older state: {stale[:3]}"
    assert last == {
        "content": "gone",
        "guild": False,
        "channel": None,
        "role": None,
        "nick": None,
        "member_roles": None,
    }
    assert "discord.CHANNEL_UPDATE" not in worker.text()


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_a_new_session_rebuilds_the_cache_from_its_ready_and_guild_creates(
    broker: str, data_dir: Path
) -> None:
    cache = Cache.from_env({"INGEST_STATE_URL": broker})
    with SimulatorThread(guilds_per_shard=2, guild_size_kb=8) as sim:
        gateway = gateway_process(_env(sim, broker, data_dir))  # the default cache
        try:
            gateway.wait_for_line("all 1 shards ready", timeout=30)
            # The simulator's two guilds of shard 0, as its READY lists them.
            guild_ids = [int(_guild_id(0, g, 1)) for g in range(2)]
            _wait(
                lambda: all(cache.guild(g) is not None for g in guild_ids),
                30,
                "both guilds cached",
                gateway,
            )
            first = guild_ids[0]
            extra = sample_guild_create(7, size_kb=4)  # joined during the session
            sim.emit("GUILD_CREATE", extra)
            sim.emit("CHANNEL_CREATE", {"id": "66", "guild_id": str(first), "name": "stale"})
            _wait(
                lambda: cache.guild(int(extra["id"])) is not None and cache.channel(66) is not None,
                30,
                "the extra guild and channel cached",
                gateway,
            )
            identified = len(sim.identify_log)
            sim.send_invalid_session(resumable=False)
            _wait(
                lambda: len(sim.identify_log) > identified,
                30,
                "a new IDENTIFY",
                gateway,
            )

            def rebuilt() -> bool:
                guild = cache.guild(first)
                return (
                    cache.guild(int(extra["id"])) is None
                    and cache.channel(66) is None
                    and guild is not None
                    and (guild.model_extra or {}).get("unavailable") is False
                )

            _wait(rebuilt, 30, "the cache rebuilt by the new session", gateway)
            assert len(cache.guild_channels(first)) == 6
            assert gateway.stop() == 0
        finally:
            gateway.kill()
            cache.close()


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_ingest_cache_none_writes_nothing(broker: str, data_dir: Path) -> None:
    client = redis.Redis.from_url(broker)
    with SimulatorThread(guilds_per_shard=2, guild_size_kb=8) as sim:
        gateway = gateway_process(_env(sim, broker, data_dir, INGEST_CACHE="none"))
        try:
            gateway.wait_for_line("all 1 shards ready", timeout=30)
            gateway.wait_for_line("cache off (INGEST_CACHE=none)", timeout=5)
            sim.emit("CHANNEL_CREATE", {"id": "66", "guild_id": DEFAULT_GUILD_ID, "name": "c"})
            sim.emit("MESSAGE_CREATE", sample_message_create(1))
            # No worker: the published message waits in its queue, proof the events went by.
            _wait(lambda: client.llen("discord.MESSAGE_CREATE") == 1, 30, "the message", gateway)
            assert gateway.stop() == 0
        finally:
            gateway.kill()
    assert list(client.scan_iter(match="ingest:cache:*")) == []
    client.close()


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_a_gateway_whose_cache_is_empty_identifies_instead_of_resuming(
    broker: str, data_dir: Path
) -> None:
    # A resume never brings READY and the GUILD_CREATEs back: a session stored while the cache
    # was off (or before Redis was flushed) must start anew, or the cache stays empty.
    cache = Cache.from_env({"INGEST_STATE_URL": broker})
    client = redis.Redis.from_url(broker)
    with SimulatorThread(guilds_per_shard=2, guild_size_kb=4) as sim:
        guild = int(_guild_id(0, 0, 1))
        try:
            for cache_setting, expect in (("none", "resume"), ("", "identify"), ("", "resume")):
                identified = len(sim.identify_log)
                resumed = len(sim.resume_log)
                extra = {"INGEST_CACHE": cache_setting} if cache_setting else {}
                gateway = gateway_process(_env(sim, broker, data_dir, **extra))
                try:
                    gateway.wait_for_line("all 1 shards ready", timeout=30)
                    if cache_setting != "none":
                        _wait(lambda: cache.guild(guild) is not None, 30, "the guild", gateway)
                    assert gateway.stop() == 0
                finally:
                    gateway.kill()
                if expect == "identify":
                    assert len(sim.identify_log) == identified + 1, gateway.text()[-2000:]
                    assert "identifying instead of resuming" in gateway.text()
                elif identified:  # the first run of all identifies; later ones resume
                    assert len(sim.resume_log) == resumed + 1, gateway.text()[-2000:]
        finally:
            cache.close()
            client.close()
