"""Gateway commands from any process: validate here, queue in the state Redis, and let the
gateway process that owns the target shard send them (``ingest.command_relay``).

A handler, a script or a web app calls ``update_presence``, ``request_guild_members``,
``update_voice_state`` or ``send_command``; nothing here talks to Discord.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import orjson
import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ingest.brokers import state_url_from_env, sync_redis
from ingest.errors import CommandError, ConfigError, NotConnected, PayloadTooLarge
from ingest.models import Snowflake
from ingest.protocol import MAX_PAYLOAD_BYTES, Opcode

# A command not sent within this many seconds of its issue is dropped, never sent late.
DEFAULT_TTL: Final = 60.0
KEY_PREFIX: Final = "ingest:commands"
# Discord ignores a longer nonce (and the chunks then carry none).
MAX_NONCE_BYTES: Final = 32
# Discord answers at most 100 members for a query prefix or a list of user ids.
MAX_MEMBERS_PER_QUERY: Final = 100
REDIS_TIMEOUT: Final = 5.0
# Ops an application may send; HEARTBEAT, IDENTIFY and RESUME belong to the session.
COMMAND_OPS: Final = frozenset(
    {
        Opcode.PRESENCE_UPDATE,
        Opcode.VOICE_STATE_UPDATE,
        Opcode.REQUEST_GUILD_MEMBERS,
        Opcode.REQUEST_SOUNDBOARD_SOUNDS,
    }
)


# ---------------------------------------------------------------------------------------------
# Payload models: what Discord documents for each command, checked before anything leaves


class _Command(BaseModel):
    model_config = ConfigDict(extra="allow")


class PresenceUpdate(_Command):
    since: int | None = None
    activities: list[dict[str, Any]] = Field(default_factory=list)
    status: Literal["online", "dnd", "idle", "invisible", "offline"] = "online"
    afk: bool = False


class VoiceStateUpdate(_Command):
    guild_id: Snowflake
    channel_id: Snowflake | None
    self_mute: bool = False
    self_deaf: bool = False


class RequestGuildMembers(_Command):
    guild_id: Snowflake
    query: str | None = None
    limit: Annotated[int, Field(ge=0)] = 0
    presences: bool = False
    user_ids: Annotated[list[Snowflake], Field(max_length=MAX_MEMBERS_PER_QUERY)] | None = None
    nonce: str | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> RequestGuildMembers:
        if (self.query is None) == (self.user_ids is None):
            raise ValueError("give exactly one of query or user_ids")
        if self.nonce is not None and len(self.nonce.encode()) > MAX_NONCE_BYTES:
            raise ValueError(f"nonce is over {MAX_NONCE_BYTES} bytes: Discord would drop it")
        return self


_MODELS: Final[dict[int, type[_Command]]] = {
    Opcode.PRESENCE_UPDATE: PresenceUpdate,
    Opcode.VOICE_STATE_UPDATE: VoiceStateUpdate,
    Opcode.REQUEST_GUILD_MEMBERS: RequestGuildMembers,
}


def checked_payload(op: int, d: Any) -> Any:
    """``d`` validated for ``op`` and in the form Discord takes; the frame within 4,096 bytes.

    Raises ``CommandError`` (``PayloadTooLarge`` for the size) naming what is wrong.
    """
    if op not in COMMAND_OPS:
        raise CommandError(
            f"op {op} is not a command an application sends (use one of "
            f"{', '.join(str(int(o)) for o in sorted(COMMAND_OPS))})"
        )
    model = _MODELS.get(op)
    if model is not None:
        try:
            d = model.model_validate(d).model_dump(mode="json", exclude_none=False)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'd'}: {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False)
            )
            raise CommandError(f"op {op}: {problems}") from None
        if op == Opcode.REQUEST_GUILD_MEMBERS:
            # Discord takes one selector: send no null for the other.
            d = {k: v for k, v in d.items() if v is not None or k not in ("query", "user_ids")}
            if d.get("nonce") is None:
                d.pop("nonce", None)
    size = len(orjson.dumps({"op": int(op), "d": d}))
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"op {op} payload is {size} bytes; Discord allows {MAX_PAYLOAD_BYTES}"
        )
    return d


# ---------------------------------------------------------------------------------------------
# Where commands wait: keys shared with the gateway side


def shard_count_key(prefix: str = KEY_PREFIX) -> str:
    """Written by every gateway process at start: the running deployment's shard count."""
    return f"{prefix}:shard_count"


