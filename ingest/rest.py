"""The handlers' Discord REST client: ``Rest`` (sync) and ``AsyncRest``, one shared rate limit.

Every request passes the bot-wide limiter in ``ingest.ratelimit`` first, so N worker processes
stay within the limits one client would. Retries are bounded: 429s after the limiter waits,
5xx and connection errors only for idempotent methods unless the caller asks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import httpx
import redis
import redis.asyncio

from ingest.brokers import state_url_from_env, sync_redis
from ingest.discovery import DEFAULT_API_URL
from ingest.errors import ConfigError, RestError
from ingest.interactions import DEFERRED, DEFERRING, RESPONDED, InitialResponses
from ingest.metrics import cumulative_buckets
from ingest.models import Interaction, Message
from ingest.ratelimit import (
    DEFAULT_GLOBAL_LIMIT,
    DEFAULT_INVALID_LIMIT,
    DEFAULT_MAX_WAIT,
    AsyncRateLimiter,
    LimiterCore,
    Limits,
    LocalState,
    Permit,
    RateLimiter,
    RouteKey,
    WaitObserver,
)

__all__ = ["AsyncRest", "Rest", "RestMetrics", "rest_client", "rest_metrics"]

log = logging.getLogger("ingest.rest")

USER_AGENT: Final = "DiscordBot (https://github.com/discord-ingest, 0.1)"
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
MAX_RATE_LIMITED_RETRIES: Final = 3
MAX_SERVER_ERROR_RETRIES: Final = 3
BACKOFF_BASE: Final = 0.5
BACKOFF_CAP: Final = 8.0
# The limiter's Redis answers in a millisecond; seconds of silence mean it is gone.
REDIS_TIMEOUT: Final = 2.0
# Interaction callback types (Discord's InteractionCallbackType).
CHANNEL_MESSAGE_WITH_SOURCE: Final = 4
DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE: Final = 5
# Discord's answer to a second initial response ("Interaction has already been acknowledged").
ALREADY_ACKNOWLEDGED: Final = 40060
# Claims of the initial response tried before falling back to a follow-up (a deferral that
# failed gives its claim back, and the answer is then ours to send as the initial response).
CLAIM_ATTEMPTS: Final = 3
# A component's deferral: acknowledge, edit the message it sits on later (no "thinking...").
DEFERRED_UPDATE_MESSAGE: Final = 6
EPHEMERAL: Final = 1 << 6
WAIT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
# Webhook and interaction tokens travel in the URL path, which httpx logs at INFO.
_TOKEN_IN_PATH: Final = re.compile(r"(/(?:webhooks|interactions)/\d+/)[^/?\s\"]+")


class _RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_PATH.sub(r"\1***", str(arg)) if isinstance(arg, httpx.URL) else arg
                for arg in record.args
            )
        return True


logging.getLogger("httpx").addFilter(_RedactTokens())


class RestMetrics(WaitObserver):
    """Counters of one process's REST calls; a Prometheus collector built at scrape time."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.invalid_in_window = 0
        self.wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)
        self.wait_sum = 0.0

    def request(self, route: str, status: int | None) -> None:
        self.requests[route, "error" if status is None else str(status)] += 1

    def limited(self, scope: str) -> None:
        self.rate_limited[scope or "unknown"] += 1

    def limiter_waited(self, seconds: float) -> None:
        index = next((i for i, b in enumerate(WAIT_BUCKETS) if seconds <= b), len(WAIT_BUCKETS))
        self.wait_buckets[index] += 1
        self.wait_sum += seconds

    def invalid_requests(self, count: int) -> None:
        self.invalid_in_window = count

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        requests = CounterMetricFamily(
            "discord_ingest_rest_requests",
            "REST responses by route and status",
            labels=["route", "status"],
        )
        for (route, status), count in sorted(self.requests.items()):
            requests.add_metric([route, status], count)
        yield requests
        limited = CounterMetricFamily(
            "discord_ingest_rest_rate_limited",
            "429 responses by X-RateLimit-Scope",
            labels=["scope"],
        )
        for scope, count in sorted(self.rate_limited.items()):
            limited.add_metric([scope], count)
        yield limited
        yield GaugeMetricFamily(
            "discord_ingest_rest_invalid_requests",
            "401/403/429 by the whole bot in the last 10 minutes (as last seen)",
            value=self.invalid_in_window,
        )
        yield HistogramMetricFamily(
            "discord_ingest_rest_limiter_wait_seconds",
            "Time a request waited for the shared rate limiter",
            buckets=cumulative_buckets(WAIT_BUCKETS, self.wait_buckets),
            sum_value=self.wait_sum,
        )


