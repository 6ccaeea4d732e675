"""Real processes for end-to-end tests: the gateway (`python -m ingest`) and a Celery worker,
their output collected line by line so tests can wait for what they print."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

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


MESSAGE_LINE = re.compile(r"message (\d+) in channel \d+ by \S+ \(shard (\d+), seq (\d+)\)")


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


def base_env(**overrides: str) -> dict[str, str]:
    return clean_env(ROOT, **overrides)


def gateway_process(env: Mapping[str, str], name: str = "gateway") -> Proc:
    return Proc(name, [sys.executable, "-m", "ingest"], env)


def worker_process(
    env: Mapping[str, str],
    *queues: str,
    name: str = "worker",
    app: str = "tasks",
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


def handled_messages(proc: Proc) -> list[tuple[int, int, int]]:
    """(message id, shard id, sequence) of every MESSAGE_CREATE the example handler logged."""
    found = []
    for line in proc.output():
        match = MESSAGE_LINE.search(line)
        if match:
            found.append((int(match[1]), int(match[2]), int(match[3])))
    return found


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
