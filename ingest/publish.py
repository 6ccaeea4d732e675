"""Publishers: put a batch of task messages on the broker and return only once it accepted all.

One implementation per broker family (Redis, RabbitMQ) plus an eager one that runs handlers
in-process. Every network step is bounded by a timeout; failure is ``BrokerUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiormq
import orjson
import pamqp.frame
import redis.asyncio as aioredis
from aiormq.abc import AbstractConnection, ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError
from pamqp import encode as pamqp_encode
from pamqp.commands import Basic
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ingest.brokers import (
    REDIS_SCHEMES,
    async_redis,
    data_dir_from_env,
    ensure_embedded_broker,
    redis_failure,
)
from ingest.errors import BrokerUnavailable, ConfigError
from ingest.logs import throttled
from ingest.messages import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    DISCORD_HEADERS,
    TaskMessage,
    amqp_header_table,
    redis_envelope,
    unique_ids,
)

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
            self._client = async_redis(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                # One retry covers a pooled connection the server closed while we were idle;
                # more would only stretch the time before the caller hears of an outage.
                retry=Retry(NoBackoff(), 1),
                health_check_interval=30,
            )
        return self._client

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._connection().ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise redis_failure(self.url, exc) from exc  # one line: TLS, maxclients, down
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
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"Redis did not accept {len(messages)} messages: {exc!r}"
            ) from exc
        # Only a failed LPUSH means the batch was not taken; an extra command that failed on
        # its own (a key of the wrong type) must not make us push the whole batch again.
        pushes, extras = results[: len(by_queue)], results[len(by_queue) :]
        failed = next((r for r in pushes if isinstance(r, Exception)), None)
        if failed is not None:
            raise BrokerUnavailable(f"Redis did not accept {len(messages)} messages: {failed!r}")
        for result in extras:
            if isinstance(result, Exception):
                throttled(log).error("a command in the publish transaction failed: %r", result)

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

    A batch is marshalled here, method + content header + body frames for every message, and
    handed to aiormq's connection writer as one write; its confirms are counted by one
    ``_BatchConfirm`` registered under each delivery tag (see ``_publish_batch``). Per message
    that is a join of pre-encoded bytes, where ``basic_publish`` costs a task, a pamqp encode
    of the 23-key header table and three socket writes.
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        self._connection: AbstractConnection | None = None
        self._channel: aiormq.Channel | None = None
        self._declared: set[str] = set()
        self._bulk = False
        self._method_frames: dict[str, bytes] = {}

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
        opened = await self._connection.channel(publisher_confirms=True)
        assert isinstance(opened, aiormq.Channel)
        self._channel = opened
        self._bulk = _supports_bulk(opened)
        self._method_frames.clear()
        return opened

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
                if self._bulk:
                    await self._publish_batch(channel, messages)
                else:
                    await self._publish_each(channel, messages)
        except BaseException as exc:
            # Not only AMQPError: a channel that closed under us raises aiormq's
            # ChannelInvalidStateError (a RuntimeError), a closed connection RuntimeError, and
            # a future aiormq rejected on close can raise CancelledError in a task nobody
            # cancelled. All of them mean "the broker did not take this batch"; only our
            # own cancellation (shutdown) propagates as itself.
            if _cancelled_from_outside(exc):
                raise
            await self._reset()
            raise BrokerUnavailable(
                f"AMQP did not confirm {len(messages)} messages: {exc!r}"
            ) from exc

    async def _publish_batch(
        self, channel: aiormq.Channel, messages: Sequence[TaskMessage]
    ) -> None:
        number = channel.number
        chunk = channel.max_content_size
        method_frames = self._method_frames
        loop = asyncio.get_running_loop()
        confirm = _BatchConfirm(loop.create_future(), len(messages))
        confirmations = channel.confirmations
        returns = channel.message_id_delivery_tag
        message_ids: list[str] = []
        parts: list[bytes] = []
        append = parts.append
        next_id = unique_ids.next_text
        async with channel.lock:
            # Delivery tags on a confirm channel count every publish from 1: ours are the next
            # len(messages), in order. aiormq's reader resolves ``confirmations[tag]`` on each
            # (multiple) ack or nack and, for a mandatory message the broker returned,
            # ``confirmations[message_id_delivery_tag[message_id]]``.
            first = channel.delivery_tag + 1
            channel.delivery_tag += len(messages)
            for tag, message in enumerate(messages, first):
                method = method_frames.get(message.queue)
                if method is None:
                    method = method_frames[message.queue] = pamqp.frame.marshal(
                        Basic.Publish(
                            exchange=message.queue, routing_key=message.queue, mandatory=True
                        ),
                        number,
                    )
                message_id = next_id()
                message_ids.append(message_id)
                returns[message_id] = tag
                confirmations[tag] = confirm  # type: ignore[assignment]
                append(method)
                append(_content_frames(message, message_id, number, chunk))
            try:
                await channel.write_queue.put(ChannelFrame(b"".join(parts), False))
            except BaseException:
                # Never reached the writer: give the tags back (the channel is reset anyway).
                channel.delivery_tag = first - 1
                _forget(channel, first, message_ids)
                raise
        closing = channel.closing
        try:
            await asyncio.wait((confirm.future, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()  # only an observer: cancelling it does not close the channel
            _forget(channel, first, message_ids)
        if not confirm.future.done():
            if not closing.cancelled() and closing.exception() is not None:
                raise closing.exception()  # type: ignore[misc]
            raise ChannelInvalidStateError(f"channel closed with {confirm.pending} unconfirmed")
        confirm.future.result()  # raises the nack or return, if any

    async def _publish_each(self, channel: aiormq.Channel, messages: Sequence[TaskMessage]) -> None:
        # The plain aiormq path, for an aiormq whose Channel lacks what the batch path uses.
        # wait=False: don't wait for each frame to drain; the channel lock still keeps the
        # batch in order, and all confirms are awaited together below.
        confirms = await asyncio.gather(
            *(
                channel.basic_publish(
                    m.body,
                    exchange=m.queue,
                    routing_key=m.queue,
                    properties=Basic.Properties(
                        content_type=CONTENT_TYPE,
                        content_encoding=CONTENT_ENCODING,
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
            # Every publish runs to its end before we look: no task is left behind on a dead
            # channel.
            return_exceptions=True,
        )
        failed = next((c for c in confirms if isinstance(c, BaseException)), None)
        if failed is not None:
            raise failed
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


class _BatchConfirm:
    """The confirmation of a whole batch, registered under each of its delivery tags.

    aiormq's channel reader treats each ``confirmations[tag]`` as an ``asyncio.Future`` and
    calls only these methods on it; one object counting acks replaces a future (and its
    callbacks) per message. ``done()`` stays False so that acks arriving after a failure
    are counted quietly instead of logged as unexpected.
    """

    __slots__ = ("future", "pending")

    def __init__(self, future: asyncio.Future[None], pending: int) -> None:
        self.future = future
        self.pending = pending

    def done(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def set_result(self, _frame: object) -> None:
        self.pending -= 1
        if self.pending <= 0 and not self.future.done():
            self.future.set_result(None)

    def set_exception(self, exc: BaseException) -> None:
        # A nack (DeliveryError) or a returned, unroutable message (PublishError).
        if not self.future.done():
            self.future.set_exception(exc)


def _supports_bulk(channel: aiormq.Channel) -> bool:
    """Whether this aiormq Channel has the state ``_publish_batch`` drives (aiormq 6-7)."""
    return (
        channel.publisher_confirms
        and isinstance(getattr(channel, "confirmations", None), dict)
        and isinstance(getattr(channel, "message_id_delivery_tag", None), dict)
        and isinstance(getattr(channel, "delivery_tag", None), int)
        and isinstance(getattr(channel, "max_content_size", None), int)
        and isinstance(getattr(channel, "write_queue", None), asyncio.Queue)
    )


def _forget(channel: aiormq.Channel, first: int, message_ids: list[str]) -> None:
    confirmations = channel.confirmations
    returns = channel.message_id_delivery_tag
    for tag, message_id in enumerate(message_ids, first):
        confirmations.pop(tag, None)
        returns.pop(message_id, None)


# Content header: class Basic (60), weight 0, then the property flags of content_type,
# content_encoding, headers, delivery_mode, correlation_id and message_id, then their values
# in that order; what pamqp writes for Celery's properties (an empty reply_to is left out).
_PROPERTY_FLAGS: Final = 0x8000 | 0x4000 | 0x2000 | 0x1000 | 0x0400 | 0x0080
_PROPERTIES_HEAD: Final = (
    struct.pack(">H", _PROPERTY_FLAGS)
    + pamqp_encode.short_string(CONTENT_TYPE)
    + pamqp_encode.short_string(CONTENT_ENCODING)
)
_DELIVERY_MODE_PERSISTENT: Final = b"\x02"
_FRAME_HEAD: Final = struct.Struct(">BHI")
_HEADER_HEAD: Final = struct.Struct(">HHQ")
_FRAME_END: Final = b"\xce"
_FRAME_HEADER: Final = 2
_FRAME_BODY: Final = 3


def _content_frames(message: TaskMessage, message_id: str, channel: int, chunk: int) -> bytes:
    """The content header and body frames of ``message`` (after its Basic.Publish frame)."""
    body = message.body
    task_id = message.task_id.encode()
    mid = message_id.encode()
    payload = b"".join(
        (
            _HEADER_HEAD.pack(60, 0, len(body)),
            _PROPERTIES_HEAD,
            amqp_header_table(message),
            _DELIVERY_MODE_PERSISTENT,
            len(task_id).to_bytes(1, "big"),
            task_id,
            len(mid).to_bytes(1, "big"),
            mid,
        )
    )
    parts = [_FRAME_HEAD.pack(_FRAME_HEADER, channel, len(payload)), payload, _FRAME_END]
    if len(body) <= chunk:
        parts += (_FRAME_HEAD.pack(_FRAME_BODY, channel, len(body)), body, _FRAME_END)
    else:
        for start in range(0, len(body), chunk):
            piece = body[start : start + chunk]
            parts += (_FRAME_HEAD.pack(_FRAME_BODY, channel, len(piece)), piece, _FRAME_END)
    return b"".join(parts)


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
        "amqp://, amqps:// or pyamqp://"
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
