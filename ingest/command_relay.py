"""The gateway side of ``ingest.commands``: take each owned shard's queued commands from the
state Redis and send them in issue order through the session's 120-per-60-s budget.

``ShardCommands`` decides (no I/O, explicit clocks): send now, drop as expired, or wait how
long. ``CommandRelay`` moves commands between Redis and the shards of one gateway process, on
two Redis connections however many shards it serves (hosted plans cap connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis
import redis.asyncio

from ingest.brokers import async_redis
from ingest.commands import (
    KEY_PREFIX,
    QueuedCommand,
    bell_key,
    decode_command,
    pending_key,
    processing_key,
    shard_count_key,
)
from ingest.errors import CommandError
from ingest.gateway import Gateway
from ingest.logs import throttled
from ingest.metrics import cumulative_buckets
from ingest.protocol import Opcode
from ingest.session import GUILD_MEMBERS_INTERVAL, Session, State

log = logging.getLogger("ingest.commands")

# Commands held in memory per shard (the rest wait in Redis, in order).
MAX_HELD: Final = 1000
# How many commands one round trip takes from Redis.
TAKE_BATCH: Final = 100
# Longest sleep between looks at a shard's queue, bell or not: a bell lost (popped as a
# connection broke, or a caller that rings none) delays its command by at most this.
IDLE_POLL: Final = 1.0
REDIS_TIMEOUT: Final = 5.0
# Connections for the relay's short calls (take, done, recover), shared by all its shards: one
# round trip is well under a millisecond on a near Redis, so shards queue for it briefly
# rather than each holding a connection. The bells' blocking pop has one more of its own.
POOL_CONNECTIONS: Final = 1
WAIT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0)


# ---------------------------------------------------------------------------------------------
# The decision core


@dataclass(slots=True)
class Pumped:
    """What one ``pump`` did: commands handed to the session, dropped, and how long to wait."""

    sent: list[QueuedCommand] = field(default_factory=list)
    expired: list[QueuedCommand] = field(default_factory=list)
    invalid: list[QueuedCommand] = field(default_factory=list)
    wait: float | None = None  # None: nothing held, wait for new commands


def _full_member_list(command: QueuedCommand) -> str | None:
    """The guild id of a request for a guild's whole member list (Discord: 1 per 30 s)."""
    d = command.d
    if (
        command.op == Opcode.REQUEST_GUILD_MEMBERS
        and isinstance(d, dict)
        and d.get("query") == ""
        and d.get("limit") == 0
        and "user_ids" not in d
    ):
        return str(d.get("guild_id"))
    return None


class ShardCommands:
    """One shard's commands in issue order.

    ``now`` is the session's clock (its send budget); ``wall_now`` is wall-clock time, which
    the callers' issue times are in. A command whose TTL has passed is dropped wherever it
    waits; the head is sent only when the session is connected and the budget has a slot, so
    later commands never overtake it.
    """

    def __init__(self, shard_id: int) -> None:
        self.shard_id = shard_id
        self._held: deque[QueuedCommand] = deque()
        # guild id -> when its full member list was last requested (session clock).
        self._full_lists: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._held)

    def push(self, command: QueuedCommand) -> None:
        self._held.append(command)

    def pump(self, session: Session, now: float, wall_now: float) -> Pumped:
        out = Pumped()
        if any(c.deadline <= wall_now for c in self._held):
            kept: deque[QueuedCommand] = deque()
            for command in self._held:
                (out.expired if command.deadline <= wall_now else kept).append(command)
            self._held = kept
        while self._held:
            head = self._held[0]
            if session.state is not State.CONNECTED:
                # Reconnecting: hold everything until READY/RESUMED, or the first TTL to pass.
                out.wait = min(c.deadline for c in self._held) - wall_now
                break
            delay = session.send_retry_after(now)
            guild = _full_member_list(head)
            if guild is not None and guild in self._full_lists:
                delay = max(delay, self._full_lists[guild] + GUILD_MEMBERS_INTERVAL - now)
            if delay > 0:
                if wall_now + delay >= head.deadline:
                    # It cannot go out in time: drop it now rather than hold the rest back.
                    out.expired.append(self._held.popleft())
                    continue
                out.wait = delay
                break
            self._held.popleft()
            try:
                session.send(head.op, head.d, now)
            except CommandError as exc:
                log.warning("shard %d: dropped op %d: %s", self.shard_id, head.op, exc)
                out.invalid.append(head)
                continue
            if guild is not None:
                if len(self._full_lists) > MAX_HELD:
                    # Only the last 30 s matter: forget the rest rather than grow forever.
                    self._full_lists = {
                        g: at
                        for g, at in self._full_lists.items()
                        if now - at < GUILD_MEMBERS_INTERVAL
                    }
                self._full_lists[guild] = now
            out.sent.append(head)
        return out


