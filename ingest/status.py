"""``python -m ingest status``: what a running deployment looks like, from the session store
and the broker: shards, sessions, committed sequences and queue depth per event type.

It reads the same environment as the gateway, never starts anything (not even the embedded
broker) and gives up after a few seconds with one line on stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any, Final

from ingest.brokers import is_redis_url
from ingest.errors import ConfigError

TIMEOUT_SECONDS: Final = 5.0


async def collect_status(env: dict[str, str]) -> dict[str, Any]:
    from ingest.brokers import broker_url_from_env, data_dir_from_env, redis_py_url
    from ingest.routing import DEAD_LETTER_QUEUE, TASK_PREFIX
    from ingest.store import store_for

    broker_url = broker_url_from_env(env, start=False)
    store = store_for(env.get("INGEST_STATE_URL") or None, broker_url, data_dir_from_env(env))
    try:
        sessions = await store.load_all()
        problems = await store.load_problems()
    finally:
        await store.close()
    queues: dict[str, int] = {}
    if is_redis_url(broker_url):
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(
            redis_py_url(broker_url),
            socket_timeout=TIMEOUT_SECONDS,
            socket_connect_timeout=TIMEOUT_SECONDS,
        )
        try:
            names = [
                key.decode()
                async for key in client.scan_iter(match=f"{TASK_PREFIX}*", count=1000)
                if await client.type(key) == b"list"
            ]
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.llen(name)
            queues = dict(zip(names, (int(n) for n in await pipe.execute()), strict=True))
        finally:
            await client.aclose()
    return {
        "broker": _without_password(broker_url),
        "shards": [
            {
                "shard": f"{s.shard_id}/{s.shard_count}",
                "shard_id": s.shard_id,
                "shard_count": s.shard_count,
                "session_id": s.session_id,
                "committed_sequence": s.sequence,
                "resume_url": s.resume_url,
                "heartbeat_latency_ms": (
                    None if s.heartbeat_latency is None else round(s.heartbeat_latency * 1000, 1)
                ),
                "saved_seconds_ago": (
                    None if s.saved_at is None else round(max(0.0, time.time() - s.saved_at), 1)
                ),
            }
            for s in sessions
        ],
        "problems": [{"shard": shard, "problem": text} for shard, text in sorted(problems.items())],
        "queues": [
            {
                "queue": name,
                "event": None if name == DEAD_LETTER_QUEUE else name[len(TASK_PREFIX) :],
                "depth": depth,
            }
            for name, depth in sorted(queues.items())
        ],
    }


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def format_table(status: dict[str, Any]) -> str:
    lines = [f"broker: {status['broker']}", ""]
    lines.append(
        f"{'SHARD':<9} {'SESSION':<34} {'COMMITTED':>10} {'HEARTBEAT':>10} {'SAVED':>9}  RESUME URL"
    )
    for row in status["shards"]:
        committed = "-" if row["committed_sequence"] is None else row["committed_sequence"]
        latency = row.get("heartbeat_latency_ms")
        heartbeat = "-" if latency is None else f"{latency:.1f} ms"
        ago = row.get("saved_seconds_ago")
        saved = "-" if ago is None else f"{ago:.0f} s ago"
        lines.append(
            f"{row['shard']:<9} {row['session_id']:<34} {committed!s:>10} {heartbeat:>10} "
            f"{saved:>9}  {row['resume_url'] or '-'}"
        )
    if not status["shards"]:
        lines.append("(no persisted sessions)")
    for row in status.get("problems", []):
        lines.append(f"shard {row['shard']}: {row['problem']}")
    lines.append("")
    lines.append(f"{'EVENT':<36} {'QUEUE':<44} {'DEPTH':>8}")
    for row in status["queues"]:
        event = row["event"] or "(dead letters)"
        lines.append(f"{event:<36} {row['queue']:<44} {row['depth']:>8}")
    if not status["queues"]:
        lines.append("(no queued messages)")
    return "\n".join(lines)


def run_status(*, as_json: bool) -> int:
    from redis.exceptions import RedisError

    try:
        status = asyncio.run(
            asyncio.wait_for(collect_status(dict(os.environ)), TIMEOUT_SECONDS * 3)
        )
    except ConfigError as exc:
        print(f"discord-ingest: {exc}", file=sys.stderr)
        return 2
    except (OSError, RedisError, TimeoutError) as exc:
        print(
            f"discord-ingest: cannot read the deployment's state: {exc or type(exc).__name__}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(status, indent=2) if as_json else format_table(status))
    return 0
