"""Run the gateway simulator standalone: ``python -m ingest.testing --port 8765``.

Prints ``gateway <ws url>`` and ``api <http url>`` on their own lines, then serves until
SIGINT/SIGTERM; ``--emit EVENT:COUNT[:RATE]`` starts emitting once a session is READY.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass

from ingest.protocol import PRIVILEGED_INTENTS, Intents
from ingest.testing.simulator import (
    DEFAULT_HEARTBEAT_INTERVAL_MS,
    DEFAULT_TOKEN,
    SAMPLE_GENERATORS,
    GatewaySimulator,
    generate_payload,
)


@dataclass(frozen=True, slots=True)
class EmitSpec:
    event: str
    count: int
    rate: float | None


def parse_emit(spec: str) -> EmitSpec:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise argparse.ArgumentTypeError(f"expected EVENT:COUNT[:RATE], got {spec!r}")
    event = parts[0].upper()
    if event not in SAMPLE_GENERATORS:
        known = ", ".join(SAMPLE_GENERATORS)
        raise argparse.ArgumentTypeError(f"no generator for {event}; known: {known}")
    try:
        count = int(parts[1])
        rate = float(parts[2]) if len(parts) == 3 and parts[2] else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad COUNT or RATE in {spec!r}") from None
    return EmitSpec(event, count, rate)


def parse_privileged(spec: str) -> int:
    """``all``, or names such as ``GUILD_MEMBERS,MESSAGE_CONTENT``."""
    if spec.strip().lower() == "all":
        return int(PRIVILEGED_INTENTS)
    value = 0
    for name in spec.replace("|", ",").split(","):
        if not name.strip():
            continue
        try:
            flag = Intents[name.strip().upper()]
        except KeyError:
            raise argparse.ArgumentTypeError(f"unknown intent {name.strip()!r}") from None
        value |= int(flag)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.testing", description="Discord Gateway v10 simulator"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--shards", type=int, default=1, help="shard count the bot must use")
    parser.add_argument("--max-concurrency", type=int, default=1)
    parser.add_argument("--identify-interval", type=float, default=5.0)
    parser.add_argument("--heartbeat-interval-ms", type=int, default=DEFAULT_HEARTBEAT_INTERVAL_MS)
    parser.add_argument("--resume-window", type=float, default=180.0)
    parser.add_argument("--guilds-per-shard", type=int, default=0)
    parser.add_argument("--guild-size-kb", type=float, default=2.0)
    parser.add_argument(
        "--emit",
        type=parse_emit,
        action="append",
        default=[],
        metavar="EVENT:COUNT[:RATE]",
        help="emit generated events once a session is READY (repeatable)",
    )
    parser.add_argument(
        "--allow-privileged",
        type=parse_privileged,
        nargs="?",
        const=int(PRIVILEGED_INTENTS),
        default=0,
        metavar="INTENTS",
        help="allow privileged intents: all (the default when given bare) or names",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


async def run(args: argparse.Namespace) -> None:
    sim = GatewaySimulator(
        host=args.host,
        port=args.port,
        token=args.token,
        shard_count=args.shards,
        max_concurrency=args.max_concurrency,
        identify_interval=args.identify_interval,
        heartbeat_interval_ms=args.heartbeat_interval_ms,
        allowed_privileged=args.allow_privileged,
        resume_window=args.resume_window,
        guilds_per_shard=args.guilds_per_shard,
        guild_size_kb=args.guild_size_kb,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with sim:
        print(f"gateway {sim.url}", flush=True)
        print(f"api {sim.api_url}", flush=True)
        emitter = asyncio.create_task(emit_when_ready(sim, args.emit))
        await stop.wait()
        emitter.cancel()


async def emit_when_ready(sim: GatewaySimulator, specs: list[EmitSpec]) -> None:
    if not specs:
        return
    await sim.wait_until(lambda: bool(sim.ready_shards()), timeout=float("inf"))
    for spec in specs:

        def make(i: int, event: str = spec.event) -> object:
            return generate_payload(event, i)

        await sim.emit_many(spec.event, make, spec.count, spec.rate)
        print(f"emitted {spec.count} {spec.event}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        asyncio.run(run(args))
    except OSError as exc:
        where = f"{args.host}:{args.port}"
        print(f"gateway simulator: cannot listen on {where}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
