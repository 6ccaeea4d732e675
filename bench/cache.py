"""The cache phase of ``python -m bench --cache``: what the shared cache costs the gateway.

Throughput: the Redis gateway is run three times in the same run, with ``INGEST_CACHE=none``,
the default (guilds, channels, roles) and with members, through the same phases as the main
run (MESSAGE_CREATE throughput, GUILD_CREATE burst); reported side by side with the ratio to
no cache. Memory: the real writer's commands for ``guilds`` realistic GUILD_CREATEs
(``sample_guild_create``, 50 KB) applied to the bench Redis; Redis's ``used_memory`` before and
after, per guild (default kinds) and per member (members on, minus the default's share).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import redis

from bench.run import Options, log, run_pipeline
from ingest.brokers import redis_py_url
from ingest.cache_layout import DEFAULT_KINDS, KINDS
from ingest.cache_writer import CacheWriter
from ingest.testing.simulator import sample_guild_create

SETTINGS = (
    ("none", "none"),
    ("default", ",".join(k for k in KINDS if k in DEFAULT_KINDS)),
    ("members", ",".join(KINDS)),
)


def run_cache_phase(opts: Options, log_dir: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for name, setting in SETTINGS:
        phase = dataclasses.replace(
            opts,
            ingest_env={**opts.ingest_env, "INGEST_CACHE": setting},
            latency_seconds=min(opts.latency_seconds, 1.0),
            burst_brokers=("redis",),
        )
        log(f"cache phase: INGEST_CACHE={setting}")
        row, burst = run_pipeline("ours", "redis", phase, log_dir)
        rows.append(
            {
                "cache": name,
                "INGEST_CACHE": setting,
                "events_per_s": row.events_per_s,
                "cpu_us_per_event": row.cpu_us_per_event,
                "burst_payloads_per_s": burst.payloads_per_s if burst else None,
                "burst_seconds": burst.seconds if burst else None,
                "burst_peak_rss_mb": burst.peak_rss_mb if burst else None,
                # CPU per payload moves less than wall time on a shared machine.
                "burst_cpu_ms_per_payload": (
                    round(burst.cpu_seconds / burst.delivered * 1000, 2)
                    if burst and burst.cpu_seconds and burst.delivered
                    else None
                ),
                "error": row.error or (burst.error if burst else None),
            }
        )
    base = rows[0]
    for row in rows:
        for key in ("events_per_s", "burst_payloads_per_s"):
            ratio = None
            if row[key] and base[key]:
                ratio = round(row[key] / base[key], 2)
            row[f"{key}_vs_none"] = ratio
    memory = measure_memory(opts.redis_url, guilds=200, size_kb=opts.burst_kb)
    return {"rows": rows, "memory": memory}


def _apply(client: redis.Redis, writer: CacheWriter, guilds: list[dict[str, Any]]) -> int:
    before = int(client.info("memory")["used_memory"])
    for guild in guilds:
        pipe = client.pipeline(transaction=True)
        for command in writer.commands("GUILD_CREATE", guild) or ():
            pipe.execute_command(*command)
        pipe.execute()
    return int(client.info("memory")["used_memory"]) - before


def measure_memory(url: str, *, guilds: int, size_kb: float) -> dict[str, Any]:
    """Bytes Redis holds per cached guild (default kinds) and per cached member."""
    url = redis_py_url(url)
    client = redis.Redis.from_url(url)
    payloads = [sample_guild_create(i, size_kb=size_kb) for i in range(guilds)]
    members = sum(len(g["members"]) for g in payloads)
    try:
        client.flushdb()
        default = _apply(client, CacheWriter(url, DEFAULT_KINDS), payloads)
        client.flushdb()
        with_members = _apply(client, CacheWriter(url, frozenset(KINDS)), payloads)
    finally:
        client.flushdb()
        client.close()
    return {
        "guilds": guilds,
        "guild_create_kb": size_kb,
        "members_per_guild": members // guilds,
        "bytes_per_guild": default // guilds,
        "bytes_per_member": (with_members - default) // members,
        "bytes_per_guild_with_members": with_members // guilds,
    }


def format_cache(report: dict[str, Any]) -> str:
    lines = [
        "",
        "cache phase (Redis): gateway events/s by INGEST_CACHE, same run",
        f"{'cache':<8} {'msg ev/s':>9} {'vs none':>7} {'CPU us/ev':>9} "
        f"{'burst GC/s':>10} {'vs none':>7} {'burst s':>8} {'CPU ms/GC':>9} {'RSS MB':>7}",
    ]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in report["rows"]:
        lines.append(
            f"{row['cache']:<8} {fmt(row['events_per_s'], ',.0f'):>9} "
            f"{fmt(row['events_per_s_vs_none'], '.2f'):>7} "
            f"{fmt(row['cpu_us_per_event'], '.0f'):>9} "
            f"{fmt(row['burst_payloads_per_s'], ',.0f'):>10} "
            f"{fmt(row['burst_payloads_per_s_vs_none'], '.2f'):>7} "
            f"{fmt(row['burst_seconds'], '.2f'):>8} "
            f"{fmt(row['burst_cpu_ms_per_payload'], '.2f'):>9} "
            f"{fmt(row['burst_peak_rss_mb'], '.0f'):>7}"
        )
        if row["error"]:
            lines.append(f"ERROR cache={row['cache']}: {row['error']}")
    memory = report["memory"]
    lines.append(
        f"memory: {memory['bytes_per_guild']:,} bytes per guild (default kinds), "
        f"{memory['bytes_per_member']:,} bytes per member (members on), from "
        f"{memory['guilds']} GUILD_CREATEs of {memory['guild_create_kb']:.0f} KB "
        f"({memory['members_per_guild']} members each)"
    )
    return "\n".join(lines)
