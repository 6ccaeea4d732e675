"""Nothing lost: at-least-once delivery through kill -9, SIGTERM, broker outages and a worker
killed mid-task, with real processes, real brokers and 10,000 events streamed."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import redis

from ingest.testing import SimulatorThread
from ingest.testing.simulator import sample_message_create
from tests.brokers import PrivateRabbitMQ, PrivateRedis, rabbitmq_available
from tests.support import (
    REDIS_HOST,
    REDIS_PORT,
    Proc,
    base_env,
    gateway_process,
    redis_url,
    require_broker,
    short_tempdir,
    worker_process,
)

EVENTS = 10_000
BROKER_DB = 9
RECORD_DB = 10
RECORD_URL = redis_url(RECORD_DB)
EXPECTED = frozenset(sample_message_create(i)["id"] for i in range(EVENTS))


@dataclass
class Record:
    """What the fault app's handler wrote: which messages ran, and how often."""

    client: redis.Redis
    prefix: str

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def handled(self) -> set[str]:
        return {m.decode() for m in self.client.smembers(self.key("handled"))}

    def runs(self, ids: frozenset[str]) -> dict[str, int]:
        keys = sorted(ids)
        values = self.client.mget([self.key(f"runs:{k}") for k in keys])
        return {k: int(v or 0) for k, v in zip(keys, values, strict=True)}

    def wait_handled(
        self,
        expected: frozenset[str],
        timeout: float,
        *procs: Proc,
        supervise: Callable[[], None] | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if supervise is not None:
                supervise()
            if self.client.scard(self.key("handled")) >= len(expected):
                return
            time.sleep(0.2)
        missing = len(expected - self.handled())
        tails = "\n".join(
            f"--- {p.name} (exit code {p.popen.poll()})\n" + "\n".join(p.output()[-60:])
            for p in procs
        )
        raise AssertionError(f"{missing} of {len(expected)} events never handled\n{tails}")


@pytest.fixture
def record() -> Iterator[Record]:
    require_broker("redis")
    client = redis.Redis.from_url(RECORD_URL)
    prefix = f"{uuid.uuid4().hex}:"
    yield Record(client, prefix)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with short_tempdir() as path:
        yield path


def shared_redis_broker() -> str:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_DB)
    client.flushdb()
    client.close()
    return redis_url(BROKER_DB)


def stack_env(
    record: Record, sim: SimulatorThread, broker_url: str, data_dir: Path, **extra: str
) -> dict[str, str]:
    return base_env(
        DISCORD_TOKEN="sim-token",
        DISCORD_GATEWAY_URL=sim.url,
        DISCORD_API_URL=sim.api_url,
        CELERY_BROKER_URL=broker_url,
        INGEST_DATA_DIR=str(data_dir),
        INGEST_CELERY_APP="tests.fault_app",
        FAULT_RECORD_URL=RECORD_URL,
        FAULT_RECORD_PREFIX=record.prefix,
        **extra,
    )


def stream(sim: SimulatorThread, count: int, rate: float) -> threading.Thread:
    thread = threading.Thread(
        target=sim.emit_many,
        args=("MESSAGE_CREATE", sample_message_create, count),
        kwargs={"rate": rate},
        daemon=True,
    )
    thread.start()
    return thread


def wait_emitted(sim: SimulatorThread, at_least: int, timeout: float = 60) -> None:
    """Block until the stream is this far along, so a fault lands mid-stream."""
    deadline = time.monotonic() + timeout
    while sim.emitted_count() < at_least and time.monotonic() < deadline:
        time.sleep(0.02)


def published(*gateways: Proc) -> int:
    total = 0
    for gateway in gateways:
        for line in gateway.output():
            if "stopped:" in line:
                total += int(line.split("received, ")[1].split(" published")[0])
    return total


def report(
    name: str, emitted: int, gateways: list[Proc], record: Record, workers: list[Proc]
) -> None:
    runs = record.runs(EXPECTED)
    suppressed = sum(1 for w in workers for line in w.output() if "duplicate suppressed" in line)
    print(
        f"\n{name}: emitted {emitted}, published {published(*gateways) or 'n/a (killed)'}, "
        f"handled {len(record.handled())}, handler runs {sum(runs.values())}, "
        f"duplicates suppressed {suppressed}"
    )


