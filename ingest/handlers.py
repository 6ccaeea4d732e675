"""The author-facing Celery side: ``on(event)`` registers a handler as the event's Celery task.

Every handler shares ``EventTask``, which holds the ack/retry policy and the opt-in worker-side
dedupe; ``current_event()`` gives a running handler its shard, sequence and session.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol
from urllib.parse import urlsplit

import redis
from celery import Celery, Task, current_task  # type: ignore[import-untyped]
from celery.signals import celeryd_init  # type: ignore[import-untyped]
from kombu.entity import Exchange, Queue

from ingest.brokers import (
    REDIS_SCHEMES,
    ensure_broker_running,
    explain_worker_broker_errors,
    redis_py_url,
)
from ingest.errors import ConfigError
from ingest.messages import HEADER_EVENT, HEADER_SEQUENCE, HEADER_SESSION_ID, HEADER_SHARD_ID
from ingest.routing import DEAD_LETTER_QUEUE, DEAD_LETTER_TASK, event_of_task, route_for

log = logging.getLogger("ingest.handlers")

DEDUPE_KEY_PREFIX: Final = "ingest:dedupe:"
DEFAULT_DEDUPE_TTL: Final = 3600
_TRUE: Final = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True, slots=True)
class EventContext:
    """Where the running handler's event came from; None where the caller gave no metadata."""

    event: str | None
    shard_id: int | None
    sequence: int | None
    session_id: str | None
    task_id: str | None


class EventTask(Task):  # type: ignore[misc]  # celery ships no type information
    """Base of every event handler task: the delivery policy, declared once.

    ``acks_late`` + ``reject_on_worker_lost``: a message is acked only after its handler ran,
    and a worker killed mid-task hands the message back instead of losing it (at least once,
    like the rest of the pipeline). No automatic retries: an exception in a handler is usually a
    bug that a retry would repeat; a handler that calls flaky services opts in with
    ``@on(..., autoretry_for=(SomeError,))`` and gets exponential backoff with jitter.
    """

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    autoretry_for: tuple[type[BaseException], ...] = ()
    max_retries = 5
    retry_backoff = True
    retry_backoff_max = 300
    retry_jitter = True

    # Per process; a metrics exporter or a test reads it.
    duplicates_suppressed: ClassVar[int] = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request_stack.top
        if request is None or request.called_directly:
            # A plain function call (a unit test, one handler calling another): no message.
            return super().__call__(*args, **kwargs)
        # Run from a message (worker or eager apply). Not calling super(): Task.__call__ would
        # push a fresh request and hide the message's headers from current_event().
        dedupe = _dedupe_for(self.app)
        if dedupe is not None and not dedupe.claim(request):
            EventTask.duplicates_suppressed += 1
            log.info("duplicate suppressed: %s[%s]", self.name, request.id)
            return None
        try:
            return self.run(*args, **kwargs)
        except BaseException:
            if dedupe is not None:
                # Failed or retrying: a later copy of this event deserves its own attempt.
                dedupe.release(request.id)
            raise


class On(Protocol):
    def __call__(self, event: str, **options: Any) -> Callable[[Callable[..., object]], Any]: ...


def event_handler(app: Celery) -> On:
    """Return ``on`` for ``app``: ``@on("MESSAGE_CREATE")`` makes a function that event's task.

    The task is named by the routing table and routed to its queue (a ``task_routes`` router),
    validates its argument with the annotated pydantic model (Celery's ``pydantic=True``) and
    uses ``EventTask``. ``options`` go to ``app.task`` (e.g. ``autoretry_for``, ``rate_limit``).
    Registers the dead-letter task on ``app`` too.
    """
    _register_dead_letter(app)
    _install_router(app)

    def on(event: str, **options: Any) -> Callable[[Callable[..., object]], Any]:
        route = route_for(event)

        def register(handler: Callable[..., object]) -> Any:
            return app.task(
                name=route.task_name,
                base=EventTask,
                # A shared task would be added to every Celery app in the process, not only
                # this one (a test's app would grow the bot's handlers).
                shared=False,
                # Not strict: the argument is JSON, so datetimes and snowflakes arrive as strings.
                pydantic=True,
                pydantic_strict=False,
                **options,
            )(handler)

        return register

    return on


def current_event() -> EventContext:
    """The metadata of the event the running handler is processing.

    The gateway sends it as message headers (``discord_shard_id`` ...). A worker exposes custom
    headers both as ``task.request.<name>`` and in ``task.request.headers``; an eager
    ``apply(headers=...)`` only in the latter, so read the headers dict, then the attribute.
    """
    task = current_task  # a proxy: falsy when no task runs
    if not task or task.request.id is None:
        raise RuntimeError("current_event() is only meaningful inside a running handler task")
    request = task.request
    headers: dict[str, Any] = request.headers or {}

    def field(name: str) -> Any:
        return headers.get(name, getattr(request, name, None))

    return EventContext(
        event=field(HEADER_EVENT) or event_of_task(task.name),
        shard_id=field(HEADER_SHARD_ID),
        sequence=field(HEADER_SEQUENCE),
        session_id=field(HEADER_SESSION_ID),
        task_id=request.id,
    )


def subscribed_events(app: Celery) -> frozenset[str]:
    """Events with a registered handler: the gateway publishes these and drops the rest."""
    events: set[str] = set()
    for name, task in app.tasks.items():
        event = event_of_task(name)
        if event is not None and isinstance(task, EventTask):
            events.add(event)
    return frozenset(events)


