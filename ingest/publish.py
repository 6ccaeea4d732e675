"""Publishers: put a batch of task messages on the broker and return only once it accepted all.

One implementation per broker family (Redis, RabbitMQ) plus an eager one that runs handlers
in-process. Every network step is bounded by a timeout; failure is ``BrokerUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiormq
import orjson
import redis.asyncio as aioredis
from aiormq.abc import AbstractConnection
from pamqp.commands import Basic
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ingest.brokers import REDIS_SCHEMES, data_dir_from_env, ensure_embedded_broker, redis_py_url
from ingest.errors import BrokerUnavailable, ConfigError
from ingest.messages import DISCORD_HEADERS, TaskMessage, redis_envelope

if TYPE_CHECKING:
    from celery import Celery  # type: ignore[import-untyped]

log = logging.getLogger("ingest.publisher")

DEFAULT_TIMEOUT: Final = 10.0
# How long closing a failed AMQP connection may take before we abandon it.
_CLOSE_TIMEOUT: Final = 2.0
AMQP_SCHEMES: Final = frozenset({"amqp", "amqps", "pyamqp"})
EAGER_URL: Final = "eager"
EMBEDDED_URL: Final = "embedded"


class Publisher(Protocol):
    """Where the gateway puts task messages. ``publish`` returning means every one was accepted."""

    async def connect(self) -> None: ...

    async def declare(self, queues: Iterable[str]) -> None: ...

    async def publish(self, messages: Sequence[TaskMessage]) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class RedisPublisher:
    """LPUSHes kombu's own envelope, so a stock worker on the Redis transport consumes it.

    A batch is one MULTI/EXEC with one LPUSH per queue: one round trip (per-command overhead
    in redis-py, not the network, is what limits a pipeline of single LPUSHes), and the broker
    takes all or none of it,
    which keeps the duplicates a retried batch can cause to the rare lost-reply case.
    ``extra_commands`` lets the caller add its own writes (e.g. the session checkpoint) to the
    same transaction, so they commit exactly when the batch does.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        extra_commands: Callable[[Pipeline], object] | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.extra_commands = extra_commands
        self._client: aioredis.Redis | None = None

    def __repr__(self) -> str:
        # The URL may carry a password.
        return f"RedisPublisher({_redact(self.url)!r})"

    def _connection(self) -> aioredis.Redis:
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                redis_py_url(self.url),
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                # One retry covers a pooled connection the server closed while we were idle;
                # more would only stretch the time before the caller hears of an outage.
                retry=Retry(NoBackoff(), 1),
                health_check_interval=30,
            )
        return self._client

    async def connect(self) -> None:
        if not await self.ping():
            raise BrokerUnavailable(f"Redis broker at {_redact(self.url)} does not answer")
        log.info("publishing to Redis at %s", _redact(self.url))

    async def declare(self, queues: Iterable[str]) -> None:
        # A Redis list exists once something is pushed to it; the worker declares its bindings.
        return None

    async def publish(self, messages: Sequence[TaskMessage]) -> None:
        if not messages:
            return
        by_queue: dict[str, list[bytes]] = {}
        for message in messages:
            by_queue.setdefault(message.queue, []).append(redis_envelope(message))
        pipe = self._connection().pipeline(transaction=True)
        for queue, envelopes in by_queue.items():
            # One multi-value LPUSH per queue: the worker BRPOPs from the other end, so the
            # first envelope is still the first consumed. Priority 0 lives under the plain
            # queue name in kombu's Redis transport.
            pipe.lpush(queue, *envelopes)
        if self.extra_commands is not None:
            self.extra_commands(pipe)
        try:
            async with asyncio.timeout(self.timeout):
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"Redis did not accept {len(messages)} messages: {exc!r}"
            ) from exc

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                return bool(await self._connection().ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


class AmqpPublisher:
    """Publishes with publisher confirms, a whole batch before awaiting any confirm.

    Queues are declared exactly as kombu declares a Celery queue (durable direct exchange named
    like the queue, durable queue, routing key = name, no arguments), so the worker's own
    declaration agrees with ours; ``mandatory`` turns an unroutable message into an error.
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        self._connection: AbstractConnection | None = None
        self._channel: aiormq.Channel | None = None
        self._declared: set[str] = set()

    def __repr__(self) -> str:
        return f"AmqpPublisher({_redact(self.url)!r})"

    async def _open(self) -> aiormq.Channel:
        channel, connection = self._channel, self._connection
        if (
            channel is not None
            and not channel.is_closed
            and connection is not None
            and connection.is_opened
        ):
            return channel
        await self._reset()
        self._connection = await aiormq.connect(_aiormq_url(self.url))
        # The concrete Channel: its basic_publish takes ``wait``, the abstract one does not.
        channel = await self._connection.channel(publisher_confirms=True)
        assert isinstance(channel, aiormq.Channel)
        self._channel = channel
        return channel

    async def _reset(self) -> None:
        # After any failure the channel's state is unknown: start over on the next call. The
        # old connection is closed with a real exception (aiormq's default is CancelledError,
        # which it sets on every future still pending there) and in bounded time: a dead peer
        # must not hold the publisher up.
        connection, self._connection, self._channel = self._connection, None, None
        self._declared.clear()
        if connection is None or connection.is_closed:
            return
        try:
            async with asyncio.timeout(min(self.timeout, _CLOSE_TIMEOUT)):
                await connection.close(BrokerUnavailable("AMQP publisher reset"))
        except BaseException as exc:
            if _cancelled_from_outside(exc):
                raise
            log.debug("closing a failed AMQP connection", exc_info=True)

    async def _declare(self, channel: aiormq.Channel, queues: Iterable[str]) -> None:
        for queue in queues:
            if queue in self._declared:
                continue
            await channel.exchange_declare(queue, exchange_type="direct", durable=True)
            await channel.queue_declare(queue, durable=True)
            await channel.queue_bind(queue, queue, routing_key=queue)
            self._declared.add(queue)

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._open()
        except BaseException as exc:
            if _cancelled_from_outside(exc):
                raise
            await self._reset()
            raise BrokerUnavailable(f"AMQP broker at {_redact(self.url)}: {exc!r}") from exc
        log.info("publishing to AMQP at %s", _redact(self.url))

    async def declare(self, queues: Iterable[str]) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._declare(await self._open(), queues)
        except BaseException as exc:
            if _cancelled_from_outside(exc):
                raise
            await self._reset()
            raise BrokerUnavailable(f"AMQP declare failed: {exc!r}") from exc

    async def publish(self, messages: Sequence[TaskMessage]) -> None:
        if not messages:
            return
        try:
            async with asyncio.timeout(self.timeout):
                channel = await self._open()
                await self._declare(channel, {m.queue for m in messages})
                # wait=False: don't wait for each frame to drain; the channel lock still keeps
                # the batch in order, and all confirms are awaited together below.
                confirms = await asyncio.gather(
                    *(
                        channel.basic_publish(
                            m.body,
                            exchange=m.queue,
                            routing_key=m.queue,
                            properties=Basic.Properties(
                                content_type="application/json",
                                content_encoding="utf-8",
                                headers=m.headers,
                                delivery_mode=2,
                                correlation_id=m.task_id,
                                reply_to="",
                            ),
                            mandatory=True,
                            wait=False,
                        )
                        for m in messages
                    ),
                    # Every publish runs to its end before we look: no task is left behind
                    # on a dead channel.
                    return_exceptions=True,
                )
                failed = next((c for c in confirms if isinstance(c, BaseException)), None)
                if failed is not None:
                    raise failed
        except BaseException as exc:
            # Not only AMQPError: a channel that closed under us raises aiormq's
            # ChannelInvalidStateError (a RuntimeError), a closed connection RuntimeError, and
            # a future aiormq rejected on close can raise CancelledError in a task nobody
            # cancelled. All of them mean "the broker did not take this batch".
            if _cancelled_from_outside(exc):
                raise
            await self._reset()
            raise BrokerUnavailable(
                f"AMQP did not confirm {len(messages)} messages: {exc!r}"
            ) from exc
        refused = sum(1 for confirm in confirms if not isinstance(confirm, Basic.Ack))
        if refused:
            raise BrokerUnavailable(f"AMQP refused {refused} of {len(messages)} messages")

    async def ping(self) -> bool:
        # A round trip, not only "is the channel object open": after the peer vanished the
        # connection looks open until the heartbeat notices, minutes later.
        try:
            async with asyncio.timeout(self.timeout):
                channel = await self._open()
                await channel.exchange_declare("amq.direct", exchange_type="direct", passive=True)
        except BaseException as exc:
            if _cancelled_from_outside(exc):
                raise
            await self._reset()
            return False
        return True

    async def close(self) -> None:
        await self._reset()


class EagerPublisher:
    """Runs each message's task inline through the Celery app: the eager path for tests.

    ``send_task`` ignores ``task_always_eager``, so this is how simulator -> gateway -> handler
    runs in one process. The ``discord_*`` headers reach ``task.request.headers`` just as they do
    on a worker. A handler's exception is logged and counted, as a worker would; pass
    ``propagate=True`` to have it raise out of ``publish`` instead. Handlers run synchronously on
    the caller's loop, so there is no timeout here: keep eager handlers short.
    """

    def __init__(self, app: Celery, *, propagate: bool = False) -> None:
        self.app = app
        self.propagate = propagate
        self.failed = 0
        self.unhandled = 0

    def __repr__(self) -> str:
        return f"EagerPublisher({self.app.main!r})"

    async def connect(self) -> None:
        return None

    async def declare(self, queues: Iterable[str]) -> None:
        return None

    async def publish(self, messages: Sequence[TaskMessage]) -> None:
        for message in messages:
            task = self.app.tasks.get(message.task_name)
            if task is None:
                # A broker would keep it in a queue no one reads; say so instead.
                self.unhandled += 1
                log.warning(
                    "no task %s registered; message %s dropped", message.task_name, message.task_id
                )
                continue
            args, kwargs, _embed = orjson.loads(message.body)
            metadata = {key: message.headers[key] for key in DISCORD_HEADERS}
            result = task.apply(
                args=args,
                kwargs=kwargs,
                task_id=message.task_id,
                headers=metadata,
                throw=self.propagate,
            )
            if result.failed():
                self.failed += 1
                log.error(
                    "eager task %s[%s] failed: %r",
                    message.task_name,
                    message.task_id,
                    result.result,
                )

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def publisher_for(
    url: str, app: Celery | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> Publisher:
    """The publisher for broker ``url``: by scheme, ``eager`` (needs ``app``), or ``embedded``."""
    if url in ("", EMBEDDED_URL):
        url = ensure_embedded_broker(data_dir_from_env(os.environ))
    if url == EAGER_URL:
        if app is None:
            raise ConfigError("the eager publisher needs the Celery app (tasks.app)")
        return EagerPublisher(app)
    scheme = urlsplit(url).scheme
    if scheme in REDIS_SCHEMES:
        return RedisPublisher(url, timeout=timeout)
    if scheme in AMQP_SCHEMES:
        return AmqpPublisher(url, timeout=timeout)
    raise ConfigError(
        f"unsupported broker URL scheme {scheme!r}: use redis://, rediss://, redis+socket://, "
        "amqp:// or pyamqp://"
    )


def _cancelled_from_outside(exc: BaseException) -> bool:
    """True when ``exc`` is our own task being cancelled (shutdown), which must propagate.

    aiormq rejects the futures of a closed connection with ``CancelledError`` and cancels its
    tasks; that reaches us as a ``CancelledError`` although nobody cancelled *our* task.
    """
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _aiormq_url(url: str) -> str:
    # kombu spells plain AMQP "pyamqp" and fills in guest/localhost/"/" when left out.
    parts = urlsplit(url)
    scheme = "amqps" if parts.scheme == "amqps" else "amqp"
    netloc = parts.netloc or "guest:guest@localhost:5672"
    if "@" not in netloc:
        netloc = f"guest:guest@{netloc}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


__all__ = [
    "AmqpPublisher",
    "EagerPublisher",
    "Publisher",
    "RedisPublisher",
    "publisher_for",
]