def pending_key(shard_id: int, shard_count: int, prefix: str = KEY_PREFIX) -> str:
    """Commands for a shard, newest on the left; the owning gateway takes from the right."""
    return f"{prefix}:{shard_count}:{shard_id}"


def processing_key(shard_id: int, shard_count: int, prefix: str = KEY_PREFIX) -> str:
    """Commands a gateway took but has not yet sent or dropped: put back after a crash."""
    return f"{prefix}:{shard_count}:{shard_id}:processing"


def bell_key(shard_id: int, shard_count: int, prefix: str = KEY_PREFIX) -> str:
    """At most one token, pushed with every command for the shard: one blocking pop over all
    of a process's bells wakes its shards, so a process holds one waiting connection, not one
    per shard."""
    return f"{prefix}:{shard_count}:{shard_id}:bell"


def shard_for(guild_id: int, shard_count: int) -> int:
    """Discord's sharding formula."""
    return (guild_id >> 22) % shard_count


@dataclass(frozen=True, slots=True)
class QueuedCommand:
    """A command as it waits in Redis: ``raw`` is its exact list entry (to remove it by)."""

    op: int
    d: Any
    issued_at: float  # wall clock (time.time()) of the caller
    ttl: float
    raw: bytes

    @property
    def deadline(self) -> float:
        return self.issued_at + self.ttl


def encode_command(op: int, d: Any, issued_at: float, ttl: float) -> bytes:
    # The random id keeps two identical commands distinct entries (LREM removes one of them).
    return orjson.dumps(
        {"op": int(op), "d": d, "issued_at": issued_at, "ttl": ttl, "id": secrets.token_hex(8)}
    )