rest_metrics: Final = RestMetrics()


@dataclass(frozen=True, slots=True)
class Settings:
    """What ``from_env`` reads; also what both clients take."""

    token: str
    api_url: str
    state_url: str
    global_limit: int = DEFAULT_GLOBAL_LIMIT
    invalid_limit: int = DEFAULT_INVALID_LIMIT
    max_wait: float = DEFAULT_MAX_WAIT
    # Off by default: limiting each process alone can exceed the bot's limits N times over.
    local_fallback: bool = False

    def limiter_parts(self, namespace: str) -> tuple[LimiterCore, RestMetrics, LocalState | None]:
        """What either client's limiter is built from, besides its Redis client."""
        core = LimiterCore(
            self.token,
            global_limit=self.global_limit,
            invalid_limit=self.invalid_limit,
            namespace=namespace,
            max_wait=self.max_wait,
        )
        return core, rest_metrics, LocalState() if self.local_fallback else None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        token = env.get("DISCORD_TOKEN", "").strip()
        if not token:
            raise ConfigError("DISCORD_TOKEN is not set: the REST client needs the bot token")
        state_url = state_url_from_env(env)
        if state_url is None:
            raise ConfigError(
                "the REST rate limiter needs Redis: set INGEST_STATE_URL to a redis:// URL "
                "(the broker is not Redis)"
            )
        return cls(
            token=token,
            api_url=env.get("DISCORD_API_URL", "").strip() or DEFAULT_API_URL,
            state_url=state_url,
            global_limit=_positive(env, "DISCORD_REST_GLOBAL_LIMIT", DEFAULT_GLOBAL_LIMIT),
            invalid_limit=_positive(env, "DISCORD_REST_INVALID_LIMIT", DEFAULT_INVALID_LIMIT),
            max_wait=_positive(env, "DISCORD_REST_MAX_WAIT", round(DEFAULT_MAX_WAIT)),
            local_fallback=env.get("DISCORD_REST_LOCAL_FALLBACK", "").strip().lower()
            in ("1", "true", "yes"),
        )


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}")
    return value


# --------------------------------------------------------------------------------------------
# What both clients share: building a request and judging its response (no I/O)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Call:
    method: str
    route: str
    path: str
    key: RouteKey
    retry_unsafe: bool

    @property
    def retryable(self) -> bool:
        return self.method in IDEMPOTENT or self.retry_unsafe


def _plan(method: str, route: str, params: Mapping[str, object], retry_unsafe: bool) -> _Call:
    method = method.upper()
    try:
        path = route.format_map({k: quote(str(v), safe="") for k, v in params.items()})
    except KeyError as exc:
        raise TypeError(f"route {route!r} needs the parameter {exc.args[0]}") from None
    return _Call(method, route, path, RouteKey.of(method, route, params), retry_unsafe)


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bot {token}", "User-Agent": USER_AGENT}


