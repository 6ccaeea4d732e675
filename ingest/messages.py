"""Stock Celery protocol-2 task messages, built by splicing bytes instead of going through kombu.

A stock ``celery worker`` consumes what this module builds. Per event the gateway pays for one
SHA-1 (the task id), one small object and, per broker, one join of pre-encoded pieces: every
part of the headers and properties that depends only on the event type is encoded once per
event type (``_Route``), and ``d`` is never re-serialized.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import os
import secrets
import socket
import struct
import uuid
from collections.abc import Callable
from typing import Any, Final

import orjson
from pamqp import encode as amqp_encode

from ingest.routing import DEAD_LETTER_QUEUE, DEAD_LETTER_TASK, route_for

# Fixed forever: changing it would give a replayed event a new task id and defeat dedupe.
TASK_ID_NAMESPACE: Final = uuid.UUID("6f1d3c2e-5b8a-4c1e-9a7d-2e4b6c8d0f13")

_NAMESPACE_SHA1: Final = hashlib.sha1(TASK_ID_NAMESPACE.bytes)

# Our metadata headers. A real worker copies every message header onto ``task.request``, so
# these names become request attributes; ``ingest.handlers.current_event`` reads them.
HEADER_SHARD_ID: Final = "discord_shard_id"
HEADER_SEQUENCE: Final = "discord_sequence"
HEADER_SESSION_ID: Final = "discord_session_id"
HEADER_EVENT: Final = "discord_event"
# When the gateway read the frame, in wall-clock epoch microseconds: a worker knows the event's
# age at handler start (an interaction must be answered within 3 s of it). An integer, since
# AMQP tables (pamqp) carry a Python float as 32 bits: minutes of resolution at today's epoch.
HEADER_RECEIVED_AT: Final = "discord_received_at_us"
DISCORD_HEADERS: Final = (
    HEADER_SHARD_ID,
    HEADER_SEQUENCE,
    HEADER_SESSION_ID,
    HEADER_EVENT,
    HEADER_RECEIVED_AT,
)

CONTENT_TYPE: Final = "application/json"
CONTENT_ENCODING: Final = "utf-8"

# The tail of every event body: no kwargs and protocol 2's empty "embed" (no canvas).
_BODY_HEAD: Final = b"[["
_BODY_TAIL: Final = b'],{},{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]'
_EMBED: Final = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

# Celery's ``anon_nodename()``: what ``celery events`` and flower show as the sender.
_ORIGIN: Final = f"gen{os.getpid()}@{socket.gethostname()}"


class TaskMessage:
    """One task message, transport-neutral: the publishers wrap it for Redis or AMQP.

    ``headers`` is the Celery header dict; for an event it is built only when asked for (the
    eager publisher, tests): the brokers get the pre-encoded form from ``_route``.
    """

    __slots__ = (
        "_headers",
        "_received_at",
        "_route",
        "_sequence",
        "_session_id",
        "_shard_id",
        "body",
        "queue",
        "task_id",
        "task_name",
    )

    def __init__(
        self,
        task_name: str,
        queue: str,
        task_id: str,
        body: bytes,
        headers: dict[str, Any] | None = None,
        *,
        _route: _Route | None = None,
        _shard_id: int = 0,
        _sequence: int = 0,
        _session_id: str = "",
        _received_at: int = 0,
    ) -> None:
        if headers is None and _route is None:
            raise TypeError("TaskMessage needs headers")
        self.task_name = task_name
        self.queue = queue
        self.task_id = task_id
        self.body = body
        self._headers = headers
        self._route = _route
        self._shard_id = _shard_id
        self._sequence = _sequence
        self._session_id = _session_id
        self._received_at = _received_at

    @property
    def headers(self) -> dict[str, Any]:
        headers = self._headers
        if headers is None:
            route = self._route
            assert route is not None
            headers = self._headers = _headers(
                route.task_name,
                self.task_id,
                route.argsrepr(self._data_size),
                "{}",
                event=route.event,
                shard_id=self._shard_id,
                sequence=self._sequence,
                session_id=self._session_id,
                received_at=self._received_at,
            )
        return headers

    @property
    def _data_size(self) -> int:
        return len(self.body) - _WRAP_SIZE

    def __repr__(self) -> str:
        return f"TaskMessage({self.task_name!r}, task_id={self.task_id!r}, {len(self.body)} bytes)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskMessage):
            return NotImplemented
        return (self.task_name, self.queue, self.task_id, self.body, self.headers) == (
            other.task_name,
            other.queue,
            other.task_id,
            other.body,
            other.headers,
        )

    __hash__ = None  # type: ignore[assignment]


_WRAP_SIZE: Final = len(_BODY_HEAD) + len(_BODY_TAIL)


# ------------------------------------------------------------------------------- task ids

# sha1(namespace + "<session>/<shard>/") per (session, shard): a task id then hashes only the
# sequence digits. Sessions change rarely; the bound only guards against a leak.
_ID_PREFIXES: dict[tuple[str, int, str], Any] = {}
_ID_PREFIXES_MAX: Final = 4096


def _session_key(session_id: str, epoch: str) -> str:
    # The epoch names the IDENTIFY (a server may reuse a session id and restart its
    # sequences); without one (a session persisted by an older version) the id is unchanged.
    return f"{session_id}@{epoch}" if epoch else session_id


def task_id_for(session_id: str, shard_id: int, sequence: int, epoch: str = "") -> str:
    """The task id of one dispatch: the same for a replay of it, so a worker can recognise it.

    ``str(uuid.uuid5(TASK_ID_NAMESPACE, f"{session_id}@{epoch}/{shard_id}/{sequence}"))``
    (without ``@{epoch}`` when there is none), computed in a fraction of the time.
    """
    key = (session_id, shard_id, epoch)
    prefix = _ID_PREFIXES.get(key)
    if prefix is None:
        if len(_ID_PREFIXES) >= _ID_PREFIXES_MAX:
            _ID_PREFIXES.clear()
        prefix = _NAMESPACE_SHA1.copy()
        prefix.update(f"{_session_key(session_id, epoch)}/{shard_id}/".encode())
        _ID_PREFIXES[key] = prefix
    digest = prefix.copy()
    digest.update(b"%d" % sequence)
    return _uuid5_text(digest.digest())


def _uuid5(name: str) -> str:
    digest = _NAMESPACE_SHA1.copy()
    digest.update(name.encode())
    return _uuid5_text(digest.digest())


def _uuid5_text(sha1: bytes) -> str:
    # RFC 4122 version 5: the first 16 bytes of the SHA-1, version and variant bits set.
    raw = bytearray(sha1[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# ------------------------------------------------------------------------------- headers


def _headers(
    task_name: str,
    task_id: str,
    argsrepr: str,
    kwargsrepr: str,
    *,
    event: str | None,
    shard_id: int,
    sequence: int | None,
    session_id: str,
    received_at: int | None = None,
) -> dict[str, Any]:
    # Mirrors celery 5.7 ``AMQP.as_task_v2``, key for key, so nothing in the worker sees a
    # difference from ``send_task``; results are never stored (nobody waits on an event).
    return {
        "lang": "py",
        "task": task_name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": argsrepr,
        "kwargsrepr": kwargsrepr,
        "origin": _ORIGIN,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        HEADER_SHARD_ID: shard_id,
        HEADER_SEQUENCE: sequence,
        HEADER_SESSION_ID: session_id,
        HEADER_EVENT: event,
        HEADER_RECEIVED_AT: received_at,
    }


# Placeholders: a route's constant bytes are what is left of a fully encoded message once the
# per-event values are cut out at them.
_P_TASK_ID: Final = "\x01\x01TASK_ID\x01\x01"
_P_ROOT_ID: Final = "\x01\x01ROOT_ID\x01\x01"
_P_CORRELATION_ID: Final = "\x01\x01CORRELATION_ID\x01\x01"
_P_SIZE: Final = "\x01\x01SIZE\x01\x01"
_P_SHARD: Final = "\x01\x01SHARD\x01\x01"
_P_SEQUENCE: Final = "\x01\x01SEQUENCE\x01\x01"
_P_SESSION: Final = "\x01\x01SESSION\x01\x01"
_P_RECEIVED: Final = "\x01\x01RECEIVED\x01\x01"
_P_BODY: Final = "\x01\x01BODY\x01\x01"
_P_TAG: Final = "\x01\x01TAG\x01\x01"


def _cut(encoded: bytes, *placeholders: bytes) -> list[bytes]:
    """``encoded`` split at each placeholder, which must occur once each, in this order."""
    pieces = []
    rest = encoded
    for placeholder in placeholders:
        head, found, rest = rest.partition(placeholder)
        if not found or placeholder in rest:
            raise AssertionError(f"template placeholder {placeholder!r} not found exactly once")
        pieces.append(head)
    pieces.append(rest)
    return pieces


class _Route:
    """What every message of one event type shares, encoded once."""

    __slots__ = ("_argsrepr_head", "amqp", "event", "queue", "redis", "task_name")

    def __init__(self, event: str, task_name: str | None = None, queue: str | None = None) -> None:
        route = route_for(event)
        self.event = event
        # Another task name/queue: one handler's own message (``build_handler_message``).
        self.task_name = task_name or route.task_name
        self.queue = queue or route.queue
        # argsrepr ends up in worker logs and events; the payload itself would flood both.
        self._argsrepr_head = f"[<{event} "
        self.redis = self._redis_pieces()
        self.amqp = self._amqp_pieces()

    def argsrepr(self, size: int) -> str:
        return f"{self._argsrepr_head}{size} bytes>]"

    def _placeholder_headers(self) -> dict[str, Any]:
        headers = _headers(
            self.task_name,
            _P_TASK_ID,
            f"{self._argsrepr_head}{_P_SIZE} bytes>]",
            "{}",
            event=self.event,
            shard_id=0,
            sequence=0,
            session_id="",
        )
        # JSON strings, so orjson writes them in quotes: the quotes are cut out with them.
        headers["root_id"] = _P_ROOT_ID
        headers[HEADER_SHARD_ID] = _P_SHARD
        headers[HEADER_SEQUENCE] = _P_SEQUENCE
        headers[HEADER_SESSION_ID] = _P_SESSION
        headers[HEADER_RECEIVED_AT] = _P_RECEIVED
        return headers

    def _redis_pieces(self) -> list[bytes]:
        envelope = _redis_envelope_dict(
            body=_P_BODY,
            headers=self._placeholder_headers(),
            task_id=_P_CORRELATION_ID,
            queue=self.queue,
            delivery_tag=_P_TAG,
        )
        encoded = orjson.dumps(envelope)

        def p(text: str, quoted: bool = False) -> bytes:
            raw = orjson.dumps(text)
            return raw if quoted else raw[1:-1]

        return _cut(
            encoded,
            p(_P_BODY),
            p(_P_TASK_ID),
            p(_P_ROOT_ID),
            p(_P_SIZE),
            p(_P_SHARD, quoted=True),
            p(_P_SEQUENCE, quoted=True),
            p(_P_SESSION, quoted=True),
            p(_P_RECEIVED, quoted=True),
            p(_P_CORRELATION_ID),
            p(_P_TAG),
        )

    def _amqp_pieces(self) -> list[bytes]:
        # pamqp encodes a field table sorted by key; the per-event items cut the sorted run of
        # constant items into pieces. Each placeholder item is cut out whole, type and length
        # prefix included, so only the value encoders below run per event.
        headers = self._placeholder_headers()
        encoded = amqp_encode.field_table(headers)[4:]  # without the table's length

        def item(value: str) -> bytes:
            return amqp_encode.encode_table_value(value)

        return _cut(
            encoded,
            item(headers["argsrepr"]),
            item(_P_RECEIVED),
            item(_P_SEQUENCE),
            item(_P_SESSION),
            item(_P_SHARD),
            item(_P_TASK_ID),
            item(_P_ROOT_ID),
        )


_ROUTES: dict[str, _Route] = {}


def _route(event: str) -> _Route:
    route = _ROUTES.get(event)
    if route is None:
        route = _ROUTES[event] = _Route(event)
    return route


def build_event_message(
    event: str,
    data_json: bytes,
    *,
    shard_id: int,
    sequence: int,
    session_id: str,
    epoch: str = "",
    received_at: float = 0.0,
) -> TaskMessage:
    """The task message for dispatch ``event`` whose ``d`` is already the JSON ``data_json``.

    ``received_at``: ``time.time()`` when the gateway read the frame (sent in microseconds).
    """
    route = _ROUTES.get(event) or _route(event)
    return TaskMessage(
        route.task_name,
        route.queue,
        task_id_for(session_id, shard_id, sequence, epoch),
        _BODY_HEAD + data_json + _BODY_TAIL,
        None,
        _route=route,
        _shard_id=shard_id,
        _sequence=sequence,
        _session_id=session_id,
        _received_at=int(received_at * 1_000_000),
    )


_HANDLER_ROUTES: dict[tuple[str, str, str], _Route] = {}


def handler_task_id(event_task_id: str, task_name: str) -> str:
    """The task id of one handler's own message for the event whose task id is given.

    Derived, not random: the gateway's copy, a worker's retry and a replay of the event all
    carry the same id, so dedupe recognises them.
    """
    return _uuid5(f"{event_task_id}/{task_name}")


def build_handler_message(message: TaskMessage, task_name: str, queue: str) -> TaskMessage:
    """Event ``message`` again, for one handler's own task and queue (same body and headers)."""
    route = message._route
    if route is None:
        raise TypeError("only an event's message has handler copies")
    key = (route.event, task_name, queue)
    handler_route = _HANDLER_ROUTES.get(key)
    if handler_route is None:
        handler_route = _HANDLER_ROUTES[key] = _Route(route.event, task_name, queue)
    return TaskMessage(
        task_name,
        queue,
        handler_task_id(message.task_id, task_name),
        message.body,
        None,
        _route=handler_route,
        _shard_id=message._shard_id,
        _sequence=message._sequence,
        _session_id=message._session_id,
        _received_at=message._received_at,
    )


