"""A Celery app for tests of the demo and the command line: its MESSAGE_CREATE handler logs
one line per message (and answers "!hello" through the REST client), so a test can count what
reached a handler without the shipped examples in ``tasks/`` (which a user may change or
delete)."""

from __future__ import annotations

import logging

from celery import Celery

from ingest.handlers import event_handler, queues_for
from ingest.models import MessageCreate
from ingest.rest import rest_client

log = logging.getLogger("tests.demo_app")

app = Celery("demo_app")
app.config_from_object("celeryconfig")
on = event_handler(app)


@on("MESSAGE_CREATE")
def saw_message(message: MessageCreate) -> None:
    log.warning("demo app saw message %s: %r", message.id, message.content)
    # As the README's handler does: the reply goes through REST and comes back as an event.
    if message.content == "!hello" and not message.author.bot:
        rest_client().reply(message, "Hello from the demo app!")


app.conf.task_queues = queues_for(app)
