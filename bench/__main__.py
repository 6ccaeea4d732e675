"""``python -m bench`` (``./dev bench``): our gateway against a naive pipeline, in one run.

See ``bench/README.md`` for what is measured and how, and the latest numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.cache import format_cache, run_cache_phase
from bench.run import Options, format_table, run

BROKERS = ("redis", "rabbitmq", "embedded")


def _brokers(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BROKERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown broker {unknown[0]!r}; use {', '.join(BROKERS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Stream Discord dispatches from the bundled simulator (zlib-stream, pre-encoded) "
            "into a real `python -m ingest` process and into a naive client (json.loads + "
            "pydantic + one Celery send_task per event), and measure: events/s from the first "
            "frame written to the last task message counted in the broker queue (no worker "
            "runs), simulator-send -> visible-in-broker latency p50/p99 at a fixed rate, peak "
            "RSS and CPU seconds of the client process, and the time for a GUILD_CREATE burst. "
            "Needs Redis (db 14 is flushed) and RabbitMQ on loopback for those brokers."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--events",
        type=int,
        default=50_000,
        help="MESSAGE_CREATEs (~0.9 KB) for the throughput phase",
    )
    parser.add_argument(
        "--rate", type=float, default=2_000.0, help="offered events/s for the latency phase"
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=5.0,
        help="length of the latency phase (rate x seconds events)",
    )
    parser.add_argument(
        "--burst", type=int, default=2_500, help="GUILD_CREATEs in the burst phase (0: skip)"
    )
    parser.add_argument("--burst-kb", type=float, default=50.0, help="size of each GUILD_CREATE")
    parser.add_argument(
        "--brokers",
        type=_brokers,
        default=BROKERS,
        help="comma-separated: redis, rabbitmq, embedded (no CELERY_BROKER_URL)",
    )
    parser.add_argument(
        "--burst-brokers",
        type=_brokers,
        default=BROKERS,
        help="brokers that also get the GUILD_CREATE burst",
    )
    parser.add_argument(
        "--no-naive",
        dest="naive",
        action="store_false",
        help="skip the naive pipeline (and the ratio)",
    )
    parser.add_argument(
        "--naive-short-argsrepr",
        action="store_true",
        help="let the naive client pass argsrepr (a kinder baseline: Celery's saferepr of the "
        "payload is about half of its cost per event)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1_000,
        help="MESSAGE_CREATEs sent untimed after READY, before measuring",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/14",
        help="Redis for the benchmark; its db is FLUSHed before and after",
    )
    parser.add_argument(
        "--amqp-url",
        default="amqp://guest:guest@127.0.0.1:5672//",
        help="RabbitMQ; the discord.* queues used are purged before and after",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="INGEST_BATCH_SIZE for the gateway (default: its own)",
    )
    parser.add_argument(
        "--linger-ms",
        type=float,
        default=None,
        help="INGEST_LINGER_MS for the gateway (default: its own)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="attach py-spy to the gateway during the throughput and burst phases of the first "
        "broker in --brokers "
        "phases and write collapsed stacks to FILE (summarise with "
        "`python -m bench.profile FILE`)",
    )
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument(
        "--logs", type=Path, default=None, help="keep the child processes' logs in this directory"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 5,000 events, 1 s of latency, a 250-payload burst",
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="add the cache phase: the Redis gateway with INGEST_CACHE=none, the default and "
        "members, side by side, and the cache's bytes per guild and per member",
    )
    parser.add_argument(
        "--cache-only", action="store_true", help="run only the cache phase (implies --cache)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON on stdout (progress stays on stderr)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        defaults = build_parser().parse_args([])
        if args.events == defaults.events:
            args.events = 5_000
        if args.latency_seconds == defaults.latency_seconds:
            args.latency_seconds = 1.0
        if args.burst == defaults.burst:
            args.burst = 250
        if args.warmup == defaults.warmup:
            args.warmup = 500
    ingest_env: dict[str, str] = {}
    if args.batch_size is not None:
        ingest_env["INGEST_BATCH_SIZE"] = str(args.batch_size)
    if args.linger_ms is not None:
        ingest_env["INGEST_LINGER_MS"] = str(args.linger_ms)
    opts = Options(
        events=args.events,
        rate=args.rate,
        latency_seconds=args.latency_seconds,
        burst=args.burst,
        burst_kb=args.burst_kb,
        brokers=args.brokers,
        burst_brokers=args.burst_brokers,
        naive=args.naive,
        naive_short_argsrepr=args.naive_short_argsrepr,
        warmup=args.warmup,
        redis_url=args.redis_url,
        amqp_url=args.amqp_url,
        ingest_env=ingest_env,
        profile=args.profile,
        profile_rate=args.profile_rate,
        log_dir=args.logs,
    )
    failed = False
    report: dict[str, Any] = {}
    if not args.cache_only:
        report = run(opts)
        failed = any(r["error"] for r in report["results"]) or any(
            b["error"] for b in report["bursts"]
        )
    if args.cache or args.cache_only:
        log_dir = opts.log_dir or Path(tempfile.mkdtemp(prefix="di-bench-logs-", dir="/tmp"))
        report["cache"] = run_cache_phase(opts, log_dir)
        failed = failed or any(r["error"] for r in report["cache"]["rows"])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        if not args.cache_only:
            print(format_table(report))
        if "cache" in report:
            print(format_cache(report["cache"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
