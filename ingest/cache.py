"""The bot's side of the shared cache: guilds, channels, roles, members and users as models.

The gateway writes every entry before it publishes the event that changed it, so a handler
never reads state older than its own event. ``Cache`` is synchronous (Celery handlers),
``AsyncCache`` the same with ``await``. Layout: ``ingest.cache_layout`` and docs/cache.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final, TypeVar

import orjson
import redis
import redis.asyncio as aioredis
from pydantic import BaseModel

from ingest.brokers import sync_redis
from ingest.cache_layout import (
    GLOBAL_CHANNEL_INDEX,
    THREAD_TYPES,
    USERS,
    async_redis_client,
    cache_url_from_env,
    channels_key,
    guild_key,
    members_key,
    roles_key,
)
from ingest.errors import ConfigError
from ingest.models import Channel, Guild, GuildMember, Role, User

# A handler waits at most this long for a cache read (connect and reply).
REDIS_TIMEOUT: Final = 10.0

M = TypeVar("M", bound=BaseModel)
# What redis-py hands back (bytes here: the clients do not decode responses).
Raw = bytes | str


def _text(raw: Raw) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _url(env: Mapping[str, str] | None) -> str:
    url = cache_url_from_env(os.environ if env is None else env)
    if url is None:
        raise ConfigError(
            "the cache needs Redis: set INGEST_STATE_URL to a redis:// URL "
            "(the broker is not Redis)"
        )
    return url


def _one(model: type[M], raw: Raw | None) -> M | None:
    return None if raw is None else model.model_validate_json(raw)


def _guild(fields: Mapping[Raw, Raw]) -> Guild | None:
    if not fields:
        return None
    return Guild.model_validate({_text(k): orjson.loads(v) for k, v in fields.items()})


def _member(raw_member: Raw | None, raw_user: Raw | None) -> GuildMember | None:
    if raw_member is None:
        return None
    member: dict[str, Any] = orjson.loads(raw_member)
    if raw_user is not None:
        member["user"] = orjson.loads(raw_user)
    return GuildMember.model_validate(member)


def _position(model: Channel | Role) -> tuple[int, int]:
    return (model.position or 0, model.id)


def _channels(values: list[Raw]) -> list[Channel]:
    channels = [Channel.model_validate_json(v) for v in values]
    return sorted((c for c in channels if c.type not in THREAD_TYPES), key=_position)


def _roles(values: list[Raw]) -> list[Role]:
    return sorted((Role.model_validate_json(v) for v in values), key=_position)


class Cache:
    """Synchronous reads of the cache; every method returns the model or None when unknown."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Cache:
        return cls(sync_redis(_url(env), timeout=REDIS_TIMEOUT))

    def guild(self, guild_id: int) -> Guild | None:
        """The guild's own fields (``unavailable`` among its extras during an outage)."""
        return _guild(self.client.hgetall(guild_key(guild_id)))

    def channel(self, channel_id: int) -> Channel | None:
        """A guild channel or thread by id."""
        guild_id = self.client.hget(GLOBAL_CHANNEL_INDEX, str(channel_id))
        if guild_id is None:
            return None
        return _one(Channel, self.client.hget(channels_key(_text(guild_id)), str(channel_id)))

    def guild_channels(self, guild_id: int) -> list[Channel]:
        """The guild's channels (threads excluded), by position."""
        return _channels(self.client.hvals(channels_key(guild_id)))

    def role(self, guild_id: int, role_id: int) -> Role | None:
        return _one(Role, self.client.hget(roles_key(guild_id), str(role_id)))

    def roles(self, guild_id: int) -> list[Role]:
        """The guild's roles, by position."""
        return _roles(self.client.hvals(roles_key(guild_id)))

    def member(self, guild_id: int, user_id: int) -> GuildMember | None:
        """The member, with its ``user`` (needs ``members`` in INGEST_CACHE)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(members_key(guild_id), str(user_id))
        pipe.hget(USERS, str(user_id))
        raw_member, raw_user = pipe.execute()
        return _member(raw_member, raw_user)

    def user(self, user_id: int) -> User | None:
        return _one(User, self.client.hget(USERS, str(user_id)))

    def close(self) -> None:
        self.client.close()


class AsyncCache:
    """``Cache`` with ``await``, for asyncio code."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AsyncCache:
        return cls(async_redis_client(_url(env)))

    async def guild(self, guild_id: int) -> Guild | None:
        return _guild(await self.client.hgetall(guild_key(guild_id)))

    async def channel(self, channel_id: int) -> Channel | None:
        guild_id = await self.client.hget(GLOBAL_CHANNEL_INDEX, str(channel_id))
        if guild_id is None:
            return None
        raw = await self.client.hget(channels_key(_text(guild_id)), str(channel_id))
        return _one(Channel, raw)

    async def guild_channels(self, guild_id: int) -> list[Channel]:
        return _channels(await self.client.hvals(channels_key(guild_id)))

    async def role(self, guild_id: int, role_id: int) -> Role | None:
        return _one(Role, await self.client.hget(roles_key(guild_id), str(role_id)))

    async def roles(self, guild_id: int) -> list[Role]:
        return _roles(await self.client.hvals(roles_key(guild_id)))

    async def member(self, guild_id: int, user_id: int) -> GuildMember | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(members_key(guild_id), str(user_id))
        pipe.hget(USERS, str(user_id))
        raw_member, raw_user = await pipe.execute()
        return _member(raw_member, raw_user)

    async def user(self, user_id: int) -> User | None:
        return _one(User, await self.client.hget(USERS, str(user_id)))

    async def close(self) -> None:
        await self.client.aclose()


__all__ = ["AsyncCache", "Cache"]
