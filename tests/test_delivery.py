"""Nothing lost: at-least-once delivery through kill -9, SIGTERM, broker outages and a worker
killed mid-task, with real processes, real brokers and 10,000 events streamed.

Counted as distinct message ids, never as log lines or publishes: the recorder app's handlers
keep a record per id (``tests.support.Record``), and the Redis outage test also reads what the
broker accepted from its append-only file. Each test reports its counts under "measured" at the
end of the run.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import psutil
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ingest.testing import SimulatorThread
from ingest.testing.processes import free_port
from ingest.testing.simulator import sample_message_create
from tests.brokers import PrivateRabbitMQ, PrivateRedis, rabbitmq_available
from tests.support import (
    REDIS_HOST,
    REDIS_PORT,
    Proc,
    Record,
    base_env,
    gateway_process,
    redis_url,
    short_tempdir,
    worker_process,
)

EVENTS = 10_000
BROKER_DB = 9
EXPECTED = frozenset(int(sample_message_create(i)["id"]) for i in range(EVENTS))
MESSAGE_QUEUE = "discord.MESSAGE_CREATE"
# A stock worker's prefetch window: --concurrency 4 x worker_prefetch_multiplier 4.
PREFETCH_WINDOW = 16

Measured = Callable[[str], None]


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
    # base_env loads the recorder app in gateway and worker alike.
    return base_env(
        DISCORD_TOKEN="sim-token",
        DISCORD_GATEWAY_URL=sim.url,
        DISCORD_API_URL=sim.api_url,
        CELERY_BROKER_URL=broker_url,
        INGEST_DATA_DIR=str(data_dir),
        **record.env(),
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
    measured: Measured,
    name: str,
    emitted: int,
    gateways: list[Proc],
    record: Record,
    workers: list[Proc],
) -> None:
    runs = record.runs()
    suppressed = sum(1 for w in workers for line in w.output() if "duplicate suppressed" in line)
    line = (
        f"{name}: emitted {emitted}, published {published(*gateways) or 'n/a (killed)'}, "
        f"distinct handled {len(runs)}, missing {len(EXPECTED - runs.keys())}, "
        f"handler runs {sum(runs.values())}, duplicates suppressed {suppressed}"
    )
    print(f"\n{line}")
    measured(line)


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
        worker = worker_process({**env, **worker_env})
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
    record: Record, data_dir: Path, measured: Measured
) -> None:
    # SIGKILL: no flush, no final persist; the next process replays from the last checkpoint.
    run = restart_mid_stream(record, data_dir, Proc.kill, INGEST_DEDUPE="1")
    report(measured, "kill -9", EVENTS, [run.first, run.second], record, [run.worker])
    assert record.handled() == EXPECTED
    assert set(record.runs().values()) == {1}, "with dedupe, each handler runs once"
    assert run.identifies == 1, "the restarted gateway resumed; it did not start a new session"


def sigterm_and_wait(gateway: Proc) -> None:
    gateway.signal(signal.SIGTERM)
    gateway.popen.wait(timeout=30)
    assert gateway.popen.returncode == 0, gateway.text()[-2000:]


@pytest.mark.timeout(240)
def test_sigterm_mid_stream_exits_in_time_and_the_next_process_resumes(
    record: Record, data_dir: Path, measured: Measured
) -> None:
    run = restart_mid_stream(record, data_dir, sigterm_and_wait)
    label = f"SIGTERM (exit after {run.stop_seconds:.1f} s)"
    report(measured, label, EVENTS, [run.first, run.second], record, [run.worker])
    assert run.stop_seconds < 30
    assert run.identifies == 1
    assert record.handled() == EXPECTED
    # A clean stop commits exactly what the broker holds: not even a duplicate.
    assert set(record.runs().values()) == {1}


def _resp_commands(data: bytes) -> Iterator[list[bytes]]:
    """The commands of a Redis append-only file (RESP arrays of bulk strings), in order."""
    pos = 0
    while pos < len(data):
        end = data.index(b"\r\n", pos)
        count = int(data[pos + 1 : end])  # "*<count>"
        pos = end + 2
        args = []
        for _ in range(count):
            end = data.index(b"\r\n", pos)
            length = int(data[pos + 1 : end])  # "$<length>"
            args.append(data[end + 2 : end + 2 + length])
            pos = end + 2 + length + 2
        yield args


def accepted_by_redis(broker: PrivateRedis, queue: str) -> Counter[int]:
    """Message id -> copies of MESSAGE_CREATE that ``broker`` accepted into ``queue``, read from
    its append-only file: every LPUSH it executed, whether or not a worker took it since.

    Copies count replays and a worker's restores of unacked messages; a restore only returns
    what the broker held already, so the distinct ids are what the gateway delivered.
    """
    directory = broker.dir / "appendonlydir"
    manifest = (directory / "appendonly.aof.manifest").read_text().split("\n")
    # An AOF rewrite would fold history into a snapshot; the test's volume stays far below
    # the 64 MB where Redis starts one, and this says so if that ever changes.
    assert "file appendonly.aof.1.base.rdb seq 1 type b" in manifest, manifest
    copies: Counter[int] = Counter()
    for line in manifest:
        if not line.endswith(" type i"):
            continue
        data = (directory / line.split(" ")[1]).read_bytes()
        for args in _resp_commands(data):
            if args[0].lower() not in (b"lpush", b"rpush") or args[1] != queue.encode():
                continue
            for envelope in args[2:]:
                body = base64.b64decode(orjson.loads(envelope)["body"])
                task_args = orjson.loads(body)[0]
                copies[int(task_args[0]["id"])] += 1
    return copies


def committed_sequence(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0.0  # not serving yet
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "discord_ingest_shard_committed_sequence":
                return sample.value
    return 0.0


@pytest.mark.timeout(300)
def test_redis_down_10_s_mid_stream_loses_nothing_and_the_gateway_stays_up(
    record: Record, data_dir: Path, measured: Measured
) -> None:
    broker = PrivateRedis()
    broker.start()
    metrics_port = free_port()
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
                INGEST_METRICS_PORT=str(metrics_port),
            )
            workers = [worker_process(env, name="worker-1")]

            def supervise() -> None:
                # Celery 5.7's worker can exit when Redis vanishes (kombu fails restoring its
                # unacked messages on a dead connection). Procfile hosts restart crashed
                # processes; so does this test. The gateway, though, must never exit.
                if workers[-1].popen.poll() is not None:
                    workers.append(worker_process(env, name=f"worker-{len(workers) + 1}"))

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
                # READY is sequence 1, the messages 2 .. EVENTS + 1: the gateway says the
                # broker holds them all (checked independently below).
                gateway.wait_for(
                    lambda _: committed_sequence(metrics_port) >= EVENTS + 1,
                    120,
                    f"committed sequence {EVENTS + 1}",
                )
                assert gateway.popen.poll() is None
                assert gateway.stop() == 0
                # Drained: nothing queued, nothing held unacked (kombu's "unacked" hash; the
                # worker restores what it held after the visibility timeout). What the handlers
                # never ran by then, the worker lost.
                client = redis.Redis.from_url(broker.url)
                deadline = time.monotonic() + 90
                while client.llen(MESSAGE_QUEUE) or client.hlen("unacked"):
                    assert time.monotonic() < deadline, (
                        f"not drained: {client.llen(MESSAGE_QUEUE)} queued, "
                        f"{client.hlen('unacked')} unacked"
                    )
                    supervise()
                    time.sleep(0.2)
                client.close()
            finally:
                gateway.kill()
                for worker in workers:
                    worker.stop()
        broker.stop()
        copies = accepted_by_redis(broker, MESSAGE_QUEUE)
    finally:
        broker.close()
    handled = record.handled()
    lost_by_worker = EXPECTED - handled
    report(
        measured,
        f"Redis down 10 s (gateway peak RSS {peak_rss / 2**20:.0f} MB, "
        f"worker restarts {len(workers) - 1})",
        EVENTS,
        [gateway],
        record,
        workers,
    )
    boundary = (
        f"Redis down 10 s, gateway -> broker: {len(copies.keys() & EXPECTED)} of {EVENTS} "
        f"distinct messages accepted by Redis ({sum(copies.values())} copies with replays "
        f"and restores), missing {len(EXPECTED - copies.keys())}"
    )
    window = (
        f"Redis down 10 s, stock worker's loss window: {len(lost_by_worker)} accepted "
        f"messages never ran (bound: prefetch {PREFETCH_WINDOW} per worker that lost Redis)"
    )
    print(f"\n{boundary}\n{window}")
    measured(boundary)
    measured(window)
    # The gateway's promise: every event reached the broker, not one missing.
    assert copies.keys() == EXPECTED
    # The stock worker's known window (README "Delivery guarantees"): kombu's BRPOP removes a
    # message before it records it as unacked, and that write fails when Redis dies. It can
    # only drop what it had popped: at most its prefetch window, once per outage.
    assert len(lost_by_worker) <= PREFETCH_WINDOW
    assert peak_rss < 300 * 2**20
    assert "dropping" in gateway.text()  # the bound was hit and the session closed resumably


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    not rabbitmq_available() and not os.environ.get("CI"), reason="rabbitmq-server not installed"
)
def test_rabbitmq_stopped_and_restarted_mid_stream_loses_nothing(
    record: Record, data_dir: Path, measured: Measured
) -> None:
    broker = PrivateRabbitMQ()
    broker.start()
    try:
        with SimulatorThread() as sim:
            env = stack_env(record, sim, broker.url, data_dir)
            worker = worker_process(env)
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
    report(measured, "RabbitMQ stopped 8 s", EVENTS, [gateway], record, [worker])
    assert record.handled() == EXPECTED


@pytest.mark.timeout(120)
def test_worker_child_killed_mid_task_runs_the_task_again(
    record: Record, data_dir: Path, measured: Measured
) -> None:
    with SimulatorThread() as sim:
        env = stack_env(record, sim, shared_redis_broker(), data_dir, RECORD_SLOW_SECONDS="3")
        worker = worker_process(env, pool="prefork", concurrency=1)
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
            record.wait_handled({int(slow["id"])}, 60, worker)
            assert gateway.stop() == 0
        finally:
            gateway.kill()
            worker.stop()
    attempts = int(record.client.get(record.key(f"slow:attempts:{slow['id']}")) or 0)
    runs = record.runs()
    line = f"worker killed mid-task: attempts {attempts}, completed runs {runs}"
    print(f"\n{line}")
    measured(line)
    assert attempts == 2
    assert runs == {int(slow["id"]): 1}


def _envelope(message_id: int) -> bytes:
    # What accepted_by_redis reads of kombu's envelope: the base64 body [args, kwargs, embed].
    body = orjson.dumps([[{"id": str(message_id)}], {}, {}])
    return orjson.dumps({"body": base64.b64encode(body).decode()})


@pytest.mark.timeout(30)
def test_the_broker_record_counts_what_redis_accepted_even_once_consumed() -> None:
    broker = PrivateRedis()
    broker.start()
    try:
        client = redis.Redis.from_url(broker.url)
        pipe = client.pipeline(transaction=True)  # the gateway's MULTI/EXEC
        pipe.lpush(MESSAGE_QUEUE, _envelope(1), _envelope(2))
        pipe.lpush("discord.GUILD_CREATE", _envelope(9))
        pipe.execute()
        assert client.brpop([MESSAGE_QUEUE], timeout=1) is not None  # a worker took one
        client.close()
        broker.stop()
        broker.start()  # a restart appends to the same file
        client = redis.Redis.from_url(broker.url)
        client.lpush(MESSAGE_QUEUE, _envelope(2), _envelope(3))  # a replay and a new one
        client.close()
        broker.stop()
        assert accepted_by_redis(broker, MESSAGE_QUEUE) == Counter({1: 1, 2: 2, 3: 1})
    finally:
        broker.close()
