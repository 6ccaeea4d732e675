"""The gateway's side of the shared cache: Redis commands from dispatches, written before publish.

``CacheWriter.commands`` turns one dispatch into the Redis commands that bring the cache up to
date (pure: no I/O), for every cacheable event whether or not a handler wants it. The pipeline
runs a batch's commands in the broker's own MULTI/EXEC when the state Redis is the broker Redis,
else in a transaction of their own just before the batch is published; either way a task is on
the broker only after the cache holds its event. A crash in between is repaired by the replay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
from redis.asyncio.client import Pipeline as RedisPipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ingest.brokers import is_redis_url, redis_py_url
from ingest.cache_layout import (
    GLOBAL_CHANNEL_INDEX,
    KINDS,
    PREFIX,
    USERS,
    async_redis_client,
    channels_key,
    guild_key,
    members_key,
    ready_key,
    roles_key,
    shard_key,
)
from ingest.config import Config
from ingest.errors import BrokerUnavailable
from ingest.logs import throttled

log = logging.getLogger("ingest.cache")

# One Redis command: the arguments of ``execute_command``.
Command = tuple[str | bytes | int, ...]
Handler = Callable[[Any, int, int], list[Command]]

# GUILD_CREATE's lists: kept in hashes of their own (or not at all), never in the guild's hash.
_GUILD_LISTS: Final = frozenset(
    {
        "channels",
        "threads",
        "members",
        "roles",
        "presences",
        "voice_states",
        "stage_instances",
        "guild_scheduled_events",
        "soundboard_sounds",
    }
)
# HSET/HDEL/SADD at most this many fields per command (Lua's unpack has a stack limit too).
_CHUNK: Final = 500

# Forget one guild: its hash, its per-guild hashes and its channels' index entries.
# KEYS: guild, channels, roles, members, channel index.
_DROP_GUILD: Final = """
local ids = redis.call('HKEYS', KEYS[2])
for i = 1, #ids, 500 do
  redis.call('HDEL', KEYS[5], unpack(ids, i, math.min(i + 499, #ids)))
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return #ids
"""

# A new session's READY: guilds this shard held but READY does not list are gone (dropped now);
# those it lists are marked unavailable until their GUILD_CREATE rebuilds them.
# KEYS[1]: the shard's guild set. ARGV: prefix, "1" to mark guilds, then the READY guild ids.
_READY: Final = """
local prefix = ARGV[1]
local keep = {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local dropped = 0
for _, gid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not keep[gid] then
    local ids = redis.call('HKEYS', prefix .. ':channels:' .. gid)
    for i = 1, #ids, 500 do
      redis.call('HDEL', prefix .. ':channel_guild', unpack(ids, i, math.min(i + 499, #ids)))
    end
    redis.call('DEL', prefix .. ':guild:' .. gid, prefix .. ':channels:' .. gid,
      prefix .. ':roles:' .. gid, prefix .. ':members:' .. gid)
    dropped = dropped + 1
  end
end
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 500 do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
if ARGV[2] == '1' then
  for i = 3, #ARGV do
    redis.call('HSET', prefix .. ':guild:' .. ARGV[i], 'id', '"' .. ARGV[i] .. '"',
      'unavailable', 'true')
  end
end
return dropped
"""

# Merge a partial member into the stored one, top-level key by key: fields the event did not
# carry keep their stored value. The event's member is kept as the JSON text it came as; only
# the stored fields it lacks are re-encoded and appended (cjson decodes [] and {} alike into an
# empty table: the only member field that is a list is ``roles``, so an empty table is written
# back as [] there and as {} elsewhere, e.g. ``avatar_decoration_data``).
# KEYS[1]: the guild's members hash. ARGV: user id, the member's JSON object.
_MERGE_MEMBER: Final = """
local text = ARGV[2]
local ok, fresh = pcall(cjson.decode, text)
if not ok or type(fresh) ~= 'table' then return 0 end
local old = redis.call('HGET', KEYS[1], ARGV[1])
local kept = {}
if old then
  local decoded, stored = pcall(cjson.decode, old)
  if decoded and type(stored) == 'table' then
    for k, v in pairs(stored) do
      if fresh[k] == nil then
        local value
        if type(v) == 'table' and next(v) == nil then
          if k == 'roles' then value = '[]' else value = '{}' end
        else
          value = cjson.encode(v)
        end
        kept[#kept + 1] = cjson.encode(k) .. ':' .. value
      end
    end
  end
end
if #kept > 0 then
  if next(fresh) == nil then
    text = '{' .. table.concat(kept, ',') .. '}'
  else
    text = string.sub(text, 1, -2) .. ',' .. table.concat(kept, ',') .. '}'
  end
end
redis.call('HSET', KEYS[1], ARGV[1], text)
return 1
"""


def _dumps(value: Any) -> bytes:
    # A copy of exact size: orjson's result keeps a 4 KB buffer however small the JSON, and a
    # GUILD_CREATE's commands held in the outage buffer would otherwise weigh 20x their bytes.
    return bytes(memoryview(orjson.dumps(value)))


def _hset(key: str, pairs: Sequence[tuple[str, bytes]]) -> list[Command]:
    commands: list[Command] = []
    for start in range(0, len(pairs), _CHUNK):
        flat: list[str | bytes | int] = ["HSET", key]
        for field, value in pairs[start : start + _CHUNK]:
            flat += (field, value)
        commands.append(tuple(flat))
    return commands


def _drop_guild(guild_id: str) -> Command:
    return (
        "EVAL",
        _DROP_GUILD,
        5,
        guild_key(guild_id),
        channels_key(guild_id),
        roles_key(guild_id),
        members_key(guild_id),
        GLOBAL_CHANNEL_INDEX,
    )


def _member_without_user(member: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in member.items() if k not in ("user", "guild_id")}


class CacheWriter:
    """Cache commands per dispatch for the enabled ``kinds``; writes a batch's commands.

    ``url`` is the state Redis (redis-py spelling). ``attach`` lets the commands ride the
    broker's transaction when the broker is that same Redis.
    """

    def __init__(self, url: str, kinds: frozenset[str]) -> None:
        self.url = url
        self.kinds = kinds
        self.riding = False
        self._staged: list[Command] = []
        self._client: Any = None
        guilds, channels = "guilds" in kinds, "channels" in kinds
        roles, members = "roles" in kinds, "members" in kinds
        handlers: dict[str, Handler] = {}
        if kinds:
            handlers |= {
                "READY": self._ready,
                "GUILD_CREATE": self._guild_create,
                "GUILD_DELETE": self._guild_delete,
                "USER_UPDATE": self._user_update,
            }
        if guilds or roles:
            handlers["GUILD_UPDATE"] = self._guild_update
        if channels:
            handlers |= {
                "CHANNEL_CREATE": self._channel_put,
                "CHANNEL_UPDATE": self._channel_put,
                "THREAD_CREATE": self._channel_put,
                "THREAD_UPDATE": self._channel_put,
                "CHANNEL_DELETE": self._channel_delete,
                "THREAD_DELETE": self._channel_delete,
                "THREAD_LIST_SYNC": self._thread_list_sync,
            }
        if roles:
            handlers |= {
                "GUILD_ROLE_CREATE": self._role_put,
                "GUILD_ROLE_UPDATE": self._role_put,
                "GUILD_ROLE_DELETE": self._role_delete,
            }
        if members:
            handlers |= {
                "GUILD_MEMBER_ADD": self._member_add,
                "GUILD_MEMBER_UPDATE": self._member_update,
                "GUILD_MEMBER_REMOVE": self._member_remove,
                "GUILD_MEMBERS_CHUNK": self._members_chunk,
                "MESSAGE_CREATE": self._message_create,
            }
        self._handlers = handlers

    def __repr__(self) -> str:
        return f"CacheWriter(kinds={sorted(self.kinds)}, riding={self.riding})"

    # -- dispatch -> commands (pure) -----------------------------------------------------------

    def commands(
        self, event: str, data: Any, shard_id: int = 0, shard_count: int = 1
    ) -> list[Command] | None:
        """The commands that apply ``event`` to the cache; None when it changes nothing.

        Never raises: a payload without the ids we need changes nothing (and is logged).
        """
        handler = self._handlers.get(event)
        if handler is None or not isinstance(data, dict):
            return None
        try:
            return handler(data, shard_id, shard_count) or None
        except (KeyError, TypeError, ValueError, AttributeError, orjson.JSONEncodeError) as exc:
            throttled(log).warning("%s not cached: %s: %s", event, type(exc).__name__, exc)
            return None

    def _ready(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        ids = [str(g["id"]) for g in data.get("guilds") or ()]
        mark = "1" if "guilds" in self.kinds else "0"
        commands: list[Command] = [
            ("EVAL", _READY, 1, shard_key(shard_id, shard_count), PREFIX, mark, *ids),
            ("SET", ready_key(shard_id, shard_count), "1"),
        ]
        user = data.get("user")
        if isinstance(user, dict):
            commands.append(("HSET", USERS, str(user["id"]), _dumps(user)))
        return commands

    def _guild_create(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        gid = str(data["id"])
        shard = shard_key(shard_id, shard_count)
        if data.get("unavailable"):
            # Still in an outage: keep what we know, say it is unavailable.
            return self._mark_unavailable(gid, shard)
        # A GUILD_CREATE is the whole guild: rebuild, so nothing of an earlier session survives.
        commands: list[Command] = [_drop_guild(gid), ("SADD", shard, gid)]
        kinds = self.kinds
        if "guilds" in kinds:
            commands += _hset(
                guild_key(gid),
                [(k, _dumps(v)) for k, v in data.items() if k not in _GUILD_LISTS],
            )
        if "channels" in kinds:
            channels = [*(data.get("channels") or ()), *(data.get("threads") or ())]
            pairs = []
            for channel in channels:
                # GUILD_CREATE leaves guild_id out of its channels; never change the payload.
                if "guild_id" not in channel:
                    channel = {**channel, "guild_id": gid}
                pairs.append((str(channel["id"]), _dumps(channel)))
            commands += _hset(channels_key(gid), pairs)
            commands += _hset(GLOBAL_CHANNEL_INDEX, [(cid, gid.encode()) for cid, _ in pairs])
        if "roles" in kinds:
            commands += _hset(
                roles_key(gid), [(str(r["id"]), _dumps(r)) for r in data.get("roles") or ()]
            )
        if "members" in kinds:
            commands += self._members(gid, data.get("members") or ())
        return commands

    def _mark_unavailable(self, gid: str, shard: str) -> list[Command]:
        commands: list[Command] = [("SADD", shard, gid)]
        if "guilds" in self.kinds:
            commands.append(("HSET", guild_key(gid), "id", _dumps(gid), "unavailable", b"true"))
        return commands

    def _guild_update(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        gid = str(data["id"])
        commands: list[Command] = []
        if "guilds" in self.kinds:
            # Only the fields it carries: what it leaves out keeps its stored value.
            commands += _hset(
                guild_key(gid),
                [(k, _dumps(v)) for k, v in data.items() if k not in _GUILD_LISTS],
            )
        roles = data.get("roles")
        if "roles" in self.kinds and roles:
            commands += _hset(roles_key(gid), [(str(r["id"]), _dumps(r)) for r in roles])
        return commands

    def _guild_delete(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        gid = str(data["id"])
        shard = shard_key(shard_id, shard_count)
        if data.get("unavailable"):
            return self._mark_unavailable(gid, shard)
        # No ``unavailable``: the bot left or was removed; the guild is gone from the cache.
        return [_drop_guild(gid), ("SREM", shard, gid)]

    def _user_update(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        return [("HSET", USERS, str(data["id"]), _dumps(data))]

    def _channel_put(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        gid = data.get("guild_id")
        if gid is None:
            return []  # a DM channel: not part of any guild's cache
        cid = str(data["id"])
        return [
            ("HSET", channels_key(str(gid)), cid, _dumps(data)),
            ("HSET", GLOBAL_CHANNEL_INDEX, cid, str(gid)),
        ]

    def _channel_delete(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        gid = data.get("guild_id")
        if gid is None:
            return []
        cid = str(data["id"])
        return [("HDEL", channels_key(str(gid)), cid), ("HDEL", GLOBAL_CHANNEL_INDEX, cid)]

    def _thread_list_sync(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        gid = str(data["guild_id"])
        pairs = []
        for thread in data.get("threads") or ():
            if "guild_id" not in thread:
                thread = {**thread, "guild_id": gid}
            pairs.append((str(thread["id"]), _dumps(thread)))
        return _hset(channels_key(gid), pairs) + _hset(
            GLOBAL_CHANNEL_INDEX, [(tid, gid.encode()) for tid, _ in pairs]
        )

    def _role_put(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        role = data["role"]
        return [("HSET", roles_key(str(data["guild_id"])), str(role["id"]), _dumps(role))]

    def _role_delete(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        return [("HDEL", roles_key(str(data["guild_id"])), str(data["role_id"]))]

    def _members(self, gid: str, members: Iterable[Any]) -> list[Command]:
        """Whole members (GUILD_CREATE, chunks, ADD): each replaces what is stored; the user
        goes to the global user hash, once however many guilds share it."""
        member_pairs: list[tuple[str, bytes]] = []
        user_pairs: list[tuple[str, bytes]] = []
        for member in members:
            user = member["user"]
            uid = str(user["id"])
            member_pairs.append((uid, _dumps(_member_without_user(member))))
            user_pairs.append((uid, _dumps(user)))
        return _hset(members_key(gid), member_pairs) + _hset(USERS, user_pairs)

    def _member_add(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        return self._members(str(data["guild_id"]), [data])

    def _merge_member(self, gid: str, uid: str, member: dict[str, Any]) -> Command:
        merged = _dumps(_member_without_user(member))
        return ("EVAL", _MERGE_MEMBER, 1, members_key(gid), uid, merged)

    def _member_update(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        user = data["user"]
        uid = str(user["id"])
        return [
            self._merge_member(str(data["guild_id"]), uid, data),
            ("HSET", USERS, uid, _dumps(user)),
        ]

    def _member_remove(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        # The user stays: it may be a member of other guilds.
        return [("HDEL", members_key(str(data["guild_id"])), str(data["user"]["id"]))]

    def _members_chunk(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        return self._members(str(data["guild_id"]), data.get("members") or ())

    def _message_create(self, data: Any, shard_id: int, shard_count: int) -> list[Command]:
        member = data.get("member")
        author = data.get("author")
        gid = data.get("guild_id")
        if not isinstance(author, dict) or data.get("webhook_id") is not None:
            return []  # a webhook's author is no user of the guild
        uid = str(author["id"])
        commands: list[Command] = [("HSET", USERS, uid, _dumps(author))]
        if gid is not None and isinstance(member, dict):
            commands.insert(0, self._merge_member(str(gid), uid, member))
        return commands

    # -- writing -------------------------------------------------------------------------------

    def attach(self, publisher: object) -> None:
        """Ride ``publisher``'s MULTI/EXEC when it publishes to this same Redis."""
        from ingest.fanout import FanoutPublisher
        from ingest.publish import RedisPublisher

        inner = publisher.publisher if isinstance(publisher, FanoutPublisher) else publisher
        if not isinstance(inner, RedisPublisher):
            return
        if redis_py_url(inner.url) != self.url:
            return
        previous = inner.extra_commands

        def add(pipe: RedisPipeline) -> None:
            if previous is not None:
                previous(pipe)
            for command in self._staged:
                pipe.execute_command(*command)

        inner.extra_commands = add
        self.riding = True

    async def before_publish(self, commands: list[Command], publishing: bool) -> None:
        """Make ``commands`` part of the coming publish, or write them now if they cannot be.

        Raises ``BrokerUnavailable`` when the state Redis does not answer: the batch then waits,
        exactly as for a broker outage.
        """
        if self.riding and publishing:
            self._staged = commands
            return
        self._staged = []
        if commands:
            await self._execute(commands)

    def published(self) -> None:
        self._staged = []

    async def filled(self, shard_id: int, shard_count: int) -> bool:
        """Whether the cache holds a READY of this shard (see ``ready_key``); True when Redis
        does not answer, so a cache outage never costs a session."""
        if self._client is None:
            self._client = async_redis_client(self.url)
        try:
            return bool(await self._client.exists(ready_key(shard_id, shard_count)))
        except (RedisError, OSError):
            return True

    async def ping(self) -> bool:
        """Whether the cache's Redis answers (always, when the cache rides the broker)."""
        if self.riding:
            return True
        if self._client is None:
            self._client = async_redis_client(self.url)
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def _execute(self, commands: list[Command]) -> None:
        if self._client is None:
            self._client = async_redis_client(self.url)
        pipe = self._client.pipeline(transaction=True)
        for command in commands:
            pipe.execute_command(*command)
        try:
            results = await pipe.execute(raise_on_error=False)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"cache Redis did not answer: {exc!r}") from exc
        except RedisError as exc:
            throttled(log).error("cache write failed: %r", exc)
            return
        for result in results:
            if isinstance(result, Exception):
                # Someone else's value under our key, say: log it, never stall the events.
                throttled(log).error("cache command failed: %r", result)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def cache_writer_for(config: Config, publisher: object) -> CacheWriter | None:
    """The gateway's cache writer for ``config`` (None when INGEST_CACHE=none), riding
    ``publisher``'s transactions when it publishes to the state Redis."""
    if not config.cache_kinds:
        log.info("cache off (INGEST_CACHE=none)")
        return None
    # The same Redis the handlers' Cache.from_env() finds (ingest.brokers.state_url_from_env).
    urls = [u for u in (config.state_url, config.broker_url) if u and is_redis_url(u)]
    url = urls[0] if urls else None
    if url is None:
        log.warning(
            "cache off: the broker is not Redis and INGEST_STATE_URL is unset; set it to a "
            "redis:// URL to keep %s for handlers",
            ",".join(sorted(config.cache_kinds)),
        )
        return None
    writer = CacheWriter(redis_py_url(url), config.cache_kinds)
    writer.attach(publisher)
    log.info(
        "caching %s in Redis %s (%s)",
        ",".join(k for k in KINDS if k in config.cache_kinds),
        _where(writer.url),
        "same transaction as the broker" if writer.riding else "written before each publish",
    )
    return writer


def _where(url: str) -> str:
    """The Redis's address without its password."""
    parts = urlsplit(url)
    return parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
