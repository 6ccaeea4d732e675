"""Command line: ``python -m ingest`` runs the gateway process; ``demo``, ``status`` and
``simulate`` are the other verbs."""

from __future__ import annotations

import argparse
import logging
import sys

from ingest.errors import ConfigError
from ingest.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingest",
        description="Discord Gateway events into Celery tasks. Configured by environment "
        "variables (see README).",
    )
    verbs = parser.add_subparsers(dest="verb")
    verbs.add_parser("run", help="run the gateway process (the default)")
    demo = verbs.add_parser("demo", help="simulator + gateway + worker on the embedded broker")
    demo.add_argument("--seconds", type=float, default=None, help="stop after this long")
    demo.add_argument("--messages", type=int, default=20, help="MESSAGE_CREATEs to emit")
    status = verbs.add_parser("status", help="shards, sessions and queue depths of a deployment")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    verbs.add_parser("simulate", help="run the gateway simulator (see --help of ingest.testing)")
    args, rest = parser.parse_known_args(argv)

    if args.verb == "simulate":
        from ingest.testing.__main__ import main as simulate

        return simulate(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.verb == "demo":
        from ingest.demo import run_demo

        return run_demo(seconds=args.seconds, messages=args.messages)
    if args.verb == "status":
        from ingest.status import run_status

        return run_status(as_json=args.json)

    from ingest.config import load_config
    from ingest.process import run_process

    try:
        config = load_config()
    except ConfigError as exc:
        print(f"discord-ingest: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format, secrets=[config.token])
    logging.getLogger("ingest.process").info("starting gateway process: %r", config)
    return run_process(config)


if __name__ == "__main__":
    sys.exit(main())
