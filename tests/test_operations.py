"""Operating a deployment: metrics that move by the right amounts, ``python -m ingest status``,
rate-limited warnings, and a token that never shows up in any log line or broker message.

The end-to-end tests share one deployment (simulator, ``python -m ingest`` with DEBUG logs and
metrics, a worker of the recorder app that consumes only MESSAGE_CREATE) on Redis db 13. Each
test makes the traffic it asserts on and reads deltas, and a test that stops the deployment
leaves it to be rebuilt for the next, so the tests pass alone and in any order.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ingest.logs import JsonFormatter, RateLimitedLogger, RedactingFilter, configure_logging
from ingest.metrics import LATENCY_BUCKETS, Metrics, redis_queue_depths
from ingest.session import SessionConfig
from ingest.testing import SimulatorThread
from ingest.testing.processes import free_port
from ingest.testing.simulator import (
    sample_guild_create,
    sample_message_create,
    sample_typing_start,
)
from tests.support import (
    REDIS_HOST,
    REDIS_PORT,
    ROOT,
    TEST_APP,
    Proc,
    Record,
    base_env,
    gateway_process,
    redis_url,
    require_broker,
    short_tempdir,
)

REDIS_DB = 13
REDIS_URL = redis_url(REDIS_DB)
# Shaped like a real bot token (id.timestamp.hmac) and found nowhere else.
TOKEN = "MTE4MDAwMDAwMDAwMDAwMDAwMQ.GhOst7.opsTest-s3cr3t-7f3a9c2b1d4e5f60"
# A leak that cuts the token short still contains this.
TOKEN_TAIL = TOKEN.rsplit(".", 1)[1]


# ---------------------------------------------------------------------------------------------
# Logs, in-process


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def capture(logger_name: str) -> tuple[logging.Logger, list[str]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    logger.handlers[:] = [Keep()]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, lines


def test_a_flood_of_warnings_logs_a_burst_then_one_line_then_a_summary() -> None:
    logger, lines = capture("test.flood")
    clock = Clock()
    limited = RateLimitedLogger(logger, burst=5, period=60.0, clock=clock)
    for i in range(10_000):
        limited.warning("shard %d rejected a payload: %s", 0, f"bad JSON {i}")
        clock.now += 0.001  # ten seconds of flood
    assert len(lines) == 6
    assert lines[:5] == [f"shard 0 rejected a payload: bad JSON {i}" for i in range(5)]
    assert lines[5].startswith("more than 5 warnings like this in 60 s")
    clock.now = 61.0
    limited.warning("shard %d rejected a payload: %s", 0, "after the flood")
    assert lines[6] == "suppressed 9995 similar warnings in the last 60 s (shard)"
    assert lines[7] == "shard 0 rejected a payload: after the flood"
    assert limited.suppressed_total == 9995


def test_rate_limits_are_per_kind_of_warning_and_flush_reports_the_rest() -> None:
    logger, lines = capture("test.kinds")
    clock = Clock()
    limited = RateLimitedLogger(logger, burst=2, period=60.0, clock=clock)
    for _ in range(4):
        limited.warning("kind a %d", 1)
        limited.warning("kind b %d", 2)
    assert lines.count("kind a 1") == 2 and lines.count("kind b 2") == 2
    limited.flush()
    assert "suppressed 2 similar warnings in the last 60 s (kind a)" in lines
    assert "suppressed 2 similar warnings in the last 60 s (kind b)" in lines


def test_the_token_is_scrubbed_from_messages_arguments_exceptions_and_stacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter([TOKEN]))
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.redact")
    logger.handlers[:] = [handler]
    logger.propagate = False
    # Another test's logging set-up (Celery's worker) may have disabled existing loggers.
    logger.disabled = False
    logger.setLevel(logging.DEBUG)
    logger.warning("identify with %s", TOKEN)
    logger.warning(f"inline {TOKEN}")
    logger.warning("config %r", SessionConfig(token=TOKEN, intents=1, gateway_url="wss://x"))
    try:
        raise RuntimeError(f"Authorization: Bot {TOKEN}")
    except RuntimeError:
        logger.exception("request failed")
    logger.warning("with a stack", stack_info=True, extra={"unrelated": TOKEN})
    logger.warning("%s %s", "bad format")  # a broken call must not be turned into a crash
    text = stream.getvalue()
    assert TOKEN not in text and TOKEN_TAIL not in text
    assert text.count("[REDACTED]") >= 3


def test_json_log_lines_are_one_object_each_and_scrubbed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json", secrets=[TOKEN])
        log = logging.getLogger("ingest.gateway")
        log.info("shard %d ready, token %s", 0, TOKEN)
        try:
            raise ValueError(TOKEN)
        except ValueError:
            log.exception("failed")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = capsys.readouterr().err.strip().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["message"] for e in entries] == ["shard 0 ready, token [REDACTED]", "failed"]
    assert entries[0]["level"] == "INFO" and entries[0]["logger"] == "ingest.gateway"
    assert "ValueError: [REDACTED]" in entries[1]["exc"]
    assert entries[0]["ts"].endswith("Z")
    assert TOKEN not in "".join(lines)
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)


# ---------------------------------------------------------------------------------------------
# Metrics, in-process


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(scraped: dict[Any, float], name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def exposition(metrics: Metrics) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(metrics)  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_publish_latency_is_a_histogram_with_cumulative_buckets() -> None:
    metrics = Metrics()
    for latency in (0.0001, 0.003, 0.003, 0.2, 100.0):
        metrics.published("MESSAGE_CREATE", latency)
    scraped = samples(exposition(metrics))
    name = "discord_ingest_publish_latency_seconds"
    assert value(scraped, f"{name}_count") == 5
    assert value(scraped, f"{name}_sum") == pytest.approx(100.2061)
    assert value(scraped, f"{name}_bucket", le="0.0005") == 1
    assert value(scraped, f"{name}_bucket", le="0.005") == 3
    assert value(scraped, f"{name}_bucket", le="0.25") == 4
    assert value(scraped, f"{name}_bucket", le=str(LATENCY_BUCKETS[-1])) == 4
    assert value(scraped, f"{name}_bucket", le="+Inf") == 5
    assert value(scraped, "discord_ingest_events_published_total", event="MESSAGE_CREATE") == 5
    assert value(scraped, "discord_ingest_publish_latency_recent_seconds", quantile="0.5") == 0.003


def test_a_scrape_survives_a_broker_that_does_not_answer() -> None:
    metrics = Metrics()
    reader = redis_queue_depths("redis://127.0.0.1:1/0", ["discord.MESSAGE_CREATE"], timeout=0.2)
    assert reader is not None
    metrics.queue_depths = reader
    scraped = samples(exposition(metrics))
    assert value(scraped, "discord_ingest_events_shed_total") == 0
    assert redis_queue_depths("amqp://guest@localhost//", ["q"]) is None


# ---------------------------------------------------------------------------------------------
# The deployment


@dataclass
class Deployment:
    sim: SimulatorThread
    env: dict[str, str]
    gateway: Proc
    worker: Proc
    metrics_url: str
    redis: redis.Redis
    sim_log: list[str]
    tap: BrokerTap
    record: Record

    def alive(self) -> bool:
        return self.gateway.popen.poll() is None and self.worker.popen.poll() is None

    def broker_traffic(self) -> list[str]:
        return list(self.tap.commands)

    def scrape(self) -> dict[Any, float]:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return samples(response.read().decode())

    def wait_scrape(self, check: Any, timeout: float, what: str) -> dict[Any, float]:
        deadline = time.monotonic() + timeout
        scraped = self.scrape()
        while not check(scraped):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out waiting for {what}; gateway:\n{self.gateway.text()[-3000:]}"
                )
            time.sleep(0.1)
            scraped = self.scrape()
        return scraped

    def status(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ingest", "status", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


class BrokerTap:
    """Every command any client sends to Redis while the deployment runs (MONITOR)."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self._client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
        self._monitor = self._client.monitor()
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for command in self._monitor.listen():
                if command.get("db") == REDIS_DB:
                    self.commands.append(str(command.get("command", "")))
        except (redis.RedisError, OSError, ValueError, AttributeError):
            return  # closed

    def close(self) -> None:
        self._monitor.connection.disconnect()  # type: ignore[union-attr]
        self._thread.join(timeout=5)
        self._client.close()


