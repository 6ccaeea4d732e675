"""One benchmark run: each pipeline against each broker, measured the same way.

Per pipeline: start a fresh simulator and the client (``python -m ingest``, or the naive
client), wait for READY, then three phases, each from the simulator's first write of the phase:

1. latency: ``rate`` MESSAGE_CREATE/s for ``latency_seconds``; every frame's send time is
   recorded by the simulator, every task message is stamped when a consumer can pop it; the
   payload's nonce matches the two. p50/p99 of (visible in broker - sent by simulator).
2. throughput: ``events`` MESSAGE_CREATEs written at once; events/s = events / (last task
   message counted in the queue - first frame written). No consumer runs.
3. burst: ``burst`` GUILD_CREATEs of ``burst_kb`` at once; seconds until all are in the queue.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import Child, clean_env, wait_for
from bench.watch import AmqpWatch, QueueWatch, RedisWatch
from ingest.testing.processes import free_port

MESSAGE_QUEUE = "discord.MESSAGE_CREATE"
GUILD_QUEUE = "discord.GUILD_CREATE"
QUEUES = [MESSAGE_QUEUE, GUILD_QUEUE, "discord.invalid"]

TARGETS = {
    "redis_events_per_s": 20_000,
    "ratio_vs_naive": 15.0,
    "p99_ms_at_rate": 10.0,
    "rabbitmq_events_per_s": 5_000,
    "burst_seconds": 5.0,
}


@dataclass
class Options:
    events: int = 50_000
    rate: float = 2_000.0
    latency_seconds: float = 5.0
    burst: int = 2_500
    burst_kb: float = 50.0
    brokers: tuple[str, ...] = ("redis", "rabbitmq", "embedded")
    burst_brokers: tuple[str, ...] = ("redis", "rabbitmq", "embedded")
    naive: bool = True
    redis_url: str = "redis://127.0.0.1:6379/14"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    ingest_env: dict[str, str] = field(default_factory=dict)
    profile: Path | None = None
    profile_rate: int = 200
    log_dir: Path | None = None
    timeout_floor: float = 60.0
    warmup: int = 1_000
    naive_short_argsrepr: bool = False


@dataclass
class Row:
    pipeline: str
    broker: str
    events: int
    delivered: int = 0
    seconds: float | None = None
    events_per_s: float | None = None
    latency_events: int = 0
    latency_delivered: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    gateway_p50_ms: float | None = None  # the gateway's own receipt->accepted metric
    gateway_p99_ms: float | None = None
    peak_rss_mb: float | None = None
    cpu_seconds: float | None = None
    cpu_us_per_event: float | None = None
    # The 1-minute load average of the machine around the row: the benchmark shares two cores
    # with whatever else runs, and a busy machine explains a slow row.
    load_before: float | None = None
    load_after: float | None = None
    error: str | None = None


@dataclass
class Burst:
    broker: str
    payloads: int
    payload_kb: float
    wire_mb: float = 0.0
    delivered: int = 0
    seconds: float | None = None
    payloads_per_s: float | None = None
    peak_rss_mb: float | None = None
    cpu_seconds: float | None = None
    error: str | None = None


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- the simulator ----------------------------------------------------------------------------


class Sim:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.child = Child(
            "simulator", ["-m", "bench.fastsim", "--port", str(self.port)], clean_env(), log_dir
        )
        self.url = f"ws://127.0.0.1:{self.port}"
        wait_for(self._answers, 20, "the simulator to listen", self.child)

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data)
        with urllib.request.urlopen(req, timeout=30) as response:
            return json.loads(response.read())

    def _answers(self) -> bool:
        try:
            self._request("/_sim/state")
        except OSError:
            return False
        return True

    def ready(self) -> bool:
        return bool(self._request("/_sim/state")["ready_shards"])

    def blast(self, event: str, count: int, rate: float | None = None, **extra: Any) -> None:
        self._request("/_sim/blast", {"event": event, "count": count, "rate": rate, **extra})

    def blast_state(self) -> dict[str, Any]:
        state: dict[str, Any] = self._request("/_sim/blast_state", {})["blast"]
        if state.get("error"):
            raise RuntimeError(f"simulator blast failed: {state['error']}")
        return state

    def blast_times(self) -> tuple[int, list[float]]:
        answer = self._request("/_sim/blast_times", {})
        return int(answer["first_index"]), list(answer["send_times"])

    def stop(self) -> None:
        self.child.stop()


# -- phases -----------------------------------------------------------------------------------


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def measure_latency(sim: Sim, watch: QueueWatch, client: Child, row: Row, opts: Options) -> None:
    count = max(1, int(opts.rate * opts.latency_seconds))
    row.latency_events = count
    watch.clear([MESSAGE_QUEUE])
    result: list[list[tuple[float, int]]] = []
    failure: list[BaseException] = []
    started = threading.Event()
    timeout = opts.latency_seconds + opts.timeout_floor

    def collect() -> None:
        try:
            result.append(watch.collect(MESSAGE_QUEUE, count, timeout, started))
        except Exception as exc:  # noqa: BLE001 - reported below, in the caller's thread
            failure.append(exc)
            started.set()

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    started.wait(10)
    sim.blast("MESSAGE_CREATE", count, opts.rate)
    collector.join(timeout + 10)
    if failure:
        raise RuntimeError(f"latency consumer failed: {failure[0]!r}")
    if not client.alive():
        raise RuntimeError(f"{client.name} exited:\n{client.tail()}")
    wait_for(lambda: sim.blast_state()["done"], 30, "the simulator to finish the latency blast")
    first_index, send_times = sim.blast_times()
    arrivals = result[0] if result else []
    row.latency_delivered = len(arrivals)
    latencies = sorted(
        (at - send_times[index - first_index]) * 1000
        for at, index in arrivals
        if 0 <= index - first_index < len(send_times)
    )
    if len(arrivals) < count:
        raise RuntimeError(f"latency phase: only {len(arrivals)} of {count} reached the broker")
    if latencies:
        row.p50_ms = round(_percentile(latencies, 0.50), 3)
        row.p99_ms = round(_percentile(latencies, 0.99), 3)
        row.max_ms = round(latencies[-1], 3)


def measure_drain(
    sim: Sim,
    watch: QueueWatch,
    client: Child,
    queue: str,
    count: int,
    timeout: float,
    **blast: Any,
) -> tuple[int, float | None, float]:
    """Blast ``count`` frames at once; (delivered, seconds from first frame, client CPU s)."""
    watch.clear([queue])
    cpu_before = client.cpu_seconds()
    sim.blast(blast.pop("event"), count, None, **blast)
    deadline = time.monotonic() + timeout
    delivered = 0
    last_at: float | None = None
    while time.monotonic() < deadline:
        delivered = watch.depth(queue)
        if delivered >= count:
            last_at = time.monotonic()
            break
        if not client.alive():
            raise RuntimeError(f"{client.name} exited:\n{client.tail()}")
        time.sleep(0.002)
    cpu = client.cpu_seconds() - cpu_before
    wait_for(lambda: sim.blast_state()["done"], 30, "the simulator to finish the blast")
    started_at = sim.blast_state()["started_at"]
    seconds = None if last_at is None or started_at is None else last_at - started_at
    return delivered, seconds, cpu


def _scrape_gateway_latency(port: int) -> tuple[float | None, float | None]:
    """The gateway's own receipt->accepted quantiles over its last 10,000 events."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None, None
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("discord_ingest_publish_latency_recent_seconds{"):
            q = line.split('quantile="', 1)[1].split('"', 1)[0]
            found[q] = float(line.rsplit(" ", 1)[1]) * 1000
    return found.get("0.5"), found.get("0.99")


