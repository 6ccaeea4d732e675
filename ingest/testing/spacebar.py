"""Dispatch payloads (the ``d`` of op 0) shaped the way Spacebar sends them.

Spacebar is an independent Discord-compatible server; it omits keys whose value is undefined or
null and predates newer Discord fields. These four shapes were dead-lettered by the first models
(issue #10); the simulator and tests reuse them to prove real payloads are accepted. The payloads
share nested objects: ``copy.deepcopy`` one before changing it.
"""

from __future__ import annotations

from typing import Any, Final

GUILD_ID: Final = "1180424867431579648"
CHANNEL_ID: Final = "1180424867448356865"
ROLE_ID: Final = "1180425110709604352"
USER_ID: Final = "1180424826902052864"
MESSAGE_ID: Final = "1180425329648111616"

# Spacebar's PublicUser projection: no global_name, and null keys such as avatar left out.
_PUBLIC_USER: Final[dict[str, Any]] = {
    "id": USER_ID,
    "username": "ruby",
    "discriminator": "4417",
    "public_flags": 0,
    "bot": False,
    "premium_type": 0,
    "premium_since": "2023-12-01T10:14:02.511Z",
    "bio": "",
    "accent_color": None,
}

# Spacebar's PublicMember: its own id and guild_id, no ``flags`` on older servers.
_PUBLIC_MEMBER: Final[dict[str, Any]] = {
    "id": USER_ID,
    "guild_id": GUILD_ID,
    "roles": [GUILD_ID],
    "joined_at": "2023-12-01T10:12:40.882Z",
    "pending": False,
    "deaf": False,
    "mute": False,
    "premium_since": None,
    "avatar": None,
    "bio": "",
    "communication_disabled_until": None,
    "user": _PUBLIC_USER,
}

SPACEBAR_PAYLOADS: Final[dict[str, dict[str, Any]]] = {
    # A unicode emoji without ``id`` (undefined, so left out), and no ``burst``/``type``: the
    # super-reaction fields never existed there.
    "MESSAGE_REACTION_ADD": {
        "user_id": USER_ID,
        "channel_id": CHANNEL_ID,
        "message_id": MESSAGE_ID,
        "guild_id": GUILD_ID,
        "emoji": {"name": "\N{THUMBS UP SIGN}"},
        "member": _PUBLIC_MEMBER,
    },
    # A role without ``flags`` (nor ``colors``), carrying its own guild_id.
    "GUILD_ROLE_CREATE": {
        "guild_id": GUILD_ID,
        "role": {
            "id": ROLE_ID,
            "guild_id": GUILD_ID,
            "name": "helpers",
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "permissions": "0",
            "position": 1,
        },
    },
    # The guild row as saved: every null column (icon, splash, banner, description,
    # afk_channel_id, rules_channel_id, ...) left out, no roles or emojis relation loaded,
    # and Spacebar's own extras (region, nsfw, welcome_screen, ...).
    "GUILD_UPDATE": {
        "id": GUILD_ID,
        "name": "spacebar test guild (renamed)",
        "owner_id": USER_ID,
        "afk_timeout": 300,
        "default_message_notifications": 1,
        "explicit_content_filter": 0,
        "features": [],
        "max_members": 250000,
        "max_presences": 250000,
        "max_video_channel_users": 200,
        "member_count": 2,
        "presence_count": 0,
        "mfa_level": 0,
        "nsfw": False,
        "nsfw_level": 0,
        "preferred_locale": "en-US",
        "premium_progress_bar_enabled": False,
        "premium_tier": 0,
        "region": "spacebar",
        "system_channel_flags": 4,
        "system_channel_id": CHANNEL_ID,
        "verification_level": 0,
        "widget_enabled": True,
        "welcome_screen": {"enabled": False, "description": "", "welcome_channels": []},
    },
    # An edit echoed as a partial message: no ``mentions``/``mention_roles``/``nonce``, and an
    # author from the PublicUser projection (no avatar, no global_name).
    "MESSAGE_UPDATE": {
        "id": MESSAGE_ID,
        "channel_id": CHANNEL_ID,
        "guild_id": GUILD_ID,
        "author": {k: _PUBLIC_USER[k] for k in ("id", "username", "discriminator", "public_flags")},
        "content": "edited on spacebar",
        "timestamp": "2023-12-01T10:20:11.093Z",
        "edited_timestamp": "2023-12-01T10:21:47.300Z",
        "type": 0,
        "tts": False,
        "pinned": False,
        "mention_everyone": False,
        "embeds": [],
        "attachments": [],
        "reactions": [],
        "sticker_items": [],
        "components": [],
    },
}