def worker_debug(env: dict[str, str], *queues: str) -> Proc:
    cmd = [
        sys.executable, "-m", "celery", "-A", TEST_APP, "worker", "--loglevel", "DEBUG",
        "--pool", "threads", "--concurrency", "4",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"ops-{time.monotonic_ns()}@%h", "-Q", ",".join(queues),
    ]  # fmt: skip
    return Proc("worker", cmd, env)


@contextmanager
def deploy() -> Iterator[Deployment]:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.flushdb()
    sim_logger, sim_log = capture("ingest.testing.simulator")
    tap = BrokerTap()
    record = Record(REDIS_URL, f"{uuid.uuid4().hex}:")
    port = free_port()
    with short_tempdir() as data_dir, SimulatorThread(token=TOKEN) as sim:
        env = base_env(
            DISCORD_TOKEN=TOKEN,
            DISCORD_GATEWAY_URL=sim.url,
            DISCORD_API_URL=sim.api_url,
            CELERY_BROKER_URL=REDIS_URL,
            INGEST_DATA_DIR=str(data_dir),
            INGEST_LOG_LEVEL="DEBUG",
            INGEST_METRICS_PORT=str(port),
            **record.env(),
        )
        # Only MESSAGE_CREATE is consumed: GUILD_CREATE (which has a handler) and the dead
        # letters stay queued for `status` to count.
        worker = worker_debug(env, "discord.MESSAGE_CREATE")
        gateway = gateway_process(env)
        deployment = Deployment(
            sim,
            env,
            gateway,
            worker,
            f"http://127.0.0.1:{port}/metrics",
            client,
            sim_log,
            tap,
            record,
        )
        try:
            gateway.wait_for_line("all 1 shards ready", timeout=30)
            worker.wait_for_line("ready.", timeout=60)
            yield deployment
        finally:
            gateway.stop()
            worker.stop()
            tap.close()
            sim_logger.handlers.clear()
            sim_logger.propagate = True
            record.close()
    client.close()


