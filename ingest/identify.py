"""Who may IDENTIFY when: one identify per ``shard_id % max_concurrency`` bucket per 5 s.

The in-process scheduler serves every shard of one process; ``RedisIdentifyScheduler`` extends
the same rule across processes and machines with a lease per bucket that expires if its holder
dies. ``BudgetedIdentifyScheduler`` wraps either and never starts more sessions than
``session_start_limit`` allows.

Discord times the 5 s on its side, when each IDENTIFY arrives; a slot is taken here a moment
before the IDENTIFY leaves, and that moment varies (a busy event loop, another machine's
network). Every slot is therefore held a small ``margin`` longer than the interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Protocol

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


class BudgetedIdentifyScheduler:
    """Never identify past ``session_start_limit``: with the budget spent, wait for its reset.

    Discord resets a bot's token when it starts more than ``total`` sessions a day. A start is
    counted when a shard is let through to its bucket, so shards identifying in parallel
    never overspend; a shard cancelled before its slot gives its start back.
    """

    def __init__(
        self,
        inner: IdentifyScheduler,
        *,
        remaining: int,
        total: int,
        reset_after: float,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._inner = inner
        self.remaining = remaining
        self._total = total
        self._clock = clock
        self._sleep = sleep
        self._reset_at = clock() + reset_after
        self._waiting_for_reset = 0

    def next_slot_in(self) -> float | None:
        inner = self._inner.next_slot_in()
        if self._waiting_for_reset:
            reset = max(0.0, self._reset_at - self._clock())
            return reset if inner is None else min(inner, reset)
        return inner

    async def acquire(self, shard_id: int) -> None:
        while True:
            now = self._clock()
            if now >= self._reset_at:
                self.remaining = self._total
                self._reset_at = now + SESSION_START_WINDOW_SECONDS
            if self.remaining > 0:
                self.remaining -= 1
                break
            wait = self._reset_at - now
            log.warning(
                "session start budget spent; shard %d waits %.0f s for Discord's reset",
                shard_id,
                wait,
            )
            self._waiting_for_reset += 1
            try:
                await self._sleep(wait)
            finally:
                self._waiting_for_reset -= 1
        try:
            await self._inner.acquire(shard_id)
        except BaseException:
            self.remaining += 1
            raise

    async def close(self) -> None:
        await self._inner.close()
