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


class RestError(IngestError):
    """A Discord REST call failed: ``status`` is the HTTP status (None if none came back),
    ``code`` Discord's JSON error code. The message names the route template, never a token."""

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class RateLimiterUnavailable(RestError):
    """The shared rate limiter (Redis) did not answer; nothing was sent, to stay within limits."""


class RateLimitWaitTooLong(RestError):
    """The limits would hold this request back longer than the caller allows (``max_wait``):
    raised instead of blocking a worker slot, so the handler can retry later (status 429)."""


class InvalidRequestLimit(RestError):
    """Too many 401/403/429 across the bot in 10 minutes: refused locally to avoid an IP ban."""