def queues_for(app: Celery) -> list[Queue]:
    """One kombu queue per handled event, plus the dead-letter queue, declared as kombu would."""
    names = [route_for(event).queue for event in sorted(subscribed_events(app))]
    names.append(DEAD_LETTER_QUEUE)
    return [
        Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]
        for name in names
    ]


def route_event_task(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any
) -> dict[str, str] | None:
    """Celery router: a handler's ``delay()`` goes to its event's queue (``task_routes``)."""
    if name == DEAD_LETTER_TASK:
        return {"queue": DEAD_LETTER_QUEUE}
    event = event_of_task(name)
    return None if event is None else {"queue": route_for(event).queue}


def _install_router(app: Celery) -> None:
    # After the app's own routes, so a project can still send a handler somewhere else.
    # (A ``queue`` task attribute would do the same, but Celery 5.7 deprecates it.)
    routes = app.conf.task_routes
    if routes is None:
        routers = []
    elif isinstance(routes, list | tuple):
        routers = list(routes)
    else:
        routers = [routes]
    if route_event_task not in routers:
        app.conf.task_routes = [*routers, route_event_task]


_with_dead_letter: weakref.WeakSet[Celery] = weakref.WeakSet()


def _register_dead_letter(app: Celery) -> None:
    # Dead letters are consumed by any worker that consumes every queue (the default) and logged
    # at WARNING there. To keep them queued for inspection instead, run the workers with
    # ``-X discord.invalid``; with no worker at all they simply stay in the queue.
    # Not ``DEAD_LETTER_TASK in app.tasks``: reading app.tasks would finalize the app before
    # the handler modules are imported.
    if app in _with_dead_letter:
        return
    _with_dead_letter.add(app)

    app.task(name=DEAD_LETTER_TASK, base=EventTask, shared=False)(dead_letter)


def dead_letter(
    reason: str, raw: str, raw_base64: str | None = None, event: str | None = None
) -> None:
    """The ``discord.invalid`` task: make a payload the gateway could not use visible."""
    context = current_event()
    log.warning(
        "dead letter: %s (event %s, shard %s, seq %s, session %s): %.500s",
        reason,
        event,
        context.shard_id,
        context.sequence,
        context.session_id,
        raw,
    )


def _start_embedded_broker(conf: Any, **_: Any) -> None:
    # celeryconfig names the embedded broker without starting it (importing the app must not
    # spawn a server); a worker booting is the moment it is needed.
    ensure_broker_running(str(conf.broker_url or ""))
    explain_worker_broker_errors(str(conf.broker_url or ""))


celeryd_init.connect(_start_embedded_broker)


class _Dedupe:
    """Worker-side duplicate suppression by task id: ``SET key NX EX ttl`` claims an id.

    A copy whose claim fails is skipped, unless it is this message coming back (a retry, or
    a redelivery after a lost worker): suppressing those would lose the event.
    """

    def __init__(self, url: str, ttl: int) -> None:
        self.ttl = ttl
        self.client = redis.Redis.from_url(
            redis_py_url(url), socket_timeout=5, socket_connect_timeout=5
        )

    def claim(self, request: Any) -> bool:
        if request.retries or (request.delivery_info or {}).get("redelivered"):
            return True
        try:
            claimed = self.client.set(DEDUPE_KEY_PREFIX + request.id, 1, nx=True, ex=self.ttl)
        except (redis.RedisError, OSError) as exc:
            # Dedupe is an optimisation; running a duplicate beats dropping an event.
            log.warning("dedupe store unavailable, running %s anyway: %r", request.id, exc)
            return True
        return bool(claimed)

    def release(self, task_id: str) -> None:
        try:
            self.client.delete(DEDUPE_KEY_PREFIX + task_id)
        except (redis.RedisError, OSError) as exc:
            log.warning("dedupe store unavailable, %s stays claimed: %r", task_id, exc)


# Resolved once per app and process (a forked pool child builds its own Redis client).
_dedupes: weakref.WeakKeyDictionary[Celery, tuple[int, _Dedupe | None]] = (
    weakref.WeakKeyDictionary()
)


def _dedupe_for(app: Celery) -> _Dedupe | None:
    cached = _dedupes.get(app)
    if cached is not None and cached[0] == os.getpid():
        return cached[1]
    dedupe = _build_dedupe(app)
    _dedupes[app] = (os.getpid(), dedupe)
    return dedupe


def _build_dedupe(app: Celery) -> _Dedupe | None:
    conf = app.conf
    enabled = os.environ.get("INGEST_DEDUPE", "").lower() in _TRUE or bool(
        conf.get("ingest_dedupe")
    )
    if not enabled:
        return None
    url = os.environ.get("INGEST_DEDUPE_URL") or conf.get("ingest_dedupe_url")
    if not url:
        url = str(conf.broker_url or "")
        if urlsplit(url).scheme not in REDIS_SCHEMES:
            raise ConfigError(
                "INGEST_DEDUPE needs a Redis: the broker is not Redis, set INGEST_DEDUPE_URL"
            )
    ttl = int(
        os.environ.get("INGEST_DEDUPE_TTL") or conf.get("ingest_dedupe_ttl") or DEFAULT_DEDUPE_TTL
    )
    log.info("dedupe on: task ids remembered for %d s", ttl)
    return _Dedupe(url, ttl)