def decode_command(raw: bytes) -> QueuedCommand:
    """Raises ``ValueError`` for an entry that is not a command (someone else wrote it)."""
    try:
        data = orjson.loads(raw)
        return QueuedCommand(
            op=int(data["op"]),
            d=data["d"],
            issued_at=float(data["issued_at"]),
            ttl=float(data["ttl"]),
            raw=raw,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a gateway command: {exc!r}") from None


# ---------------------------------------------------------------------------------------------
# The client


class Commands:
    """Queue gateway commands for the gateway processes of one bot. Thread-safe."""

    def __init__(self, client: redis.Redis, *, prefix: str = KEY_PREFIX) -> None:
        self._redis = client
        self.prefix = prefix

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Commands:
        url = state_url_from_env(os.environ if env is None else env)
        if url is None:
            raise ConfigError(
                "gateway commands need the bot's state Redis: set INGEST_STATE_URL to a "
                "redis:// URL (the broker is not Redis)"
            )
        return cls(sync_redis(url, timeout=REDIS_TIMEOUT))

    def close(self) -> None:
        self._redis.close()

    def shard_count(self) -> int:
        """The running deployment's shard count, as its gateway processes wrote it."""
        raw = self._redis.get(shard_count_key(self.prefix))
        if raw is None:
            raise NotConnected(
                "no gateway process has run against this Redis yet (no shard count at "
                f"{shard_count_key(self.prefix)}): start `python -m ingest` first"
            )
        return int(raw)

    def send_command(
        self,
        op: int,
        d: Any,
        *,
        guild_id: int | None = None,
        shard_id: int | None = None,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        """Queue ``op`` for the shard of ``guild_id`` (or ``shard_id``); a presence without
        either goes to every shard. Sent within ``ttl`` seconds or dropped and counted."""
        d = checked_payload(op, d)
        if ttl <= 0:
            raise CommandError(f"ttl must be positive, got {ttl}")
        try:
            self._queue(op, d, guild_id, shard_id, ttl)
        except redis.RedisError as exc:
            raise CommandError(
                f"op {op} not queued: the state Redis did not answer ({exc})"
            ) from exc

    def _queue(
        self, op: int, d: Any, guild_id: int | None, shard_id: int | None, ttl: float
    ) -> None:
        count = self.shard_count()
        if shard_id is not None:
            if not 0 <= shard_id < count:
                raise CommandError(f"shard {shard_id} does not exist: the bot runs {count}")
            shards = [shard_id]
        elif guild_id is not None:
            shards = [shard_for(int(guild_id), count)]
        elif op == Opcode.PRESENCE_UPDATE:
            shards = list(range(count))
        else:
            raise CommandError(f"op {op} needs a guild_id or a shard_id to be routed")
        issued_at = time.time()
        pipe = self._redis.pipeline(transaction=True)
        # A queue no gateway reads (a shard count since changed) goes away on its own.
        lifetime = int(ttl) + 3600
        for shard in shards:
            key = pending_key(shard, count, self.prefix)
            pipe.lpush(key, encode_command(op, d, issued_at, ttl))
            pipe.expire(key, lifetime)
            # In the same MULTI: a gateway woken by the bell finds the command there. One
            # token is enough (a woken shard takes everything queued), so a burst adds none.
            bell = bell_key(shard, count, self.prefix)
            pipe.lpush(bell, 1)
            pipe.ltrim(bell, 0, 0)
            pipe.expire(bell, lifetime)
        pipe.execute()

    def update_presence(
        self,
        *,
        status: str = "online",
        activities: Sequence[Mapping[str, Any]] = (),
        afk: bool = False,
        since: int | None = None,
        shard_id: int | None = None,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        d = {"since": since, "activities": [dict(a) for a in activities], "status": status}
        d["afk"] = afk
        self.send_command(Opcode.PRESENCE_UPDATE, d, shard_id=shard_id, ttl=ttl)

    def request_guild_members(
        self,
        guild_id: int,
        *,
        query: str = "",
        limit: int = 0,
        user_ids: Sequence[int] | None = None,
        presences: bool = False,
        nonce: str | None = None,
        ttl: float = DEFAULT_TTL,
    ) -> str:
        """Returns the nonce the GUILD_MEMBERS_CHUNK events will carry."""
        if nonce is None:
            nonce = secrets.token_hex(16)
        d: dict[str, Any] = {
            "guild_id": guild_id,
            "limit": limit,
            "presences": presences,
            "nonce": nonce,
        }
        if user_ids is not None:
            d["user_ids"] = list(user_ids)
        else:
            d["query"] = query
        self.send_command(Opcode.REQUEST_GUILD_MEMBERS, d, guild_id=guild_id, ttl=ttl)
        return nonce

    def update_voice_state(
        self,
        guild_id: int,
        channel_id: int | None,
        *,
        self_mute: bool = False,
        self_deaf: bool = False,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        d = {
            "guild_id": guild_id,
            "channel_id": channel_id,
            "self_mute": self_mute,
            "self_deaf": self_deaf,
        }
        self.send_command(Opcode.VOICE_STATE_UPDATE, d, guild_id=guild_id, ttl=ttl)


_process_client: tuple[int, Commands] | None = None


def commands_client() -> Commands:
    """This process's ``Commands.from_env()``, made on first use (and again after a fork)."""
    global _process_client
    if _process_client is None or _process_client[0] != os.getpid():
        _process_client = (os.getpid(), Commands.from_env())
    return _process_client[1]


def send_command(
    op: int,
    d: Any,
    *,
    guild_id: int | None = None,
    shard_id: int | None = None,
    ttl: float = DEFAULT_TTL,
) -> None:
    commands_client().send_command(op, d, guild_id=guild_id, shard_id=shard_id, ttl=ttl)


def update_presence(
    *,
    status: str = "online",
    activities: Sequence[Mapping[str, Any]] = (),
    afk: bool = False,
    since: int | None = None,
    shard_id: int | None = None,
    ttl: float = DEFAULT_TTL,
) -> None:
    commands_client().update_presence(
        status=status, activities=activities, afk=afk, since=since, shard_id=shard_id, ttl=ttl
    )


def request_guild_members(
    guild_id: int,
    *,
    query: str = "",
    limit: int = 0,
    user_ids: Sequence[int] | None = None,
    presences: bool = False,
    nonce: str | None = None,
    ttl: float = DEFAULT_TTL,
) -> str:
    return commands_client().request_guild_members(
        guild_id,
        query=query,
        limit=limit,
        user_ids=user_ids,
        presences=presences,
        nonce=nonce,
        ttl=ttl,
    )


def update_voice_state(
    guild_id: int,
    channel_id: int | None,
    *,
    self_mute: bool = False,
    self_deaf: bool = False,
    ttl: float = DEFAULT_TTL,
) -> None:
    commands_client().update_voice_state(
        guild_id, channel_id, self_mute=self_mute, self_deaf=self_deaf, ttl=ttl
    )
