"""4 worker processes x 8 threads share Discord's limits through Redis, against the simulator.

Run as a script, this file is one worker process: it sends the messages it is given on 8
threads once the test says "go" on stdin. The simulator's message bucket is 5 per 1 s (Discord's
5 per 5 s, five times faster, to keep the test short); the global limit is Discord's 50/s.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ingest.errors import RestError
from ingest.rest import Rest, Settings
from ingest.testing import SimulatorThread
from ingest.testing.rest_sim import RestRecord

PROCESSES = 4
THREADS = 8
GLOBAL_LIMIT = 50
# Discord allows 5 messages per 5 s in a channel; 10 per 1 s keeps the shape (a per-channel
# bucket well under the global limit) at a test's pace.
BUCKET_LIMIT = 10
BUCKET_PERIOD = 1.0
ROUTE = "POST /channels/{channel_id}/messages"


def worker_main(api_url: str, state_url: str, namespace: str, channels: list[str]) -> None:
    rest = Rest(
        Settings(token="sim-token", api_url=api_url, state_url=state_url), namespace=namespace
    )

    def send(channel: str) -> str:
        try:
            rest.send_message(channel, "load")
            return ""
        except RestError as exc:
            return str(exc)

    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    with ThreadPoolExecutor(THREADS) as pool:
        errors = [e for e in pool.map(send, channels) if e]
    print(json.dumps({"errors": errors}), flush=True)


def run_workers(
    sim: SimulatorThread, state_url: str, channels: list[str]
) -> tuple[float, list[str]]:
    """Spread ``channels`` (one entry per message) over the workers; wall time from "go"."""
    namespace = uuid.uuid4().hex
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, sim.api_url, state_url, namespace, *channels[i::PROCESSES]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        for i in range(PROCESSES)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        started = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        errors: list[str] = []
        for proc in procs:
            assert proc.stdout is not None
            errors += json.loads(proc.stdout.readline())["errors"]
        return time.monotonic() - started, errors
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def busiest_window(times: list[float], length: float) -> int:
    """The most requests in any window of ``length`` seconds (sliding)."""
    times = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= length:
            first += 1
        most = max(most, last - first + 1)
    return most


def busiest_bucket_window(times: list[float]) -> int:
    """Replays Discord's bucket: a window opens at the first request after the last one closed."""
    most, ends, used = 0, -math.inf, 0
    for at in sorted(times):
        if at >= ends:
            ends, used = at + BUCKET_PERIOD, 0
        used += 1
        most = max(most, used)
    return most


@pytest.mark.parametrize(
    ("messages", "channel_count"), [(160, 1), (400, 40)], ids=["one_channel", "forty_channels"]
)
@pytest.mark.timeout(240)
def test_four_processes_of_eight_threads_stay_within_discords_limits(
    redis_server: str, messages: int, channel_count: int, capsys: pytest.CaptureFixture[str]
) -> None:
    channels = [str(1180000000000001000 + i % channel_count) for i in range(messages)]
    with SimulatorThread(port=0) as sim:
        sim.read(
            lambda s: s.rest.configure(message_limit=BUCKET_LIMIT, message_period=BUCKET_PERIOD)
        )
        elapsed, errors = run_workers(sim, f"{redis_server}/3", channels)
        log: list[RestRecord] = sim.read(lambda s: list(s.rest.log))

    created = [r for r in log if r.status == 200]
    limited = [r for r in log if r.status == 429]
    per_second: dict[int, int] = defaultdict(int)
    for record in log:  # every arrival, rejected or not, in whole seconds from the first
        per_second[int(record.at - log[0].at)] += 1
    by_channel: dict[str, list[float]] = defaultdict(list)
    for record in created:
        by_channel[record.major].append(record.at)
    per_channel = messages // channel_count
    ideal = max(
        (math.ceil(messages / GLOBAL_LIMIT) - 1) * 1.0,
        (math.ceil(per_channel / BUCKET_LIMIT) - 1) * BUCKET_PERIOD,
    )
    with capsys.disabled():
        print(
            f"\n{messages} messages / {channel_count} channels: {elapsed:.2f} s "
            f"(ideal {ideal:.1f} s, x{elapsed / ideal:.2f}), {len(log)} requests, "
            f"{len(limited)} 429s {sorted({r.scope for r in limited})}, busiest second "
            f"{max(per_second.values())}, busiest 1-s window of created "
            f"{busiest_window([r.at for r in created], 1.0)}"
        )

    assert errors == []
    assert len(created) == messages and all(r.route == ROUTE for r in log)
    assert len(limited) <= 0.01 * len(log)
    assert max(per_second.values()) <= GLOBAL_LIMIT
    assert busiest_window([r.at for r in created], 1.0) <= GLOBAL_LIMIT
    assert max(busiest_bucket_window(times) for times in by_channel.values()) <= BUCKET_LIMIT
    assert elapsed <= 1.6 * ideal


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
