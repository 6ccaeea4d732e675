"""MESSAGE_CREATE: log one line per message; answer "!hello" through the REST client."""

import logging

from ingest.handlers import current_event
from ingest.models import MessageCreate
from ingest.rest import rest_client
from tasks import on

log = logging.getLogger(__name__)


@on("MESSAGE_CREATE")
def log_message(message: MessageCreate) -> None:
    event = current_event()
    log.info(
        "message %s in channel %s by %s (shard %s, seq %s)",
        message.id,
        message.channel_id,
        message.author.username,
        event.shard_id,
        event.sequence,
    )
    if message.author.bot:
        return  # our own reply comes back as a MESSAGE_CREATE too: never answer it
    if (message.content or "").strip() == "!hello":
        rest_client().reply(message, f"Hello, {message.author.username}!")
