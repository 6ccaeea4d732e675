"""The test suite's own Celery app: its handlers record every run in Redis, so tests count
distinct events (id, shard, sequence, task id, runs) instead of parsing the log lines of the
example handlers in ``tasks/``, which a bot author deletes on day one.

Run as ``celery -A tests.apps.recorder worker``; the gateway loads it through INGEST_CELERY_APP
(``tests.support.base_env`` sets it), so it publishes exactly what this app handles. RECORD_URL
names the Redis that keeps the record (not a broker a test may stop) and RECORD_PREFIX keeps one
test's record apart from every other's. A message whose content starts with "slow" notes its
pid and sleeps RECORD_SLOW_SECONDS, so a test can kill the worker mid-task.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from ingest.handlers import current_event, event_handler, queues_for
from ingest.models import GuildCreate, MessageCreate

app = Celery("recorder")
app.config_from_object("celeryconfig")
on = event_handler(app)

_clients: dict[int, redis.Redis] = {}


def _store() -> redis.Redis:
    # One client per process: a prefork child must not share its parent's socket.
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(os.environ["RECORD_URL"])
    return _clients[pid]


def record(event: str, object_id: int) -> None:
    """One run of ``event``'s handler for ``object_id``, with where the event came from.

    Keys (see ``tests.support.Record``): ``<prefix><event>:runs`` hash id -> runs, and
    ``<prefix><event>:deliveries`` set of "id shard sequence task_id", one per distinct copy.
    """
    prefix = os.environ.get("RECORD_PREFIX", "") + event
    context = current_event()
    pipe = _store().pipeline(transaction=False)
    pipe.hincrby(f"{prefix}:runs", str(object_id), 1)
    pipe.sadd(
        f"{prefix}:deliveries",
        f"{object_id} {context.shard_id} {context.sequence} {context.task_id}",
    )
    pipe.execute()


@on("MESSAGE_CREATE")
def record_message(message: MessageCreate) -> None:
    if message.content.startswith("slow"):
        prefix = os.environ.get("RECORD_PREFIX", "")
        store = _store()
        store.rpush(f"{prefix}slow:pids", os.getpid())
        store.incr(f"{prefix}slow:attempts:{message.id}")
        time.sleep(float(os.environ.get("RECORD_SLOW_SECONDS", "5")))
    record("MESSAGE_CREATE", message.id)


@on("GUILD_CREATE")
def record_guild(guild: GuildCreate) -> None:
    record("GUILD_CREATE", guild.id)


app.conf.task_queues = queues_for(app)
