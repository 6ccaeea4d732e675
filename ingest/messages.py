"""Stock Celery protocol-2 task messages, built by splicing bytes instead of going through kombu.

A stock ``celery worker`` consumes what this module builds; the gateway only pays for one uuid5,
one small dict and (for Redis) one orjson dump per event, never for re-serializing ``d``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Final

import orjson

from ingest.routing import DEAD_LETTER_QUEUE, DEAD_LETTER_TASK, route_for

# Fixed forever: changing it would give a replayed event a new task id and defeat dedupe.
TASK_ID_NAMESPACE: Final = uuid.UUID("6f1d3c2e-5b8a-4c1e-9a7d-2e4b6c8d0f13")

_NAMESPACE_SHA1: Final = hashlib.sha1(TASK_ID_NAMESPACE.bytes)
_VARIANT: Final = "89ab"

# Our metadata headers. A real worker copies every message header onto ``task.request``, so
# these names become request attributes; ``ingest.handlers.current_event`` reads them.
HEADER_SHARD_ID: Final = "discord_shard_id"
HEADER_SEQUENCE: Final = "discord_sequence"
HEADER_SESSION_ID: Final = "discord_session_id"
HEADER_EVENT: Final = "discord_event"
DISCORD_HEADERS: Final = (HEADER_SHARD_ID, HEADER_SEQUENCE, HEADER_SESSION_ID, HEADER_EVENT)

CONTENT_TYPE: Final = "application/json"
CONTENT_ENCODING: Final = "utf-8"

# The tail of every event body: no kwargs and protocol 2's empty "embed" (no canvas).
_BODY_HEAD: Final = b"[["
_BODY_TAIL: Final = b'],{},{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]'
_EMBED: Final = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

# Celery's ``anon_nodename()``: what ``celery events`` and flower show as the sender.
_ORIGIN: Final = f"gen{os.getpid()}@{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """One task message, transport-neutral: the publishers wrap it for Redis or AMQP."""

    task_name: str
    queue: str
    task_id: str
    body: bytes
    headers: dict[str, Any]


def task_id_for(session_id: str, shard_id: int, sequence: int) -> str:
    """The task id of one dispatch: the same for a replay of it, so a worker can recognise it."""
    return _uuid5(f"{session_id}/{shard_id}/{sequence}")


def _uuid5(name: str) -> str:
    # ``str(uuid.uuid5(TASK_ID_NAMESPACE, name))``, computed in a third of the time (it is
    # the largest cost of building a message): hash, then set the version and variant bits.
    digest = _NAMESPACE_SHA1.copy()
    digest.update(name.encode())
    h = digest.hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


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
    }


def build_event_message(
    event: str, data_json: bytes, *, shard_id: int, sequence: int, session_id: str
) -> TaskMessage:
    """The task message for dispatch ``event`` whose ``d`` is already the JSON ``data_json``."""
    route = route_for(event)
    task_id = task_id_for(session_id, shard_id, sequence)
    # argsrepr ends up in worker logs and events; the payload itself would flood both.
    argsrepr = f"[<{event} {len(data_json)} bytes>]"
    return TaskMessage(
        task_name=route.task_name,
        queue=route.queue,
        task_id=task_id,
        body=_BODY_HEAD + data_json + _BODY_TAIL,
        headers=_headers(
            route.task_name,
            task_id,
            argsrepr,
            "{}",
            event=event,
            shard_id=shard_id,
            sequence=sequence,
            session_id=session_id,
        ),
    )


def build_dead_letter_message(
    *,
    reason: str,
    raw: bytes,
    event: str | None,
    shard_id: int,
    sequence: int | None,
    session_id: str,
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
        task_id = _uuid5(f"invalid/{session_id}/{shard_id}/{sequence}")
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


def redis_envelope(message: TaskMessage) -> bytes:
    """The JSON kombu's Redis transport LPUSHes for ``message`` (kombu 5.7, priority 0).

    Same shape as ``Channel.prepare_message`` + ``_inplace_augment_message``: the body is
    base64, and the exchange is the anonymous one, so kombu's restore of an unacked message
    routes it straight back to ``routing_key`` without needing exchange bindings.
    """
    return orjson.dumps(
        {
            "body": base64.b64encode(message.body).decode("ascii"),
            "content-encoding": CONTENT_ENCODING,
            "content-type": CONTENT_TYPE,
            "headers": message.headers,
            "properties": {
                "correlation_id": message.task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": message.queue},
                "priority": 0,
                "body_encoding": "base64",
                # kombu's redis ack emulation keys the unacked hash by this; it must be unique
                # per delivery, not per task (a replay is a second delivery).
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )
