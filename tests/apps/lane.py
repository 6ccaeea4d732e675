"""The fast-lane test's Celery app: a slow MESSAGE_CREATE handler (it calls a slow service) and
an INTERACTION_CREATE handler that notes, in Redis, when it started against the gateway's
receipt time, so a test measures receipt -> handler start behind a backlog.

Run with the Procfile's worker lines (``-A tests.apps.lane``). LANE_URL names the Redis that
keeps the record, LANE_PREFIX keeps a run's record apart, LANE_SLOW_SECONDS is the slow
handler's time (default 0.5 s).
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from ingest.handlers import current_event, event_handler, queues_for
from ingest.models import Interaction, MessageCreate

app = Celery("lane")
app.config_from_object("celeryconfig")
on = event_handler(app)

_clients: dict[int, redis.Redis] = {}


def _store() -> redis.Redis:
    # One client per process: a prefork child must not share its parent's socket.
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(os.environ["LANE_URL"])
    return _clients[pid]


@on("MESSAGE_CREATE")
def slow_message(message: MessageCreate) -> None:
    time.sleep(float(os.environ.get("LANE_SLOW_SECONDS", "0.5")))
    _store().incr(os.environ.get("LANE_PREFIX", "") + "messages")


@on("INTERACTION_CREATE")
def interaction_started(interaction: Interaction) -> None:
    started = time.time()
    received_at = current_event().received_at
    _store().hset(
        os.environ.get("LANE_PREFIX", "") + "interactions",
        str(interaction.id),
        f"{received_at} {started}",
    )


app.conf.task_queues = queues_for(app)
