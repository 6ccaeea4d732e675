"""The end-to-end bench's Celery app (``celery -A bench.e2e_app worker``).

MESSAGE_CREATE and INTERACTION_CREATE handlers note receipt -> start in Redis (BENCH_URL,
BENCH_PREFIX) when the message content or command name says "rec"; a message saying "slow"
sleeps BENCH_SLOW_SECONDS (a handler calling a slow service); any other does nothing, so the
drain phase compares our dispatcher with ``bench.bare``: what a bot author would write without
us, a stock Celery task that validates the same payload into the same model.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery
from kombu import Queue

from ingest.handlers import current_event, event_handler, queues_for
from ingest.models import Interaction, MessageCreate

app = Celery("bench_e2e")
app.config_from_object("celeryconfig")
on = event_handler(app)
BARE_QUEUE = "bench.bare"

_clients: dict[int, redis.Redis] = {}


def _store() -> redis.Redis:
    pid = os.getpid()  # one client per process: a prefork child must not share a socket
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(os.environ["BENCH_URL"])
    return _clients[pid]


def _note(kind: str) -> None:
    started = time.time()
    received_at = current_event().received_at
    _store().rpush(f"{os.environ.get('BENCH_PREFIX', '')}{kind}", f"{received_at} {started}")


@on("MESSAGE_CREATE")
def message(message: MessageCreate) -> None:
    content = message.content or ""
    if content.startswith("rec"):
        _note("messages")
    elif content.startswith("slow"):
        time.sleep(float(os.environ.get("BENCH_SLOW_SECONDS", "0.5")))


@on("INTERACTION_CREATE")
def interaction(interaction: Interaction) -> None:
    _note("interactions")


@app.task(name="bench.bare", shared=False, ignore_result=True, pydantic=True)
def bare(message: MessageCreate) -> None:
    """The same payload and model as a stock task, with no dispatcher: the baseline."""


app.conf.task_queues = [*queues_for(app), Queue(BARE_QUEUE)]
app.conf.task_routes = [{"bench.bare": {"queue": BARE_QUEUE}}, *app.conf.task_routes]
