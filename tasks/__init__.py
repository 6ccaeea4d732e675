"""The Celery app of the bot: ``celery -A tasks worker`` runs every handler in this package.

Drop a module into ``tasks/`` with ``@on("EVENT")`` functions and it is picked up: this file
imports every submodule (alphabetically: the order handlers of one event run in), then gives the
worker its queues. Any number of modules may handle the same event.
"""

import importlib
import pkgutil

from celery import Celery

from ingest.handlers import event_handler, queues_for

app = Celery("tasks")
app.config_from_object("celeryconfig")
on = event_handler(app)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

# Without -Q the worker consumes all of these: one per handled event, each handler's own queue,
# dead letters and Celery's default queue (plain @app.task); -Q discord.MESSAGE_CREATE runs one.
app.conf.task_queues = queues_for(app)
