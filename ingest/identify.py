"""Who may IDENTIFY when: one identify per ``shard_id % max_concurrency`` bucket per 5 s.

The in-process scheduler serves every shard of one process; ``RedisIdentifyScheduler`` extends
the same rule across processes and machines with a lease per bucket that expires if its holder
dies. ``BudgetedIdentifyScheduler`` wraps either and never starts more sessions than
``session_start_limit`` allows, counting in ``RedisSessionBudget`` (one budget per bot, shared
by all its processes) whenever a Redis is configured.

Discord times the 5 s on its side, when each IDENTIFY arrives; a slot is taken here a moment
before the IDENTIFY leaves, and that moment varies (a busy event loop, another machine's
network). Every slot is therefore held a small ``margin`` longer than the interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from ingest.errors import ConfigError
from ingest.protocol import IDENTIFY_INTERVAL_SECONDS

if TYPE_CHECKING:
    import redis.asyncio

log = logging.getLogger("ingest.identify")

# A slot is held this fraction of the interval longer than Discord's rule (0.25 s of 5 s).
MARGIN_FRACTION: Final = 0.05
SESSION_START_WINDOW_SECONDS: Final = 24 * 3600.0
REDIS_RETRY_SECONDS: Final = 1.0
LEASE_PREFIX: Final = "ingest:identify"

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class IdentifyScheduler(Protocol):
    async def acquire(self, shard_id: int) -> None:
        """Return when ``shard_id`` may send IDENTIFY; the slot counts as used from then."""

    def next_slot_in(self) -> float | None:
        """Seconds until the next slot opens for a shard waiting here; None if none waits."""

    async def close(self) -> None:
        """Release connections; waiting shards are the caller's to cancel."""


def lease_key(max_concurrency: int, bucket: int, prefix: str = LEASE_PREFIX) -> str:
    """The Redis key whose holder owns ``bucket``'s current identify slot."""
    return f"{prefix}:{max_concurrency}:{bucket}"


def _margin(interval: float, margin: float | None) -> float:
    return interval * MARGIN_FRACTION if margin is None else margin