# ---------------------------------------------------------------------------------------------
# Metrics


class CommandMetrics:
    """Commands received / sent / expired / invalid by op and shard, and issue-to-sent time."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[tuple[int, int]]] = {
            "received": Counter(),
            "sent": Counter(),
            "expired": Counter(),
            "invalid": Counter(),
        }
        self.wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)
        self.wait_sum = 0.0
        self.waits: deque[float] = deque(maxlen=10_000)

    def count(self, what: str, shard_id: int, commands: Sequence[QueuedCommand]) -> None:
        for command in commands:
            self.counts[what][(command.op, shard_id)] += 1

    def waited(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.wait_buckets[bisect_left(WAIT_BUCKETS, seconds)] += 1
        self.wait_sum += seconds
        self.waits.append(seconds)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        for what, counts in self.counts.items():
            family = CounterMetricFamily(
                f"discord_ingest_commands_{what}",
                f"Gateway commands {what}, by op and shard",
                labels=["op", "shard"],
            )
            for (op, shard), value in sorted(counts.items()):
                family.add_metric([str(op), str(shard)], value)
            yield family
        yield HistogramMetricFamily(
            "discord_ingest_command_wait_seconds",
            "A command's issue (caller's clock) to its send on the shard",
            buckets=cumulative_buckets(WAIT_BUCKETS, self.wait_buckets),
            sum_value=self.wait_sum,
        )


# ---------------------------------------------------------------------------------------------
# The shell

# Up to ARGV[1] commands from the head of the queue onto the processing list, in one round trip
# that stops at the first empty pop.
_TAKE_SCRIPT: Final = """
local taken = {}
for _ = 1, tonumber(ARGV[1]) do
  local command = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not command then break end
  taken[#taken + 1] = command
end
return taken
"""


def redis_client(url: str, connections: int, *, blocks_for: float = 0.0) -> redis.asyncio.Redis:
    """The one place the relay builds its Redis clients: at most ``connections``, callers wait
    for one beyond that; a reply may take ``blocks_for`` seconds more (a blocking pop)."""
    return async_redis(
        url,
        max_connections=connections,
        socket_timeout=REDIS_TIMEOUT + blocks_for,
        socket_connect_timeout=REDIS_TIMEOUT,
    )


class CommandRelay:
    """Feeds the shards of one gateway process with the commands queued for them.

    A caller rings the shard's bell with each command; one task per process waits on all the
    bells and wakes the shard's task, which takes without blocking in Redis. So the process
    holds ``POOL_CONNECTIONS`` + 1 connections whatever its shard count.
    """

    def __init__(
        self,
        url: str,
        shard_count: int,
        gateways: Sequence[Gateway],
        *,
        prefix: str = KEY_PREFIX,
        metrics: CommandMetrics | None = None,
    ) -> None:
        self._url = url
        self.shard_count = shard_count
        self.gateways = list(gateways)
        self.prefix = prefix
        self.metrics = metrics or CommandMetrics()
        # Set by a bell, READY/RESUMED or a broken bell connection: look at the shard now.
        self._wakers = {g.shard_id: asyncio.Event() for g in self.gateways}
        self._redis: redis.asyncio.Redis | None = None
        self._bells: redis.asyncio.Redis | None = None

    def shard_connected(self, shard_id: int) -> None:
        """READY or RESUMED: commands held for the shard may go now."""
        waker = self._wakers.get(shard_id)
        if waker is not None:
            waker.set()

    async def run(self) -> None:
        self._redis = redis_client(self._url, POOL_CONNECTIONS)
        self._bells = redis_client(self._url, 1, blocks_for=IDLE_POLL)
        try:
            await self._announce()
            await asyncio.gather(self._listen(), *(self._serve(g) for g in self.gateways))
        finally:
            await self._redis.aclose()
            await self._bells.aclose()

    async def _announce(self) -> None:
        """Tell callers the running deployment's shard count (they route by it)."""
        assert self._redis is not None
        while True:
            try:
                await self._redis.set(shard_count_key(self.prefix), self.shard_count)
                log.info(
                    "gateway commands: serving shards %s of %d",
                    ",".join(str(g.shard_id) for g in self.gateways),
                    self.shard_count,
                )
                return
            except (redis.RedisError, OSError) as exc:
                throttled(log).warning("gateway commands: state Redis not answering: %r", exc)
                await asyncio.sleep(IDLE_POLL)

    async def _listen(self) -> None:
        """Wake the shard whose bell rang: one blocking pop over all of them (BLPOP takes many
        keys), so one connection waits for every shard of the process."""
        assert self._bells is not None
        shard_of = {
            bell_key(g.shard_id, self.shard_count, self.prefix).encode(): g.shard_id
            for g in self.gateways
        }
        bells = list(shard_of)
        while True:
            try:
                rung = await self._bells.blpop(bells, timeout=int(IDLE_POLL))
            except (redis.RedisError, OSError) as exc:
                # A bell popped as the connection broke is lost: look at every shard.
                for waker in self._wakers.values():
                    waker.set()
                throttled(log).warning("gateway commands: bells not answering (%r)", exc)
                await asyncio.sleep(IDLE_POLL)
                continue
            except Exception:
                log.exception("gateway commands: waiting for bells failed; retrying")
                await asyncio.sleep(IDLE_POLL)
                continue
            if rung is not None:
                bell = rung[0]
                self._wakers[shard_of[bell if isinstance(bell, bytes) else bell.encode()]].set()

    async def _serve(self, gateway: Gateway) -> None:
        shard = gateway.shard_id
        held = ShardCommands(shard)
        waker = self._wakers[shard]
        pending = pending_key(shard, self.shard_count, self.prefix)
        processing = processing_key(shard, self.shard_count, self.prefix)
        recovered = False
        # Sent or dropped, still to remove from the processing list (kept across Redis errors).
        finished: list[bytes] = []
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not recovered:
                    moved = await self._recover(pending, processing)
                    if moved:
                        log.info(
                            "shard %d: re-queued %d commands taken before a crash", shard, moved
                        )
                    recovered = True
                # Before the take: a bell rung from here on is for a command it may miss.
                waker.clear()
                room = MAX_HELD - len(held)
                for raw in await self._take(pending, processing, room):
                    try:
                        command = decode_command(raw)
                    except ValueError as exc:
                        throttled(log).warning("shard %d: dropped a queue entry: %s", shard, exc)
                        finished.append(raw)
                        continue
                    self.metrics.count("received", shard, [command])
                    held.push(command)
                if not held:
                    await self._done_even_if_cancelled(processing, list(finished))
                    finished.clear()
                    await _woken(waker, IDLE_POLL)
                    continue
                pumped = held.pump(gateway.session, loop.time(), time.time())
                if pumped.sent:
                    gateway.send_queued()
                    sent_at = time.time()
                    for command in pumped.sent:
                        self.metrics.waited(sent_at - command.issued_at)
                if pumped.expired:
                    throttled(log).warning(
                        "shard %d: %d commands not sent within their TTL: dropped",
                        shard,
                        len(pumped.expired),
                    )
                self.metrics.count("sent", shard, pumped.sent)
                self.metrics.count("expired", shard, pumped.expired)
                self.metrics.count("invalid", shard, pumped.invalid)
                finished += [c.raw for c in pumped.sent + pumped.expired + pumped.invalid]
                await self._done_even_if_cancelled(processing, list(finished))
                finished.clear()
                if held:
                    wait = IDLE_POLL if pumped.wait is None else min(pumped.wait, IDLE_POLL)
                    await _woken(waker, wait)
            except (redis.RedisError, OSError) as exc:
                throttled(log).warning("shard %d: state Redis error (%r); retrying", shard, exc)
                await asyncio.sleep(IDLE_POLL)
            except Exception:
                # A bug here must not end command delivery for good, nor the gateway.
                log.exception("shard %d: relaying commands failed; retrying", shard)
                await asyncio.sleep(IDLE_POLL)

    async def _recover(self, pending: str, processing: str) -> int:
        """Put what a dead process had taken back at the head of the queue, in order."""
        assert self._redis is not None
        moved = 0
        # Newest-taken first onto the right (the head): the oldest ends up first again.
        while await self._redis.lmove(processing, pending, "LEFT", "RIGHT") is not None:
            moved += 1
        return moved

    async def _take(self, pending: str, processing: str, room: int) -> list[bytes]:
        """Up to ``room`` commands (at most a batch) moved to the processing list; never waits
        in Redis, where a shard waiting would hold a connection of its own."""
        assert self._redis is not None
        if room <= 0:
            return []
        taken = await self._redis.eval(
            _TAKE_SCRIPT, 2, pending, processing, str(min(TAKE_BATCH, room))
        )
        return list(taken)

    async def _done_even_if_cancelled(self, processing: str, raws: list[bytes]) -> None:
        """A stop (SIGTERM) must not leave a sent command where the next owner would resend it."""
        removal = asyncio.ensure_future(self._done(processing, raws))
        try:
            await asyncio.shield(removal)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await removal
            raise

    async def _done(self, processing: str, raws: list[bytes]) -> None:
        if not raws:
            return
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=False)
        for raw in raws:
            pipe.lrem(processing, 1, raw)  # type: ignore[arg-type]  # bytes are fine
        await pipe.execute()


async def _woken(waker: asyncio.Event, timeout: float) -> None:
    """Until ``waker`` is set, or ``timeout`` seconds."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(waker.wait(), max(timeout, 0.0))
