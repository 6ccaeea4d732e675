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

from ingest.testing.processes import free_port

COLOURS = ("\033[36m", "\033[33m", "\033[32m")
RESET = "\033[0m"


def _pump(name: str, colour: str, stream: object, width: int) -> None:
    tty = sys.stdout.isatty()
    prefix = f"{colour}{name:<{width}} |{RESET} " if tty else f"{name:<{width}} | "
    for line in iter(stream.readline, ""):  # type: ignore[attr-defined]
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def run_demo(seconds: float | None = None, messages: int = 20) -> int:
    port = free_port()
    data_dir = Path(".ingest/demo").resolve()
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "REDIS_URL")}
    env.update(
        {
            "DISCORD_TOKEN": "sim-token",
            "DISCORD_GATEWAY_URL": f"ws://127.0.0.1:{port}",
            "DISCORD_API_URL": f"http://127.0.0.1:{port}/api/v10",
            "INGEST_DATA_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
        }
    )
    py = sys.executable
    commands = {
        "simulator": [
            py,
            "-m",
            "ingest.testing",
            "--port",
            str(port),
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
            "tasks",
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
    print(
        "demo: Ctrl-C stops everything" + (f"; stopping after {seconds:.0f} s" if seconds else "")
    )
    procs: dict[str, subprocess.Popen[str]] = {}
    threads = []
    for index, (name, cmd) in enumerate(commands.items()):
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        procs[name] = proc
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
    if failed:
        print(f"demo: {failed}", file=sys.stderr)
        return 1
    return 0