class Deployments:
    """The module's one deployment, rebuilt when a test stopped it (or it died): sharing it
    keeps the file fast, rebuilding keeps every test independent of the others' order."""

    def __init__(self) -> None:
        self._stack: ExitStack | None = None
        self._current: Deployment | None = None

    def get(self) -> Deployment:
        if self._current is not None and self._current.alive():
            return self._current
        self.close()
        stack = ExitStack()
        self._current = stack.enter_context(deploy())
        self._stack = stack
        return self._current

    def close(self) -> None:
        stack, self._stack, self._current = self._stack, None, None
        if stack is not None:
            stack.close()


@pytest.fixture(scope="module")
def deployments() -> Iterator[Deployments]:
    pool = Deployments()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def deployment(deployments: Deployments) -> Deployment:
    require_broker("redis")
    return deployments.get()


def test_metrics_count_received_published_and_dropped_by_event_type(
    deployment: Deployment,
) -> None:
    sim, before = deployment.sim, deployment.scrape()
    sim.emit_many("MESSAGE_CREATE", lambda i: sample_message_create(10_000 + i), 100)
    sim.emit_many("TYPING_START", sample_typing_start, 7)  # no handler in the app
    received = "discord_ingest_events_received_total"

    def moved(scraped: dict[Any, float]) -> bool:
        return (
            value(scraped, received, event="TYPING_START")
            - value(before, received, event="TYPING_START")
            >= 7
            and value(scraped, "discord_ingest_events_published_total", event="MESSAGE_CREATE")
            - value(before, "discord_ingest_events_published_total", event="MESSAGE_CREATE")
            >= 100
        )

    after = deployment.wait_scrape(moved, 30, "100 published and 7 dropped")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(received, event="MESSAGE_CREATE") == 100
    assert delta("discord_ingest_events_published_total", event="MESSAGE_CREATE") == 100
    assert delta("discord_ingest_events_dropped_total", event="MESSAGE_CREATE") == 0
    assert delta(received, event="TYPING_START") == 7
    assert delta("discord_ingest_events_dropped_total", event="TYPING_START") == 7
    assert delta("discord_ingest_events_published_total", event="TYPING_START") == 0
    assert delta("discord_ingest_events_invalid_total", event="MESSAGE_CREATE") == 0
    # Every publish has a latency observation.
    assert delta("discord_ingest_publish_latency_seconds_count") == 100
    assert value(after, "discord_ingest_publish_latency_seconds_bucket", le="+Inf") >= 100
    assert value(after, "discord_ingest_broker_up") == 1
    deployment.record.wait_handled(
        {int(sample_message_create(10_000 + i)["id"]) for i in range(100)}, 60, deployment.worker
    )


def test_committed_sequence_catches_up_with_received_after_quiescence(
    deployment: Deployment,
) -> None:
    received_before = value(
        deployment.scrape(), "discord_ingest_shard_received_sequence", shard="0"
    )
    deployment.sim.emit_many("MESSAGE_CREATE", lambda i: sample_message_create(15_000 + i), 50)

    def caught_up(scraped: dict[Any, float]) -> bool:
        received = value(scraped, "discord_ingest_shard_received_sequence", shard="0")
        committed = value(scraped, "discord_ingest_shard_committed_sequence", shard="0")
        return received >= received_before + 50 and committed == received

    scraped = deployment.wait_scrape(caught_up, 15, "committed == received")
    assert value(scraped, "discord_ingest_shard_received_sequence", shard="0") >= 51