def _decode(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class _Retry:
    delay: float


def _judge(
    call: _Call, response: httpx.Response, body: Any, limits: Limits, attempt: int
) -> _Retry | None:
    """None: return ``body``. _Retry: wait, then try again. Raises when it is over."""
    status = response.status_code
    if status < 300:
        return None
    if status == 429:
        rest_metrics.limited(limits.scope)
        log.warning(
            "429 on %s (scope %s, retry after %.3fs)",
            call.key.route,
            limits.scope,
            limits.retry_after,
        )
        if attempt < MAX_RATE_LIMITED_RETRIES:
            # The limiter already holds everyone back; a route with no bucket waits here.
            return _Retry(0.0 if limits.bucket or limits.scope == "global" else limits.retry_after)
    elif status >= 500 and call.retryable and attempt < MAX_SERVER_ERROR_RETRIES:
        return _Retry(min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
    code = body.get("code") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    raise RestError(
        f"{call.method} {call.route} failed: HTTP {status}"
        + (f" (code {code})" if code is not None else "")
        + (f": {message}" if message else ""),
        status=status,
        code=code if isinstance(code, int) else None,
    )


def _connection_failed(call: _Call, exc: httpx.TransportError, attempt: int) -> _Retry:
    rest_metrics.request(call.key.route, None)
    if call.retryable and attempt < MAX_SERVER_ERROR_RETRIES:
        return _Retry(min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
    # The exception's text may hold the URL, and a webhook URL holds its token: name the type.
    raise RestError(
        f"{call.method} {call.route} failed: {type(exc).__name__}"
        + ("" if call.retryable else " (not retried: the request may have been applied)"),
        status=None,
    ) from None


def _deferral(*, ephemeral: bool, update: bool) -> tuple[int, dict[str, Any]]:
    """The callback type and data of a deferral."""
    if update:
        return DEFERRED_UPDATE_MESSAGE, {}
    return DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE, {"flags": EPHEMERAL} if ephemeral else {}


def _message_body(content: str | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = dict(fields)
    if content is not None:
        body["content"] = content
    return body


def _reference(message: Message) -> dict[str, Any]:
    reference: dict[str, Any] = {
        "message_id": str(message.id),
        "channel_id": str(message.channel_id),
        "fail_if_not_exists": False,
    }
    if message.guild_id is not None:
        reference["guild_id"] = str(message.guild_id)
    return reference


# --------------------------------------------------------------------------------------------
# The clients
# --------------------------------------------------------------------------------------------


class Rest:
    """Synchronous client: what a Celery worker (prefork or threads) uses. Thread-safe."""

    def __init__(
        self,
        settings: Settings,
        *,
        limiter: RateLimiter | None = None,
        timeout: float = 10.0,
        namespace: str = "",
    ) -> None:
        self.api_url = settings.api_url.rstrip("/")
        if limiter is None:
            client = sync_redis(settings.state_url, timeout=REDIS_TIMEOUT)
            limiter = RateLimiter(client, *settings.limiter_parts(namespace))
        self.limiter = limiter
        self.initial_responses = InitialResponses(settings.state_url, namespace)
        self._http = httpx.Client(
            base_url=self.api_url, headers=_headers(settings.token), timeout=timeout
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Rest:
        return cls(Settings.from_env(os.environ if env is None else env))

    def __repr__(self) -> str:
        return f"Rest(api_url={self.api_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Rest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        route: str,
        *,
        json: Any = None,
        query: Mapping[str, Any] | None = None,
        reason: str | None = None,
        retry_unsafe: bool = False,
        **params: object,
    ) -> Any:
        """Send ``method route`` with ``params`` filled in; return the decoded JSON body.

        ``retry_unsafe`` lets a POST/PATCH be retried after a 5xx or a lost connection, when the
        caller knows a duplicate is harmless (Discord may have applied the first one).
        """
        call = _plan(method, route, params, retry_unsafe)
        headers = {"X-Audit-Log-Reason": quote(reason)} if reason else None
        attempt = 0
        while True:
            permit = self.limiter.admit(call.key)
            try:
                response = self._http.request(
                    call.method, call.path, json=json, params=query, headers=headers
                )
            except httpx.TransportError as exc:
                self.limiter.learn(permit, None)
                retry: _Retry | None = _connection_failed(call, exc, attempt)
            else:
                retry = self._after(call, permit, response, attempt)
                if retry is None:
                    return _decode(response)
            attempt += 1
            if retry is not None and retry.delay:
                time.sleep(retry.delay)

    def _after(
        self, call: _Call, permit: Permit, response: httpx.Response, attempt: int
    ) -> _Retry | None:
        body = _decode(response) if response.status_code >= 300 else None
        limits = Limits.of(response.status_code, response.headers, body)
        self.limiter.learn(permit, limits)
        rest_metrics.request(call.key.route, response.status_code)
        return _judge(call, response, body, limits, attempt)

    # ---- the calls a handler makes ----

    def send_message(
        self, channel_id: int | str, content: str | None = None, **fields: Any
    ) -> Message:
        raw = self.request(
            "POST",
            "/channels/{channel_id}/messages",
            channel_id=channel_id,
            json=_message_body(content, fields),
        )
        return Message.model_validate(raw)

    def reply(self, message: Message, content: str | None = None, **fields: Any) -> Message:
        """Answer ``message`` in its channel, as a reply (``message_reference``)."""
        return self.send_message(
            message.channel_id, content, message_reference=_reference(message), **fields
        )

    def add_reaction(self, channel_id: int | str, message_id: int | str, emoji: str) -> None:
        """React with a unicode emoji (``"👍"``) or a custom one (``"name:id"``)."""
        self.request(
            "PUT",
            "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me",
            channel_id=channel_id,
            message_id=message_id,
            emoji=emoji,
        )

    def respond(self, interaction: Interaction, content: str | None = None, **data: Any) -> None:
        """Answer an interaction with a message (callback type 4); within 3 s of receipt.

        Once it was deferred (by ``defer`` or the auto-defer) or already answered, the answer
        goes as a follow-up instead, which replaces the "thinking..." of a deferral: one
        interaction never gets two initial responses (``ingest.interactions``).
        """
        initial = self.initial_responses
        for _ in range(CLAIM_ATTEMPTS):
            if initial.claim(interaction.id, RESPONDED):
                try:
                    self._callback(
                        interaction, CHANNEL_MESSAGE_WITH_SOURCE, _message_body(content, data)
                    )
                except RestError as exc:
                    if exc.code != ALREADY_ACKNOWLEDGED:
                        initial.release(interaction.id)
                        raise
                    break  # answered behind our claim's back (Redis was away): follow up
                except BaseException:
                    initial.release(interaction.id)
                    raise
                return
            if initial.wait_deferred(interaction.id) is not None:
                break
            # The deferral we waited for failed and gave its claim back: answer it ourselves.
        self.follow_up(interaction, content, **data)

    def defer(
        self, interaction: Interaction, *, ephemeral: bool = False, update: bool = False
    ) -> bool:
        """Acknowledge now, answer later with ``follow_up`` (callback type 5; with ``update``,
        type 6 for a component whose message you will edit).

        False, and nothing sent, when the interaction was already answered or deferred.
        """
        initial = self.initial_responses
        if not initial.claim(interaction.id, DEFERRING):
            return False
        try:
            self._callback(interaction, *_deferral(ephemeral=ephemeral, update=update))
        except BaseException:
            initial.release(interaction.id)
            raise
        initial.mark(interaction.id, DEFERRED)
        return True

    def follow_up(
        self, interaction: Interaction, content: str | None = None, **fields: Any
    ) -> Message:
        raw = self.request(
            "POST",
            "/webhooks/{application_id}/{interaction_token}",
            application_id=interaction.application_id,
            interaction_token=interaction.token,
            json=_message_body(content, fields),
        )
        return Message.model_validate(raw)

    def _callback(self, interaction: Interaction, kind: int, data: dict[str, Any]) -> None:
        self.request(
            "POST",
            "/interactions/{interaction_id}/{interaction_token}/callback",
            interaction_id=interaction.id,
            interaction_token=interaction.token,
            json={"type": kind, "data": data} if data else {"type": kind},
        )


class AsyncRest:
    """The same client for asyncio code: every call is awaited."""

    def __init__(
        self,
        settings: Settings,
        *,
        limiter: AsyncRateLimiter | None = None,
        timeout: float = 10.0,
        namespace: str = "",
    ) -> None:
        self.api_url = settings.api_url.rstrip("/")
        if limiter is None:
            client = redis.asyncio.Redis.from_url(
                settings.state_url,
                socket_timeout=REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT,
            )
            limiter = AsyncRateLimiter(client, *settings.limiter_parts(namespace))
        self.limiter = limiter
        self.initial_responses = InitialResponses(settings.state_url, namespace)
        self._http = httpx.AsyncClient(
            base_url=self.api_url, headers=_headers(settings.token), timeout=timeout
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AsyncRest:
        return cls(Settings.from_env(os.environ if env is None else env))

    def __repr__(self) -> str:
        return f"AsyncRest(api_url={self.api_url!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRest:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def request(
        self,
        method: str,
        route: str,
        *,
        json: Any = None,
        query: Mapping[str, Any] | None = None,
        reason: str | None = None,
        retry_unsafe: bool = False,
        **params: object,
    ) -> Any:
        call = _plan(method, route, params, retry_unsafe)
        headers = {"X-Audit-Log-Reason": quote(reason)} if reason else None
        attempt = 0
        while True:
            permit = await self.limiter.admit(call.key)
            try:
                response = await self._http.request(
                    call.method, call.path, json=json, params=query, headers=headers
                )
            except httpx.TransportError as exc:
                await self.limiter.learn(permit, None)
                retry: _Retry | None = _connection_failed(call, exc, attempt)
            else:
                body = _decode(response) if response.status_code >= 300 else None
                limits = Limits.of(response.status_code, response.headers, body)
                await self.limiter.learn(permit, limits)
                rest_metrics.request(call.key.route, response.status_code)
                retry = _judge(call, response, body, limits, attempt)
                if retry is None:
                    return _decode(response)
            attempt += 1
            if retry is not None and retry.delay:
                await asyncio.sleep(retry.delay)

    async def send_message(
        self, channel_id: int | str, content: str | None = None, **fields: Any
    ) -> Message:
        raw = await self.request(
            "POST",
            "/channels/{channel_id}/messages",
            channel_id=channel_id,
            json=_message_body(content, fields),
        )
        return Message.model_validate(raw)

    async def reply(self, message: Message, content: str | None = None, **fields: Any) -> Message:
        return await self.send_message(
            message.channel_id, content, message_reference=_reference(message), **fields
        )

    async def add_reaction(self, channel_id: int | str, message_id: int | str, emoji: str) -> None:
        await self.request(
            "PUT",
            "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me",
            channel_id=channel_id,
            message_id=message_id,
            emoji=emoji,
        )

    async def respond(
        self, interaction: Interaction, content: str | None = None, **data: Any
    ) -> None:
        # The same coordination as Rest.respond; its few Redis calls run in a thread.
        initial = self.initial_responses
        for _ in range(CLAIM_ATTEMPTS):
            if await asyncio.to_thread(initial.claim, interaction.id, RESPONDED):
                try:
                    await self._callback(
                        interaction, CHANNEL_MESSAGE_WITH_SOURCE, _message_body(content, data)
                    )
                except RestError as exc:
                    if exc.code != ALREADY_ACKNOWLEDGED:
                        await asyncio.to_thread(initial.release, interaction.id)
                        raise
                    break
                except BaseException:
                    await asyncio.to_thread(initial.release, interaction.id)
                    raise
                return
            if await asyncio.to_thread(initial.wait_deferred, interaction.id) is not None:
                break
        await self.follow_up(interaction, content, **data)

    async def defer(
        self, interaction: Interaction, *, ephemeral: bool = False, update: bool = False
    ) -> bool:
        initial = self.initial_responses
        if not await asyncio.to_thread(initial.claim, interaction.id, DEFERRING):
            return False
        try:
            await self._callback(interaction, *_deferral(ephemeral=ephemeral, update=update))
        except BaseException:
            await asyncio.to_thread(initial.release, interaction.id)
            raise
        await asyncio.to_thread(initial.mark, interaction.id, DEFERRED)
        return True

    async def follow_up(
        self, interaction: Interaction, content: str | None = None, **fields: Any
    ) -> Message:
        raw = await self.request(
            "POST",
            "/webhooks/{application_id}/{interaction_token}",
            application_id=interaction.application_id,
            interaction_token=interaction.token,
            json=_message_body(content, fields),
        )
        return Message.model_validate(raw)

    async def _callback(self, interaction: Interaction, kind: int, data: dict[str, Any]) -> None:
        await self.request(
            "POST",
            "/interactions/{interaction_id}/{interaction_token}/callback",
            interaction_id=interaction.id,
            interaction_token=interaction.token,
            json={"type": kind, "data": data} if data else {"type": kind},
        )


_process_client: tuple[int, Rest] | None = None


def rest_client() -> Rest:
    """This process's ``Rest.from_env()``, made on first use.

    A handler calls this rather than building a client at import: a prefork worker forks after
    importing the tasks, and a child must not share its parent's sockets.
    """
    global _process_client
    if _process_client is None or _process_client[0] != os.getpid():
        _process_client = (os.getpid(), Rest.from_env())
    return _process_client[1]
