"""Scale out: identify scheduling within a process (explicit clock), across processes (Redis
leases), and shards split over two real gateway processes feeding one real Celery worker."""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ingest.config import parse_shard_ids
from ingest.errors import ConfigError
from ingest.identify import (
    BudgetedIdentifyScheduler,
    LocalIdentifyScheduler,
    RedisIdentifyScheduler,
    lease_key,
)
from ingest.testing import SimulatorThread
from ingest.testing.simulator import IdentifyRecord, sample_message_create
from tests.support import (
    REDIS_HOST,
    REDIS_PORT,
    ROOT,
    Proc,
    Record,
    base_env,
    gateway_process,
    redis_url,
    require_broker,
    short_tempdir,
    worker_process,
)

REDIS_DB = 12
REDIS_URL = redis_url(REDIS_DB)
INTERVAL = 5.0  # Discord's, and the simulator's default
MESSAGES_PER_SHARD = 5


# --------------------------------------------------------------------------------------------
# Virtual time: the schedulers take a clock and a sleep; no test here sleeps for real.
# --------------------------------------------------------------------------------------------


class VirtualTime:
    """A clock and a sleep for injected use; ``run`` advances time only when all are asleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, delay), next(self._order), future))
        await future

    def run(self, *coros: Coroutine[Any, Any, Any]) -> list[Any]:
        async def drive() -> list[Any]:
            tasks = [asyncio.ensure_future(c) for c in coros]
            while True:
                for _ in range(50):  # let every task run until it sleeps or ends
                    await asyncio.sleep(0)
                if all(t.done() for t in tasks):
                    return [t.result() for t in tasks]
                if not self._sleepers:
                    raise AssertionError("deadlock: tasks wait but nobody sleeps")
                wake, _, future = heapq.heappop(self._sleepers)
                self.now = wake
                future.set_result(None)

        return asyncio.run(drive())


def _identify_times(scheduler: Any, vt: VirtualTime, shard_ids: list[int]) -> dict[int, float]:
    granted: dict[int, float] = {}

    async def one(shard_id: int) -> None:
        await scheduler.acquire(shard_id)
        granted[shard_id] = vt.now

    vt.run(*(one(s) for s in shard_ids))
    return granted


def _gaps_per_bucket(times: list[tuple[float, int]], buckets: int) -> list[float]:
    """Every gap between consecutive identifies of one bucket."""
    gaps = []
    for bucket in range(buckets):
        in_bucket = sorted(t for t, shard in times if shard % buckets == bucket)
        gaps += [b - a for a, b in itertools.pairwise(in_bucket)]
    return gaps


# --------------------------------------------------------------------------------------------
# LocalIdentifyScheduler
# --------------------------------------------------------------------------------------------


def test_local_scheduler_runs_buckets_in_parallel_one_identify_per_bucket_per_interval() -> None:
    vt = VirtualTime()
    scheduler = LocalIdentifyScheduler(
        max_concurrency=2, interval=INTERVAL, margin=0.0, clock=vt.clock, sleep=vt.sleep
    )
    granted = _identify_times(scheduler, vt, list(range(8)))

    assert sorted(granted.items()) == [
        (0, 0.0), (1, 0.0), (2, 5.0), (3, 5.0), (4, 10.0), (5, 10.0), (6, 15.0), (7, 15.0),
    ]  # fmt: skip


def test_local_scheduler_holds_each_slot_a_margin_past_the_interval() -> None:
    vt = VirtualTime()
    scheduler = LocalIdentifyScheduler(
        max_concurrency=1, interval=INTERVAL, clock=vt.clock, sleep=vt.sleep
    )
    granted = _identify_times(scheduler, vt, [0, 1, 2])

    gaps = _gaps_per_bucket([(t, s) for s, t in granted.items()], 1)
    assert gaps and all(INTERVAL < gap <= INTERVAL + 0.5 for gap in gaps), gaps


def test_local_scheduler_reports_when_the_next_slot_opens() -> None:
    vt = VirtualTime()
    scheduler = LocalIdentifyScheduler(
        max_concurrency=2, interval=INTERVAL, margin=0.0, clock=vt.clock, sleep=vt.sleep
    )
    seen: list[float | None] = []

    async def probe() -> None:
        await vt.sleep(2.0)
        seen.append(scheduler.next_slot_in())  # shards 2 and 3 wait for t=5
        await vt.sleep(5.0)
        seen.append(scheduler.next_slot_in())  # t=7: everyone is through

    assert scheduler.next_slot_in() is None
    vt.run(probe(), *(scheduler.acquire(s) for s in range(4)))
    assert seen == [3.0, None]


def test_local_scheduler_gives_a_bucket_free_for_an_interval_its_slot_at_once() -> None:
    vt = VirtualTime()
    scheduler = LocalIdentifyScheduler(
        max_concurrency=1, interval=INTERVAL, margin=0.0, clock=vt.clock, sleep=vt.sleep
    )
    vt.run(scheduler.acquire(0))
    vt.now = 60.0
    granted = _identify_times(scheduler, vt, [1])
    assert granted == {1: 60.0}


# --------------------------------------------------------------------------------------------
# BudgetedIdentifyScheduler
# --------------------------------------------------------------------------------------------


def _budgeted(vt: VirtualTime, remaining: int, total: int = 10) -> BudgetedIdentifyScheduler:
    inner = LocalIdentifyScheduler(
        max_concurrency=4, interval=INTERVAL, margin=0.0, clock=vt.clock, sleep=vt.sleep
    )
    return BudgetedIdentifyScheduler(
        inner, remaining=remaining, total=total, reset_after=100.0, clock=vt.clock,
        sleep=vt.sleep,
    )  # fmt: skip


def test_budgeted_scheduler_waits_for_the_reset_when_the_budget_is_spent() -> None:
    vt = VirtualTime()
    scheduler = _budgeted(vt, remaining=2)
    seen: list[float | None] = []

    async def probe() -> None:
        await vt.sleep(40.0)
        seen.append(scheduler.next_slot_in())

    granted: dict[int, float] = {}

    async def one(shard_id: int) -> None:
        await scheduler.acquire(shard_id)
        granted[shard_id] = vt.now

    # Four shards in four buckets: two starts left, so two go now and two at the reset.
    vt.run(probe(), *(one(s) for s in range(4)))
    assert sorted(granted.values()) == [0.0, 0.0, 100.0, 100.0]
    assert seen == [60.0]
    assert scheduler.remaining == 10 - 2


def test_budgeted_scheduler_never_overspends_when_buckets_identify_in_parallel() -> None:
    vt = VirtualTime()
    scheduler = _budgeted(vt, remaining=1)
    granted = _identify_times(scheduler, vt, [0, 1, 2, 3])
    assert sorted(granted.values()) == [0.0, 100.0, 100.0, 100.0]


def test_budgeted_scheduler_gives_back_the_start_of_a_cancelled_shard() -> None:
    vt = VirtualTime()
    scheduler = _budgeted(vt, remaining=3)

    async def scenario() -> None:
        await scheduler.acquire(0)
        waiting = asyncio.ensure_future(scheduler.acquire(4))  # bucket 0: waits for t=5
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    vt.run(scenario())
    assert scheduler.remaining == 2


# --------------------------------------------------------------------------------------------
# RedisIdentifyScheduler, in-process against the real Redis
# --------------------------------------------------------------------------------------------


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    require_broker("redis")
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_redis_scheduler_shares_buckets_between_processes(redis_db: redis.Redis) -> None:
    """Two schedulers (two processes' worth) on one Redis: still one per bucket per interval."""
    interval = 0.4
    granted: list[tuple[float, int]] = []

    async def scenario() -> None:
        first = RedisIdentifyScheduler(REDIS_URL, max_concurrency=2, interval=interval)
        second = RedisIdentifyScheduler(REDIS_URL, max_concurrency=2, interval=interval)

        async def one(scheduler: RedisIdentifyScheduler, shard_id: int) -> None:
            await scheduler.acquire(shard_id)
            granted.append((time.monotonic(), shard_id))

        try:
            await asyncio.gather(
                *(one(first, s) for s in range(4)), *(one(second, s) for s in range(4, 8))
            )
        finally:
            await first.close()
            await second.close()

    started = time.monotonic()
    asyncio.run(scenario())
    gaps = _gaps_per_bucket(granted, 2)
    assert len(granted) == 8 and len(gaps) == 6
    assert min(gaps) >= interval, gaps
    # Buckets ran side by side: 4 rounds, not 8.
    assert time.monotonic() - started < 4 * interval * 1.05 + 1.0


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_redis_scheduler_waits_for_a_dead_holders_lease_no_longer_than_its_expiry(
    redis_db: redis.Redis,
) -> None:
    redis_db.set(lease_key(2, 0), "4242@gone-host:0", px=1500)
    expires = time.monotonic() + 1.5
    granted: dict[int, float] = {}
    seen: list[float | None] = []

    async def scenario() -> None:
        scheduler = RedisIdentifyScheduler(REDIS_URL, max_concurrency=2)

        async def one(shard_id: int) -> None:
            await scheduler.acquire(shard_id)
            granted[shard_id] = time.monotonic()

        try:
            waiting = asyncio.gather(one(0), one(1))
            await asyncio.sleep(0.3)
            seen.append(scheduler.next_slot_in())
            await waiting
        finally:
            await scheduler.close()

    asyncio.run(scenario())
    assert granted[1] < expires - 1.0  # bucket 1 was free: no wait
    assert expires - 0.05 <= granted[0] <= expires + 0.3, granted[0] - expires
    assert seen[0] is not None and 0.9 <= seen[0] <= 1.3
    assert redis_db.get(lease_key(2, 0)) != b"4242@gone-host:0"


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_redis_scheduler_expires_a_lease_left_without_expiry(redis_db: redis.Redis) -> None:
    redis_db.set(lease_key(1, 0), "by-hand")  # no PX: would block the bucket forever

    async def scenario() -> None:
        scheduler = RedisIdentifyScheduler(REDIS_URL, max_concurrency=1, interval=0.3)
        try:
            await asyncio.wait_for(scheduler.acquire(0), timeout=5)
        finally:
            await scheduler.close()

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# Configuration and the session_start_limit guard: `python -m ingest` as a subprocess
# --------------------------------------------------------------------------------------------


def _run_ingest(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("discord-ingest:")]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("0-3", (0, 1, 2, 3)), ("0,4,8", (0, 4, 8)), ("0-1, 8", (0, 1, 8)), ("3,3,1", (1, 3))],
)
def test_parse_shard_ids_reads_ranges_and_lists(spec: str, expected: tuple[int, ...]) -> None:
    assert parse_shard_ids(spec, 16) == expected


