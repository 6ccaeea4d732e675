"""Watching a broker queue from outside: its depth, and when each task message became visible.

Depth is what "in the broker" means for throughput (no worker runs; Redis ``LLEN``, AMQP
``queue.declare(passive)``). For latency a consumer takes messages as they arrive and stamps
each with ``time.monotonic()`` on receipt; Redis ``BRPOP`` and an AMQP consumer are both woken
by the push itself, so the stamp trails the broker's acceptance by one local round trip.
"""

from __future__ import annotations

import base64
import threading
import time
from typing import Protocol
from urllib.parse import unquote, urlsplit

import amqp
import orjson
import redis

from ingest.brokers import redis_py_url

NONCE_BASE = 10_000_000  # sample_message_create(i) carries nonce str(NONCE_BASE + i)


class QueueWatch(Protocol):
    def depth(self, queue: str) -> int: ...

    def clear(self, queues: list[str]) -> None: ...

    def collect(
        self, queue: str, count: int, timeout: float, started: threading.Event
    ) -> list[tuple[float, int]]: ...

    def close(self) -> None: ...


def _nonce_of_body(body: bytes) -> int:
    """Protocol 2 body ``[args, kwargs, embed]``; the payload is ``args[0]``."""
    args = orjson.loads(body)[0]
    return int(args[0]["nonce"]) - NONCE_BASE


class RedisWatch:
    def __init__(self, url: str) -> None:
        self.url = redis_py_url(url)
        self._client = redis.Redis.from_url(self.url, socket_timeout=10)

    def depth(self, queue: str) -> int:
        return int(self._client.llen(queue))

    def clear(self, queues: list[str]) -> None:
        if queues:
            self._client.delete(*queues)

    def flush(self) -> None:
        self._client.flushdb()

    def collect(
        self, queue: str, count: int, timeout: float, started: threading.Event
    ) -> list[tuple[float, int]]:
        """Pop ``count`` messages as they come: (receipt time, payload index) each."""
        client = redis.Redis.from_url(self.url, socket_timeout=timeout + 5)
        stamped: list[tuple[float, bytes]] = []
        deadline = time.monotonic() + timeout
        started.set()
        try:
            while len(stamped) < count and time.monotonic() < deadline:
                item = client.brpop([queue], timeout=0.5)
                now = time.monotonic()
                if item is None:
                    continue
                stamped.append((now, item[1]))
                more = client.rpop(queue, 1000)
                if more:
                    now = time.monotonic()
                    stamped.extend((now, raw) for raw in more)
        finally:
            client.close()
        # Decode after the run: kombu's envelope holds the body in base64.
        return [
            (at, _nonce_of_body(base64.b64decode(orjson.loads(raw)["body"]))) for at, raw in stamped
        ]

    def close(self) -> None:
        self._client.close()


class AmqpWatch:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._params = {
            "host": f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}",
            "userid": unquote(parts.username or "guest"),
            "password": unquote(parts.password or "guest"),
            "virtual_host": unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
        }
        self._conn = self._connect()
        self._channel = self._conn.channel()

    def _connect(self) -> amqp.Connection:
        conn = amqp.Connection(**self._params)
        conn.connect()
        return conn

    def depth(self, queue: str) -> int:
        try:
            _, count, _ = self._channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            self._channel = self._conn.channel()  # the failed passive declare closed it
            return 0
        return int(count)

    def clear(self, queues: list[str]) -> None:
        for queue in queues:
            try:
                self._channel.queue_purge(queue)
            except amqp.exceptions.NotFound:
                self._channel = self._conn.channel()

    def collect(
        self, queue: str, count: int, timeout: float, started: threading.Event
    ) -> list[tuple[float, int]]:
        conn = self._connect()
        stamped: list[tuple[float, bytes]] = []
        try:
            channel = conn.channel()
            channel.basic_qos(0, 2000, False)
            channel.basic_consume(
                queue,
                # py-amqp hands a utf-8 body over already decoded.
                callback=lambda m: stamped.append(
                    (time.monotonic(), m.body.encode() if isinstance(m.body, str) else m.body)
                ),
                no_ack=True,
            )
            deadline = time.monotonic() + timeout
            started.set()
            while len(stamped) < count and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    continue
        finally:
            conn.close()
        return [(at, _nonce_of_body(body)) for at, body in stamped[:count]]

    def close(self) -> None:
        self._conn.close()
