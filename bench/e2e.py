"""End to end, with the Procfile's own processes: simulator -> ``python -m ingest`` -> Redis ->
stock ``celery worker`` -> handler start, measured from the gateway's receipt stamp.

``python -m bench.e2e [--redis redis://127.0.0.1:6379/15]`` (that db is flushed). Three phases:
1. MESSAGE_CREATE at a fixed offered rate (200/s): receipt -> handler start p50/p99;
2. interactions (one every 100 ms) while a backlog of MESSAGE_CREATE whose handler takes 500 ms
   drains: receipt -> handler start with the Procfile's lane, and without it (INGEST_FAST_EVENTS
   set to none: interactions go to their own queue on the general worker, as before the lane);
3. the general worker's drain rate for our MESSAGE_CREATE dispatcher against ``bench.bare``, a
   bare Celery task of the same payload, in the same run (ours/bare must stay >= 0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import redis

from bench.procs import ROOT, Child, clean_env, wait_for
from ingest.messages import build_event_message
from ingest.publish import RedisPublisher
from ingest.testing import SimulatorThread
from ingest.testing.simulator import sample_message_create

APP = "bench.e2e_app"


def procfile_command(name: str) -> tuple[list[str], dict[str, str]]:
    """The Procfile's ``name`` line for the bench app: celery's arguments, leading env vars."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        key, _, command = line.partition(":")
        if key.strip() != name:
            continue
        words, env = shlex.split(command), {}
        while "=" in words[0]:
            var, _, value = words.pop(0).partition("=")
            env[var] = value
        assert words[:3] == ["celery", "-A", "tasks"], line
        words = ["-m", "celery", "-A", APP, *words[3:]]
        return [w.replace("@%h", f"-{uuid.uuid4().hex[:6]}@%h") for w in words], env
    raise SystemExit(f"no {name}: line in the Procfile")


def interaction_payload(i: int) -> dict[str, Any]:
    return {
        "id": str(1190000000000000000 + i),
        "application_id": "1100000000000000001",
        "type": 2,
        "token": f"bench-token-{i}",
        "version": 1,
        "data": {"id": "1", "name": "rec", "type": 1},
        "channel_id": "1180000000000000101",
    }


def message_payload(i: int, content: str) -> dict[str, Any]:
    data = sample_message_create(i)
    data["content"] = content
    return data


def summary(ages: list[float]) -> dict[str, float]:
    ordered = sorted(ages)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


class Stack:
    """Simulator, gateway and the Procfile's workers on one Redis, for one phase."""

    def __init__(self, url: str, log_dir: Path, workers: tuple[str, ...], **env: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url)
        self.prefix = f"{uuid.uuid4().hex}:"
        self.log_dir = log_dir
        self.workers = workers
        self.extra = env
        self.children: list[Child] = []

    @contextmanager
    def running(self) -> Iterator[SimulatorThread]:
        with SimulatorThread(port=0) as sim:
            env = clean_env(
                INGEST_CELERY_APP=APP,
                DISCORD_TOKEN="sim-token",
                DISCORD_GATEWAY_URL=sim.url,
                DISCORD_API_URL=sim.api_url,
                CELERY_BROKER_URL=self.url,
                BENCH_URL=self.url,
                BENCH_PREFIX=self.prefix,
                **self.extra,
            )
            try:
                for name in self.workers:
                    args, own = procfile_command(name)
                    child = Child(
                        f"{name}-{len(self.children)}", args, {**env, **own}, self.log_dir
                    )
                    self.children.append(child)
                gateway = Child("gateway", ["-m", "ingest"], env, self.log_dir)
                self.children.append(gateway)
                wait_for(lambda: "shards ready" in _read(gateway), 60, "gateway ready", gateway)
                for child in self.children[:-1]:
                    wait_for(lambda c=child: " ready." in _read(c), 60, f"{child.name} up", child)
                yield sim
            finally:
                for child in reversed(self.children):
                    child.stop(timeout=10)
                self.children.clear()

    def ages(self, kind: str) -> list[float]:
        raw = self.client.lrange(f"{self.prefix}{kind}", 0, -1)
        return [float(b) - float(a) for a, b in (item.decode().split() for item in raw)]

    def wait_count(self, kind: str, count: int, timeout: float) -> None:
        key = f"{self.prefix}{kind}"
        wait_for(lambda: self.client.llen(key) >= count, timeout, f"{count} {kind} handled")


def _read(child: Child) -> str:
    try:
        return child.log_path.read_text(errors="replace")
    except OSError:
        return ""


async def _publish(url: str, messages: Iterator[Any], batch: int = 1000) -> None:
    publisher = RedisPublisher(url)
    await publisher.connect()
    try:
        pending = []
        for message in messages:
            pending.append(message)
            if len(pending) == batch:
                await publisher.publish(pending)
                pending = []
        if pending:
            await publisher.publish(pending)
    finally:
        await publisher.close()