def test_heartbeat_latency_is_reported_after_a_server_requested_heartbeat(
    deployment: Deployment,
) -> None:
    deployment.sim.request_heartbeat()
    scraped = deployment.wait_scrape(
        lambda s: ("discord_ingest_shard_heartbeat_latency_seconds", (("shard", "0"),)) in s,
        10,
        "a heartbeat latency",
    )
    latency = value(scraped, "discord_ingest_shard_heartbeat_latency_seconds", shard="0")
    assert 0 <= latency < 1


def test_queue_depth_is_scraped_from_the_broker(deployment: Deployment) -> None:
    scraped = deployment.scrape()
    # Read at scrape time: both queues of this deployment are listed, consumed or not.
    assert ("discord_ingest_queue_depth", (("queue", "discord.GUILD_CREATE"),)) in scraped
    assert ("discord_ingest_queue_depth", (("queue", "discord.invalid"),)) in scraped


def test_status_shows_shard_session_committed_sequence_and_queue_depths(
    deployment: Deployment,
) -> None:
    sim, client = deployment.sim, deployment.redis
    queued_before = client.llen("discord.GUILD_CREATE")
    sim.emit_many("GUILD_CREATE", lambda i: sample_guild_create(i, size_kb=1), 3)
    deadline = time.monotonic() + 15
    while client.llen("discord.GUILD_CREATE") < queued_before + 3:
        assert time.monotonic() < deadline, "GUILD_CREATE tasks never reached the broker"
        time.sleep(0.05)
    scraped = deployment.wait_scrape(
        lambda s: (
            value(s, "discord_ingest_shard_committed_sequence", shard="0")
            == value(s, "discord_ingest_shard_received_sequence", shard="0")
        ),
        15,
        "quiescence",
    )
    committed = int(value(scraped, "discord_ingest_shard_committed_sequence", shard="0"))
    ready = [line for line in deployment.gateway.output() if "shard 0 ready, session " in line]
    session_id = ready[-1].rsplit(" ", 1)[1]
    assert session_id in sim.sessions

    # The store is written every 0.2 s: wait until it holds the committed sequence.
    deadline = time.monotonic() + 10
    while True:
        result = deployment.status("--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        if status["shards"] and status["shards"][0]["committed_sequence"] == committed:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    (shard,) = status["shards"]
    assert shard["shard"] == "0/1" and shard["session_id"] == session_id
    depths = {row["event"]: row["depth"] for row in status["queues"]}
    assert depths["GUILD_CREATE"] == queued_before + 3
    assert "MESSAGE_CREATE" not in depths or depths["MESSAGE_CREATE"] == 0
    assert TOKEN not in result.stdout

    table = deployment.status()
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    (shard_line,) = [line for line in lines if line.startswith("0/1 ")]
    assert session_id in shard_line and str(committed) in shard_line.split()
    (queue_line,) = [line for line in lines if line.startswith("GUILD_CREATE ")]
    assert queue_line.split() == ["GUILD_CREATE", "discord.GUILD_CREATE", str(queued_before + 3)]


def test_a_flood_of_bad_frames_is_counted_in_full_but_logged_in_a_bounded_burst(
    deployment: Deployment,
) -> None:
    before = deployment.scrape()
    for i in range(300):
        deployment.sim.send_raw(f"not json {i} {{")
    invalid = "discord_ingest_events_invalid_total"
    after = deployment.wait_scrape(
        lambda s: (
            value(s, invalid, event="(frame)") - value(before, invalid, event="(frame)") >= 300
        ),
        30,
        "300 rejected frames",
    )
    assert value(after, invalid, event="(frame)") - value(before, invalid, event="(frame)") == 300
    warned = [line for line in deployment.gateway.output() if "rejected a payload" in line]
    assert 1 <= len(warned) <= 20
    assert any("more than 20 warnings like this" in line for line in deployment.gateway.output())
    assert value(after, "discord_ingest_log_warnings_suppressed_total") >= 280
    # Each one is kept with its reason in the dead-letter queue (counted on receipt, so the
    # last publish batch may still be on its way).
    deadline = time.monotonic() + 10
    while deployment.redis.llen("discord.invalid") < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert deployment.redis.llen("discord.invalid") >= 300


def test_reconnects_and_resumes_lose_nothing(deployment: Deployment) -> None:
    sim, gateway, worker = deployment.sim, deployment.gateway, deployment.worker

    def resumed() -> int:
        return sum("resumed session" in line for line in gateway.output())

    count = resumed()
    sent: set[int] = set()
    for i, disturb in enumerate(
        (
            sim.send_reconnect,  # op 7
            sim.drop_connections,  # TCP drop, no close frame
            lambda: sim.send_invalid_session(True),  # op 9, resumable
            lambda: sim.close_connections(4000, "unknown error"),
        )
    ):
        disturb()
        gateway.wait_for(lambda _, n=count + i + 1: resumed() >= n, 30, f"resume {i + 1}")
        sim.emit_many(
            "MESSAGE_CREATE", lambda j, i=i: sample_message_create(20_000 + 10 * i + j), 5
        )
        sent |= {int(sample_message_create(20_000 + 10 * i + j)["id"]) for j in range(5)}
    # Every one of the 20 distinct messages ran, whatever the reconnects replayed.
    deployment.record.wait_handled(sent, 60, worker, gateway)
    assert len(sent) == 20 and sent <= deployment.record.handled()
    scraped = deployment.scrape()
    # Each disturbance is counted under its own cause, as a reconnect and as a resume.
    for cause in ("op7", "dropped", "op9_resumable", "close_4000"):
        assert value(scraped, "discord_ingest_reconnects_total", cause=cause) >= 1, cause
        assert value(scraped, "discord_ingest_resumes_total", cause=cause) >= 1, cause
    assert value(scraped, "discord_ingest_shard_resumes_total", shard="0") >= 4
    assert value(scraped, "discord_ingest_sessions_lost_total") == 0
    assert "fatal" not in gateway.text().lower()


def test_the_token_appears_in_no_output_and_no_broker_message(deployment: Deployment) -> None:
    # Traffic of its own: every path a token could leak through has carried something.
    sim = deployment.sim
    sim.emit_many("MESSAGE_CREATE", lambda i: sample_message_create(30_000 + i), 5)
    sim.emit("GUILD_CREATE", sample_guild_create(30_000, size_kb=1))
    sim.send_raw("not json {")
    deployment.record.wait_handled(
        {int(sample_message_create(30_000 + i)["id"]) for i in range(5)}, 60, deployment.worker
    )
    # Stop everything (the next test gets a new deployment) so every line and every broker
    # command is in.
    assert deployment.gateway.stop() == 0
    deployment.worker.stop()
    time.sleep(0.5)
    sources = {
        "gateway": deployment.gateway.text(),
        "worker": deployment.worker.text(),
        "simulator": "\n".join(deployment.sim_log),
        "broker commands": "\n".join(_decoded(deployment.broker_traffic())),
        "broker contents": "\n".join(_decoded(_dump(deployment.redis))),
    }
    assert len(sources["gateway"].splitlines()) > 50, "DEBUG logging was not on"
    assert "LPUSH" in sources["broker commands"], "the broker tap saw no task message"
    for name, text in sources.items():
        assert TOKEN not in text, f"the token leaked into the {name}"
        assert TOKEN_TAIL not in text, f"part of the token leaked into the {name}"


def _dump(client: redis.Redis) -> list[str]:
    """Every value in the deployment's Redis database, as text."""
    out: list[str] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        out.append(key.decode(errors="replace"))
        if kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"hash":
            values = [v for pair in client.hgetall(key).items() for v in pair]
        elif kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"zset":
            values = list(client.zrange(key, 0, -1))
        else:
            values = []
        out.extend(v.decode(errors="replace") for v in values)
    return out


BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")


def _decoded(texts: list[str]) -> Iterator[str]:
    """Each text, plus every base64 run in it decoded (kombu base64-encodes message bodies)."""
    for text in texts:
        yield text
        for run in BASE64_RUN.findall(text):
            for start in range(4):  # a run may begin mid-quantum inside an escaped string
                chunk = run[start:]
                chunk = chunk[: len(chunk) - len(chunk) % 4]
                try:
                    yield base64.b64decode(chunk).decode(errors="replace")
                except (binascii.Error, ValueError):
                    continue


def test_the_leak_search_finds_a_token_hidden_in_a_base64_message_body() -> None:
    body = json.dumps([[{"content": f"leaked {TOKEN}"}], {}, {}]).encode()
    for prefix in ("", "x", "xy"):
        envelope = json.dumps({"body": prefix + base64.b64encode(body).decode()})
        assert any(TOKEN in text for text in _decoded([envelope.replace('"', '\\"')]))
