"""The one routing table: an event name maps to its model, Celery task name and queue.

Nothing else in the project spells ``discord.<EVENT>``; ask this module.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Final

from ingest.models import DiscordModel, model_for

TASK_PREFIX: Final = "discord."
DEAD_LETTER_TASK: Final = "discord.invalid"
DEAD_LETTER_QUEUE: Final = "discord.invalid"
# Between an event's task name and a handler's ``module.qualname`` in the handler's task name.
HANDLER_SEPARATOR: Final = ":"
# The fast lane: latency-sensitive events share this queue, which only the Procfile's
# ``interactions`` workers consume, so no backlog of other events delays them.
FAST_QUEUE: Final = "discord.fast"
FAST_EVENTS_ENV: Final = "INGEST_FAST_EVENTS"
DEFAULT_FAST_EVENTS: Final = "INTERACTION_CREATE"


@dataclass(frozen=True, slots=True)
class Route:
    event: str
    task_name: str
    queue: str
    model: type[DiscordModel]


@functools.cache
def route_for(event: str) -> Route:
    """The route of dispatch ``event``; unknown event names get the generic model."""
    name = f"{TASK_PREFIX}{event}"
    queue = FAST_QUEUE if event in fast_events() else name
    return Route(event=event, task_name=name, queue=queue, model=model_for(event))


@functools.cache
def fast_events() -> frozenset[str]:
    """``INGEST_FAST_EVENTS`` (comma-separated; default INTERACTION_CREATE; ``-`` for none).

    Gateway and workers must agree: set it once for the whole app (Heroku config vars are).
    """
    raw = os.environ.get(FAST_EVENTS_ENV, DEFAULT_FAST_EVENTS).strip()
    return frozenset(name.strip() for name in raw.split(",") if name.strip() not in ("", "-"))


def handler_task_name(event: str, handler: str) -> str:
    """The task of one handler of ``event``: ``discord.MESSAGE_CREATE:tasks.greetings.greet``.

    ``handler`` is the function's ``module.qualname``, so Flower, ``celery inspect`` and the
    worker's logs name the handler that ran, failed or retried.
    """
    return f"{route_for(event).task_name}{HANDLER_SEPARATOR}{handler}"


def event_of_task(task_name: str) -> str | None:
    """``discord.MESSAGE_CREATE`` (or one of its handlers' tasks) -> ``MESSAGE_CREATE``.

    None for other tasks.
    """
    if task_name.startswith(TASK_PREFIX) and task_name != DEAD_LETTER_TASK:
        event = task_name[len(TASK_PREFIX) :].partition(HANDLER_SEPARATOR)[0]
        return event if event.isupper() or "_" in event else None
    return None
