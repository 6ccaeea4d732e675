"""The recorder app plus a GUILD_MEMBERS_CHUNK handler, for the gateway-command tests: it keeps
each chunk under its nonce, the pattern the README shows for answering ``request_guild_members``.

Run as ``celery -A tests.apps.chunks worker``; the gateway loads it through INGEST_CELERY_APP.
"""

from __future__ import annotations

import os

from ingest.handlers import current_event, queues_for
from ingest.models import GuildMembersChunk
from tests.apps.recorder import _store, app, on

__all__ = ["app"]


@on("GUILD_MEMBERS_CHUNK")
def store_chunk(chunk: GuildMembersChunk) -> None:
    prefix = os.environ.get("RECORD_PREFIX", "")
    context = current_event()
    pipe = _store().pipeline(transaction=False)
    # The caller got the nonce from request_guild_members and reads its chunks here.
    pipe.rpush(f"{prefix}chunks:{chunk.nonce}", chunk.model_dump_json())
    pipe.sadd(f"{prefix}GUILD_MEMBERS_CHUNK:nonces", f"{chunk.nonce} {context.shard_id}")
    pipe.execute()


app.conf.task_queues = queues_for(app)
