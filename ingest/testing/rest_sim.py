"""Discord's REST side for the simulator: the routes a handler calls, with Discord's limits.

Enforces the global limit (any 1-second window), per-channel buckets whose window opens on the
first request (as Discord's do), answers 429s with ``retry_after`` and scope headers, 401s a
bad token, and records every request so tests can count what arrived and when.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote

JSONDict = dict[str, Any]
Emit = Callable[[str, JSONDict, str], Awaitable[None]]  # event, data, guild id

DEFAULT_GUILD_ID: Final = "1180000000000000001"
DISCORD_EPOCH_MS: Final = 1420070400000


@dataclass(frozen=True, slots=True)
class RestRecord:
    """One request the simulator received."""

    at: float  # monotonic seconds
    method: str
    route: str  # the template, e.g. "POST /channels/{channel_id}/messages"
    major: str  # channel id, interaction id, ... ("" for none)
    status: int
    scope: str = ""  # on a 429


@dataclass(slots=True)
class _Window:
    ends: float = 0.0
    used: int = 0


@dataclass(slots=True)
class BucketRule:
    name: str  # the X-RateLimit-Bucket hash Discord would send
    limit: int
    period: float  # seconds


@dataclass(slots=True)
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


_ROUTES: Final = (
    ("POST", re.compile(r"^/channels/(\d+)/messages$"), "/channels/{channel_id}/messages"),
    (
        "PUT",
        re.compile(r"^/channels/(\d+)/messages/(\d+)/reactions/([^/]+)/@me$"),
        "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me",
    ),
    (
        "POST",
        re.compile(r"^/interactions/(\d+)/([^/]+)/callback$"),
        "/interactions/{interaction_id}/{interaction_token}/callback",
    ),
    ("POST", re.compile(r"^/webhooks/(\d+)/([^/]+)$"), "/webhooks/{application_id}/{token}"),
)


class RestSimulator:
    """Serves the REST routes; ``handle`` returns None for a path it does not know."""

    def __init__(
        self,
        *,
        token: str,
        bot_user: JSONDict,
        emit: Emit | None = None,
        global_limit: int = 50,
        message_limit: int = 5,
        message_period: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token = token
        self.bot_user = bot_user
        self.emit = emit
        self.global_limit = global_limit
        self.clock = clock
        self.rules: dict[str, BucketRule] = {
            "/channels/{channel_id}/messages": BucketRule(
                "80c17d2f203122d936070c88c8d10f33", message_limit, message_period
            ),
            "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me": BucketRule(
                "a2f8a6a5c6f7b3d15e2c8b6f1e8f6d31", 1, 0.25
            ),
            "/webhooks/{application_id}/{token}": BucketRule(
                "4f5e8d0c0b9a1e2d3c4b5a69788776655", 5, 2.0
            ),
        }
        self.log: list[RestRecord] = []
        self.messages: list[JSONDict] = []
        self.reactions: list[tuple[str, str, str]] = []
        self.callbacks: list[JSONDict] = []  # interaction callbacks: id, token, body, at
        self.forbidden_channels: set[str] = set()  # POSTs there answer 403 (Missing Access)
        # Interaction/webhook tokens past their life: Discord answers 401, code 50027.
        self.expired_tokens: set[str] = set()
        self.fail_next: deque[int] = deque()  # statuses to answer next (e.g. 502), in order
        self._global: deque[float] = deque()
        self._windows: dict[tuple[str, str], _Window] = {}
        self._ids = itertools.count(1)

    def configure(self, *, message_limit: int, message_period: float) -> None:
        self.rules["/channels/{channel_id}/messages"].limit = message_limit
        self.rules["/channels/{channel_id}/messages"].period = message_period

    # ---- readings ----

    def count(self, route: str | None = None, status: int | None = None) -> int:
        return sum(
            1
            for r in self.log
            if (route is None or r.route.endswith(route)) and (status is None or r.status == status)
        )

    def rate_limited(self) -> list[RestRecord]:
        return [r for r in self.log if r.status == 429]

    def per_second(self) -> dict[int, int]:
        """Requests received per whole second since the first one."""
        if not self.log:
            return {}
        start = self.log[0].at
        counts: dict[int, int] = {}
        for record in self.log:
            second = int(record.at - start)
            counts[second] = counts.get(second, 0) + 1
        return counts

    # ---- serving ----

    async def handle(
        self, method: str, path: str, headers: Any, body: bytes, json_body: Any
    ) -> Reply | None:
        for route_method, pattern, template in _ROUTES:
            match = pattern.match(path)
            if match is None or method != route_method:
                continue
            reply = self._serve(method, template, match.groups(), headers, json_body)
            major = match.group(1)
            self.log.append(
                RestRecord(
                    self.clock(),
                    method,
                    f"{method} {template}",
                    major,
                    reply.status,
                    reply.headers.get("X-RateLimit-Scope", "") if reply.status == 429 else "",
                )
            )
            created = reply.status == 200 and template == "/channels/{channel_id}/messages"
            if created and self.emit is not None:
                await self.emit("MESSAGE_CREATE", reply.body, str(reply.body["guild_id"]))
            return reply
        return None

    def _serve(
        self, method: str, template: str, groups: tuple[str, ...], headers: Any, json_body: Any
    ) -> Reply:
        now = self.clock()
        tokened = template.startswith(("/interactions/", "/webhooks/"))
        # Interaction callbacks and token webhooks authenticate by their token, not the bot's.
        if not tokened and headers.get("Authorization") != f"Bot {self.token}":
            return Reply(401, {"message": "401: Unauthorized", "code": 0})
        if tokened and groups[1] in self.expired_tokens:
            return Reply(401, {"message": "Invalid Webhook Token", "code": 50027})
        if self.fail_next:
            status = self.fail_next.popleft()
            return Reply(status, {"message": f"{status}: simulated failure", "code": 0})
        if not tokened:
            while self._global and self._global[0] <= now - 1.0:
                self._global.popleft()
            if len(self._global) >= self.global_limit:
                retry_after = round(self._global[0] + 1.0 - now, 3)
                return Reply(
                    429,
                    {
                        "message": "You are being rate limited.",
                        "retry_after": retry_after,
                        "global": True,
                    },
                    {
                        "X-RateLimit-Global": "true",
                        "X-RateLimit-Scope": "global",
                        "Retry-After": str(max(1, round(retry_after))),
                    },
                )
            self._global.append(now)
        rule = self.rules.get(template)
        limit_headers: dict[str, str] = {}
        if rule is not None:
            window = self._windows.setdefault((rule.name, groups[0]), _Window())
            if now >= window.ends:
                window.ends, window.used = now + rule.period, 0
            reset_after = window.ends - now
            limit_headers = {
                "X-RateLimit-Bucket": rule.name,
                "X-RateLimit-Limit": str(rule.limit),
                "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
                "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            }
            if window.used >= rule.limit:
                limit_headers["X-RateLimit-Remaining"] = "0"
                limit_headers["X-RateLimit-Scope"] = "user"
                limit_headers["Retry-After"] = str(max(1, round(reset_after)))
                return Reply(
                    429,
                    {
                        "message": "You are being rate limited.",
                        "retry_after": round(reset_after, 3),
                        "global": False,
                    },
                    limit_headers,
                )
            window.used += 1
            limit_headers["X-RateLimit-Remaining"] = str(rule.limit - window.used)
        if template == "/channels/{channel_id}/messages":
            channel_id = groups[0]
            if channel_id in self.forbidden_channels:
                return Reply(403, {"message": "Missing Access", "code": 50001}, limit_headers)
            return Reply(200, self._message(channel_id, json_body), limit_headers)
        if template.endswith("/@me"):
            self.reactions.append((groups[0], groups[1], unquote(groups[2])))
            return Reply(204, None, limit_headers)
        if template.startswith("/interactions/"):
            self.callbacks.append(
                {"id": groups[0], "token": groups[1], "body": json_body, "at": now}
            )
            return Reply(204, None)
        return Reply(200, self._message("0", json_body, webhook_id=groups[0]), limit_headers)

    def _message(self, channel_id: str, body: Any, webhook_id: str | None = None) -> JSONDict:
        body = body if isinstance(body, dict) else {}
        number = next(self._ids)
        created_ms = int(time.time() * 1000)
        message: JSONDict = {
            "id": str(((created_ms - DISCORD_EPOCH_MS) << 22) | (30 << 17) | (number & 0x1FFFF)),
            "channel_id": channel_id,
            "guild_id": DEFAULT_GUILD_ID,
            "author": dict(self.bot_user),
            "content": str(body.get("content", "")),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime()),
            "edited_timestamp": None,
            "tts": bool(body.get("tts", False)),
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": list(body.get("embeds") or []),
            "pinned": False,
            "type": 19 if body.get("message_reference") else 0,
            "flags": int(body.get("flags") or 0),
            "components": list(body.get("components") or []),
        }
        if body.get("nonce") is not None:
            message["nonce"] = body["nonce"]
        if isinstance(body.get("message_reference"), dict):
            message["message_reference"] = body["message_reference"]
        if webhook_id is not None:
            message["webhook_id"] = webhook_id
        self.messages.append(message)
        return message