def build_dead_letter_message(
    *,
    reason: str,
    raw: bytes,
    event: str | None,
    shard_id: int,
    sequence: int | None,
    session_id: str,
    epoch: str = "",
) -> TaskMessage:
    """A ``discord.invalid`` task keeping a payload we could not use, with why."""
    try:
        raw_text = raw.decode("utf-8")
        raw_base64: str | None = None
    except UnicodeDecodeError:
        # Binary garbage (e.g. a corrupt zlib frame): the text is for reading, base64 is exact.
        raw_text = raw.decode("utf-8", errors="replace")
        raw_base64 = base64.b64encode(raw).decode("ascii")
    kwargs = {"reason": reason, "raw": raw_text, "raw_base64": raw_base64, "event": event}
    if sequence is None:
        # Nothing identifies this payload (no sequence): a replay cannot be recognised anyway.
        task_id = str(uuid.uuid4())
    else:
        task_id = _uuid5(f"invalid/{_session_key(session_id, epoch)}/{shard_id}/{sequence}")
    return TaskMessage(
        task_name=DEAD_LETTER_TASK,
        queue=DEAD_LETTER_QUEUE,
        task_id=task_id,
        body=orjson.dumps([[], kwargs, _EMBED]),
        headers=_headers(
            DEAD_LETTER_TASK,
            task_id,
            "[]",
            f"{{'reason': {reason[:200]!r}, 'event': {event!r}, 'raw': <{len(raw)} bytes>}}",
            event=event,
            shard_id=shard_id,
            sequence=sequence,
            session_id=session_id,
        ),
    )


