"""The shared cache's Redis layout, its switches and its Redis client: what both sides agree on.

The gateway writes (``ingest.cache_writer``), handlers read (``ingest.cache``); neither spells a
key anywhere else. The layout is documented in docs/cache.md for other languages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

import redis.asyncio as aioredis

from ingest.brokers import async_redis, redis_py_url, state_url_from_env
from ingest.errors import ConfigError

PREFIX: Final = "ingest:cache"
# Every string the cache stores is JSON; a guild is a hash of its top-level fields (so a partial
# GUILD_UPDATE merges), the rest are hashes per guild keyed by the entity's id.
GLOBAL_CHANNEL_INDEX: Final = f"{PREFIX}:channel_guild"  # channel/thread id -> guild id
USERS: Final = f"{PREFIX}:users"  # user id -> user JSON

KINDS: Final = ("guilds", "channels", "roles", "members")
DEFAULT_KINDS: Final = frozenset({"guilds", "channels", "roles"})
# Channel types that are threads (Discord keeps them apart from a guild's channel list).
THREAD_TYPES: Final = frozenset({10, 11, 12})


def guild_key(guild_id: int | str) -> str:
    return f"{PREFIX}:guild:{guild_id}"


def channels_key(guild_id: int | str) -> str:
    return f"{PREFIX}:channels:{guild_id}"


def roles_key(guild_id: int | str) -> str:
    return f"{PREFIX}:roles:{guild_id}"


def members_key(guild_id: int | str) -> str:
    return f"{PREFIX}:members:{guild_id}"


def shard_key(shard_id: int, shard_count: int) -> str:
    """The set of guild ids one shard's session holds: what a new READY reconciles against."""
    return f"{PREFIX}:shard:{shard_count}:{shard_id}"


def ready_key(shard_id: int, shard_count: int) -> str:
    """Set at a shard's READY: the cache holds what that session started from. A stored
    session whose shard has no such key (a cache turned on, flushed or moved) identifies
    instead of resuming, since a resume would never bring the READY and GUILD_CREATEs back."""
    return f"{PREFIX}:ready:{shard_count}:{shard_id}"


def parse_kinds(text: str) -> frozenset[str]:
    """``INGEST_CACHE``: ``none``, or a comma list of ``guilds,channels,roles,members``."""
    text = text.strip().lower()
    if not text:
        return DEFAULT_KINDS
    if text in ("none", "off", "0", "false"):
        return frozenset()
    kinds = frozenset(part.strip() for part in text.split(",")) - {""}
    unknown = kinds - set(KINDS)
    if unknown:
        raise ConfigError(
            f"INGEST_CACHE={text!r}: unknown {', '.join(sorted(unknown))}; use none or a list of "
            + ",".join(KINDS)
        )
    return kinds


def cache_url_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The state Redis (``INGEST_STATE_URL``, else a Redis broker, else the embedded one) in
    redis-py's spelling; None when the broker is not Redis and no state URL is set."""
    env = os.environ if env is None else env
    url = state_url_from_env(env)
    return None if url is None else redis_py_url(url)


def async_redis_client(url: str) -> aioredis.Redis:
    # The gateway's writer: one connection (a bounded pool, as every gateway client has), since
    # its commands mostly ride the broker's own transaction.
    return async_redis(url, max_connections=1, socket_timeout=10, socket_connect_timeout=10)