@dataclass
class Restart:
    """What a gateway stopped mid-stream and started again left behind."""

    first: Proc
    second: Proc
    worker: Proc
    identifies: int
    stop_seconds: float


def restart_mid_stream(
    record: Record, data_dir: Path, stop_first: Callable[[Proc], None], **worker_env: str
) -> Restart:
    """Stream EVENTS; at 40 % stop the gateway with ``stop_first``, start a new one, and wait
    until every event was handled."""
    with SimulatorThread() as sim:
        env = stack_env(record, sim, shared_redis_broker(), data_dir)
        worker = worker_process({**env, **worker_env}, app="tests.fault_app")
        first = gateway_process(env, name="gateway-1")
        second = None
        try:
            first.wait_for_line("all 1 shards ready")
            emitter = stream(sim, EVENTS, rate=2000)
            wait_emitted(sim, 4000)
            started = time.monotonic()
            stop_first(first)
            stop_seconds = time.monotonic() - started
            second = gateway_process(env, name="gateway-2")
            second.wait_for_line("resumed session", timeout=30)
            emitter.join(timeout=120)
            record.wait_handled(EXPECTED, 180, worker, second)
            assert second.stop() == 0
        finally:
            first.kill()
            if second is not None:
                second.kill()
            worker.stop()
        return Restart(first, second, worker, len(sim.identify_log), stop_seconds)


@pytest.mark.timeout(240)
def test_gateway_kill_9_mid_stream_loses_nothing_and_dedupe_runs_each_handler_once(
    record: Record, data_dir: Path
) -> None:
    # SIGKILL: no flush, no final persist; the next process replays from the last checkpoint.
    run = restart_mid_stream(record, data_dir, Proc.kill, INGEST_DEDUPE="1")
    report("kill -9", EVENTS, [run.first, run.second], record, [run.worker])
    assert record.handled() == EXPECTED
    assert set(record.runs(EXPECTED).values()) == {1}, "with dedupe, each handler runs once"
    assert run.identifies == 1, "the restarted gateway resumed; it did not start a new session"


def sigterm_and_wait(gateway: Proc) -> None:
    gateway.signal(signal.SIGTERM)
    gateway.popen.wait(timeout=30)
    assert gateway.popen.returncode == 0, gateway.text()[-2000:]


@pytest.mark.timeout(240)
def test_sigterm_mid_stream_exits_in_time_and_the_next_process_resumes(
    record: Record, data_dir: Path
) -> None:
    run = restart_mid_stream(record, data_dir, sigterm_and_wait)
    label = f"SIGTERM (exit after {run.stop_seconds:.1f} s)"
    report(label, EVENTS, [run.first, run.second], record, [run.worker])
    assert run.stop_seconds < 30
    assert run.identifies == 1
    assert record.handled() == EXPECTED
    # A clean stop commits exactly what the broker holds: not even a duplicate.
    assert set(record.runs(EXPECTED).values()) == {1}