class _Waiters:
    """Which buckets have shards waiting here, and when each bucket's slot opens."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._count: dict[int, int] = {}
        self.opens_at: dict[int, float] = {}

    def enter(self, bucket: int) -> None:
        self._count[bucket] = self._count.get(bucket, 0) + 1

    def leave(self, bucket: int) -> None:
        self._count[bucket] -= 1
        if not self._count[bucket]:
            del self._count[bucket]

    def next_slot_in(self) -> float | None:
        if not self._count:
            return None
        now = self._clock()
        return min(max(0.0, self.opens_at.get(b, now) - now) for b in self._count)


class LocalIdentifyScheduler:
    """Buckets in parallel, one identify per bucket per ``interval`` within this process."""

    def __init__(
        self,
        max_concurrency: int = 1,
        interval: float = IDENTIFY_INTERVAL_SECONDS,
        *,
        margin: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.max_concurrency = max(1, max_concurrency)
        self.interval = interval
        self.hold = interval + _margin(interval, margin)
        self._clock = clock
        self._sleep = sleep
        self._waiters = _Waiters(clock)
        self._locks: dict[int, asyncio.Lock] = {}

    def bucket(self, shard_id: int) -> int:
        return shard_id % self.max_concurrency

    def next_slot_in(self) -> float | None:
        return self._waiters.next_slot_in()

    async def acquire(self, shard_id: int) -> None:
        bucket = self.bucket(shard_id)
        lock = self._locks.setdefault(bucket, asyncio.Lock())
        opens_at = self._waiters.opens_at
        self._waiters.enter(bucket)
        try:
            async with lock:
                while (wait := opens_at.get(bucket, 0.0) - self._clock()) > 0:
                    await self._sleep(wait)
                opens_at[bucket] = self._clock() + self.hold
        finally:
            self._waiters.leave(bucket)

    async def close(self) -> None:
        return None


class RedisIdentifyScheduler:
    """The bucket rule shared by every gateway process that reaches one Redis.

    A bucket's slot is a key ``SET NX PX hold``: whoever sets it may identify, and the key
    expiring is the 5 s wait. A holder that dies mid-wait blocks nobody past the expiry. Redis
    being unreachable delays identifies (logged, retried), it never ends the shard.
    """

    def __init__(
        self,
        redis_url: str,
        max_concurrency: int = 1,
        interval: float = IDENTIFY_INTERVAL_SECONDS,
        *,
        margin: float | None = None,
        prefix: str = LEASE_PREFIX,
        clock: Clock = time.monotonic,
    ) -> None:
        from ingest.brokers import async_redis

        self.max_concurrency = max(1, max_concurrency)
        self.interval = interval
        self.hold = interval + _margin(interval, margin)
        self._redis: redis.asyncio.Redis = async_redis(
            redis_url, socket_timeout=5, socket_connect_timeout=5
        )
        self._prefix = prefix
        self._holder = f"{os.getpid()}@{os.uname().nodename}"
        self._clock = clock
        self._waiters = _Waiters(clock)

    def lease_key(self, bucket: int) -> str:
        return lease_key(self.max_concurrency, bucket, self._prefix)

    def next_slot_in(self) -> float | None:
        return self._waiters.next_slot_in()

    async def acquire(self, shard_id: int) -> None:
        import redis.exceptions

        bucket = shard_id % self.max_concurrency
        key = self.lease_key(bucket)
        hold_ms = max(1, round(self.hold * 1000))
        self._waiters.enter(bucket)
        try:
            while True:
                try:
                    holder = f"{self._holder}:{shard_id}"
                    if await self._redis.set(key, holder, nx=True, px=hold_ms):
                        self._waiters.opens_at[bucket] = self._clock() + self.hold
                        return
                    remaining_ms = await self._redis.pttl(key)
                    if remaining_ms == -1:
                        # A lease without expiry (set by hand, or by an older version) would
                        # block the bucket forever: give it the normal lifetime.
                        log.warning("identify lease %s had no expiry; expiring it", key)
                        await self._redis.pexpire(key, hold_ms)
                        remaining_ms = hold_ms
                except (redis.exceptions.RedisError, OSError) as exc:
                    log.warning(
                        "shard %d cannot reach Redis for its identify slot (%s); retrying",
                        shard_id,
                        exc,
                    )
                    await asyncio.sleep(REDIS_RETRY_SECONDS)
                    continue
                wait = max(remaining_ms, 10) / 1000.0
                self._waiters.opens_at[bucket] = self._clock() + wait
                await asyncio.sleep(wait)
        finally:
            self._waiters.leave(bucket)

    async def close(self) -> None:
        await self._redis.aclose()


# Take one session start from the bot's shared budget, atomically.
# KEYS[1]: the budget key. ARGV[1]: starts this process knows are left (Discord's figure at
# start, minus its own starts since, or the total once its view of the reset has passed): it
# seeds a missing key and caps a key that claims more (stale, or left by another run).
# ARGV[2]: ms until this process's view of the reset, the lifetime of a key it creates.
# Returns {granted (1/0), starts left after this call, ms until the shared budget resets}.
_TAKE_SCRIPT: Final = """
local left = tonumber(redis.call('GET', KEYS[1]))
local known = tonumber(ARGV[1])
if left == nil then
  redis.call('SET', KEYS[1], known, 'PX', ARGV[2])
  left = known
elseif left > known then
  redis.call('DECRBY', KEYS[1], left - known)
  left = known
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
if left > 0 then
  redis.call('DECR', KEYS[1])
  return {1, left - 1, ttl}
end
return {0, 0, ttl}
"""

# A start taken but never used (the shard was cancelled before its slot) goes back, unless the
# budget has reset meanwhile (the key is gone: nothing to give back to).
_GIVE_BACK_SCRIPT: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCR', KEYS[1])
end
return -1
"""


def budget_key(token: str, prefix: str = LEASE_PREFIX) -> str:
    """The Redis key of a bot's shared session start budget.

    ``session_start_limit`` is per bot, and two bots may share one Redis, so the key names the
    bot by a digest of its token (never the token itself).
    """
    digest = hashlib.sha256(token.encode()).hexdigest()[:16]
    return f"{prefix}:budget:{digest}"


