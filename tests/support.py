"""Real processes for end-to-end tests: the gateway (`python -m ingest`) and a Celery worker of
the suite's own app (``tests.apps.recorder``), their output collected line by line, and the
record that app's handlers keep in Redis, read back as distinct events."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import redis

from ingest.testing.processes import clean_env

ROOT = Path(__file__).resolve().parent.parent
# The shared brokers; INGEST_TEST_REDIS ("host:port") and INGEST_TEST_AMQP (a URL, e.g. with a
# vhost of its own) let two checkouts run their suites side by side without sharing queues.
REDIS_HOST, _, _redis_port = os.environ.get("INGEST_TEST_REDIS", "127.0.0.1:6379").partition(":")
REDIS_PORT = int(_redis_port or 6379)
RABBITMQ_URL = os.environ.get("INGEST_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


def redis_url(db: int) -> str:
    """URL of database ``db`` on the shared test Redis."""
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


# The suite's Celery app: gateways and workers started here load it, never the examples in
# tasks/ (a bot author deletes those; the suite must not notice).
TEST_APP = "tests.apps.recorder"
# Records of every test live in this db of the shared Redis, each under a prefix of its own.
RECORD_DB = 10


@contextmanager
def short_tempdir() -> Iterator[Path]:
    """A temp dir with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="di-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Proc:
    """A child process whose combined output is kept, for waiting on and for failure reports."""

    def __init__(self, name: str, cmd: list[str], env: Mapping[str, str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.popen = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def output(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def text(self) -> str:
        return "\n".join(self.output())

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.output()):
                return
            if self.popen.poll() is not None and predicate(self.output()):
                return
            time.sleep(0.05)
        tail = "\n".join(self.output()[-40:])
        raise AssertionError(f"{self.name}: timed out waiting for {what}; last output:\n{tail}")

    def wait_for_line(self, needle: str, timeout: float = 30) -> None:
        self.wait_for(lambda lines: any(needle in line for line in lines), timeout, repr(needle))

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 15) -> int:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        self._reader.join(timeout=5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)
        self._reader.join(timeout=5)


def connections_to(port: int, proc: Proc) -> int:
    """TCP connections to ``port`` held by ``proc`` and its children (the worker's pool)."""
    parent = psutil.Process(proc.popen.pid)
    pids = {parent.pid, *(child.pid for child in parent.children(recursive=True))}
    return sum(
        1
        for conn in psutil.net_connections("tcp")
        if conn.pid in pids and conn.raddr and conn.raddr.port == port
    )


def base_env(**overrides: str) -> dict[str, str]:
    """A child's environment: none of the developer's settings, the suite's Celery app."""
    return clean_env(ROOT, **{"INGEST_CELERY_APP": TEST_APP, **overrides})


def gateway_process(env: Mapping[str, str], name: str = "gateway") -> Proc:
    return Proc(name, [sys.executable, "-m", "ingest"], env)


def worker_process(
    env: Mapping[str, str],
    *queues: str,
    name: str = "worker",
    app: str = TEST_APP,
    pool: str = "threads",
    concurrency: int = 4,
) -> Proc:
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "--loglevel",
        "INFO",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"{name}-{os.getpid()}-{time.monotonic_ns()}@%h",
    ]
    if queues:
        cmd += ["-Q", ",".join(queues)]
    return Proc(name, cmd, env)


@dataclass(frozen=True, order=True)
class Delivery:
    """One distinct copy of an event a handler ran: a replay has the same task id."""

    id: int
    shard_id: int | None
    sequence: int | None
    task_id: str


def _int_or_none(text: str) -> int | None:
    return None if text == "None" else int(text)


class Record:
    """What the handlers of ``tests.apps.recorder`` wrote under ``prefix`` in the Redis at
    ``url``: which ids ran, how often, and with which shard, sequence and task id."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(url)

    def env(self) -> dict[str, str]:
        """What a worker of the recorder app needs to write here."""
        return {"RECORD_URL": self.url, "RECORD_PREFIX": self.prefix}

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def runs(self, event: str = "MESSAGE_CREATE") -> dict[int, int]:
        """Handler runs per id (an id never run is absent)."""
        found = self.client.hgetall(self.key(f"{event}:runs"))
        return {int(k): int(v) for k, v in found.items()}

    def handled(self, event: str = "MESSAGE_CREATE") -> set[int]:
        return {int(k) for k in self.client.hkeys(self.key(f"{event}:runs"))}

    def deliveries(self, event: str = "MESSAGE_CREATE") -> set[Delivery]:
        found = set()
        for raw in self.client.smembers(self.key(f"{event}:deliveries")):
            object_id, shard_id, sequence, task_id = raw.decode().split(" ")
            found.add(
                Delivery(int(object_id), _int_or_none(shard_id), _int_or_none(sequence), task_id)
            )
        return found

    def wait_handled(
        self,
        expected: Collection[int],
        timeout: float,
        *procs: Proc,
        event: str = "MESSAGE_CREATE",
        supervise: Callable[[], None] | None = None,
    ) -> None:
        """Until every id in ``expected`` ran; on timeout fail with the count missing and the
        tails of ``procs``."""
        wanted = set(expected)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if supervise is not None:
                supervise()
            if self.client.hlen(self.key(f"{event}:runs")) >= len(wanted) and wanted <= (
                self.handled(event)
            ):
                return
            time.sleep(0.1)
        missing = len(wanted - self.handled(event))
        tails = "\n".join(
            f"--- {p.name} (exit code {p.popen.poll()})\n" + "\n".join(p.output()[-60:])
            for p in procs
        )
        raise AssertionError(f"{missing} of {len(wanted)} {event} never handled\n{tails}")

    def clear(self) -> None:
        keys = list(self.client.scan_iter(match=f"{self.prefix}*", count=1000))
        if keys:
            self.client.delete(*keys)

    def close(self) -> None:
        self.client.close()


def service_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_broker(kind: str) -> None:
    """Skip without the shared broker on a developer's machine; in CI a skip is a failure."""
    import pytest

    amqp = urlsplit(RABBITMQ_URL)
    where = {
        "redis": (REDIS_HOST, REDIS_PORT),
        "rabbitmq": (amqp.hostname or "127.0.0.1", amqp.port or 5672),
    }
    if kind not in where or service_answers(*where[kind]):
        return
    host, port = where[kind]
    message = f"{kind} is not answering on {host}:{port}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must run every broker test)")
    pytest.skip(message)
