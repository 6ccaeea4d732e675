"""What the shared REST rate limiter adds to each request: p50/p99 of admit + learn on loopback.

``python -m bench.rest_limiter [--redis redis://127.0.0.1:6379/15] [--requests 5000]``. The
route's bucket is known and never empty (the common case): admit is one script call, learn
usually none. A bare PING is printed for scale. Keys go under a fresh namespace, deleted after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import redis

from ingest.ratelimit import LimiterCore, Limits, RateLimiter, RouteKey

BUCKET = "bench-bucket"


def quantiles(samples: list[float]) -> str:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return (
        f"p50 {at(0.5):.3f} ms  p99 {at(0.99):.3f} ms  max {ordered[-1] * 1000:.3f} ms  "
        f"mean {statistics.fmean(ordered) * 1000:.3f} ms"
    )


def main() -> None:
    default = f"redis://{os.environ.get('INGEST_TEST_REDIS', '127.0.0.1:6379')}/15"
    parser = argparse.ArgumentParser(prog="python -m bench.rest_limiter")
    parser.add_argument("--redis", default=default)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis)
    namespace = uuid.uuid4().hex
    # A global limit the bench cannot reach: it measures cost, not waiting.
    core = LimiterCore("bench-token", global_limit=10**9, namespace=namespace)
    limiter = RateLimiter(client, core)
    key = RouteKey.of("POST", "/channels/{channel_id}/messages", {"channel_id": 1})
    plenty = Limits(200, BUCKET, limit=10**9, remaining=10**9 - 1, reset_after=600.0)
    limiter.learn(limiter.admit(key), plenty)  # learn the bucket, as a first request would
    for _ in range(200):  # warm connections and script cache
        limiter.learn(limiter.admit(key), plenty)

    pings, admits, totals, learned = [], [], [], 0
    for _ in range(args.requests):
        started = time.perf_counter()
        client.ping()
        pings.append(time.perf_counter() - started)

        started = time.perf_counter()
        permit = limiter.admit(key)
        admitted = time.perf_counter()
        learned += core.learn_args(permit, plenty) is not None
        limiter.learn(permit, plenty)
        finished = time.perf_counter()
        admits.append(admitted - started)
        totals.append(finished - started)

    print(f"redis {args.redis}, {args.requests} requests on one known bucket")
    print(f"PING round trip      {quantiles(pings)}")
    print(f"admit                {quantiles(admits)}")
    print(f"admit + learn        {quantiles(totals)}  (learn ran {learned} times)")
    for name in client.scan_iter(match=f"{core.prefix}*"):
        client.delete(name)


if __name__ == "__main__":
    main()
