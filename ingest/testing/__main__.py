"""The gateway simulator's command line: run one, or drive a running one.

``python -m ingest simulate --port 8765`` (also ``python -m ingest.testing``) prints
``gateway <ws url>`` and ``api <http url>`` on their own lines, then serves until SIGINT/SIGTERM;
``say``, ``emit``, ``reconnect``, ``invalid-session``, ``close`` and ``state`` drive a running one
through its ``/_sim/*`` HTTP control routes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Final

from ingest.protocol import PRIVILEGED_INTENTS, Intents
from ingest.testing.simulator import (
    DEFAULT_HEARTBEAT_INTERVAL_MS,
    DEFAULT_TOKEN,
    DISCORD_EPOCH_MS,
    SAMPLE_GENERATORS,
    GatewaySimulator,
    generate_payload,
    sample_message_create,
)

DEFAULT_PORT: Final = 8765
DEFAULT_URL: Final = f"http://127.0.0.1:{DEFAULT_PORT}"
CONTROL_TIMEOUT: Final = 30.0


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


EPILOG: Final = f"""\
The simulator accepts the token {DEFAULT_TOKEN!r} (--token to change it). Point a gateway at it:
  DISCORD_TOKEN={DEFAULT_TOKEN} DISCORD_GATEWAY_URL=ws://127.0.0.1:{DEFAULT_PORT} \\
  DISCORD_API_URL=http://127.0.0.1:{DEFAULT_PORT}/api/v10 python -m ingest
(Procfile.dev does this: honcho -f Procfile.dev start). Then, from another terminal:
  python -m ingest simulate say "!hello"             a MESSAGE_CREATE with that content
  python -m ingest simulate emit TYPING_START -n 5   generated events of a type
  python -m ingest simulate reconnect                op 7: the gateway resumes
  python -m ingest simulate invalid-session          op 9: the gateway identifies again
Like Discord, guild messages reach a session without the MESSAGE_CONTENT intent with empty
content; --allow-privileged MESSAGE_CONTENT lets a gateway ask for it.
"""


def build_parser(prog: str = "python -m ingest.testing") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A Discord Gateway v10 simulator: run one (the options below), or drive a "
        "running one (the commands).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one"
    )
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the bot token it accepts")
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

    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    url_help = f"the running simulator (default: $INGEST_SIM_URL, else {DEFAULT_URL})"

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--url", default=os.environ.get("INGEST_SIM_URL") or DEFAULT_URL, help=url_help
        )
        sub.add_argument("--shard", type=int, default=None, help="only this shard (default: all)")
        return sub

    say = command("say", "send a MESSAGE_CREATE with this content, as a user would")
    say.add_argument("text")
    say.add_argument("--author", default="newcomer", help="the author's username")
    say.add_argument("--channel-id", default=None)
    say.add_argument("--dm", action="store_true", help="a direct message (no guild)")
    emit = command("emit", "emit generated events of a type")
    emit.add_argument("event", type=str.upper, help=", ".join(SAMPLE_GENERATORS))
    emit.add_argument("-n", "--count", type=int, default=1)
    emit.add_argument("--rate", type=float, default=None, help="per second (default: at once)")
    command("reconnect", "send op 7 RECONNECT: the gateway reconnects and resumes")
    invalid = command("invalid-session", "send op 9 INVALID_SESSION")
    invalid.add_argument(
        "--resumable", action="store_true", help="d=true: resume instead of identifying again"
    )
    close = command("close", "close the connections with a close code")
    close.add_argument("code", type=int, help="e.g. 4000 (resume), 4009 (new session), 4004")
    command("drop", "abort the TCP connections with no close frame, like a network failure")
    command("state", "print the simulator's sessions, sequences and counters as JSON")
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
        honour_message_content=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with sim:
        print(f"gateway {sim.url}", flush=True)
        print(f"api {sim.api_url}", flush=True)
        print(
            f"connect a gateway with DISCORD_TOKEN={args.token} DISCORD_GATEWAY_URL={sim.url} "
            f"DISCORD_API_URL={sim.api_url}",
            flush=True,
        )
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


def message_from(text: str, author: str, channel_id: str | None, dm: bool) -> dict[str, Any]:
    """A MESSAGE_CREATE ``d`` saying ``text``, with a snowflake of now (ids never repeat)."""
    now_ms = int(time.time() * 1000)
    i = now_ms % 100_000  # varies the generated author and member fields
    message = sample_message_create(i)
    message["id"] = str(((now_ms - DISCORD_EPOCH_MS) << 22) | (os.getpid() & 0x1FFFF))
    message["content"] = text
    message["author"]["username"] = author
    message["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime())
    message["mentions"] = []
    if channel_id is not None:
        message["channel_id"] = channel_id
    if dm:
        del message["guild_id"], message["member"]
    return message


def control(args: argparse.Namespace) -> int:
    """Run one command against the simulator at ``args.url``; the exit code."""
    body: dict[str, Any] = {}
    if args.shard is not None:
        body["shard_id"] = args.shard
    if args.command == "say":
        action = "emit"
        body |= {
            "event": "MESSAGE_CREATE",
            "data": message_from(args.text, args.author, args.channel_id, args.dm),
        }
    elif args.command == "emit":
        action = "emit"
        body |= {"event": args.event, "count": args.count, "rate": args.rate}
    elif args.command == "invalid-session":
        action, body["resumable"] = "invalid_session", args.resumable
    elif args.command == "close":
        action, body["code"] = "close", args.code
    else:
        action = args.command
    try:
        if action == "emit" and not _call(args.url, "state", None)["ready_shards"]:
            print(
                f"no gateway is connected to the simulator at {args.url}: nothing to send to "
                "(is the gateway running with DISCORD_GATEWAY_URL pointing here?)",
                file=sys.stderr,
            )
            return 1
        result = _call(args.url, action, None if action == "state" else body)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        print(f"simulator at {args.url} refused {action}: {exc.code} {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"no simulator answers at {args.url} ({reason}): start one with "
            "`python -m ingest simulate` or `honcho -f Procfile.dev start`, or pass --url",
            file=sys.stderr,
        )
        return 1
    if args.command == "state":
        print(json.dumps(result, indent=2))
    elif args.command == "say":
        sessions = "every shard" if args.shard is None else f"shard {args.shard}"
        print(f"said {args.text!r} as {args.author} to {sessions}")
    elif args.command == "emit":
        print(f"emitted {args.count} {args.event}")
    else:
        print(f"sent {args.command}")
    return 0


def _call(base_url: str, action: str, body: dict[str, Any] | None) -> Any:
    """GET (no body) or POST one ``/_sim/<action>`` route; its decoded JSON answer."""
    request = urllib.request.Request(
        base_url.rstrip("/") + "/_sim/" + action,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=CONTROL_TIMEOUT) as response:
        return json.loads(response.read() or b"null")


def main(argv: list[str] | None = None, prog: str = "python -m ingest.testing") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command is not None:
        return control(args)
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