# ------------------------------------------------------------------------------- unique tags


class _UniqueIds:
    """Per-delivery ids: a random per-process prefix plus a counter (a uuid4 costs 10x more).

    128 random bits make a clash with another process negligible; a forked child draws a
    new prefix, so it never repeats its parent's ids.
    """

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self.prefix_text = secrets.token_hex(16) + "."
        self.prefix = self.prefix_text.encode()
        self.counter: Callable[[], int] = itertools.count(1).__next__

    def next(self) -> bytes:
        return self.prefix + b"%d" % self.counter()

    def next_text(self) -> str:
        return f"{self.prefix_text}{self.counter()}"


unique_ids: Final = _UniqueIds()


# ------------------------------------------------------------------------------- Redis


def _redis_envelope_dict(
    *, body: str, headers: dict[str, Any], task_id: str, queue: str, delivery_tag: str
) -> dict[str, Any]:
    return {
        "body": body,
        "content-encoding": CONTENT_ENCODING,
        "content-type": CONTENT_TYPE,
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            # kombu's redis ack emulation keys the unacked hash by this; it must be unique
            # per delivery, not per task (a replay is a second delivery).
            "delivery_tag": delivery_tag,
        },
    }


def _json_str(text: str) -> bytes:
    return orjson.dumps(text)


