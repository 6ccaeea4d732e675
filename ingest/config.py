"""The gateway process's configuration, from environment variables only (12-factor).

Every mistake becomes a ``ConfigError`` whose message is one line naming the variable to fix.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.brokers import REDIS_SCHEMES, broker_url_from_env, data_dir_from_env
from ingest.cache_layout import DEFAULT_KINDS as DEFAULT_CACHE_KINDS
from ingest.cache_layout import parse_kinds
from ingest.compression import Compression
from ingest.discovery import DEFAULT_API_URL
from ingest.errors import ConfigError
from ingest.protocol import default_intents, parse_intents


@dataclass(frozen=True)
class Config:
    token: str = field(repr=False)
    intents: int
    api_url: str
    gateway_url: str | None  # set: skip GET /gateway/bot
    shard_count: int | None  # None: Discord's recommendation
    shard_ids: tuple[int, ...] | None  # None: all of them
    broker_url: str
    celery_app: str
    extra_events: frozenset[str]
    compression: Compression
    data_dir: Path
    state_url: str | None  # where sessions persist; None: a file in data_dir
    max_buffered_events: int
    max_outage_seconds: float
    batch_size: int
    linger_seconds: float
    metrics_port: int | None
    log_format: str
    log_level: str
    # The outage buffer's byte bound (task bodies), beside its event bound.
    max_buffered_bytes: int = 256 * 1024 * 1024
    # What the shared cache keeps (INGEST_CACHE); empty: no cache.
    cache_kinds: frozenset[str] = DEFAULT_CACHE_KINDS

    def __repr__(self) -> str:
        return (
            f"Config(token='[REDACTED]', intents={self.intents}, shards={self.shard_ids}/"
            f"{self.shard_count}, broker={_redact_url(self.broker_url)})"
        )


def _redact_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# Broker schemes the gateway publishes to (kombu's spellings), and the two special values.
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
SPECIAL_BROKERS = frozenset({"eager", "embedded"})


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def exit_on_bad_broker_url(conf: Any, **_: Any) -> None:
    """Celery ``celeryd_init`` receiver: a worker whose broker URL no kombu transport serves
    says so in one line and exits 2, instead of kombu's two chained tracebacks."""
    from kombu.connection import Connection

    url = str(conf.broker_url or "")
    try:
        Connection(url).transport  # type: ignore[no-untyped-call]  # noqa: B018 - the check
    except (KeyError, ImportError) as exc:
        reason = exc.args[0] if exc.args else exc
        print(
            f"celery worker: broker URL {_redact_url(url)!r}: {reason}; use redis://, rediss://, "
            "redis+socket://, amqp://, amqps:// or pyamqp://",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def check_urls(env: Mapping[str, str]) -> None:
    """Refuse URLs the gateway could only retry forever (``DISCORD_GATEWAY_URL=http://...``)."""
    gateway_url = env.get("DISCORD_GATEWAY_URL", "").strip()
    if gateway_url and _scheme(gateway_url) not in ("ws", "wss"):
        raise ConfigError(
            f"DISCORD_GATEWAY_URL={gateway_url!r} is not a WebSocket URL: use wss://... "
            "(or ws:// for a local simulator)"
        )
    api_url = env.get("DISCORD_API_URL", "").strip()
    if api_url and _scheme(api_url) not in ("http", "https"):
        raise ConfigError(f"DISCORD_API_URL={api_url!r} is not an HTTP URL: use https://...")
    for name in ("CELERY_BROKER_URL", "REDIS_URL"):
        url = env.get(name, "").strip()
        if not url:
            continue
        if url not in SPECIAL_BROKERS and _scheme(url) not in REDIS_SCHEMES | AMQP_SCHEMES:
            raise ConfigError(
                f"{name}={_redact_url(url)!r}: unsupported broker URL scheme; use redis://, "
                "rediss://, redis+socket://, amqp://, amqps:// or pyamqp://"
            )
        break  # REDIS_URL is only read when CELERY_BROKER_URL is unset


def parse_shard_ids(spec: str, shard_count: int | None = None) -> tuple[int, ...]:
    """``0-15``, ``0,4,8`` or ``0-3,8``; every id below ``shard_count`` when it is known."""
    ids: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                low_text, high_text = part.split("-", 1)
                low, high = int(low_text), int(high_text)
                if low > high:
                    raise ValueError
                ids.extend(range(low, high + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise ConfigError(
                f"DISCORD_SHARD_IDS={spec!r} is not a shard list: use e.g. 0-15 or 0,4,8"
            ) from None
    if not ids or any(i < 0 for i in ids):
        raise ConfigError(f"DISCORD_SHARD_IDS={spec!r} names no valid shard ids")
    if shard_count is not None and max(ids) >= shard_count:
        raise ConfigError(
            f"DISCORD_SHARD_IDS={spec!r} names shard {max(ids)}, but DISCORD_SHARD_COUNT is "
            f"{shard_count}: ids must be below the count"
        )
    return tuple(sorted(set(ids)))


def _int(env: Mapping[str, str], name: str, default: int | None, minimum: int) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} must be a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} must be a number") from None
    if value < 0:
        raise ConfigError(f"{name}={value} must not be negative")
    return value


def load_config(env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    token = env.get("DISCORD_TOKEN", "").strip()
    if not token:
        raise ConfigError(
            "DISCORD_TOKEN is not set: export the bot token from the Developer Portal "
            "(or run `python -m ingest demo` to try it against the simulator)"
        )
    check_urls(env)
    if token.lower().startswith("bot "):
        token = token[4:].strip()
    intents_text = env.get("DISCORD_INTENTS", "").strip()
    try:
        intents = parse_intents(intents_text) if intents_text else int(default_intents())
    except ValueError as exc:
        raise ConfigError(f"DISCORD_INTENTS: {exc}") from None
    shard_count = _int(env, "DISCORD_SHARD_COUNT", None, 1)
    shard_spec = env.get("DISCORD_SHARD_IDS", "").strip()
    shard_ids = parse_shard_ids(shard_spec, shard_count) if shard_spec else None
    compression_text = env.get("INGEST_COMPRESSION", Compression.ZLIB_STREAM.value).strip()
    try:
        compression = Compression(compression_text)
    except ValueError:
        choices = ", ".join(c.value for c in Compression)
        raise ConfigError(
            f"INGEST_COMPRESSION={compression_text!r}: use one of {choices}"
        ) from None
    extra = frozenset(
        e.strip().upper() for e in env.get("DISCORD_EVENTS", "").replace(" ", ",").split(",")
    ) - {""}
    log_format = env.get("INGEST_LOG_FORMAT", "text").strip().lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"INGEST_LOG_FORMAT={log_format!r}: use text or json")
    metrics_port = _int(env, "INGEST_METRICS_PORT", None, 0)
    return Config(
        token=token,
        intents=intents,
        api_url=env.get("DISCORD_API_URL", "").strip() or DEFAULT_API_URL,
        gateway_url=env.get("DISCORD_GATEWAY_URL", "").strip() or None,
        shard_count=shard_count,
        shard_ids=shard_ids,
        broker_url=broker_url_from_env(env),
        celery_app=env.get("INGEST_CELERY_APP", "tasks").strip() or "tasks",
        extra_events=extra,
        compression=compression,
        data_dir=data_dir_from_env(env),
        state_url=env.get("INGEST_STATE_URL", "").strip() or None,
        max_buffered_events=_int(env, "INGEST_MAX_BUFFERED_EVENTS", 100_000, 1) or 100_000,
        max_outage_seconds=_float(env, "INGEST_MAX_OUTAGE_SECONDS", 30.0),
        batch_size=_int(env, "INGEST_BATCH_SIZE", 500, 1) or 500,
        linger_seconds=_float(env, "INGEST_LINGER_MS", 2.0) / 1000.0,
        metrics_port=metrics_port,
        log_format=log_format,
        log_level=env.get("INGEST_LOG_LEVEL", "INFO").strip().upper() or "INFO",
        max_buffered_bytes=_int(env, "INGEST_MAX_BUFFERED_BYTES", 256 * 1024 * 1024, 1)
        or 256 * 1024 * 1024,
        cache_kinds=parse_kinds(env.get("INGEST_CACHE", "")),
    )