@pytest.mark.parametrize(
    ("spec", "count", "says"),
    [
        ("0-x", None, "not a shard list"),
        ("3-1", None, "not a shard list"),
        ("-1", None, "not a shard list"),
        (",", None, "no valid shard ids"),
        ("4-8", 8, "below the count"),
        ("8", 8, "below the count"),
    ],
)
def test_parse_shard_ids_rejects_bad_specs(spec: str, count: int | None, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as raised:
        parse_shard_ids(spec, count)
    assert "\n" not in str(raised.value) and "DISCORD_SHARD_IDS" in str(raised.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("spec", "count", "says"),
    [("0-x", "8", "not a shard list"), ("4-8", "8", "DISCORD_SHARD_COUNT is 8")],
)
def test_a_bad_shard_spec_exits_2_with_one_line(spec: str, count: str, says: str) -> None:
    env = base_env(
        DISCORD_TOKEN="sim-token",
        DISCORD_GATEWAY_URL="ws://127.0.0.1:9/",
        DISCORD_SHARD_COUNT=count,
        DISCORD_SHARD_IDS=spec,
    )
    result = _run_ingest(env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("discord-ingest: DISCORD_SHARD_IDS=") and says in lines[0]
    assert result.stdout == ""


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_shard_ids_beyond_discords_shard_count_exit_2_with_one_line(
    redis_db: redis.Redis,
) -> None:
    """With no DISCORD_SHARD_COUNT the count comes from /gateway/bot, so the check is later."""
    with SimulatorThread(shard_count=2) as sim, short_tempdir() as data_dir:
        env = base_env(
            DISCORD_TOKEN="sim-token",
            DISCORD_API_URL=sim.api_url,
            DISCORD_SHARD_IDS="0-3",
            CELERY_BROKER_URL=REDIS_URL,
            INGEST_DATA_DIR=str(data_dir),
        )
        result = _run_ingest(env)
        assert sim.identify_log == []
    assert result.returncode == 2, result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "shard 3 but there are 2 shards" in errors[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]


@pytest.mark.redis
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["total", "remaining"])
def test_too_few_session_starts_left_exits_before_identifying(
    redis_db: redis.Redis, how: str
) -> None:
    kwargs = {"session_start_total": 3} if how == "total" else {}
    with SimulatorThread(shard_count=4, max_concurrency=4, **kwargs) as sim:
        if how == "remaining":
            sim.read(lambda s: setattr(s, "session_start_remaining", 3))
        with short_tempdir() as data_dir:
            env = base_env(
                DISCORD_TOKEN="sim-token",
                DISCORD_API_URL=sim.api_url,
                DISCORD_SHARD_COUNT="4",
                CELERY_BROKER_URL=REDIS_URL,
                INGEST_DATA_DIR=str(data_dir),
            )
            result = _run_ingest(env)
        assert sim.identify_log == [], "a session was started past the budget"
    assert result.returncode != 0, result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert "session_start_limit" in errors[0] and "3 of" in errors[0] and "4 shards" in errors[0]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    # Nothing else on stderr names the limit: one clear line.
    assert sum("session_start_limit" in line for line in result.stderr.splitlines()) == 1


# --------------------------------------------------------------------------------------------
# Two gateway processes, one bot: shards 0-3 and 4-7 of 8, max_concurrency 2, real Redis
# --------------------------------------------------------------------------------------------


def _sharded_env(sim: SimulatorThread, data_dir: Path, shard_ids: str) -> dict[str, str]:
    # DISCORD_API_URL and no DISCORD_GATEWAY_URL: max_concurrency comes from /gateway/bot.
    return base_env(
        DISCORD_TOKEN="sim-token",
        DISCORD_API_URL=sim.api_url,
        DISCORD_SHARD_COUNT="8",
        DISCORD_SHARD_IDS=shard_ids,
        CELERY_BROKER_URL=REDIS_URL,
        INGEST_DATA_DIR=str(data_dir / shard_ids),
    )


def _message_for_shard(shard_id: int, i: int) -> dict[str, Any]:
    return sample_message_create(shard_id * 1000 + i)


def _assert_identifies_spaced(log: list[IdentifyRecord], buckets: int) -> None:
    gaps = _gaps_per_bucket([(r.time, r.shard_id) for r in log], buckets)
    assert all(gap >= INTERVAL for gap in gaps), sorted(gaps)
    assert all(r.bucket == r.shard_id % buckets for r in log)


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_two_processes_split_eight_shards_and_share_identify_buckets(
    redis_db: redis.Redis, record: Record
) -> None:
    with SimulatorThread(shard_count=8, max_concurrency=2) as sim, short_tempdir() as data_dir:
        worker = worker_process({**_sharded_env(sim, data_dir, "0-7"), **record.env()})
        low = gateway_process(_sharded_env(sim, data_dir, "0-3"), name="gateway 0-3")
        high = gateway_process(_sharded_env(sim, data_dir, "4-7"), name="gateway 4-7")
        procs: list[Proc] = [low, high]
        try:
            # 8 shards in 2 buckets: 4 rounds of 5 s.
            low.wait_for_line("all 4 shards ready", timeout=60)
            high.wait_for_line("all 4 shards ready", timeout=60)
            assert sim.ready_shards() == list(range(8))

            for shard_id in range(8):
                sim.emit_many(
                    "MESSAGE_CREATE",
                    functools.partial(_message_for_shard, shard_id),
                    MESSAGES_PER_SHARD,
                    shard_id=shard_id,
                )
            expected = {
                int(_message_for_shard(s, i)["id"]): s
                for s in range(8)
                for i in range(MESSAGES_PER_SHARD)
            }
            record.wait_handled(expected, 60, worker, *procs)
            for proc in procs:
                assert proc.stop() == 0, proc.text()
        finally:
            for proc in procs:
                proc.kill()
            worker.stop()
        log = sim.identify_log
        invalid = sim.invalid_identifies

    assert invalid == []
    assert sorted(r.shard_id for r in log) == list(range(8)), log
    _assert_identifies_spaced(log, 2)
    assert {d.id: d.shard_id for d in record.deliveries()} == expected
    assert set(record.runs().values()) == {1}
    # The progress line says when the next bucket opens, then one line when all are ready.
    for proc in procs:
        progress = [line for line in proc.output() if "shards ready" in line]
        print("\n".join(["", *progress]))
        assert any("shards ready 1/4, next bucket in" in line for line in progress), progress
        assert sum("all 4 shards ready" in line for line in proc.output()) == 1
    print(
        "\nidentifies (s after the first, shard/bucket): "
        + ", ".join(f"{r.time - log[0].time:.2f} {r.shard_id}/{r.bucket}" for r in log)
    )


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_a_killed_lease_holder_delays_the_other_process_only_until_the_lease_expires(
    redis_db: redis.Redis,
) -> None:
    slack = 1.0
    with SimulatorThread(shard_count=8, max_concurrency=2) as sim, short_tempdir() as data_dir:
        low = gateway_process(_sharded_env(sim, data_dir, "0-3"), name="gateway 0-3")
        high: Proc | None = None
        try:
            sim.wait_until(lambda: len(sim.sim.identify_log) >= 2, timeout=30)
            low.kill()  # kill -9 while it holds both buckets' leases
            killed_at = time.monotonic()
            expiries = {}
            for bucket in (0, 1):
                ttl_ms = redis_db.pttl(lease_key(2, bucket))
                assert ttl_ms > 0, "the dead process's lease is gone already"
                expiries[bucket] = killed_at + ttl_ms / 1000.0
            high = gateway_process(_sharded_env(sim, data_dir, "4-7"), name="gateway 4-7")
            sim.wait_until(lambda: len(sim.sim.identify_log) >= 4, timeout=30)
            log = sim.identify_log
            invalid = sim.invalid_identifies
        finally:
            low.kill()
            if high is not None:
                high.kill()

    assert invalid == []
    first_low = {r.bucket: r for r in log[:2]}
    assert sorted(first_low) == [0, 1] and all(r.shard_id < 4 for r in first_low.values())
    for record in log[2:4]:
        assert record.shard_id in range(4, 8)
        waited = record.time - first_low[record.bucket].time
        late = record.time - expiries[record.bucket]
        assert waited >= INTERVAL, f"bucket {record.bucket}: identified {waited:.3f} s after"
        assert late <= slack, f"bucket {record.bucket}: {late:.3f} s past the dead lease"
        print(f"\nbucket {record.bucket}: shard {record.shard_id} identified {waited:.3f} s "
              f"after the killed holder's, {late:+.3f} s from its lease's expiry")  # fmt: skip
