"""Memory per shard: RSS of one gateway process with 1 and with N idle shards connected.

    .venv/bin/python -m bench.shard_memory [--shards 32] [--broker-url redis://...]

Runs the bundled simulator in this process (``identify_interval`` tiny, ``max_concurrency`` =
N, so every shard identifies at once), then ``python -m ingest`` twice: once with shard 0 of
N, once with shards 0..N-1. Each run waits for "all k shards ready", lets the process idle,
samples its RSS (and USS) a few times and keeps the median. Prints the cost of each
additional shard; the target is at most 2 MB.

Sessions are kept in a temporary file store (INGEST_STATE_URL=file://...), so nothing of the
run is left in the broker but its queue declarations, and the two runs do not resume each
other's sessions.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
TARGET_MB_PER_SHARD = 2.0
MB = 1024 * 1024

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ingest.testing import SimulatorThread  # noqa: E402


def _env(
    api_url: str, shard_count: int, shard_ids: str, broker_url: str, tmp: Path
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DISCORD_", "CELERY_", "INGEST_")) and k != "REDIS_URL"
    }
    env.update(
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
        DISCORD_TOKEN="sim-token",
        DISCORD_API_URL=api_url,  # max_concurrency from /gateway/bot
        DISCORD_SHARD_COUNT=str(shard_count),
        DISCORD_SHARD_IDS=shard_ids,
        INGEST_DATA_DIR=str(tmp / "data"),
        INGEST_STATE_URL=f"file://{tmp / 'sessions'}",
        INGEST_LOG_LEVEL="INFO",
    )
    if broker_url:
        env["CELERY_BROKER_URL"] = broker_url
    return env


def measure(
    api_url: str, shard_count: int, shards: int, broker_url: str, settle: float, samples: int
) -> tuple[float, float]:
    """(RSS, USS) in bytes, medians, of a gateway running ``shards`` idle shards."""
    shard_ids = "0" if shards == 1 else f"0-{shards - 1}"
    with tempfile.TemporaryDirectory(prefix="shard-mem-") as tmp_text:
        tmp = Path(tmp_text)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ingest"],
            cwd=ROOT,
            env=_env(api_url, shard_count, shard_ids, broker_url, tmp),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip())
                if f"all {shards} shards ready" in line:
                    ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            if not ready.wait(60):
                tail = "\n".join(lines[-20:])
                raise SystemExit(f"{shards} shards were not ready in 60 s:\n{tail}")
            time.sleep(settle)
            process = psutil.Process(proc.pid)
            rss, uss = [], []
            for _ in range(samples):
                info = process.memory_full_info()
                rss.append(info.rss)
                uss.append(info.uss)
                time.sleep(0.5)
            return statistics.median(rss), statistics.median(uss)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            reader.join(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=32, help="shards of the big run")
    parser.add_argument(
        "--broker-url",
        default="redis://127.0.0.1:6379/12",
        help="CELERY_BROKER_URL for the gateway ('' for the embedded broker)",
    )
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before sampling")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument(
        "--guilds", type=int, default=0, help="GUILD_CREATEs per shard at READY (0: idle shards)"
    )
    args = parser.parse_args(argv)

    with SimulatorThread(
        shard_count=args.shards,
        max_concurrency=args.shards,
        identify_interval=0.01,
        guilds_per_shard=args.guilds,
    ) as sim:
        one_rss, one_uss = measure(sim.api_url, args.shards, 1, args.broker_url, args.settle,
                                   args.samples)  # fmt: skip
        many_rss, many_uss = measure(
            sim.api_url, args.shards, args.shards, args.broker_url, args.settle, args.samples
        )
        violations = len(sim.invalid_identifies)

    extra = args.shards - 1
    per_shard_rss = (many_rss - one_rss) / extra / MB
    per_shard_uss = (many_uss - one_uss) / extra / MB
    for shards, rss, uss in ((1, one_rss, one_uss), (args.shards, many_rss, many_uss)):
        label = f"gateway RSS with {shards} shard{'s' if shards > 1 else ''}:"
        print(f"{label:28}{rss / MB:7.1f} MB (USS {uss / MB:.1f} MB)")
    print(
        f"per additional shard:       {per_shard_rss:7.2f} MB RSS, {per_shard_uss:.2f} MB USS "
        f"(target <= {TARGET_MB_PER_SHARD:.0f} MB)"
    )
    if violations:
        print(f"warning: the simulator saw {violations} identify rate-limit violations")
    ok = per_shard_rss <= TARGET_MB_PER_SHARD
    print("within target" if ok else "OVER TARGET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
