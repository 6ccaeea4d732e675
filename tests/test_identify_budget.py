"""session_start_limit is per bot, not per process (issue #10 item 9): the budget is kept in the
shared Redis and spent atomically by every gateway process; without a shared Redis a process
running a subset of the shards refuses to start."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from ingest.errors import ConfigError
from ingest.identify import (
    BudgetedIdentifyScheduler,
    LocalIdentifyScheduler,
    RedisSessionBudget,
    budget_key,
    lease_key,
    session_budget_for,
)
from ingest.testing import SimulatorThread
from tests.support import (
    RABBITMQ_URL,
    REDIS_HOST,
    REDIS_PORT,
    ROOT,
    Proc,
    base_env,
    gateway_process,
    redis_url,
    require_broker,
    short_tempdir,
)

# This file's database on the test Redis (see conftest.py); budget keys are also per test
# (a fresh token each), so one test's budget never leaks into another's.
REDIS_DB = 2
REDIS_URL = redis_url(REDIS_DB)
SPENT = "session start budget spent (shared by every gateway process of this bot)"


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    require_broker("redis")
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.flushdb()  # sessions persisted by a gateway test here would resume, not identify
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def token(redis_db: redis.Redis) -> Iterator[str]:
    """A bot token of this test alone, so its budget key is too."""
    value = f"budget-test-{uuid.uuid4().hex}"
    yield value
    redis_db.delete(budget_key(value))


def _process(
    token: str, *, remaining: int, total: int, reset_after: float, **kwargs: object
) -> BudgetedIdentifyScheduler:
    """What one gateway process builds: its own bucket scheduler, the bot's shared budget."""
    inner = LocalIdentifyScheduler(max_concurrency=64, interval=0.0, margin=0.0)
    return BudgetedIdentifyScheduler(
        inner,
        remaining=remaining,
        total=total,
        reset_after=reset_after,
        shared=RedisSessionBudget(REDIS_URL, budget_key(token)),
        **kwargs,  # type: ignore[arg-type]
    )


class ResetWaits:
    """An injected sleep for the reset: records the wait and blocks until cancelled."""

    def __init__(self) -> None:
        self.requested: list[float] = []
        self.someone_waits = asyncio.Event()

    async def sleep(self, delay: float) -> None:
        self.requested.append(delay)
        self.someone_waits.set()
        await asyncio.get_running_loop().create_future()