_SESSION_JSON: dict[str, bytes] = {}


def redis_envelope(message: TaskMessage) -> bytes:
    """The JSON kombu's Redis transport LPUSHes for ``message`` (kombu 5.7, priority 0).

    Same shape as ``Channel.prepare_message`` + ``_inplace_augment_message``: the body is
    base64, and the exchange is the anonymous one, so kombu's restore of an unacked message
    routes it straight back to ``routing_key`` without needing exchange bindings.
    """
    route = message._route
    if route is None:
        return orjson.dumps(
            _redis_envelope_dict(
                body=base64.b64encode(message.body).decode("ascii"),
                headers=message.headers,
                task_id=message.task_id,
                queue=message.queue,
                delivery_tag=unique_ids.next().decode(),
            )
        )
    session = message._session_id
    session_json = _SESSION_JSON.get(session)
    if session_json is None:
        if len(_SESSION_JSON) >= _ID_PREFIXES_MAX:
            _SESSION_JSON.clear()
        session_json = _SESSION_JSON[session] = _json_str(session)
    task_id = message.task_id.encode()
    p = route.redis
    return b"".join(
        (
            p[0],
            binascii.b2a_base64(message.body, newline=False),
            p[1],
            task_id,
            p[2],
            task_id,
            p[3],
            b"%d" % message._data_size,
            p[4],
            b"%d" % message._shard_id,
            p[5],
            b"%d" % message._sequence,
            p[6],
            session_json,
            p[7],
            b"%d" % message._received_at,
            p[8],
            task_id,
            p[9],
            unique_ids.next(),
            p[10],
        )
    )


# ------------------------------------------------------------------------------- AMQP

_LONGSTR: Final = struct.Struct(">I")
_TABLE_INTEGER: Final = amqp_encode.table_integer


def amqp_header_table(message: TaskMessage) -> bytes:
    """The message's headers as an AMQP field table (with its length), as pamqp encodes it."""
    route = message._route
    if route is None:
        return amqp_encode.field_table(message.headers)
    p = route.amqp
    task_id = message.task_id.encode()
    task_id_item = b"S" + _LONGSTR.pack(len(task_id)) + task_id
    argsrepr = route.argsrepr(message._data_size).encode()
    session = message._session_id.encode()
    items = b"".join(
        (
            p[0],
            b"S",
            _LONGSTR.pack(len(argsrepr)),
            argsrepr,
            p[1],
            _TABLE_INTEGER(message._received_at),
            p[2],
            _TABLE_INTEGER(message._sequence),
            p[3],
            b"S",
            _LONGSTR.pack(len(session)),
            session,
            p[4],
            _TABLE_INTEGER(message._shard_id),
            p[5],
            task_id_item,
            p[6],
            task_id_item,
            p[7],
        )
    )
    return _LONGSTR.pack(len(items)) + items
