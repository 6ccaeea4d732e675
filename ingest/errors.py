"""The one exception tree of discord-ingest.

Each class says whose fault it is: configuration (fix the environment), credentials or
Discord's refusal (fix the bot's settings), the caller's misuse (fix the calling code), or
the broker (wait, nothing is lost).
"""

from __future__ import annotations


class IngestError(Exception):
    """Base of every error raised by discord-ingest."""


class ConfigError(IngestError):
    """Bad configuration; the message is one line that says what to fix."""


class FatalGatewayError(IngestError):
    """Discord closed the session in a way no reconnect can fix (bad token, intents, shard)."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class CommandError(IngestError):
    """An outbound command was refused locally, before anything was sent (our caller's fault)."""


class PayloadTooLarge(CommandError):
    """The payload would exceed Discord's 4096-byte limit."""


class CommandRateLimited(CommandError):
    """Sending now would break a Discord rate limit; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotConnected(CommandError):
    """There is no live, identified connection to send on."""


class BrokerUnavailable(IngestError):
    """The broker did not accept a publish; the events stay uncommitted and will be replayed."""