# --------------------------------------------------------------------------------------------
# Several processes' worth of schedulers on one Redis
# --------------------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.timeout(30)
@pytest.mark.parametrize(("processes", "shards_each"), [(2, 2), (8, 4)])
def test_processes_racing_for_three_starts_get_exactly_three(
    redis_db: redis.Redis,
    token: str,
    caplog: pytest.LogCaptureFixture,
    processes: int,
    shards_each: int,
) -> None:
    """Each process was told remaining=3 by /gateway/bot; together they start 3 sessions."""
    caplog.set_level(logging.WARNING, logger="ingest.identify")
    granted: list[int] = []

    async def scenario() -> tuple[list[float], int]:
        waits = ResetWaits()
        schedulers = [
            _process(token, remaining=3, total=3, reset_after=60.0, sleep=waits.sleep)
            for _ in range(processes)
        ]
        three_granted = asyncio.Event()
        contenders = processes * shards_each

        async def identify(scheduler: BudgetedIdentifyScheduler, shard_id: int) -> None:
            await scheduler.acquire(shard_id)
            granted.append(shard_id)
            if len(granted) == 3:
                three_granted.set()

        tasks = [
            asyncio.ensure_future(identify(schedulers[shard % processes], shard))
            for shard in range(contenders)
        ]
        try:
            await asyncio.wait_for(three_granted.wait(), timeout=10)
            # Every other shard was refused and waits for the reset.
            while len(waits.requested) < contenders - 3:
                await asyncio.wait_for(waits.someone_waits.wait(), timeout=10)
                waits.someone_waits.clear()
            return waits.requested, sum(not t.done() for t in tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for scheduler in schedulers:
                await scheduler.close()

    requested, still_waiting = asyncio.run(scenario())
    assert len(granted) == 3, granted
    assert still_waiting == processes * shards_each - 3
    # They wait for Discord's reset, as Redis times it (the key expires with it).
    assert all(55.0 < wait <= 60.0 for wait in requested), requested
    assert int(redis_db.get(budget_key(token)) or -1) == 0
    assert 55_000 < redis_db.pttl(budget_key(token)) <= 60_000
    refused = [r.getMessage() for r in caplog.records if SPENT in r.getMessage()]
    assert len(refused) == processes * shards_each - 3, caplog.text
    assert "waits 60 s for Discord's reset" in refused[0]
    assert token not in caplog.text


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_a_shared_count_above_what_discord_reported_is_capped(
    redis_db: redis.Redis, token: str
) -> None:
    """A key left from another run with 100 starts: Discord's figure (1) wins."""
    redis_db.set(budget_key(token), 100, px=60_000)

    async def scenario() -> list[float]:
        waits = ResetWaits()
        scheduler = _process(token, remaining=1, total=1000, reset_after=60.0, sleep=waits.sleep)
        try:
            await asyncio.wait_for(scheduler.acquire(0), timeout=5)
            second = asyncio.ensure_future(scheduler.acquire(1))
            await asyncio.wait_for(waits.someone_waits.wait(), timeout=5)
            assert not second.done()
            second.cancel()
            return waits.requested
        finally:
            await scheduler.close()

    assert len(asyncio.run(scenario())) == 1
    assert int(redis_db.get(budget_key(token)) or -1) == 0


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_the_shared_budget_refills_at_discords_reset(redis_db: redis.Redis, token: str) -> None:
    """One start left, reset in 0.4 s: the second process waits for the reset, then starts."""
    reset_after = 0.4

    async def scenario() -> float:
        first = _process(token, remaining=1, total=5, reset_after=reset_after)
        second = _process(token, remaining=1, total=5, reset_after=reset_after)
        try:
            started = time.monotonic()
            await first.acquire(0)
            await asyncio.wait_for(second.acquire(1), timeout=10)
            return time.monotonic() - started
        finally:
            await first.close()
            await second.close()

    elapsed = asyncio.run(scenario())
    assert reset_after - 0.1 <= elapsed < reset_after + 2.0, elapsed
    # A new day's budget: the total, minus the start just taken, for the next 24 h.
    assert int(redis_db.get(budget_key(token)) or -1) == 4
    assert redis_db.pttl(budget_key(token)) > 23 * 3600 * 1000


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_a_shard_cancelled_before_its_slot_gives_its_start_back(
    redis_db: redis.Redis, token: str
) -> None:
    async def scenario() -> int:
        # One bucket, a 60 s interval: the second shard takes a start, then waits for the slot.
        inner = LocalIdentifyScheduler(max_concurrency=1, interval=60.0)
        scheduler = BudgetedIdentifyScheduler(
            inner,
            remaining=3,
            total=3,
            reset_after=60.0,
            shared=RedisSessionBudget(REDIS_URL, budget_key(token)),
        )
        try:
            await scheduler.acquire(0)
            waiting = asyncio.ensure_future(scheduler.acquire(1))
            while inner.next_slot_in() is None:  # until it waits in the bucket
                await asyncio.sleep(0.01)
            assert int(redis_db.get(budget_key(token)) or -1) == 1
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            return scheduler.remaining
        finally:
            await scheduler.close()

    assert asyncio.run(scenario()) == 2
    assert int(redis_db.get(budget_key(token)) or -1) == 2


@pytest.mark.timeout(30)
def test_an_unreachable_redis_delays_the_identify_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ingest.identify")

    async def scenario() -> None:
        # Port 9 (discard) on loopback: nothing listens, the connect is refused at once.
        scheduler = BudgetedIdentifyScheduler(
            LocalIdentifyScheduler(),
            remaining=3,
            total=3,
            reset_after=60.0,
            shared=RedisSessionBudget("redis://127.0.0.1:9/0", budget_key("t")),
        )
        identify = asyncio.ensure_future(scheduler.acquire(0))
        try:
            while "session start budget" not in caplog.text:
                assert not identify.done(), "identified without the shared budget"
                await asyncio.sleep(0.01)
        finally:
            identify.cancel()
            await asyncio.gather(identify, return_exceptions=True)
            await scheduler.close()

    asyncio.run(scenario())
    assert "shard 0 cannot reach Redis for the session start budget" in caplog.text


# --------------------------------------------------------------------------------------------
# Which budget a process uses, and the refusal without a shared Redis
# --------------------------------------------------------------------------------------------


def test_a_process_with_every_shard_and_no_redis_counts_alone() -> None:
    assert session_budget_for("t", None, (0, 1, 2, 3), 4) is None


def test_a_process_with_some_shards_and_no_redis_is_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        session_budget_for("t", None, (0, 1), 4)
    message = str(raised.value)
    assert "\n" not in message
    assert "2 of 4 shards" in message and "session_start_limit" in message
    assert "INGEST_STATE_URL" in message


def test_with_a_redis_every_process_shares_one_budget_per_bot() -> None:
    budget = session_budget_for("token-a", "redis://127.0.0.1:6379/0", (0, 1), 4)
    assert isinstance(budget, RedisSessionBudget)
    assert budget.key == budget_key("token-a") != budget_key("token-b")
    assert "token-a" not in budget.key
    asyncio.run(budget.close())


def _run_ingest(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.timeout(90)
def test_a_shard_subset_on_rabbitmq_without_redis_exits_2_with_one_line() -> None:
    with SimulatorThread(shard_count=4, max_concurrency=4) as sim, short_tempdir() as data_dir:
        env = base_env(
            DISCORD_TOKEN="sim-token",
            DISCORD_API_URL=sim.api_url,
            DISCORD_SHARD_COUNT="4",
            DISCORD_SHARD_IDS="0-1",
            CELERY_BROKER_URL=RABBITMQ_URL,
            INGEST_DATA_DIR=str(data_dir),
        )
        result = _run_ingest(env)
        assert sim.identify_log == [], "a session was started"
    assert result.returncode == 2, result.stderr
    # One clear line, the last one (INFO start-up lines come before it).
    errors = [line for line in result.stderr.splitlines() if line.startswith("discord-ingest:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith("discord-ingest: DISCORD_SHARD_IDS runs 2 of 4 shards")
    assert "sim-token" not in result.stderr


# --------------------------------------------------------------------------------------------
# The reproduction: two real gateway processes, 3 starts left, 4 shards
# --------------------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_two_gateway_processes_start_no_more_sessions_than_discord_allows(
    redis_db: redis.Redis,
) -> None:
    token = f"sim-token-{uuid.uuid4().hex[:8]}"
    simulator = SimulatorThread(shard_count=4, max_concurrency=4, token=token)
    with simulator as sim, short_tempdir() as data_dir:
        sim.read(lambda s: setattr(s, "session_start_remaining", 3))

        def env(shard_ids: str) -> dict[str, str]:
            # Each process alone sees 3 left and needs 2: the start-up check passes for both.
            return base_env(
                DISCORD_TOKEN=token,
                DISCORD_API_URL=sim.api_url,
                DISCORD_SHARD_COUNT="4",
                DISCORD_SHARD_IDS=shard_ids,
                CELERY_BROKER_URL=REDIS_URL,
                INGEST_DATA_DIR=str(data_dir / shard_ids),
            )

        # Hold every bucket's identify lease, as if another process were identifying, until
        # all four shards connected: both processes have then passed their start-up check on
        # /gateway/bot's "3 left" before any session started (the race of the issue).
        def hold_leases() -> None:
            for bucket in range(4):
                redis_db.set(lease_key(4, bucket), "held-by-the-test", px=2000)

        def all_connected(procs: list[Proc]) -> bool:
            text = "\n".join(p.text() for p in procs)
            return all(f"shard {s} connecting" in text for s in range(4))

        hold_leases()
        procs: list[Proc] = [
            gateway_process(env("0-1"), name="gateway 0-1"),
            gateway_process(env("2-3"), name="gateway 2-3"),
        ]
        try:
            deadline = time.monotonic() + 60
            while not all_connected(procs):
                hold_leases()
                assert time.monotonic() < deadline, "\n".join(p.text() for p in procs)
                assert all(p.popen.poll() is None for p in procs), [p.text() for p in procs]
                time.sleep(0.05)
            assert sim.identify_log == []
            # Done when the budget is spent and one shard refused, or a 4th session started.
            while not (
                len(sim.identify_log) >= 4
                or (len(sim.identify_log) >= 3 and any(SPENT in p.text() for p in procs))
            ):
                assert time.monotonic() < deadline, "\n".join(p.text() for p in procs)
                assert all(p.popen.poll() is None for p in procs), [p.text() for p in procs]
                time.sleep(0.05)
            identified = sorted(r.shard_id for r in sim.identify_log)
            for proc in procs:
                assert proc.stop() == 0, proc.text()
        finally:
            for proc in procs:
                proc.kill()
            redis_db.delete(budget_key(token))
        remaining = sim.read(lambda s: s.session_start_remaining)
    assert len(identified) == 3, identified
    assert remaining == 0
    refused = [line for p in procs for line in p.output() if SPENT in line]
    assert len(refused) == 1, refused
    assert token not in "\n".join(p.text() for p in procs)
