"""The shared cache, event by event: what the gateway's writer makes of each dispatch, applied
to a real Redis, read back through ``ingest.cache``. Partial updates merge; deletes remove; a
new session's READY drops what it no longer lists; shards never touch each other's guilds."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
import redis

from ingest.cache import AsyncCache, Cache
from ingest.cache_layout import DEFAULT_KINDS, KINDS, parse_kinds
from ingest.cache_writer import CacheWriter, Command
from ingest.config import load_config
from ingest.errors import ConfigError
from ingest.fanout import fan_out
from ingest.gateway import Gateway
from ingest.messages import TaskMessage
from ingest.pipeline import Pipeline
from ingest.publish import RedisPublisher
from ingest.session import Dispatch, SessionState
from ingest.testing.simulator import (
    _guild_id,
    sample_guild_create,
    sample_message_create,
)
from tests.support import redis_url, require_broker

REDIS_DB = 0  # shared with test_cache_process: the two run one after the other (see conftest)
ALL = frozenset(KINDS)


@pytest.fixture
def url() -> Iterator[str]:
    require_broker("redis")
    found = redis_url(REDIS_DB)
    client = redis.Redis.from_url(found)
    client.flushdb()
    client.close()
    yield found


@pytest.fixture
def cache(url: str) -> Iterator[Cache]:
    found = Cache.from_env({"INGEST_STATE_URL": url})
    yield found
    found.close()


def apply(url: str, commands: list[Command] | None) -> None:
    """What the pipeline does with a batch: one MULTI/EXEC."""
    assert commands is not None
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=True)
    for command in commands:
        pipe.execute_command(*command)
    pipe.execute()
    client.close()


def feed(
    url: str, writer: CacheWriter, event: str, data: Any, shard: int = 0, count: int = 1
) -> None:
    apply(url, writer.commands(event, data, shard, count))


def guild(gid: str, index: int = 1) -> dict[str, Any]:
    return sample_guild_create(index, size_kb=8, guild_id=gid)


GID = "1180000000000000001"


def test_a_rich_guild_create_reads_back_as_models(url: str, cache: Cache) -> None:
    writer = CacheWriter(url, ALL)
    data = guild(GID)
    data["threads"] = [{"id": "1190000000000000009", "type": 11, "name": "a thread"}]
    del data["channels"][0]["guild_id"]  # Discord leaves it out of GUILD_CREATE's channels
    feed(url, writer, "GUILD_CREATE", data)

    found = cache.guild(int(GID))
    assert (
        found is not None and found.name == data["name"] and found.owner_id == int(data["owner_id"])
    )
    assert found.features == ["COMMUNITY", "NEWS"]
    channels = cache.guild_channels(int(GID))
    assert [c.name for c in channels] == [f"channel-{c}" for c in range(6)]
    first = cache.channel(int(data["channels"][0]["id"]))
    assert first is not None and first.guild_id == int(GID)  # filled in: GUILD_CREATE omits it
    thread = cache.channel(1190000000000000009)
    assert thread is not None and thread.name == "a thread"
    assert [r.name for r in cache.roles(int(GID))] == ["@everyone"] + [
        f"role-{r}" for r in range(1, 5)
    ]
    role = cache.role(int(GID), int(data["roles"][2]["id"]))
    assert role is not None and role.permissions == "1071698660929"
    member_data = data["members"][3]
    uid = int(member_data["user"]["id"])
    member = cache.member(int(GID), uid)
    assert member is not None and member.user is not None and member.user.id == uid
    assert member.roles == [int(r) for r in member_data["roles"]]
    user = cache.user(uid)
    assert user is not None and user.username == member_data["user"]["username"]
    assert cache.guild(42) is None and cache.channel(42) is None and cache.member(1, 2) is None
    # The payload handed on to the task is untouched.
    assert "guild_id" not in data["channels"][0]


def test_guild_update_merges_and_never_erases_what_it_did_not_carry(url: str, cache: Cache) -> None:
    writer = CacheWriter(url, ALL)
    feed(url, writer, "GUILD_CREATE", guild(GID))
    feed(url, writer, "GUILD_UPDATE", {"id": GID, "name": "renamed", "description": "new"})
    found = cache.guild(int(GID))
    assert found is not None
    assert (found.name, found.description, found.premium_tier) == ("renamed", "new", 1)
    assert len(cache.guild_channels(int(GID))) == 6  # channels untouched


def test_member_update_and_message_member_merge_into_the_stored_member(
    url: str, cache: Cache
) -> None:
    writer = CacheWriter(url, ALL)
    data = guild(GID)
    feed(url, writer, "GUILD_CREATE", data)
    stored = data["members"][0]
    user = stored["user"]
    uid = int(user["id"])
    feed(
        url,
        writer,
        "GUILD_MEMBER_UPDATE",
        {"guild_id": GID, "user": {**user, "username": "renamed"}, "roles": [], "nick": "n1"},
    )
    member = cache.member(int(GID), uid)
    assert member is not None
    # Carried: nick, roles (an empty list stays a list). Not carried: kept.
    assert (member.nick, member.roles) == ("n1", [])
    assert (member.deaf, member.mute, member.pending) == (False, False, False)
    assert member.joined_at is not None
    assert member.user is not None and member.user.username == "renamed"

    message = sample_message_create(1, guild_id=GID)
    message["author"] = {**user, "global_name": "From a message"}
    message["member"] = {"roles": ["1180000000000000777"], "nick": "n2"}
    feed(url, writer, "MESSAGE_CREATE", message)
    member = cache.member(int(GID), uid)
    assert member is not None and (member.nick, member.roles) == ("n2", [1180000000000000777])
    assert member.joined_at is not None and member.deaf is False
    assert member.user is not None and member.user.global_name == "From a message"

    feed(url, writer, "GUILD_MEMBER_REMOVE", {"guild_id": GID, "user": user})
    assert cache.member(int(GID), uid) is None
    assert cache.user(uid) is not None  # a user may be in other guilds


def test_a_merge_keeps_an_empty_object_an_object(url: str, cache: Cache) -> None:
    # Lua's cjson reads [] and {} alike; a stored {} written back as [] made the member fail
    # validation in every handler that read it.
    writer = CacheWriter(url, ALL)
    data = guild(GID)
    data["members"][0]["avatar_decoration_data"] = {}
    data["members"][0]["roles"] = []
    feed(url, writer, "GUILD_CREATE", data)
    user = data["members"][0]["user"]
    message = sample_message_create(2, guild_id=GID)
    message["author"] = user
    message["member"] = {"nick": "merged"}
    feed(url, writer, "MESSAGE_CREATE", message)
    member = cache.member(int(GID), int(user["id"]))
    assert member is not None and member.nick == "merged" and member.roles == []
    assert member.avatar_decoration_data is not None  # {} read back as an object


def test_channels_threads_and_roles_follow_their_events(url: str, cache: Cache) -> None:
    writer = CacheWriter(url, DEFAULT_KINDS)
    data = guild(GID)
    feed(url, writer, "GUILD_CREATE", data)
    cid = data["channels"][1]["id"]
    feed(
        url,
        writer,
        "CHANNEL_UPDATE",
        {**data["channels"][1], "guild_id": GID, "name": "renamed", "topic": "t"},
    )
    channel = cache.channel(int(cid))
    assert channel is not None and (channel.name, channel.topic) == ("renamed", "t")
    feed(url, writer, "CHANNEL_CREATE", {"id": "77", "guild_id": GID, "type": 2, "name": "v"})
    thread = {"id": "78", "guild_id": GID, "type": 11, "name": "th", "parent_id": cid}
    feed(url, writer, "THREAD_CREATE", thread)
    names = [c.name for c in cache.guild_channels(int(GID))]
    assert "v" in names and "th" not in names  # threads are not guild channels
    assert cache.channel(78) is not None
    feed(url, writer, "THREAD_DELETE", {"id": "78", "guild_id": GID, "type": 11})
    feed(url, writer, "CHANNEL_DELETE", {"id": cid, "guild_id": GID, "type": 0})
    assert cache.channel(78) is None and cache.channel(int(cid)) is None

    role = {"id": "79", "name": "mods", "permissions": "8", "position": 9}
    feed(url, writer, "GUILD_ROLE_CREATE", {"guild_id": GID, "role": role})
    found = cache.role(int(GID), 79)
    assert found is not None and found.name == "mods"
    assert cache.roles(int(GID))[-1].id == 79
    feed(url, writer, "GUILD_ROLE_UPDATE", {"guild_id": GID, "role": {**role, "name": "admins"}})
    found = cache.role(int(GID), 79)
    assert found is not None and found.name == "admins"
    feed(url, writer, "GUILD_ROLE_DELETE", {"guild_id": GID, "role_id": "79"})
    assert cache.role(int(GID), 79) is None


def test_members_are_opt_in_and_a_message_then_costs_nothing(url: str, cache: Cache) -> None:
    writer = CacheWriter(url, DEFAULT_KINDS)
    data = guild(GID)
    feed(url, writer, "GUILD_CREATE", data)
    uid = int(data["members"][0]["user"]["id"])
    assert cache.member(int(GID), uid) is None and cache.user(uid) is None
    assert writer.commands("MESSAGE_CREATE", sample_message_create(1)) is None
    assert writer.commands("GUILD_MEMBER_ADD", {**data["members"][0], "guild_id": GID}) is None
    assert writer.commands("TYPING_START", {"channel_id": "1"}) is None


def test_guild_delete_unavailable_keeps_the_guild_removed_drops_everything(
    url: str, cache: Cache
) -> None:
    writer = CacheWriter(url, ALL)
    data = guild(GID)
    feed(url, writer, "GUILD_CREATE", data)
    feed(url, writer, "GUILD_DELETE", {"id": GID, "unavailable": True})
    found = cache.guild(int(GID))
    assert found is not None and found.name == data["name"]
    assert found.model_extra is not None and found.model_extra["unavailable"] is True

    feed(url, writer, "GUILD_DELETE", {"id": GID})
    assert cache.guild(int(GID)) is None
    assert cache.guild_channels(int(GID)) == [] and cache.roles(int(GID)) == []
    assert cache.channel(int(data["channels"][0]["id"])) is None
    uid = int(data["members"][0]["user"]["id"])
    assert cache.member(int(GID), uid) is None
    client = redis.Redis.from_url(url)
    # Nothing of the guild is left but the users (shared across guilds).
    assert sorted(k.decode() for k in client.keys("ingest:cache:*")) == ["ingest:cache:users"]
    client.close()


def test_a_new_session_drops_guilds_it_no_longer_lists_and_rebuilds_the_rest(
    url: str, cache: Cache
) -> None:
    writer = CacheWriter(url, ALL)
    kept, gone = _guild_id(0, 0, 1), _guild_id(0, 1, 1)
    feed(url, writer, "READY", {"guilds": [{"id": kept}, {"id": gone}], "user": {"id": "5"}})
    feed(url, writer, "GUILD_CREATE", guild(kept, 1))
    feed(url, writer, "GUILD_CREATE", guild(gone, 2))
    feed(url, writer, "CHANNEL_CREATE", {"id": "66", "guild_id": kept, "name": "stale"})

    feed(url, writer, "READY", {"guilds": [{"id": kept, "unavailable": True}], "user": {"id": "5"}})
    assert cache.guild(int(gone)) is None and cache.guild_channels(int(gone)) == []
    marked = cache.guild(int(kept))
    assert marked is not None and marked.model_extra is not None
    assert marked.model_extra["unavailable"] is True
    assert marked.name == "guild 1"  # what we knew stays until the GUILD_CREATE

    feed(url, writer, "GUILD_CREATE", guild(kept, 3))
    rebuilt = cache.guild(int(kept))
    assert rebuilt is not None and rebuilt.name == "guild 3"
    assert rebuilt.model_extra is not None and rebuilt.model_extra["unavailable"] is False
    assert cache.channel(66) is None  # not in the new GUILD_CREATE: gone
    assert cache.user(5) is not None


def test_shards_of_other_processes_keep_their_guilds(url: str, cache: Cache) -> None:
    # Two gateway processes, shard 0 and shard 1 of 2, writing one cache.
    first, second = CacheWriter(url, ALL), CacheWriter(url, ALL)
    g0, g1 = _guild_id(0, 0, 2), _guild_id(1, 0, 2)
    feed(url, first, "READY", {"guilds": [{"id": g0}]}, 0, 2)
    feed(url, first, "GUILD_CREATE", guild(g0), 0, 2)
    feed(url, second, "READY", {"guilds": [{"id": g1}]}, 1, 2)
    feed(url, second, "GUILD_CREATE", guild(g1), 1, 2)
    feed(url, second, "READY", {"guilds": [{"id": g1}]}, 1, 2)  # shard 1 starts over
    assert cache.guild(int(g0)) is not None and len(cache.guild_channels(int(g0))) == 6


def test_a_payload_without_its_ids_changes_nothing_and_never_raises(url: str) -> None:
    writer = CacheWriter(url, ALL)
    assert writer.commands("GUILD_CREATE", {"name": "no id"}) is None
    assert writer.commands("GUILD_ROLE_CREATE", {"guild_id": "1"}) is None
    assert writer.commands("GUILD_MEMBER_UPDATE", {"guild_id": "1", "user": None}) is None
    assert writer.commands("CHANNEL_UPDATE", ["not", "an", "object"]) is None


def test_async_cache_reads_the_same(url: str) -> None:
    writer = CacheWriter(url, ALL)
    data = guild(GID)
    feed(url, writer, "GUILD_CREATE", data)

    async def read() -> tuple[Any, ...]:
        cache = AsyncCache.from_env({"INGEST_STATE_URL": url})
        try:
            return (
                await cache.guild(int(GID)),
                await cache.channel(int(data["channels"][0]["id"])),
                await cache.guild_channels(int(GID)),
                await cache.roles(int(GID)),
                await cache.role(int(GID), int(GID)),
                await cache.member(int(GID), int(data["members"][0]["user"]["id"])),
                await cache.user(int(data["members"][0]["user"]["id"])),
            )
        finally:
            await cache.close()

    found = asyncio.run(read())
    assert all(x for x in found), found
    assert found[4].name == "@everyone"


def test_ingest_cache_switches() -> None:
    assert parse_kinds("") == DEFAULT_KINDS == {"guilds", "channels", "roles"}
    assert parse_kinds("none") == frozenset()
    assert parse_kinds("guilds, members") == {"guilds", "members"}
    with pytest.raises(ConfigError, match=r"INGEST_CACHE.*unknown presences"):
        parse_kinds("guilds,presences")
    env = {"DISCORD_TOKEN": "t", "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}
    assert load_config(env).cache_kinds == DEFAULT_KINDS
    assert load_config({**env, "INGEST_CACHE": "none"}).cache_kinds == frozenset()
    writer = CacheWriter("redis://127.0.0.1:1/0", frozenset())
    assert writer.commands("GUILD_CREATE", guild(GID)) is None
    assert writer.commands("READY", {"guilds": []}) is None


def test_the_cache_needs_a_redis() -> None:
    with pytest.raises(ConfigError, match="INGEST_STATE_URL"):
        Cache.from_env({"CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"})


# -- in the pipeline: the write lands before (or with) the publish ------------------------------


def _gateway() -> Gateway:
    """A gateway that never connects, holding session s1 (commits apply to it)."""
    return Gateway(
        "token-" + "x" * 20,
        1,
        "ws://127.0.0.1:9",
        compression="none",
        on_dispatch=lambda g, d: None,
        resume_from=SessionState(session_id="s1", sequence=None, resume_url=None),
    )


def _dispatch(event: str, sequence: int, data: dict[str, Any]) -> Dispatch:
    return Dispatch(event, sequence, data, "s1", 0, b"", orjson.dumps(data), "e1")


ROLE = {"guild_id": GID, "role": {"id": "91", "name": "fresh"}}


async def _publish_two(pipeline: Pipeline) -> Gateway:
    """A role created (no handler) then a message (handled), through ``pipeline``."""
    g = _gateway()
    pipeline.attach(g)
    running = asyncio.create_task(pipeline.run())
    pipeline.accept(g, _dispatch("GUILD_ROLE_CREATE", 1, ROLE))
    pipeline.accept(g, _dispatch("MESSAGE_CREATE", 2, sample_message_create(2, guild_id=GID)))
    await pipeline.drain(timeout=5)
    running.cancel()
    return g


def test_the_cache_rides_the_brokers_transaction_when_it_is_the_same_redis(url: str) -> None:
    publisher = RedisPublisher(url)
    writer = CacheWriter(url, ALL)
    writer.attach(fan_out(publisher, {}))
    assert writer.riding
    monitor_client = redis.Redis.from_url(url)
    seen: list[str] = []

    def watch() -> None:
        with monitor_client.monitor() as monitor:
            started.set()
            for command in monitor.listen():
                if command["db"] != REDIS_DB:
                    continue
                seen.append(command["command"])
                if "stop-watching" in command["command"]:
                    return

    started = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert started.wait(5)
    pipeline = Pipeline(publisher, subscribed=frozenset({"MESSAGE_CREATE"}), cache=writer)

    async def main() -> Gateway:
        try:
            return await _publish_two(pipeline)
        finally:
            await publisher.close()
            await writer.close()

    g = asyncio.run(main())
    redis.Redis.from_url(url).echo("stop-watching")
    watcher.join(5)
    assert g.session.committed_sequence == 2
    # One MULTI/EXEC holds the role, the member from the message and the task itself.
    multi = seen.index("MULTI")
    block = seen[multi : seen.index("EXEC", multi) + 1]
    assert any(c.startswith("HSET ingest:cache:roles:") for c in block), block
    assert any(c.startswith("LPUSH discord.MESSAGE_CREATE") for c in block), block
    assert not any("ingest:cache" in c for c in seen[:multi] + seen[multi + len(block) :])


def test_the_cache_is_written_before_the_publish_on_another_broker(url: str) -> None:
    cache = Cache.from_env({"INGEST_STATE_URL": url})
    at_publish: list[Any] = []

    class Watching:
        """A broker that notes what a handler would read the moment it takes a batch."""

        async def connect(self) -> None: ...

        async def declare(self, queues: Any) -> None: ...

        async def publish(self, messages: Sequence[TaskMessage]) -> None:
            if messages:
                at_publish.append(cache.role(int(GID), 91))

        async def ping(self) -> bool:
            return True

        async def close(self) -> None: ...

    writer = CacheWriter(url, DEFAULT_KINDS)
    writer.attach(Watching())
    assert not writer.riding
    pipeline = Pipeline(Watching(), subscribed=frozenset({"MESSAGE_CREATE"}), cache=writer)

    async def main() -> Gateway:
        try:
            return await _publish_two(pipeline)
        finally:
            await writer.close()

    g = asyncio.run(main())
    assert g.session.committed_sequence == 2
    assert [r.name for r in at_publish] == ["fresh"]
    cache.close()


def test_an_event_no_handler_wants_is_cached_before_its_sequence_commits(url: str) -> None:
    writer = CacheWriter(url, DEFAULT_KINDS)
    publisher = RedisPublisher(url)
    writer.attach(publisher)
    pipeline = Pipeline(publisher, subscribed=frozenset(), cache=writer)
    g = _gateway()
    pipeline.attach(g)

    async def main() -> None:
        pipeline.accept(g, _dispatch("GUILD_ROLE_CREATE", 1, ROLE))
        pipeline.accept(g, _dispatch("TYPING_START", 2, {"channel_id": "1"}))
        # Held: nothing commits before the write.
        assert g.session.committed_sequence is None and pipeline.buffered == 2
        running = asyncio.create_task(pipeline.run())
        await pipeline.drain(timeout=5)
        running.cancel()
        await publisher.close()
        await writer.close()

    asyncio.run(main())
    assert g.session.committed_sequence == 2
    cache = Cache.from_env({"INGEST_STATE_URL": url})
    found = cache.role(int(GID), 91)
    assert found is not None and found.name == "fresh"
    cache.close()


def test_a_cache_key_of_the_wrong_type_never_makes_the_batch_publish_twice(url: str) -> None:
    client = redis.Redis.from_url(url)
    client.set(f"ingest:cache:roles:{GID}", "someone else's string")
    publisher = RedisPublisher(url)
    writer = CacheWriter(url, ALL)
    writer.attach(publisher)
    pipeline = Pipeline(publisher, subscribed=frozenset({"MESSAGE_CREATE"}), cache=writer)

    async def main() -> Gateway:
        try:
            return await _publish_two(pipeline)
        finally:
            await publisher.close()
            await writer.close()

    g = asyncio.run(main())
    assert g.session.committed_sequence == 2
    assert client.llen("discord.MESSAGE_CREATE") == 1
    # The rest of the batch's cache writes landed.
    assert client.hlen(f"ingest:cache:members:{GID}") == 1
    client.close()


def test_cache_commands_count_in_the_outage_buffers_bytes(url: str) -> None:
    # A GUILD_CREATE no handler wants publishes nothing but carries the whole guild for the
    # cache: INGEST_MAX_BUFFERED_BYTES must see it, or an outage during the connect burst
    # holds gigabytes unnoticed.
    writer = CacheWriter(url, DEFAULT_KINDS)
    publisher = RedisPublisher(url)
    writer.attach(publisher)
    pipeline = Pipeline(publisher, subscribed=frozenset(), cache=writer)
    g = _gateway()
    pipeline.attach(g)
    guild = sample_guild_create(0, size_kb=20)
    pipeline.accept(g, _dispatch("GUILD_CREATE", 1, guild))
    assert pipeline.buffered == 1
    assert pipeline.buffered_bytes >= len(orjson.dumps(guild["channels"]))

    async def close() -> None:
        await publisher.close()
        await writer.close()

    asyncio.run(close())


def test_the_outage_probe_waits_for_a_cache_redis_that_is_not_the_broker(url: str) -> None:
    # The cache on its own Redis (here: one that does not answer): the broker answering is
    # not enough to reconnect, or every shard would resume into the same wall every 30 s.
    writer = CacheWriter("redis://127.0.0.1:1/0", DEFAULT_KINDS)
    publisher = RedisPublisher(url)
    writer.attach(publisher)
    assert not writer.riding
    pipeline = Pipeline(publisher, subscribed=frozenset(), cache=writer)

    async def main() -> bool:
        try:
            await pipeline._probe()
            return pipeline._healthy.is_set()
        finally:
            await publisher.close()
            await writer.close()

    pipeline._healthy.clear()  # as after a shed
    assert asyncio.run(main()) is False
