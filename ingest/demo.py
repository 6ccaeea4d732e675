"""``python -m ingest demo``: the whole pipeline on one machine, no token, no network.

It runs the bundled simulator, the Procfile's ``gateway`` and ``worker`` on the embedded broker,
prefixes their output like honcho does, and stops them all on Ctrl-C (or after ``--seconds``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Final

import redis

from ingest.brokers import (
    embedded_broker_answers,
    embedded_socket,
    ensure_embedded_broker,
    stop_embedded_broker,
)
from ingest.store import KEY_PREFIX
from ingest.testing.processes import SETTING_PREFIXES, free_port
from ingest.testing.simulator import DEFAULT_TOKEN

COLOURS: Final = ("\033[36m", "\033[33m", "\033[32m")
RESET: Final = "\033[0m"
DEFAULT_DATA_DIR: Final = Path(".ingest/demo")
# Settings a user may want to carry into the demo; every other DISCORD_/CELERY_/INGEST_ variable
# is dropped, so a shell configured for a real bot cannot point the demo at it.
KEPT_SETTINGS: Final = ("INGEST_LOG_FORMAT", "INGEST_LOG_LEVEL")


def _pump(name: str, colour: str, stream: IO[str], width: int) -> None:
    tty = sys.stdout.isatty()
    prefix = f"{colour}{name:<{width}} |{RESET} " if tty else f"{name:<{width}} | "
    for line in iter(stream.readline, ""):
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def forget_sessions(data_dir: Path) -> int:
    """Delete the sessions persisted in the demo's embedded broker; how many there were.

    Each demo run starts a fresh simulator on a fresh port, which knows none of the sessions a
    previous run left behind: resuming one would dial a port no one listens on any more.
    """
    client = redis.Redis(unix_socket_path=str(embedded_socket(data_dir)), socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{KEY_PREFIX}:*"))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def demo_env(port: int, data_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k in KEPT_SETTINGS or not (k.startswith(SETTING_PREFIXES) or k == "REDIS_URL")
    }
    env.update(
        {
            "DISCORD_TOKEN": DEFAULT_TOKEN,
            "DISCORD_GATEWAY_URL": f"ws://127.0.0.1:{port}",
            "DISCORD_API_URL": f"http://127.0.0.1:{port}/api/v10",
            # The simulator grants MESSAGE_CONTENT (below); Discord needs it switched on in the
            # Developer Portal too, or guild messages arrive with empty content.
            "DISCORD_INTENTS": "DEFAULT,MESSAGE_CONTENT",
            "INGEST_DATA_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def run_demo(
    seconds: float | None = None,
    messages: int = 20,
    *,
    app: str = "tasks",
    data_dir: Path = DEFAULT_DATA_DIR,
) -> int:
    port = free_port()
    data_dir = data_dir.resolve()
    started_broker = not embedded_broker_answers(data_dir)
    ensure_embedded_broker(data_dir)
    forgotten = forget_sessions(data_dir)
    env = demo_env(port, data_dir)
    env["INGEST_CELERY_APP"] = app
    py = sys.executable
    commands = {
        "simulator": [
            py,
            "-m",
            "ingest.testing",
            "--port",
            str(port),
            "--allow-privileged",
            "MESSAGE_CONTENT",
            "--guilds-per-shard",
            "3",
            "--emit",
            f"MESSAGE_CREATE:{messages}:4",
            "--emit",
            "TYPING_START:5:1",
        ],
        "gateway": [py, "-m", "ingest"],
        "worker": [
            py,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "--loglevel",
            "INFO",
            "--concurrency",
            "2",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
    }
    width = max(len(n) for n in commands)
    print(f"demo: simulator on ws://127.0.0.1:{port}, embedded broker in {data_dir}")
    if forgotten:
        print(f"demo: forgot {forgotten} session(s) of an earlier demo's simulator")
    print(
        "demo: Ctrl-C stops everything" + (f"; stopping after {seconds:.0f} s" if seconds else "")
    )
    print(
        'demo: in another terminal, `python -m ingest simulate say "!hello" '
        f"--url http://127.0.0.1:{port}` sends a message"
    )
    procs: dict[str, subprocess.Popen[str]] = {}
    threads = []
    for index, (name, cmd) in enumerate(commands.items()):
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        procs[name] = proc
        assert proc.stdout is not None
        thread = threading.Thread(
            target=_pump,
            args=(name, COLOURS[index % len(COLOURS)], proc.stdout, width),
            daemon=True,
        )
        thread.start()
        threads.append(thread)
        if name == "simulator":
            time.sleep(1.0)  # let it bind before the gateway dials
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    deadline = None if seconds is None else time.monotonic() + seconds
    failed = None
    while not stop.is_set():
        if deadline is not None and time.monotonic() >= deadline:
            break
        for name, proc in procs.items():
            if proc.poll() is not None:
                failed = f"{name} exited with code {proc.returncode}"
                stop.set()
        stop.wait(0.2)
    for name in ("gateway", "worker", "simulator"):
        proc = procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    for thread in threads:
        thread.join(timeout=2)
    if started_broker:
        # Started for this demo, so it ends with it; one that was already up stays up.
        stop_embedded_broker(data_dir)
    if failed:
        print(f"demo: {failed}", file=sys.stderr)
        return 1
    return 0
