"""``python -m ingest demo`` run as a newcomer runs it: twice in a row, both runs show events."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.brokers import stop_embedded_broker
from tests.support import ROOT, Proc, base_env, short_tempdir

SAW = re.compile(r"demo app saw message (\d+): 'message \d+")
MESSAGES = 3


def run_demo_until_events(data_dir: Path) -> str:
    """One demo run, stopped with Ctrl-C (SIGINT) once the handler saw every message."""
    cmd = [
        sys.executable,
        "-m",
        "ingest",
        "demo",
        "--seconds",
        "90",
        "--messages",
        str(MESSAGES),
        "--app",
        "tests.demo_app",
        "--data-dir",
        str(data_dir),
    ]
    demo = Proc("demo", cmd, base_env())
    try:
        demo.wait_for(
            lambda lines: sum(1 for line in lines if SAW.search(line)) >= MESSAGES,
            60,
            f"{MESSAGES} messages handled",
        )
        demo.signal(signal.SIGINT)
        assert demo.popen.wait(timeout=30) == 0, demo.text()
    finally:
        demo.kill()
    return demo.text()


@pytest.mark.timeout(180)
def test_demo_twice_in_a_row_shows_events_both_times() -> None:
    with short_tempdir() as tmp:
        data_dir = tmp / "demo"
        try:
            first = run_demo_until_events(data_dir)
            second = run_demo_until_events(data_dir)
        finally:
            stop_embedded_broker(data_dir)
    assert "will resume session" not in first
    # The first run's session belongs to a simulator that is gone: forgotten, not resumed.
    assert "forgot 1 session(s) of an earlier demo's simulator" in second, second
    assert "could not connect" not in second, second
    # Content reaches the handler: the demo asks for and is granted MESSAGE_CONTENT.
    assert "MESSAGE_CONTENT intent is off" not in first + second


def test_demo_leaves_no_broker_running_that_it_started() -> None:
    with short_tempdir() as tmp:
        data_dir = tmp / "demo"
        result = subprocess.run(
            [
                *(sys.executable, "-m", "ingest", "demo", "--seconds", "1", "--messages", "0"),
                *("--app", "tests.demo_app", "--data-dir", str(data_dir)),
            ],
            cwd=ROOT,
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=90,
        )
        try:
            assert result.returncode == 0, result.stdout + result.stderr
            assert not (data_dir / "broker.sock").exists()
        finally:
            stop_embedded_broker(data_dir)