@pytest.mark.timeout(300)
def test_redis_down_10_s_mid_stream_loses_nothing_and_the_gateway_stays_up(
    record: Record, data_dir: Path
) -> None:
    broker = PrivateRedis()
    broker.start()
    try:
        with SimulatorThread() as sim:
            # A small buffer bound, so the outage also exercises shedding and replay.
            env = stack_env(
                record,
                sim,
                broker.url,
                data_dir,
                INGEST_MAX_BUFFERED_EVENTS="3000",
                # A message the worker held when Redis died returns after this long.
                INGEST_VISIBILITY_TIMEOUT="10",
            )
            workers = [worker_process(env, app="tests.fault_app", name="worker-1")]

            def supervise() -> None:
                # Celery 5.7's worker can exit when Redis vanishes (kombu fails restoring its
                # unacked messages on a dead connection). Procfile hosts restart crashed
                # processes; so does this test. The gateway, though, must never exit.
                if workers[-1].popen.poll() is not None:
                    workers.append(
                        worker_process(
                            env, app="tests.fault_app", name=f"worker-{len(workers) + 1}"
                        )
                    )

            gateway = gateway_process(env)
            try:
                gateway.wait_for_line("all 1 shards ready")
                emitter = stream(sim, EVENTS, rate=1000)
                wait_emitted(sim, 2000)
                process = psutil.Process(gateway.popen.pid)
                broker.stop()
                peak_rss = 0
                outage_end = time.monotonic() + 10
                while time.monotonic() < outage_end:
                    assert gateway.popen.poll() is None, "the gateway exited in the outage"
                    peak_rss = max(peak_rss, process.memory_info().rss)
                    time.sleep(0.2)
                broker.start()
                emitter.join(timeout=120)
                with contextlib.suppress(AssertionError):  # judged below
                    record.wait_handled(EXPECTED, 60, workers[-1], gateway, supervise=supervise)
                assert gateway.popen.poll() is None
                assert gateway.stop() == 0
            finally:
                gateway.kill()
                for worker in workers:
                    worker.stop()
    finally:
        broker.close()
    report(
        f"Redis down 10 s (gateway peak RSS {peak_rss / 2**20:.0f} MB, "
        f"worker restarts {len(workers) - 1})",
        EVENTS,
        [gateway],
        record,
        workers,
    )
    missing = EXPECTED - record.handled()
    # The gateway loses nothing (every event reached the broker, below). A stock Celery
    # worker on Redis, though, can drop the few messages it popped in the instant Redis died:
    # kombu's BRPOP removes a message before it records it as unacked, and that write fails.
    # At most its prefetch window (4 x 4 here); the README's delivery section says so.
    print(f"lost by the worker when Redis died: {len(missing)}")
    assert len(missing) <= 16
    assert published(gateway) >= EVENTS  # every event reached the broker (replays may repeat)
    assert peak_rss < 300 * 2**20
    assert "dropping" in gateway.text()  # the bound was hit and the session closed resumably


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    not rabbitmq_available() and not os.environ.get("CI"), reason="rabbitmq-server not installed"
)
def test_rabbitmq_stopped_and_restarted_mid_stream_loses_nothing(
    record: Record, data_dir: Path
) -> None:
    broker = PrivateRabbitMQ()
    broker.start()
    try:
        with SimulatorThread() as sim:
            env = stack_env(record, sim, broker.url, data_dir)
            worker = worker_process(env, app="tests.fault_app")
            gateway = gateway_process(env)
            try:
                gateway.wait_for_line("all 1 shards ready")
                emitter = stream(sim, EVENTS, rate=1000)
                wait_emitted(sim, 2000)
                broker.stop_app()
                time.sleep(8)
                assert gateway.popen.poll() is None
                broker.start_app()
                emitter.join(timeout=120)
                record.wait_handled(EXPECTED, 180, worker, gateway)
                assert gateway.stop() == 0
            finally:
                gateway.kill()
                worker.stop()
    finally:
        broker.close()
    report("RabbitMQ stopped 8 s", EVENTS, [gateway], record, [worker])
    assert record.handled() == EXPECTED


@pytest.mark.timeout(120)
def test_worker_child_killed_mid_task_runs_the_task_again(record: Record, data_dir: Path) -> None:
    with SimulatorThread() as sim:
        env = stack_env(record, sim, shared_redis_broker(), data_dir, FAULT_SLOW_SECONDS="3")
        worker = worker_process(env, app="tests.fault_app", pool="prefork", concurrency=1)
        gateway = gateway_process(env)
        try:
            gateway.wait_for_line("all 1 shards ready")
            worker.wait_for_line("ready.", timeout=30)
            slow = sample_message_create(0)
            slow["content"] = "slow: kill the worker while I run"
            sim.emit("MESSAGE_CREATE", slow)
            deadline = time.monotonic() + 30
            while not record.client.llen(record.key("slow:pids")) and time.monotonic() < deadline:
                time.sleep(0.05)
            child = int(record.client.lindex(record.key("slow:pids"), 0) or 0)
            assert child, "the handler never started"
            os.kill(child, signal.SIGKILL)
            record.wait_handled(frozenset({slow["id"]}), 60, worker)
            assert gateway.stop() == 0
        finally:
            gateway.kill()
            worker.stop()
    attempts = int(record.client.get(record.key(f"slow:attempts:{slow['id']}")) or 0)
    print(
        f"\nworker killed mid-task: attempts {attempts}, completed runs "
        f"{record.runs(frozenset({slow['id']}))[slow['id']]}"
    )
    assert attempts == 2
    assert record.runs(frozenset({slow["id"]})) == {slow["id"]: 1}
