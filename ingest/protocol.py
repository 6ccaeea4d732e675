"""Discord Gateway v10 vocabulary: opcodes, close codes, intents and fixed limits.

Names follow Discord's developer documentation so the docs can be read beside the code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

API_VERSION: Final = 10
MAX_PAYLOAD_BYTES: Final = 4096
COMMANDS_PER_WINDOW: Final = 120
COMMAND_WINDOW_SECONDS: Final = 60.0
IDENTIFY_INTERVAL_SECONDS: Final = 5.0
ZLIB_SUFFIX: Final = b"\x00\x00\xff\xff"


class Opcode(enum.IntEnum):
    DISPATCH = 0
    HEARTBEAT = 1
    IDENTIFY = 2
    PRESENCE_UPDATE = 3
    VOICE_STATE_UPDATE = 4
    RESUME = 6
    RECONNECT = 7
    REQUEST_GUILD_MEMBERS = 8
    INVALID_SESSION = 9
    HELLO = 10
    HEARTBEAT_ACK = 11
    REQUEST_SOUNDBOARD_SOUNDS = 31


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    UNKNOWN_ERROR = 4000
    UNKNOWN_OPCODE = 4001
    DECODE_ERROR = 4002
    NOT_AUTHENTICATED = 4003
    AUTHENTICATION_FAILED = 4004
    ALREADY_AUTHENTICATED = 4005
    INVALID_SEQ = 4007
    RATE_LIMITED = 4008
    SESSION_TIMED_OUT = 4009
    INVALID_SHARD = 4010
    SHARDING_REQUIRED = 4011
    INVALID_API_VERSION = 4012
    INVALID_INTENTS = 4013
    DISALLOWED_INTENTS = 4014


# The code we close with when we want Discord to keep the session resumable: anything but
# 1000/1001, which Discord treats as "session over".
RESUMABLE_CLOSE: Final = 4000


class Intents(enum.IntFlag):
    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_MODERATION = 1 << 2
    GUILD_EXPRESSIONS = 1 << 3
    GUILD_INTEGRATIONS = 1 << 4
    GUILD_WEBHOOKS = 1 << 5
    GUILD_INVITES = 1 << 6
    GUILD_VOICE_STATES = 1 << 7
    GUILD_PRESENCES = 1 << 8
    GUILD_MESSAGES = 1 << 9
    GUILD_MESSAGE_REACTIONS = 1 << 10
    GUILD_MESSAGE_TYPING = 1 << 11
    DIRECT_MESSAGES = 1 << 12
    DIRECT_MESSAGE_REACTIONS = 1 << 13
    DIRECT_MESSAGE_TYPING = 1 << 14
    MESSAGE_CONTENT = 1 << 15
    GUILD_SCHEDULED_EVENTS = 1 << 16
    AUTO_MODERATION_CONFIGURATION = 1 << 20
    AUTO_MODERATION_EXECUTION = 1 << 21
    GUILD_MESSAGE_POLLS = 1 << 24
    DIRECT_MESSAGE_POLLS = 1 << 25


PRIVILEGED_INTENTS: Final = (
    Intents.GUILD_MEMBERS | Intents.GUILD_PRESENCES | Intents.MESSAGE_CONTENT
)

# Names as the Developer Portal shows them, for the 4014 message.
PRIVILEGED_INTENT_PORTAL_NAMES: Final[dict[Intents, str]] = {
    Intents.GUILD_PRESENCES: "Presence Intent",
    Intents.GUILD_MEMBERS: "Server Members Intent",
    Intents.MESSAGE_CONTENT: "Message Content Intent",
}


class Reconnect(enum.Enum):
    """What a close code asks of us."""

    RESUME = "resume"  # reconnect and RESUME where a session exists
    NEW_SESSION = "new_session"  # reconnect and IDENTIFY afresh
    FATAL = "fatal"  # stop; a human must fix something


@dataclass(frozen=True, slots=True)
class CloseRule:
    action: Reconnect
    explanation: str


_FATAL_EXPLANATIONS: Final[dict[int, str]] = {
    CloseCode.AUTHENTICATION_FAILED: (
        "Discord rejected the token (4004): set DISCORD_TOKEN to the bot token from the "
        "Developer Portal (Bot > Reset Token)"
    ),
    CloseCode.INVALID_SHARD: (
        "Discord rejected the shard (4010): check DISCORD_SHARD_IDS and DISCORD_SHARD_COUNT "
        "(each id must be below the count)"
    ),
    CloseCode.SHARDING_REQUIRED: (
        "Discord requires sharding for this bot (4011): set DISCORD_SHARD_COUNT, or leave it "
        "unset to use Discord's recommendation"
    ),
    CloseCode.INVALID_API_VERSION: (
        "Discord rejected the gateway API version (4012): this client speaks v10; check "
        "DISCORD_GATEWAY_URL"
    ),
    CloseCode.INVALID_INTENTS: (
        "Discord rejected the intents (4013): DISCORD_INTENTS is not a valid intents value"
    ),
}

_NEW_SESSION_CODES: Final = frozenset({CloseCode.INVALID_SEQ, CloseCode.SESSION_TIMED_OUT})


def classify_close(code: int | None, intents: int = 0) -> CloseRule:
    """Decide what a close code from Discord asks of us; ``None`` is a TCP drop."""
    if code == CloseCode.DISALLOWED_INTENTS:
        wanted = [name for flag, name in PRIVILEGED_INTENT_PORTAL_NAMES.items() if intents & flag]
        which = ", ".join(wanted) if wanted else "the privileged intents you request"
        return CloseRule(
            Reconnect.FATAL,
            "Discord refused privileged intents (4014): enable "
            f"{which} under Bot > Privileged Gateway Intents in the Developer Portal, "
            "or remove them from DISCORD_INTENTS",
        )
    if code in _FATAL_EXPLANATIONS:
        return CloseRule(Reconnect.FATAL, _FATAL_EXPLANATIONS[code])
    if code in _NEW_SESSION_CODES:
        return CloseRule(Reconnect.NEW_SESSION, f"session not resumable (close {code})")
    if code is None:
        return CloseRule(Reconnect.RESUME, "connection dropped without a close frame")
    return CloseRule(Reconnect.RESUME, f"closed by Discord with code {code}")


def parse_intents(spec: str) -> int:
    """Parse ``DISCORD_INTENTS``: a number, or names joined by ``,`` / ``|`` / spaces.

    Raises ``ValueError`` naming the unknown intent.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("DISCORD_INTENTS is empty")
    if spec.isdigit():
        return int(spec)
    value = 0
    for raw in spec.replace("|", ",").replace(" ", ",").split(","):
        name = raw.strip().upper()
        if not name:
            continue
        if name == "DEFAULT":
            value |= int(default_intents())
            continue
        if name == "ALL":
            value |= sum(int(flag) for flag in Intents)
            continue
        try:
            value |= int(Intents[name])
        except KeyError:
            known = ", ".join(flag.name or "" for flag in Intents)
            raise ValueError(f"unknown intent {raw.strip()!r}; known: {known}") from None
    return value


def default_intents() -> Intents:
    """All non-privileged intents: what a bot gets without asking the Developer Portal."""
    everything = Intents(0)
    for flag in Intents:
        everything |= flag
    return everything & ~PRIVILEGED_INTENTS
