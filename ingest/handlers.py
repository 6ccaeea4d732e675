"""The author-facing Celery side: ``on(event)`` registers a handler of a Discord event.

Any number of modules may handle one event. ``discord.<EVENT>`` is a dispatcher task that runs
the event's handlers one after another, each under its own guard; each handler is also a task of
its own (``discord.<EVENT>:<module>.<function>``) for its retries and, if it asks for a queue or
a rate limit, for its own message. ``EventTask`` holds the ack/retry policy and the opt-in
worker-side dedupe; ``current_event()`` gives a running handler its shard, sequence and session.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol
from urllib.parse import urlsplit

import redis
from celery import Celery, Task, current_task  # type: ignore[import-untyped]
from celery._state import _task_stack  # type: ignore[import-untyped]
from celery.exceptions import Ignore, Retry  # type: ignore[import-untyped]
from celery.signals import celeryd_init  # type: ignore[import-untyped]
from kombu.entity import Exchange, Queue

from ingest import interactions
from ingest.ages import start_ages
from ingest.brokers import (
    REDIS_SCHEMES,
    ensure_broker_running,
    explain_worker_broker_errors,
    sync_redis,
)
from ingest.config import exit_on_bad_broker_url
from ingest.errors import ConfigError
from ingest.logs import connect_worker_logging
from ingest.messages import (
    HEADER_EVENT,
    HEADER_RECEIVED_AT,
    HEADER_SEQUENCE,
    HEADER_SESSION_ID,
    HEADER_SHARD_ID,
    handler_task_id,
)
from ingest.routing import (
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_TASK,
    event_of_task,
    handler_task_name,
    route_for,
)

log = logging.getLogger("ingest.handlers")

# app.task options Celery applies to each message, not to a function call: a handler given one
# runs from a message of its own instead of inline in the event's dispatcher task.
_PER_MESSAGE_OPTIONS: Final = frozenset(
    {"rate_limit", "time_limit", "soft_time_limit", "expires", "priority", "acks_late"}
)
# Eager mode runs retries at once; with max_retries=None this many attempts end the loop.
EAGER_RETRY_CAP: Final = 100

DEDUPE_KEY_PREFIX: Final = "ingest:dedupe:"
DEFAULT_DEDUPE_TTL: Final = 3600
_TRUE: Final = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True, slots=True)
class EventContext:
    """Where the running handler's event came from; None where the caller gave no metadata.

    ``task_id`` is the handler's own task id: derived from the event's, so it is the same for
    every delivery, retry and replay of this event to this handler (an idempotency key).
    """

    event: str | None
    shard_id: int | None
    sequence: int | None
    session_id: str | None
    task_id: str | None
    # Wall-clock epoch seconds when the gateway read the event's frame.
    received_at: float | None = None


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
    # Seconds from receipt to deferral (``@on(..., auto_defer=True)``), None: off.
    auto_defer: float | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request_stack.top
        if request is None or request.called_directly:
            # A plain function call (a unit test, one handler calling another): no message.
            return super().__call__(*args, **kwargs)
        # Run from a message (worker, eager apply, or inline by the event's dispatcher). Not
        # calling super(): Task.__call__ would push a fresh request and hide the message's
        # headers from current_event().
        dedupe = _dedupe_for(self.app)
        if dedupe is not None and not dedupe.claim(request):
            EventTask.duplicates_suppressed += 1
            log.info("duplicate suppressed: %s[%s]", self.name, request.id)
            return None
        received_at = _received_at(request)
        event = event_of_task(self.name)
        if received_at is not None and event is not None:
            age = time.time() - received_at
            start_ages.observe(event, age)
            log.debug("%s[%s] starts, age %.1f ms", self.name, request.id, age * 1000)
        try:
            if self.auto_defer is not None and args:
                result = self._run_auto_deferring(received_at, args, kwargs)
            else:
                result = self.run(*args, **kwargs)
        except Retry:
            # Its retry message is on its way and will run it (request.retries > 0 passes
            # the claim); keep the claim so a replay meanwhile does not run it a second time.
            raise
        except BaseException:
            if dedupe is not None:
                # Failed: a later copy of this event deserves its own attempt.
                dedupe.release(request.id)
            raise
        if dedupe is not None:
            # After any successful run, first attempt or retry: a replay must find it done.
            dedupe.done(request.id)
        return result

    def _run_auto_deferring(
        self, received_at: float | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        from ingest.models import Interaction
        from ingest.rest import rest_client

        assert self.auto_defer is not None
        interaction = Interaction.model_validate(args[0])
        if interaction.type in interactions.NOT_DEFERRABLE:
            return self.run(*args, **kwargs)  # a ping or an autocomplete: no deferral exists
        component = interaction.type == interactions.MESSAGE_COMPONENT
        timer = interactions.AutoDefer(
            interaction,
            self.auto_defer,
            received_at,
            lambda i: rest_client().defer(i, update=component),
        )
        with timer:
            return self.run(*args, **kwargs)


def _received_at(request: Any) -> float | None:
    headers: dict[str, Any] = request.headers or {}
    micros = headers.get(HEADER_RECEIVED_AT, getattr(request, HEADER_RECEIVED_AT, None))
    return micros / 1_000_000 if isinstance(micros, int) and micros > 0 else None


@dataclass(frozen=True, slots=True)
class Handler:
    """One registered handler of an event, in registration order."""

    event: str
    task_name: str  # its own Celery task: discord.<EVENT>:<module>.<qualname>
    queue: str  # where its own messages go (its retries, or every event if not inline)
    inline: bool  # run by the event's dispatcher; else the gateway publishes it its own message


class EventDispatcher(EventTask):
    """``discord.<EVENT>``: the one message per event that runs all its inline handlers.

    Each handler runs in registration order under its own guard, as its own task (its request,
    name and dedupe claim), so ``current_event()`` and Celery's retry machinery see the handler:
    a handler whose ``autoretry_for`` matches sends a message for its own task, and only it runs
    again. A handler that fails is logged with its name and counted; the next one still runs.
    Handlers with a queue or rate limit of their own get their own message from the gateway.
    In eager mode (or called directly) every handler runs, and the first failure is re-raised
    once all have run, so ``task_eager_propagates`` fails a test.
    """

    handler_failures: ClassVar[Counter[str]] = Counter()
    handler_retries: ClassVar[Counter[str]] = Counter()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request_stack.top
        if request is None or request.called_directly:
            return super(EventTask, self).__call__(*args, **kwargs)
        # No claim of its own: dedupe is per (event, handler), in each handler's task.
        return self.run(*args, **kwargs)

    def run_handlers(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        request = self.request
        event = event_of_task(self.name)
        failures: list[BaseException] = []
        for handler in handlers_of(self.app, event or ""):
            task = self.app.tasks[handler.task_name]
            try:
                if request.called_directly:
                    task(*args, **kwargs)
                elif request.is_eager:
                    self._run_eagerly(task, handler, request, args, kwargs)
                elif handler.inline:
                    self._run_inline(task, handler, request, args, kwargs)
            except Retry as exc:
                EventDispatcher.handler_retries[handler.task_name] += 1
                log.info("handler %s retrying (%s[%s]): %s", task.name, self.name, request.id, exc)
            except Ignore:
                pass
            except Exception as exc:
                EventDispatcher.handler_failures[handler.task_name] += 1
                log.error(
                    "handler %s failed (%s[%s]): %r",
                    task.name,
                    self.name,
                    request.id,
                    exc,
                    exc_info=exc,
                )
                failures.append(exc)
        if failures and (request.called_directly or request.is_eager):
            raise failures[0]

    def _run_eagerly(
        self,
        task: EventTask,
        handler: Handler,
        request: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        # Eager: a retry is not sent but run here at once, as Celery's apply() would (which,
        # with task_eager_propagates, raises Retry instead of retrying).
        retries = 0
        while True:
            try:
                self._run_inline(task, handler, request, args, kwargs, retries=retries)
            except Retry as exc:
                if exc.sig is None:
                    raise
                retries += 1
                # max_retries=None retries for ever on a worker (with backoff); here it would
                # spin, so an eager test stops after a bounded number and fails instead.
                if task.max_retries is None and retries >= EAGER_RETRY_CAP:
                    raise exc.exc if isinstance(exc.exc, BaseException) else exc from None
            else:
                return

    def _run_inline(
        self,
        task: EventTask,
        handler: Handler,
        request: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retries: int = 0,
    ) -> None:
        # What a worker's tracer does before calling a task, with the request the handler's
        # own message would carry: its id, its queue for a retry, the event's headers.
        delivery_info = request.delivery_info or {}
        handler_request = {
            "id": handler_task_id(request.id, task.name),
            "task": task.name,
            "root_id": request.root_id or request.id,
            "parent_id": request.id,
            "args": list(args),
            "kwargs": kwargs,
            "retries": retries,
            "is_eager": bool(request.is_eager),
            "called_directly": False,
            "headers": request.headers,
            "hostname": request.hostname,
            "origin": request.origin,
            "ignore_result": True,
            "delivery_info": {
                "exchange": "",
                "routing_key": handler.queue,
                "priority": delivery_info.get("priority"),
                "redelivered": delivery_info.get("redelivered"),
            },
        }
        _task_stack.push(task)
        task.push_request(**handler_request)
        try:
            task(*args, **kwargs)
        finally:
            task.pop_request()
            _task_stack.pop()


class On(Protocol):
    def __call__(self, event: str, **options: Any) -> Callable[[Callable[..., object]], Any]: ...


# Per app: event -> its handlers in registration order.
_registries: weakref.WeakKeyDictionary[Celery, dict[str, list[Handler]]] = (
    weakref.WeakKeyDictionary()
)
# Handler task name -> its queue, for the router (which is not told the app).
_handler_queues: dict[str, str] = {}


def event_handler(app: Celery) -> On:
    """Return ``on`` for ``app``: ``@on("MESSAGE_CREATE")`` makes a function a handler of it.

    The function becomes a task of its own, ``discord.<EVENT>:<module>.<qualname>``, which
    validates its argument with the annotated pydantic model (Celery's ``pydantic=True``) and
    uses ``EventTask``; the event's dispatcher task runs it. ``options`` go to ``app.task``
    (e.g. ``autoretry_for``, ``max_retries``, ``rate_limit``), except ``queue``: a handler with
    a queue or a rate limit is not run by the dispatcher but gets its own message per event.
    Registers the dead-letter task on ``app`` too.
    """
    _register_dead_letter(app)
    _install_router(app)
    registry = _registries.setdefault(app, {})

    def on(event: str, **options: Any) -> Callable[[Callable[..., object]], Any]:
        route = route_for(event)
        own_queue: str | None = options.pop("queue", None)
        # Checked here: a wrong budget fails at import, not at the first interaction.
        auto_defer = interactions.budget_of(options.pop("auto_defer", None))
        if auto_defer is not None:
            options["auto_defer"] = auto_defer

        def register(function: Callable[..., object]) -> Any:
            name = handler_task_name(event, f"{function.__module__}.{function.__qualname__}")
            task = app.task(
                name=name,
                base=EventTask,
                # A shared task would be added to every Celery app in the process, not only
                # this one (a test's app would grow the bot's handlers).
                shared=False,
                # Not strict: the argument is JSON, so datetimes and snowflakes arrive as strings.
                pydantic=True,
                pydantic_strict=False,
                **options,
            )(function)
            handler = Handler(
                event=event,
                task_name=name,
                queue=own_queue or route.queue,
                # Options Celery applies per message (a rate limit, time limits, expiry,
                # priority, ack mode) only hold for a handler with a message of its own.
                inline=own_queue is None and not (options.keys() & _PER_MESSAGE_OPTIONS),
            )
            _handler_queues[name] = handler.queue
            handlers = registry.get(event)
            if handlers is None:
                handlers = registry[event] = []
                app.task(name=route.task_name, base=EventDispatcher, shared=False, bind=True)(
                    _dispatch
                )
            # A module imported twice registers again: keep its first place, not a second run.
            names = [h.task_name for h in handlers]
            if name in names:
                handlers[names.index(name)] = handler
            else:
                handlers.append(handler)
            return task

        return register

    return on


def _dispatch(task: EventDispatcher, *args: Any, **kwargs: Any) -> None:
    task.run_handlers(args, kwargs)


def handlers_of(app: Celery, event: str) -> tuple[Handler, ...]:
    """The handlers of ``event`` registered on ``app``, in registration order."""
    return tuple(_registries.get(app, {}).get(event, ()))


def published_tasks(app: Celery) -> dict[str, tuple[tuple[str, str], ...]]:
    """Per handled event, the (task name, queue) of each message the gateway publishes for it.

    The dispatcher ``discord.<EVENT>`` on the event's queue when some handler runs inline,
    then one per handler that has a queue or rate limit of its own.
    """
    published: dict[str, tuple[tuple[str, str], ...]] = {}
    for event, handlers in _registries.get(app, {}).items():
        route = route_for(event)
        tasks = [(route.task_name, route.queue)] if any(h.inline for h in handlers) else []
        tasks += [(h.task_name, h.queue) for h in handlers if not h.inline]
        published[event] = tuple(tasks)
    return published


def current_event() -> EventContext:
    """The metadata of the event the running handler is processing.

    The gateway sends it as message headers (``discord_shard_id`` ...). A worker exposes custom
    headers both as ``task.request.<name>`` and in ``task.request.headers``; an eager
    ``apply(headers=...)`` only in the latter, so read the headers dict, then the attribute.
    """
    task = current_task  # a proxy: falsy when no task runs
    if not task:
        raise RuntimeError("current_event() is only meaningful inside a running handler task")
    # A handler called as a plain function (a unit test) gets its event and no metadata.
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
        received_at=_received_at(request),
    )


def subscribed_events(app: Celery) -> frozenset[str]:
    """Events with a registered handler: the gateway publishes these and drops the rest."""
    return frozenset(_registries.get(app, {}))


def queues_for(app: Celery) -> list[Queue]:
    """Every queue a worker without ``-Q`` consumes, declared as kombu would.

    One per handled event, each handler's own queue, the dead-letter queue, and Celery's
    default queue, so plain ``@app.task`` functions and a ``.delay()`` from a handler run too.
    """
    names = [route_for(event).queue for event in sorted(subscribed_events(app))]
    for handlers in _registries.get(app, {}).values():
        names += sorted({h.queue for h in handlers} - set(names))
    names += [DEAD_LETTER_QUEUE, app.conf.task_default_queue]
    unique = list(dict.fromkeys(names))
    return [
        Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]
        for name in unique
    ]


def route_event_task(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any
) -> dict[str, str] | None:
    """Celery router: an event's task, or a handler's ``delay()``, goes to its queue."""
    if name == DEAD_LETTER_TASK:
        return {"queue": DEAD_LETTER_QUEUE}
    queue = _handler_queues.get(name)
    if queue is not None:
        return {"queue": queue}
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


def _on_worker_init(conf: Any, **_: Any) -> None:
    # A worker that would fail every task must not start: say what to fix, once, and exit.
    try:
        _dedupe_settings(conf)
    except ConfigError as exc:
        print(f"discord-ingest worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # celeryconfig names the embedded broker without starting it (importing the app must not
    # spawn a server); a worker booting is the moment it is needed.
    ensure_broker_running(str(conf.broker_url or ""))
    explain_worker_broker_errors(str(conf.broker_url or ""))


celeryd_init.connect(exit_on_bad_broker_url)
celeryd_init.connect(_on_worker_init)
connect_worker_logging()  # INGEST_LOG_FORMAT=json applies to workers too


class _Dedupe:
    """Worker-side duplicate suppression by task id: ``SET key NX EX ttl`` claims an id.

    The value says how far the claim got: running, or done (after a successful run). A copy
    whose claim fails is skipped. This message coming back (a retry, or a redelivery after a
    lost worker) runs unless a previous delivery already completed it: suppressing a claim
    that is merely running would lose the event.
    """

    RUNNING: Final = b"1"
    DONE: Final = b"done"

    def __init__(self, url: str, ttl: int) -> None:
        self.ttl = ttl
        self.client = sync_redis(url, timeout=5)

    def claim(self, request: Any) -> bool:
        key = DEDUPE_KEY_PREFIX + request.id
        try:
            if request.retries or (request.delivery_info or {}).get("redelivered"):
                return bool(self.client.get(key) != self.DONE)
            claimed = self.client.set(key, self.RUNNING, nx=True, ex=self.ttl)
        except (redis.RedisError, OSError) as exc:
            # Dedupe is an optimisation; running a duplicate beats dropping an event.
            log.warning("dedupe store unavailable, running %s anyway: %r", request.id, exc)
            return True
        return bool(claimed)

    def done(self, task_id: str) -> None:
        try:
            self.client.set(DEDUPE_KEY_PREFIX + task_id, self.DONE, ex=self.ttl)
        except (redis.RedisError, OSError) as exc:
            log.warning("dedupe store unavailable, %s not marked done: %r", task_id, exc)

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
    settings = _dedupe_settings(app.conf)
    if settings is None:
        return None
    url, ttl = settings
    log.info("dedupe on: task ids remembered for %d s", ttl)
    return _Dedupe(url, ttl)


def _dedupe_settings(conf: Any) -> tuple[str, int] | None:
    """(Redis URL, TTL) when dedupe is on, None when off; ConfigError when it cannot work."""
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
    return url, ttl
