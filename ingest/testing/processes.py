"""Helpers for running the gateway, workers and the simulator as child processes in tests,
the demo and the benchmark: a free loopback port, and an environment without our settings."""

from __future__ import annotations

import os
import socket
from pathlib import Path

# Prefixes of every variable the gateway, the workers or the tests read.
SETTING_PREFIXES = ("DISCORD_", "CELERY_", "INGEST_")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(project_root: Path | None = None, **overrides: str) -> dict[str, str]:
    """This process's environment minus our settings (and ``REDIS_URL``), plus ``overrides``.

    A child started with it sees only what the caller sets, whatever the developer's shell
    exports; unbuffered output lets a caller read its lines as they come.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(SETTING_PREFIXES) and k != "REDIS_URL"
    }
    env["PYTHONUNBUFFERED"] = "1"
    if project_root is not None:
        env["PYTHONPATH"] = str(project_root)
    env.update(overrides)
    return env
