"""A bot's Celery app with handlers in two modules, for tests/test_many_handlers.py.

Laid out like ``tasks/`` (``celery -A tests.handler_app worker`` runs it) but owned by the
tests, so ``tasks/`` stays the user's. Every handler records its runs in the Redis named by
HANDLER_RECORD_URL under HANDLER_RECORD_PREFIX, so a test counts distinct events per handler.
"""

import importlib
import os
import pkgutil

import redis
from celery import Celery

from ingest.handlers import event_handler, queues_for

app = Celery("handler_app")
app.config_from_object("celeryconfig")
on = event_handler(app)

_clients: dict[int, redis.Redis] = {}


def record() -> redis.Redis:
    """This process's client of the record store (a forked child builds its own)."""
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(os.environ["HANDLER_RECORD_URL"])
    return _clients[pid]


def key(name: str) -> str:
    return os.environ.get("HANDLER_RECORD_PREFIX", "") + name


@app.task(name="handler_app.notify")
def notify(message_id: int) -> None:
    """A plain Celery task (no event): handlers ``.delay()`` it onto Celery's default queue."""
    record().sadd(key("notified"), message_id)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

app.conf.task_queues = queues_for(app)