class RedisSessionBudget:
    """``session_start_limit`` kept in Redis, so every gateway process of a bot spends one budget.

    Each process alone would take the full ``remaining`` from /gateway/bot: two processes with
    3 left would start 4 sessions, and Discord resets the token of a bot that overspends. The
    count lives in one key that expires at Discord's reset; a Lua script checks and decrements it
    atomically. Redis being unreachable delays identifies (logged, retried), never overspends.
    """

    def __init__(self, redis_url: str, key: str) -> None:
        from ingest.brokers import async_redis

        self.key = key
        # Bounded: shards identifying at once queue for a connection instead of opening one
        # each (a process of 16 shards held 16, over hosted plans' caps).
        self._redis: redis.asyncio.Redis = async_redis(
            redis_url, socket_timeout=5, socket_connect_timeout=5
        )
        self._take = self._redis.register_script(_TAKE_SCRIPT)
        self._give_back = self._redis.register_script(_GIVE_BACK_SCRIPT)

    async def take(self, shard_id: int, known_left: int, reset_in: float) -> tuple[bool, float]:
        """Take one start: (granted, seconds until the shared budget resets)."""
        import redis.exceptions

        lifetime_ms = max(1, round(reset_in * 1000))
        while True:
            try:
                granted, _, ttl_ms = await self._take(
                    keys=[self.key], args=[max(0, known_left), lifetime_ms]
                )
                return bool(granted), int(ttl_ms) / 1000.0
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning(
                    "shard %d cannot reach Redis for the session start budget (%s); retrying",
                    shard_id,
                    exc,
                )
                await asyncio.sleep(REDIS_RETRY_SECONDS)

    async def give_back(self) -> None:
        import redis.exceptions

        try:
            await self._give_back(keys=[self.key])
        except (redis.exceptions.RedisError, OSError) as exc:
            # The start stays spent: an unused start is cheaper than an overspent budget.
            log.warning("could not give a session start back to Redis (%s)", exc)

    async def close(self) -> None:
        await self._redis.aclose()


def session_budget_for(
    token: str, redis_url: str | None, shard_ids: Sequence[int], shard_count: int
) -> RedisSessionBudget | None:
    """Where this process counts session starts: the bot's shared budget in Redis if there is
    one; else its own count, which is only safe when it runs every shard of the bot.

    Without a shared Redis a process running a subset of the shards refuses to start (rather
    than splitting the budget by shard share: a restarted process would take its share again
    from a ``remaining`` the others have already spent from).
    """
    if redis_url is not None:
        return RedisSessionBudget(redis_url, budget_key(token))
    if set(shard_ids) != set(range(shard_count)):
        raise ConfigError(
            f"DISCORD_SHARD_IDS runs {len(shard_ids)} of {shard_count} shards, so other gateway "
            "processes run the rest, but no Redis is configured to share session_start_limit "
            "between them (each would spend all of it and Discord resets the token): set "
            "INGEST_STATE_URL=redis://... or use a Redis broker, or run every shard in one process"
        )
    return None


class BudgetedIdentifyScheduler:
    """Never identify past ``session_start_limit``: with the budget spent, wait for its reset.

    Discord resets a bot's token when it starts more than ``total`` sessions a day. A start is
    counted when a shard is let through to its bucket, so shards identifying in parallel
    never overspend; a shard cancelled before its slot gives its start back. With ``shared``
    the count is the one every process of the bot spends (``RedisSessionBudget``); this
    process's own view (``remaining``) then only seeds and caps it.
    """

    def __init__(
        self,
        inner: IdentifyScheduler,
        *,
        remaining: int,
        total: int,
        reset_after: float,
        shared: RedisSessionBudget | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._inner = inner
        self.remaining = remaining
        self._total = total
        self._shared = shared
        self._clock = clock
        self._sleep = sleep
        self._reset_at = clock() + reset_after
        self._waiting_for_reset = 0
        self._wait_ends_at = self._reset_at

    def next_slot_in(self) -> float | None:
        inner = self._inner.next_slot_in()
        if self._waiting_for_reset:
            reset = max(0.0, self._wait_ends_at - self._clock())
            return reset if inner is None else min(inner, reset)
        return inner

    async def _take(self, shard_id: int) -> float | None:
        """Take one start; None when granted, else seconds until the budget resets."""
        now = self._clock()
        if now >= self._reset_at:
            self.remaining = self._total
            self._reset_at = now + SESSION_START_WINDOW_SECONDS
        if self._shared is not None:
            granted, reset_in = await self._shared.take(
                shard_id, self.remaining, self._reset_at - now
            )
        else:
            granted, reset_in = self.remaining > 0, self._reset_at - now
        if not granted:
            return reset_in
        # Our own view never goes below 0: the shared count may have granted what Discord's
        # figure at our start did not know about (a reset since).
        self.remaining = max(0, self.remaining - 1)
        return None

    async def acquire(self, shard_id: int) -> None:
        while (wait := await self._take(shard_id)) is not None:
            log.warning(
                "session start budget spent%s; shard %d waits %.0f s for Discord's reset",
                " (shared by every gateway process of this bot)" if self._shared else "",
                shard_id,
                wait,
            )
            self._waiting_for_reset += 1
            self._wait_ends_at = self._clock() + wait
            try:
                await self._sleep(wait)
            finally:
                self._waiting_for_reset -= 1
        try:
            await self._inner.acquire(shard_id)
        except BaseException:
            self.remaining += 1
            if self._shared is not None:
                await self._shared.give_back()
            raise

    async def close(self) -> None:
        await self._inner.close()
        if self._shared is not None:
            await self._shared.close()
