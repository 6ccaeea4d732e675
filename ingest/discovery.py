"""The two REST calls the gateway needs: ``GET /gateway/bot`` and ``GET /users/@me``.

Standard library only, run in a thread: it happens once per process start. Handlers call
Discord through ``ingest.rest`` (shared rate limits) instead.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Final

from ingest.errors import FatalGatewayError, RestError

DEFAULT_API_URL: Final = "https://discord.com/api/v10"


@dataclass(frozen=True, slots=True)
class SessionStartLimit:
    total: int
    remaining: int
    reset_after: float  # seconds
    max_concurrency: int


@dataclass(frozen=True, slots=True)
class GatewayBot:
    url: str
    shards: int
    session_start_limit: SessionStartLimit


def _get(api_url: str, path: str, token: str, timeout: float) -> Any:
    request = urllib.request.Request(
        api_url.rstrip("/") + path,
        headers={
            "Authorization": f"Bot {token}",
            "User-Agent": "DiscordBot (https://github.com/discord-ingest, 0.1)",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise FatalGatewayError(
                "Discord rejected the token (401): set DISCORD_TOKEN to the bot token from "
                "the Developer Portal (Bot > Reset Token)"
            ) from None
        raise RestError(f"GET {path} failed with HTTP {exc.code}", status=exc.code) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise RestError(f"GET {path} failed: {exc}") from None


async def fetch_gateway_bot(api_url: str, token: str, timeout: float = 10.0) -> GatewayBot:
    raw = await asyncio.to_thread(_get, api_url, "/gateway/bot", token, timeout)
    try:
        limit = raw["session_start_limit"]
        return GatewayBot(
            url=str(raw["url"]),
            shards=int(raw["shards"]),
            session_start_limit=SessionStartLimit(
                total=int(limit["total"]),
                remaining=int(limit["remaining"]),
                reset_after=int(limit["reset_after"]) / 1000.0,
                max_concurrency=int(limit.get("max_concurrency", 1)),
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RestError(f"GET /gateway/bot returned an unexpected body: {exc}") from None


async def fetch_current_user(api_url: str, token: str, timeout: float = 10.0) -> dict[str, Any]:
    raw = await asyncio.to_thread(_get, api_url, "/users/@me", token, timeout)
    if not isinstance(raw, dict):
        raise RestError("GET /users/@me returned an unexpected body")
    return raw
