"""Who may IDENTIFY when: one identify per ``shard_id % max_concurrency`` bucket per 5 s.

The in-process scheduler serves every shard of one process; ``RedisIdentifyScheduler`` extends
the same rule across processes and machines with a lease per bucket that expires if its holder
dies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Protocol

from ingest.protocol import IDENTIFY_INTERVAL_SECONDS

log = logging.getLogger("ingest.identify")


class IdentifyScheduler(Protocol):
    async def acquire(self, shard_id: int) -> None:
        """Return when ``shard_id`` may send IDENTIFY; the slot counts as used from then."""


class LocalIdentifyScheduler:
    """Buckets in parallel, one identify per bucket per ``interval`` within this process."""

    def __init__(
        self,
        max_concurrency: int = 1,
        interval: float = IDENTIFY_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_concurrency = max(1, max_concurrency)
        self.interval = interval
        self._clock = clock
        self._next_allowed: dict[int, float] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    def bucket(self, shard_id: int) -> int:
        return shard_id % self.max_concurrency

    def next_slot_in(self, shard_id: int) -> float:
        bucket = self.bucket(shard_id)
        return max(0.0, self._next_allowed.get(bucket, 0.0) - self._clock())

    async def acquire(self, shard_id: int) -> None:
        bucket = self.bucket(shard_id)
        lock = self._locks.setdefault(bucket, asyncio.Lock())
        async with lock:
            wait = self._next_allowed.get(bucket, 0.0) - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next_allowed[bucket] = self._clock() + self.interval


class RedisIdentifyScheduler:
    """The bucket rule shared by every gateway process that reaches one Redis.

    A bucket's slot is a key ``SET NX PX interval``: whoever sets it may identify, and the key
    expiring is the 5 s wait. A holder that dies mid-wait blocks nobody past the expiry.
    """

    def __init__(
        self,
        redis_url: str,
        max_concurrency: int = 1,
        interval: float = IDENTIFY_INTERVAL_SECONDS,
        prefix: str = "ingest:identify",
    ) -> None:
        import redis.asyncio as aioredis

        self.max_concurrency = max(1, max_concurrency)
        self.interval = interval
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._prefix = prefix
        self._holder = f"{os.getpid()}@{os.uname().nodename}"

    async def acquire(self, shard_id: int) -> None:
        key = f"{self._prefix}:{self.max_concurrency}:{shard_id % self.max_concurrency}"
        ttl_ms = int(self.interval * 1000)
        while True:
            if await self._redis.set(key, f"{self._holder}:{shard_id}", nx=True, px=ttl_ms):
                return
            remaining = await self._redis.pttl(key)
            await asyncio.sleep(max(remaining, 50) / 1000.0)

    async def close(self) -> None:
        await self._redis.aclose()