def backlog(url: str, count: int, content: str) -> None:
    """``count`` MESSAGE_CREATE straight into the broker, as the gateway publishes them."""
    data = orjson.dumps(message_payload(0, content))
    messages = (
        build_event_message(
            "MESSAGE_CREATE", data, shard_id=0, sequence=i, session_id="b", received_at=time.time()
        )
        for i in range(1, count + 1)
    )
    asyncio.run(_publish(url, messages))


def phase_rate(url: str, log_dir: Path, rate: float, seconds: float) -> dict[str, Any]:
    stack = Stack(url, log_dir, ("worker", "interactions"))
    count = int(rate * seconds)
    with stack.running() as sim:
        sim.emit_many("MESSAGE_CREATE", lambda i: message_payload(i, f"rec {i}"), count, rate)
        stack.wait_count("messages", count, 60)
    return {"phase": "message_create_at_rate", "rate": rate, **summary(stack.ages("messages"))}


def phase_lane(url: str, log_dir: Path, backlog_size: int, lane: bool) -> dict[str, Any]:
    redis.Redis.from_url(url).flushdb()
    backlog(url, backlog_size, "slow")
    extra = {} if lane else {"INGEST_FAST_EVENTS": "-"}
    stack = Stack(url, log_dir, ("worker", "interactions"), BENCH_SLOW_SECONDS="0.5", **extra)
    with stack.running() as sim:
        sim.emit_many("INTERACTION_CREATE", interaction_payload, 50, rate=10)
        stack.wait_count("interactions", 50, 60)
        queued = stack.client.llen("discord.MESSAGE_CREATE")
    ages = stack.ages("interactions")
    stack.client.flushdb()
    return {
        "phase": "interactions_behind_backlog" + ("" if lane else "_without_lane"),
        "backlog_left": queued,
        **summary(ages),
    }


def _drain_seconds(
    client: redis.Redis, queue: str, count: int, start: Callable[[], Child]
) -> float:
    """Time from the first message taken to the last one acked (queue and unacked both empty)."""
    child = start()
    try:
        wait_for(lambda: client.llen(queue) < count, 60, f"{queue} consumed", child)
        began = time.monotonic()
        wait_for(
            lambda: client.llen(queue) == 0 and client.hlen("unacked") == 0,
            300,
            f"{queue} drained",
            child,
        )
        return time.monotonic() - began
    finally:
        child.stop(timeout=10)


def phase_drain(url: str, log_dir: Path, count: int, rounds: int) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    args, own = procfile_command("worker")
    env = clean_env(CELERY_BROKER_URL=url, BENCH_URL=url, **own)

    def worker(queue: str) -> Callable[[], Child]:
        return lambda: Child(f"drain-{queue}", [*args, "-Q", queue], env, log_dir)

    from bench.e2e_app import app

    payload = message_payload(0, "nothing to do")
    ours, bare = float("inf"), float("inf")
    # Alternated, best of `rounds` each: other load on a shared machine comes and goes.
    for _ in range(rounds):
        backlog(url, count, "nothing to do")
        queue = "discord.MESSAGE_CREATE"
        ours = min(ours, _drain_seconds(client, queue, count, worker(queue)))
        with app.connection_for_write() as conn, conn.Producer() as producer:
            for _ in range(count):
                app.send_task("bench.bare", args=[payload], producer=producer)
        bare = min(bare, _drain_seconds(client, "bench.bare", count, worker("bench.bare")))
    return {
        "phase": "worker_drain",
        "tasks": count,
        "ours_per_s": round(count / ours),
        "bare_per_s": round(count / bare),
        "ours_over_bare": round(bare / ours, 3),
    }


def main() -> None:
    default = f"redis://{os.environ.get('INGEST_TEST_REDIS', '127.0.0.1:6379')}/15"
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__)
    parser.add_argument("--redis", default=default, help="its db is flushed")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--backlog", type=int, default=20_000)
    parser.add_argument("--drain", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2, help="drain runs of each, best kept")
    parser.add_argument(
        "--phases", default="rate,lane,nolane,drain", help="comma-separated subset to run"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["CELERY_BROKER_URL"] = args.redis  # for bench.bare's send_task
    os.environ["BENCH_URL"] = args.redis
    redis.Redis.from_url(args.redis).flushdb()
    phases: dict[str, Callable[[Path], dict[str, Any]]] = {
        "rate": lambda log_dir: phase_rate(args.redis, log_dir, args.rate, args.seconds),
        "lane": lambda log_dir: phase_lane(args.redis, log_dir, args.backlog, lane=True),
        "nolane": lambda log_dir: phase_lane(args.redis, log_dir, args.backlog, lane=False),
        "drain": lambda log_dir: phase_drain(args.redis, log_dir, args.drain, args.rounds),
    }
    chosen = [name.strip() for name in args.phases.split(",") if name.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        for phase in (phases[name] for name in chosen):
            row = phase(Path(tmp))
            text = json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items())
            print(text, flush=True)


if __name__ == "__main__":
    main()
