"""A Celery app whose only handler reads the shared cache: what a bot's handler would see.

Run as ``celery -A tests.apps.cache_reader worker``. For each MESSAGE_CREATE it looks up the
message's channel, guild, author's member and the role named last in the content (``check <i>
<role id>``), and appends what it found, as JSON, to the list ``<RECORD_PREFIX>seen`` in the
Redis at RECORD_URL. The gateway publishes nothing else, so every other event reaches the
cache without a task.
"""

from __future__ import annotations

import os

import orjson
import redis
from celery import Celery

from ingest.cache import Cache
from ingest.handlers import event_handler, queues_for
from ingest.models import MessageCreate

app = Celery("cache_reader")
app.config_from_object("celeryconfig")
on = event_handler(app)

_clients: dict[int, tuple[redis.Redis, Cache]] = {}


def _clients_here() -> tuple[redis.Redis, Cache]:
    # One pair per process: a prefork child must not share its parent's sockets.
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = (redis.Redis.from_url(os.environ["RECORD_URL"]), Cache.from_env())
    return _clients[pid]


@on("MESSAGE_CREATE")
def read_cache(message: MessageCreate) -> None:
    store, cache = _clients_here()
    words = (message.content or "").split()
    guild_id = message.guild_id or 0
    channel = cache.channel(message.channel_id)
    role = cache.role(guild_id, int(words[-1])) if len(words) == 3 else None
    member = cache.member(guild_id, message.author.id)
    seen = {
        "content": message.content,
        "guild": cache.guild(guild_id) is not None,
        "channel": channel.name if channel else None,
        "role": role.name if role else None,
        "nick": member.nick if member else None,
        "member_roles": [str(r) for r in member.roles or ()] if member else None,
    }
    store.rpush(os.environ.get("RECORD_PREFIX", "") + "seen", orjson.dumps(seen))


app.conf.task_queues = queues_for(app)
