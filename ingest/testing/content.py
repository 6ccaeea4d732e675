"""Discord's message content rule, for the simulator: a session without the MESSAGE_CONTENT
intent gets guild messages with empty content, embeds, attachments, components and poll,
unless the message is the bot's own or mentions it (DMs always carry content)."""

from __future__ import annotations

from typing import Any, Final

from ingest.protocol import Intents

MESSAGE_EVENTS: Final = frozenset({"MESSAGE_CREATE", "MESSAGE_UPDATE"})
# The fields Discord empties, and the empty value each one gets.
CONTENT_FIELDS: Final[dict[str, Any]] = {
    "content": "",
    "embeds": [],
    "attachments": [],
    "components": [],
}


def strips_content(event: str, data: Any, intents: int, bot_id: str) -> bool:
    """Whether Discord would send ``data`` to this session with its content emptied."""
    if event not in MESSAGE_EVENTS or intents & Intents.MESSAGE_CONTENT:
        return False
    if not isinstance(data, dict) or data.get("guild_id") is None:
        return False
    author = data.get("author")
    if isinstance(author, dict) and author.get("id") == bot_id:
        return False
    mentions = data.get("mentions")
    if isinstance(mentions, list):
        return not any(isinstance(m, dict) and m.get("id") == bot_id for m in mentions)
    return True


def without_content(data: dict[str, Any]) -> dict[str, Any]:
    stripped = {**data, **{k: v for k, v in CONTENT_FIELDS.items() if k in data}}
    stripped.pop("poll", None)
    return stripped
