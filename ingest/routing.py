"""The one routing table: an event name maps to its model, Celery task name and queue.

Nothing else in the project spells ``discord.<EVENT>``; ask this module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

from ingest.models import DiscordModel, model_for

TASK_PREFIX: Final = "discord."
DEAD_LETTER_TASK: Final = "discord.invalid"
DEAD_LETTER_QUEUE: Final = "discord.invalid"


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
    return Route(event=event, task_name=name, queue=name, model=model_for(event))


def event_of_task(task_name: str) -> str | None:
    """``discord.MESSAGE_CREATE`` -> ``MESSAGE_CREATE``; None for other tasks."""
    if task_name.startswith(TASK_PREFIX) and task_name != DEAD_LETTER_TASK:
        event = task_name[len(TASK_PREFIX) :]
        return event if event.isupper() or "_" in event else None
    return None