# -- one pipeline -----------------------------------------------------------------------------


class Profiler:
    """py-spy attached to the gateway for the throughput and burst phases (raw stacks)."""

    def __init__(self, pid: int, out: Path, rate: int) -> None:
        exe = Path(sys.executable).with_name("py-spy")
        if not exe.exists():
            found = shutil.which("py-spy")
            if found is None:
                raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
            exe = Path(found)
        self.out = out
        self.popen = subprocess.Popen(
            [
                str(exe),
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--output",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # attach before the phase starts

    def stop(self) -> None:
        self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()


def run_pipeline(
    pipeline: str, broker: str, opts: Options, log_dir: Path
) -> tuple[Row, Burst | None]:
    row = Row(pipeline=pipeline, broker=broker, events=opts.events)
    row.load_before = round(os.getloadavg()[0], 2)
    burst: Burst | None = None
    data_dir: Path | None = None
    watch: QueueWatch | None = None
    sim: Sim | None = None
    client: Child | None = None
    metrics_port: int | None = None
    try:
        sim = Sim(log_dir)
        env = clean_env(
            DISCORD_TOKEN="sim-token",
            DISCORD_GATEWAY_URL=sim.url,
            DISCORD_API_URL=f"http://127.0.0.1:{sim.port}/api/v10",
            INGEST_LOG_LEVEL="WARNING",
            # Published whatever handlers tasks/ holds: the benchmark measures the gateway.
            DISCORD_EVENTS="MESSAGE_CREATE,GUILD_CREATE",
        )
        if broker == "redis":
            redis_watch = RedisWatch(opts.redis_url)
            redis_watch.flush()  # the benchmark's own db: queues, sessions, identify slots
            watch = redis_watch
            env["CELERY_BROKER_URL"] = opts.redis_url
        elif broker == "rabbitmq":
            watch = AmqpWatch(opts.amqp_url)
            env["CELERY_BROKER_URL"] = opts.amqp_url
        elif broker != "embedded":
            raise ValueError(f"unknown broker {broker!r}")
        # Always a fresh data dir: without Redis the session store is a file in it, and a
        # session left by an earlier run would make the gateway resume to a dead simulator.
        # A short path: the embedded broker's unix socket must fit in 107 bytes.
        data_dir = Path(tempfile.mkdtemp(prefix="di-b-", dir="/tmp"))
        env["INGEST_DATA_DIR"] = str(data_dir)
        if pipeline == "ours":
            metrics_port = free_port()
            env["INGEST_METRICS_PORT"] = str(metrics_port)
            env.update(opts.ingest_env)
            client = Child(f"ingest-{broker}", ["-m", "ingest"], env, log_dir)
        else:
            naive_args = ["--gateway", sim.url, "--broker", env["CELERY_BROKER_URL"]]
            if opts.naive_short_argsrepr:
                naive_args.append("--short-argsrepr")
            client = Child(f"naive-{broker}", ["-m", "bench.naive", *naive_args], env, log_dir)
        wait_for(sim.ready, 60, f"{client.name} to be READY", client)
        if broker == "embedded":
            from ingest.brokers import embedded_url

            assert data_dir is not None
            watch = RedisWatch(embedded_url(data_dir))
        assert watch is not None
        if broker == "rabbitmq":
            watch.clear(QUEUES)

        # Warm-up, untimed: first-call costs (lazy imports, validator and connection setup)
        # are not what a long-running gateway pays per event.
        warmup = min(opts.warmup, opts.events)
        if warmup:
            measure_drain(sim, watch, client, MESSAGE_QUEUE, warmup, 60, event="MESSAGE_CREATE")
            watch.clear([MESSAGE_QUEUE])

        log(f"{pipeline}/{broker}: latency at {opts.rate:.0f} ev/s for {opts.latency_seconds} s")
        client.reset_peak_rss()
        measure_latency(sim, watch, client, row, opts)
        # The gateway keeps its last 10,000 latencies: with fewer events in this phase the
        # warm-up's (queued, so slow) events would be counted too.
        if metrics_port is not None and row.latency_events >= 10_000:
            row.gateway_p50_ms, row.gateway_p99_ms = _scrape_gateway_latency(metrics_port)

        log(f"{pipeline}/{broker}: throughput, {opts.events} MESSAGE_CREATE at once")
        profiler = None
        if opts.profile is not None and pipeline == "ours" and broker == opts.brokers[0]:
            profiler = Profiler(client.pid, opts.profile, opts.profile_rate)
        timeout = max(opts.timeout_floor, opts.events / 500)
        row.delivered, row.seconds, row.cpu_seconds = measure_drain(
            sim, watch, client, MESSAGE_QUEUE, opts.events, timeout, event="MESSAGE_CREATE"
        )
        if row.seconds:
            row.events_per_s = round(opts.events / row.seconds, 1)
        row.cpu_us_per_event = round(row.cpu_seconds / max(1, row.delivered) * 1e6, 1)
        row.peak_rss_mb = round(client.peak_rss_mb(), 1)
        if row.delivered < opts.events:
            row.error = f"only {row.delivered} of {opts.events} in the broker after {timeout} s"
        watch.clear([MESSAGE_QUEUE])

        if pipeline == "ours" and broker in opts.burst_brokers and opts.burst > 0:
            log(f"{pipeline}/{broker}: burst, {opts.burst} GUILD_CREATE of {opts.burst_kb} KB")
            burst = Burst(broker, opts.burst, opts.burst_kb)
            client.reset_peak_rss()
            burst_timeout = max(opts.timeout_floor, opts.burst * opts.burst_kb / 2000)
            try:
                burst.delivered, burst.seconds, burst.cpu_seconds = measure_drain(
                    sim,
                    watch,
                    client,
                    GUILD_QUEUE,
                    opts.burst,
                    burst_timeout,
                    event="GUILD_CREATE",
                    size_kb=opts.burst_kb,
                )
                burst.wire_mb = round(sim.blast_state()["wire_bytes"] / 2**20, 1)
                if burst.seconds:
                    burst.payloads_per_s = round(opts.burst / burst.seconds, 1)
                burst.peak_rss_mb = round(client.peak_rss_mb(), 1)
                if burst.delivered < opts.burst:
                    burst.error = f"only {burst.delivered} of {opts.burst} in the broker"
            except (RuntimeError, TimeoutError, OSError) as exc:
                burst.error = str(exc)[:2000]
            watch.clear([GUILD_QUEUE])
        if profiler is not None:
            profiler.stop()

        code = client.stop()
        if code not in (0, None) and row.error is None:
            row.error = f"{client.name} exited {code} on SIGTERM:\n{client.tail()}"
        row.load_after = round(os.getloadavg()[0], 2)
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        row.error = str(exc)[:2000]
        log(f"{pipeline}/{broker} failed: {row.error}")
    finally:
        if client is not None:
            client.stop()
        if sim is not None:
            sim.stop()
        if watch is not None:
            try:
                if broker == "redis":
                    assert isinstance(watch, RedisWatch)
                    watch.flush()
                elif broker == "rabbitmq":
                    watch.clear(QUEUES)
                watch.close()
            except OSError as exc:
                log(f"cleanup of {broker}: {exc!r}")
        if data_dir is not None:
            if broker == "embedded":
                from ingest.brokers import stop_embedded_broker

                stop_embedded_broker(data_dir)
            shutil.rmtree(data_dir, ignore_errors=True)
    return row, burst


# -- the whole run ----------------------------------------------------------------------------


def run(opts: Options) -> dict[str, Any]:
    log_dir = opts.log_dir or Path(tempfile.mkdtemp(prefix="di-bench-logs-", dir="/tmp"))
    log_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    bursts: list[Burst] = []
    plan = [("ours", b) for b in opts.brokers]
    if opts.naive:
        plan.insert(1 if "redis" in opts.brokers else 0, ("naive", "redis"))
    started = time.monotonic()
    for pipeline, broker in plan:
        row, burst = run_pipeline(pipeline, broker, opts, log_dir)
        rows.append(row)
        if burst is not None:
            bursts.append(burst)
    by_key = {(r.pipeline, r.broker): r for r in rows}
    ours, naive = by_key.get(("ours", "redis")), by_key.get(("naive", "redis"))
    ratio = None
    if ours and naive and ours.events_per_s and naive.events_per_s:
        ratio = round(ours.events_per_s / naive.events_per_s, 2)
    report = {
        "options": {
            "events": opts.events,
            "rate": opts.rate,
            "latency_seconds": opts.latency_seconds,
            "burst": opts.burst,
            "burst_kb": opts.burst_kb,
            "brokers": list(opts.brokers),
            "ingest_env": opts.ingest_env,
            "warmup": opts.warmup,
            "naive_short_argsrepr": opts.naive_short_argsrepr,
        },
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "results": [asdict(r) for r in rows],
        "bursts": [asdict(b) for b in bursts],
        "ratio_ours_over_naive": ratio,
        "targets": _targets(by_key, bursts, ratio),
        "wall_seconds": round(time.monotonic() - started, 1),
        "logs": str(log_dir),
    }
    if opts.log_dir is None and all(r.error is None for r in rows):
        shutil.rmtree(log_dir, ignore_errors=True)
        report["logs"] = None
    return report


def _targets(
    by_key: dict[tuple[str, str], Row], bursts: list[Burst], ratio: float | None
) -> dict[str, dict[str, Any]]:
    def check(measured: float | None, target: float, higher_is_better: bool) -> dict[str, Any]:
        ok = None
        if measured is not None:
            ok = measured >= target if higher_is_better else measured <= target
        return {"measured": measured, "target": target, "met": ok}

    redis = by_key.get(("ours", "redis"))
    rabbit = by_key.get(("ours", "rabbitmq"))
    burst = next((b for b in bursts if b.broker == "redis"), None)
    return {
        "redis_events_per_s": check(
            redis.events_per_s if redis else None, TARGETS["redis_events_per_s"], True
        ),
        "ratio_vs_naive": check(ratio, TARGETS["ratio_vs_naive"], True),
        "p99_ms_at_rate": check(redis.p99_ms if redis else None, TARGETS["p99_ms_at_rate"], False),
        "rabbitmq_events_per_s": check(
            rabbit.events_per_s if rabbit else None, TARGETS["rabbitmq_events_per_s"], True
        ),
        "burst_seconds": check(burst.seconds if burst else None, TARGETS["burst_seconds"], False),
    }


# -- output -----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    opts = report["options"]
    lines = [
        f"MESSAGE_CREATE ~0.9 KB, zlib-stream; throughput: {opts['events']} at once; "
        f"latency: {opts['rate']:.0f} ev/s for {opts['latency_seconds']} s",
        "",
        f"{'pipeline':<8} {'broker':<9} {'events':>7} {'in broker':>9} {'events/s':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'peak RSS MB':>11} {'CPU s':>6} {'CPU us/ev':>9} "
        f"{'load':>9}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['pipeline']:<8} {r['broker']:<9} {r['events']:>7} {r['delivered']:>9} "
            f"{_fmt(r['events_per_s'], ',.0f'):>9} {_fmt(r['p50_ms'], '.2f'):>7} "
            f"{_fmt(r['p99_ms'], '.2f'):>7} {_fmt(r['peak_rss_mb'], '.1f'):>11} "
            f"{_fmt(r['cpu_seconds'], '.2f'):>6} {_fmt(r['cpu_us_per_event'], '.0f'):>9} "
            f"{_fmt(r['load_before'], '.1f'):>4}-{_fmt(r['load_after'], '.1f'):<4}"
        )
    lines.append("")
    lines.append(
        f"ratio ours/naive (Redis events/s): {_fmt(report['ratio_ours_over_naive'], '.1f')}x"
    )
    gateway_rows = [r for r in report["results"] if r["gateway_p50_ms"] is not None]
    for r in gateway_rows:
        lines.append(
            f"gateway's own receipt->accepted metric, {r['broker']}: "
            f"p50 {_fmt(r['gateway_p50_ms'], '.2f')} ms, p99 {_fmt(r['gateway_p99_ms'], '.2f')} ms"
        )
    if report["bursts"]:
        lines += [
            "",
            f"{'burst':<9} {'payloads':>8} {'KB each':>7} {'wire MB':>7} "
            f"{'in broker':>9} {'seconds':>8} {'payloads/s':>10} {'peak RSS MB':>11} "
            f"{'CPU s':>6}",
        ]
        for b in report["bursts"]:
            lines.append(
                f"{b['broker']:<9} {b['payloads']:>8} {b['payload_kb']:>7.0f} "
                f"{b['wire_mb']:>7.1f} {b['delivered']:>9} {_fmt(b['seconds'], '.2f'):>8} "
                f"{_fmt(b['payloads_per_s'], ',.0f'):>10} {_fmt(b['peak_rss_mb'], '.1f'):>11} "
                f"{_fmt(b['cpu_seconds'], '.2f'):>6}"
            )
    lines += ["", "targets:"]
    for name, t in report["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(
            f"  {name:<22} {_fmt(t['measured'], ',.2f'):>10}  (target {t['target']:,})  {verdict}"
        )
    errors = [r for r in report["results"] if r["error"]] + [
        b for b in report["bursts"] if b["error"]
    ]
    for item in errors:
        lines.append(f"ERROR {item.get('pipeline', 'burst')}/{item['broker']}: {item['error']}")
    if report["logs"]:
        lines.append(f"logs: {report['logs']}")
    return "\n".join(lines)
