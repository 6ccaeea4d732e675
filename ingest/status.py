"""``python -m ingest status``: what a running deployment looks like, from the session store
and the broker: shards, sessions, committed sequences and queue depth per event type."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from ingest.errors import ConfigError


async def collect_status(env: dict[str, str]) -> dict[str, Any]:
    from ingest.brokers import broker_url_from_env, data_dir_from_env, redis_py_url
    from ingest.store import store_for

    broker_url = broker_url_from_env(env)
    store = store_for(env.get("INGEST_STATE_URL") or None, broker_url, data_dir_from_env(env))
    try:
        sessions = await store.load_all()
    finally:
        await store.close()
    queues: dict[str, int] = {}
    if broker_url.split("://", 1)[0] in ("redis", "rediss", "redis+socket", "unix", "socket"):
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_py_url(broker_url), socket_timeout=5)
        try:
            async for key in client.scan_iter(match="discord.*"):
                name = key.decode()
                if await client.type(key) == b"list":
                    queues[name] = int(await client.llen(key))
        finally:
            await client.aclose()
    return {
        "shards": [
            {
                "shard": f"{s.shard_id}/{s.shard_count}",
                "session_id": s.session_id,
                "committed_sequence": s.sequence,
                "resume_url": s.resume_url,
            }
            for s in sessions
        ],
        "queues": dict(sorted(queues.items())),
    }


def run_status(*, as_json: bool) -> int:
    try:
        status = asyncio.run(collect_status(dict(os.environ)))
    except ConfigError as exc:
        print(f"discord-ingest: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"discord-ingest: cannot read the deployment's state: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"{'SHARD':<8} {'SESSION':<34} {'COMMITTED':>10}")
    for row in status["shards"]:
        print(f"{row['shard']:<8} {row['session_id']:<34} {row['committed_sequence']!s:>10}")
    if not status["shards"]:
        print("(no persisted sessions)")
    print()
    print(f"{'QUEUE':<40} {'DEPTH':>8}")
    for name, depth in status["queues"].items():
        print(f"{name:<40} {depth:>8}")
    if not status["queues"]:
        print("(no queued messages)")
    return 0
