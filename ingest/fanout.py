"""The gateway's side of handlers with a message of their own (a queue or a rate limit).

Each event message the pipeline hands over becomes the messages the app's handlers asked for
(``ingest.handlers.published_tasks``), published in the same batch: the sequence commits only
once the broker accepted every one of them, and no worker has to forward anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ingest.messages import TaskMessage, build_handler_message
from ingest.publish import EagerPublisher, Publisher
from ingest.routing import route_for


class FanoutPublisher:
    """A publisher that turns each event message into one message per task of ``targets``."""

    def __init__(
        self, publisher: Publisher, targets: Mapping[str, Sequence[tuple[str, str]]]
    ) -> None:
        self.publisher = publisher
        # Keyed by the event message's task name, which is what a TaskMessage carries.
        self._targets = {
            route_for(event).task_name: tuple(tasks) for event, tasks in targets.items()
        }
        self._queues = sorted({queue for tasks in targets.values() for _, queue in tasks})

    def __repr__(self) -> str:
        return f"FanoutPublisher({self.publisher!r})"

    async def connect(self) -> None:
        await self.publisher.connect()

    async def declare(self, queues: Iterable[str]) -> None:
        names = list(queues)
        await self.publisher.declare(names + [q for q in self._queues if q not in names])

    async def publish(self, messages: Sequence[TaskMessage]) -> None:
        out: list[TaskMessage] = []
        for message in messages:
            targets = self._targets.get(message.task_name)
            if targets is None:
                out.append(message)
                continue
            for task_name, queue in targets:
                if task_name == message.task_name and queue == message.queue:
                    out.append(message)
                else:
                    out.append(build_handler_message(message, task_name, queue))
        await self.publisher.publish(out)

    async def ping(self) -> bool:
        return await self.publisher.ping()

    async def close(self) -> None:
        await self.publisher.close()


def fan_out(publisher: Publisher, targets: Mapping[str, Sequence[tuple[str, str]]]) -> Publisher:
    """``publisher``, publishing every message ``targets`` asks for per event.

    Unchanged when every handler runs inline (one message per event), and for the eager
    publisher, whose dispatcher runs every handler of the event itself.
    """
    if isinstance(publisher, EagerPublisher | FanoutPublisher):
        return publisher
    route_only = all(
        tasks == ((route_for(event).task_name, route_for(event).queue),)
        for event, tasks in targets.items()
    )
    return publisher if route_only else FanoutPublisher(publisher, targets)
