"""GUILD_CREATE: count the guilds this worker process has seen join."""

import logging

from ingest.models import GuildCreate
from tasks import on

log = logging.getLogger(__name__)

# Per worker process: a real bot would keep this in its database.
joined: set[int] = set()


@on("GUILD_CREATE")
def count_guild(guild: GuildCreate) -> None:
    if guild.unavailable:
        return  # an outage notice, not a join; the full guild follows when it is back
    joined.add(guild.id)
    log.info("guild %s joined (%s), %d guilds so far", guild.id, guild.name, len(joined))
