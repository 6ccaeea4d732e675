"""The auto-defer test's Celery app: one INTERACTION_CREATE handler with ``auto_defer=True``
that answers at once, or after INTERACTION_SLOW_SECONDS (default 3 s) when the command's name
is "slow", always through ``rest_client().respond``.

Run as ``celery -A tests.apps.interactions worker`` with DISCORD_TOKEN, DISCORD_API_URL (the
simulator) and INGEST_STATE_URL set.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from ingest.handlers import event_handler, queues_for
from ingest.models import Interaction
from ingest.rest import rest_client

app = Celery("interactions")
app.config_from_object("celeryconfig")
on = event_handler(app)


@on("INTERACTION_CREATE", auto_defer=True)
def answer(interaction: Interaction) -> None:
    name = (interaction.data or {}).get("name")
    if name == "slow":
        time.sleep(float(os.environ.get("INTERACTION_SLOW_SECONDS", "3")))
    rest_client().respond(interaction, f"answer to {name}")


app.conf.task_queues = queues_for(app)
