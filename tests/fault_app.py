"""A Celery app for delivery tests: its MESSAGE_CREATE handler records every run in Redis.

Run as ``celery -A tests.fault_app worker``; the gateway loads it via INGEST_CELERY_APP so it
publishes what this app handles. FAULT_RECORD_URL names the Redis that keeps the record (not
the broker under test, which a test may stop). A message whose content starts with "slow"
makes the handler note its pid and sleep, so a test can kill it mid-task.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from ingest.handlers import current_event, event_handler, queues_for
from ingest.models import MessageCreate

app = Celery("fault_app")
app.config_from_object("celeryconfig")
on = event_handler(app)

_clients: dict[int, redis.Redis] = {}


def record_store() -> redis.Redis:
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(os.environ["FAULT_RECORD_URL"])
    return _clients[pid]


@on("MESSAGE_CREATE")
def record_message(message: MessageCreate) -> None:
    store = record_store()
    # Each test run writes under its own prefix, so runs side by side never mix records.
    prefix = os.environ.get("FAULT_RECORD_PREFIX", "")
    context = current_event()
    if message.content.startswith("slow"):
        store.rpush(f"{prefix}slow:pids", os.getpid())
        store.incr(f"{prefix}slow:attempts:{message.id}")
        time.sleep(float(os.environ.get("FAULT_SLOW_SECONDS", "5")))
    pipe = store.pipeline(transaction=False)
    pipe.incr(f"{prefix}runs:{message.id}")
    pipe.sadd(f"{prefix}handled", message.id)
    pipe.sadd(f"{prefix}shards", str(context.shard_id))
    pipe.execute()


app.conf.task_queues = queues_for(app)
