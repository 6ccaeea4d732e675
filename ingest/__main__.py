"""Command line: ``python -m ingest`` runs the gateway process; ``demo``, ``status``,
``simulate`` and ``broker`` are the other verbs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ingest.errors import ConfigError
from ingest.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        # Everything after the verb is the simulator's, --help included.
        from ingest.testing.__main__ import main as simulate

        return simulate(argv[1:], prog="python -m ingest simulate")

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
    demo.add_argument("--app", default="tasks", help="Celery app module (default: tasks)")
    demo.add_argument(
        "--data-dir", type=Path, default=Path(".ingest/demo"), help="embedded broker directory"
    )
    status = verbs.add_parser("status", help="shards, sessions and queue depths of a deployment")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    verbs.add_parser(
        "simulate",
        help="run or drive the gateway simulator (python -m ingest simulate --help)",
    )
    broker = verbs.add_parser("broker", help="the embedded broker of a data directory")
    broker.add_argument("action", choices=["stop"], help="stop: shut it down")
    broker.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="its directory (default: INGEST_DATA_DIR, else ./.ingest)",
    )
    broker.add_argument(
        "--force", action="store_true", help="stop it even while processes are connected"
    )
    args = parser.parse_args(argv)

    if args.verb == "demo":
        from ingest.demo import run_demo

        return run_demo(
            seconds=args.seconds, messages=args.messages, app=args.app, data_dir=args.data_dir
        )
    if args.verb == "status":
        from ingest.status import run_status

        return run_status(as_json=args.json)
    if args.verb == "broker":
        from ingest.brokers import data_dir_from_env

        return stop_broker(args.data_dir or data_dir_from_env(os.environ), force=args.force)

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


def stop_broker(data_dir: Path, *, force: bool = False) -> int:
    """``python -m ingest broker stop``: end the embedded redis-server of ``data_dir``.

    It is a daemon that outlives the gateway and workers on purpose (their restarts keep the
    queue); this is how to end it. Refuses while a gateway or worker is still connected, since
    they would only reconnect into an outage.
    """
    import redis

    from ingest.brokers import embedded_socket, stop_embedded_broker

    sock = embedded_socket(data_dir)
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2, socket_connect_timeout=2)
    try:
        # Ourselves included in the count.
        others = len(client.client_list()) - 1
    except (redis.RedisError, OSError):
        print(f"no embedded broker running in {data_dir.resolve()}")
        return 0
    finally:
        client.close()
    if others and not force:
        print(
            f"discord-ingest: {others} process(es) still connected to the embedded broker in "
            f"{data_dir.resolve()}: stop the gateway and workers first, or pass --force",
            file=sys.stderr,
        )
        return 1
    stop_embedded_broker(data_dir)
    print(f"stopped the embedded broker in {data_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
