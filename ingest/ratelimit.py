"""Discord's REST rate limits, shared by every process of the bot through Redis.

All state lives in Redis and changes only inside two Lua scripts, so any number of worker
processes on any number of machines admit requests as one client would. ``admit`` costs one
round trip; ``learn`` runs only when a response teaches something new (a bucket, a new window,
a 429, an invalid request), so the common request pays one round trip. Time is Redis's clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import redis
import redis.asyncio

from ingest.errors import (
    InvalidRequestLimit,
    RateLimiterUnavailable,
    RateLimitWaitTooLong,
    RestError,
)

log = logging.getLogger("ingest.ratelimit")

DEFAULT_GLOBAL_LIMIT: Final = 50
# Requests are admitted here and counted by Discord a little later; a window slightly longer
# than Discord's second absorbs that jitter, at the cost of 5 % of the global throughput.
DEFAULT_GLOBAL_WINDOW: Final = 1.05
# Cloudflare bans the IP past 10,000 invalid requests in 10 minutes; refuse well before.
DEFAULT_INVALID_LIMIT: Final = 8000
# An unknown route admits one request at a time; a holder that dies frees it after this.
UNKNOWN_ROUTE_LOCK: Final = 10.0
# While on the local fallback, how often to ask Redis again.
REDIS_RETRY_INTERVAL: Final = 5.0
# How often a request waiting behind an unknown route's first request asks again.
UNKNOWN_ROUTE_POLL: Final = 0.01
# Route parameters that set Discord's bucket apart ("major parameters").
MAJOR_PARAMETERS: Final = ("channel_id", "guild_id", "webhook_id")
# Routes carrying an interaction token answer interactions: not bound by the global limit.
EXEMPT_PARAMETER: Final = "interaction_token"
# The longest a request waits for its limits before RateLimitWaitTooLong (seconds).
DEFAULT_MAX_WAIT: Final = 60.0
# A second learned reset within this many ms of the known one belongs to the same window.
SAME_WINDOW_MS: Final = 20


@dataclass(frozen=True, slots=True)
class RouteKey:
    """What the limits are keyed by: ``"POST /channels/{channel_id}/messages"`` + major value."""

    route: str
    major: str
    exempt: bool

    @classmethod
    def of(cls, method: str, template: str, params: Mapping[str, object]) -> RouteKey:
        parts = [f"{name}={params[name]}" for name in MAJOR_PARAMETERS if name in params]
        for secret in ("webhook_token", EXEMPT_PARAMETER):
            if secret in params:
                # A token is a credential: it keys the bucket but never enters Redis as is.
                digest = hashlib.sha256(str(params[secret]).encode()).hexdigest()[:16]
                parts.append(f"{secret}#{digest}")
        if "interaction_id" in params:
            parts.append(f"interaction_id={params['interaction_id']}")
        return cls(f"{method.upper()} {template}", ",".join(parts), EXEMPT_PARAMETER in params)

    @property
    def bot_token_auth(self) -> bool:
        """Authorised by the bot token: a webhook or interaction token in the path is its own
        credential, and its 401 (e.g. an interaction token past its 15 minutes) says nothing
        about the bot's token."""
        return "_token#" not in self.major


@dataclass(frozen=True, slots=True)
class Limits:
    """What one response says about the limits (headers and, on a 429, the body)."""

    status: int
    bucket: str = ""
    limit: int = 0
    remaining: int = 0
    reset_after: float = -1.0
    scope: str = ""
    retry_after: float = 0.0

    @classmethod
    def of(cls, status: int, headers: Mapping[str, str], body: Any = None) -> Limits:
        def number(name: str, default: float) -> float:
            try:
                return float(headers.get(name, default))
            except ValueError:
                return default

        retry_after = 0.0
        if status == 429:
            retry_after = number("Retry-After", 1.0)
            if isinstance(body, dict) and isinstance(body.get("retry_after"), int | float):
                retry_after = float(body["retry_after"])
        scope = headers.get("X-RateLimit-Scope", "")
        if not scope and headers.get("X-RateLimit-Global", "").lower() == "true":
            scope = "global"
        if not scope and status == 429 and isinstance(body, dict) and body.get("global"):
            scope = "global"
        return cls(
            status=status,
            bucket=headers.get("X-RateLimit-Bucket", ""),
            limit=int(number("X-RateLimit-Limit", 0)),
            remaining=int(number("X-RateLimit-Remaining", 0)),
            reset_after=number("X-RateLimit-Reset-After", -1.0),
            scope=scope,
            retry_after=retry_after,
        )

    @property
    def invalid(self) -> bool:
        """Counts toward Cloudflare's ban: 401, 403, and 429s except the ``shared`` scope."""
        return self.status in (401, 403) or (self.status == 429 and self.scope != "shared")


@dataclass(frozen=True, slots=True)
class Permit:
    """An admitted request; hand it back to ``learn`` with the response."""

    key: RouteKey
    request_id: str
    locked: bool  # holds the unknown route's one-at-a-time lock
    bucket: str  # the bucket the limiter knew ("" for none)
    limit: int
    fresh: bool  # this request opened a new window, whose true reset only the response tells
    admitted_at: float = 0.0  # local monotonic seconds


@dataclass(frozen=True, slots=True)
class _Wait:
    seconds: float
    reason: str


# ARGV: prefix, route, major, exempt, global limit, global window ms, invalid limit,
# request id, lock ms. Reply: {0, kind, bucket, limit, fresh} admitted; {1, wait ms, reason};
# {2} token known bad; {3, invalid count}.
_ADMIT: Final = """
local p, route, major = ARGV[1], ARGV[2], ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', p .. 'unauthorized') == 1 then return {2} end
local invalid_limit = tonumber(ARGV[7])
if invalid_limit > 0 then
  local minute = math.floor(now / 60000)
  local invalid = 0
  for i = 0, 9 do
    invalid = invalid + (tonumber(redis.call('GET', p .. 'invalid:' .. (minute - i))) or 0)
  end
  if invalid >= invalid_limit then return {3, invalid} end
end
local exempt = ARGV[4] == '1'
if not exempt then
  local blocked = tonumber(redis.call('GET', p .. 'global_until')) or 0
  if blocked > now then return {1, blocked - now, 'global'} end
end
local bucket = redis.call('HGET', p .. 'routes', route)
local bkey, lock, limit, remaining, reset_at, period = nil, nil, 0, 0, 0, 0
local fresh = 0
if bucket == false then
  bucket = ''
  lock = p .. 'lock:' .. route .. '|' .. major
  if redis.call('EXISTS', lock) == 1 then return {1, 0, 'unknown'} end
elseif bucket ~= '' then
  bkey = p .. 'bucket:' .. bucket .. '|' .. major
  local s = redis.call('HMGET', bkey, 'limit', 'remaining', 'reset_at', 'period')
  limit = tonumber(s[1])
  if limit then
    remaining, reset_at, period = tonumber(s[2]), tonumber(s[3]), tonumber(s[4])
  else
    -- A new major value of a known bucket: start from the bucket's known limit and period.
    local known = redis.call('HMGET', p .. 'limits', bucket, bucket .. ':period')
    limit, period = tonumber(known[1]) or 1, tonumber(known[2]) or 1000
    remaining, reset_at = limit, 0
  end
  if now >= reset_at then
    -- Our window is over: a new one opens; until a response says when it ends, assume a
    -- full period from now (the response moves it later, never earlier).
    remaining, reset_at, fresh = limit, now + period, 1
  end
  if remaining <= 0 then return {1, reset_at - now, 'bucket'} end
end
if not exempt then
  local gk = p .. 'global'
  local window = tonumber(ARGV[6])
  redis.call('ZREMRANGEBYSCORE', gk, '-inf', now - window)
  if redis.call('ZCARD', gk) >= tonumber(ARGV[5]) then
    local oldest = redis.call('ZRANGE', gk, 0, 0, 'WITHSCORES')
    return {1, math.max(1, tonumber(oldest[2]) + window - now), 'global'}
  end
  redis.call('ZADD', gk, now, ARGV[8])
  redis.call('PEXPIRE', gk, 2 * window)
end
if bkey then
  redis.call('HSET', bkey, 'limit', limit, 'remaining', remaining - 1, 'reset_at', reset_at,
    'period', period)
  redis.call('PEXPIRE', bkey, reset_at - now + 60000)
end
if lock then redis.call('SET', lock, ARGV[8], 'PX', ARGV[9]) end
return {0, lock and 1 or 0, bucket, limit, fresh}
"""

# ARGV: prefix, route, major, request id, locked, bucket, limit, remaining, reset-after ms,
# status, scope, retry-after ms, invalid, global window margin ms (0: the slot stands),
# bot token auth (1: a 401 means the bot's token is wrong).
# Reply: invalid requests in the 10-minute window.
_LEARN: Final = """
local p, route, major = ARGV[1], ARGV[2], ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bucket, status = ARGV[6], tonumber(ARGV[10])
local limit, remaining, reset_after = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local bkey = nil
if bucket ~= '' then
  redis.call('HSET', p .. 'routes', route, bucket)
  bkey = p .. 'bucket:' .. bucket .. '|' .. major
  if limit > 0 and reset_after >= 0 then
    local known = tonumber(redis.call('HGET', p .. 'limits', bucket .. ':period')) or 0
    -- The first request of a window reports the whole period; keep the longest seen.
    local period = math.max(known, math.ceil(reset_after))
    redis.call('HSET', p .. 'limits', bucket, limit, bucket .. ':period', period)
    local reset_at = now + math.ceil(reset_after)
    local s = redis.call('HMGET', bkey, 'remaining', 'reset_at')
    local have_remaining, have_reset = tonumber(s[1]), tonumber(s[2])
    if have_remaining == nil then
      have_remaining, have_reset = remaining, reset_at
    elseif reset_at > have_reset - 20 then
      -- This window (not a late answer from the last one): Discord's count wins if lower.
      have_remaining = math.min(have_remaining, remaining)
      have_reset = math.max(have_reset, reset_at)
    end
    redis.call('HSET', bkey, 'limit', limit, 'remaining', have_remaining,
      'reset_at', have_reset, 'period', period)
    redis.call('PEXPIRE', bkey, have_reset - now + 60000)
  end
elseif status >= 200 and status < 400 and ARGV[5] == '1' then
  -- A success without bucket headers: the route has no limit of its own.
  redis.call('HSET', p .. 'routes', route, '')
end
if status == 429 then
  local retry_ms = math.max(1, tonumber(ARGV[12]))
  local until_ms = now + retry_ms
  if ARGV[11] == 'global' then
    local blocked = tonumber(redis.call('GET', p .. 'global_until')) or 0
    if until_ms > blocked then redis.call('SET', p .. 'global_until', until_ms, 'PX', retry_ms) end
  elseif bkey then
    local have_reset = tonumber(redis.call('HGET', bkey, 'reset_at')) or 0
    redis.call('HSET', bkey, 'remaining', 0, 'reset_at', math.max(have_reset, until_ms))
    redis.call('PEXPIRE', bkey, retry_ms + 60000)
  end
end
if status == 401 and ARGV[15] == '1' then
  redis.call('SET', p .. 'unauthorized', 1, 'PX', 600000)
end
local margin = tonumber(ARGV[14])
if margin > 0 then
  -- A slow answer: Discord may have counted the request as late as now, so its global slot
  -- ends a window after now (less the margin the window already has), never earlier.
  redis.call('ZADD', p .. 'global', 'XX', 'GT', now - margin, ARGV[4])
end
local minute = math.floor(now / 60000)
if ARGV[13] == '1' then
  local key = p .. 'invalid:' .. minute
  redis.call('INCR', key)
  redis.call('PEXPIRE', key, 660000)
end
if ARGV[5] == '1' then
  local lock = p .. 'lock:' .. route .. '|' .. major
  if redis.call('GET', lock) == ARGV[4] then redis.call('DEL', lock) end
end
local invalid = 0
for i = 0, 9 do
  invalid = invalid + (tonumber(redis.call('GET', p .. 'invalid:' .. (minute - i))) or 0)
end
return invalid
"""


class LimiterCore:
    """What to ask Redis and what its answers mean; no I/O (the shells below do that)."""

    def __init__(
        self,
        token: str,
        *,
        global_limit: int = DEFAULT_GLOBAL_LIMIT,
        global_window: float = DEFAULT_GLOBAL_WINDOW,
        invalid_limit: int = DEFAULT_INVALID_LIMIT,
        namespace: str = "",
        max_wait: float = DEFAULT_MAX_WAIT,
    ) -> None:
        self.max_wait = max_wait
        # Limits are per bot: the key prefix is a digest of the token, never the token.
        digest = hashlib.sha256(token.encode()).hexdigest()[:16]
        self.prefix = f"ingest:rest:{digest}:{namespace + ':' if namespace else ''}"
        self.global_limit = global_limit
        self.global_window_ms = round(global_window * 1000)
        self.invalid_limit = invalid_limit
        self.invalid_count = 0

    def check_wait(self, key: RouteKey, total: float) -> None:
        """Refuse a wait past ``max_wait`` rather than hold a worker slot that long (some
        Discord windows last minutes)."""
        if total > self.max_wait:
            raise RateLimitWaitTooLong(
                f"{key.route}: the rate limits would hold it {total:.1f} s, over the "
                f"{self.max_wait:g} s allowed (DISCORD_REST_MAX_WAIT); retry later",
                status=429,
            )

    def admit_args(self, key: RouteKey, request_id: str) -> list[str | int]:
        return [
            self.prefix,
            key.route,
            key.major,
            int(key.exempt),
            self.global_limit,
            self.global_window_ms,
            self.invalid_limit,
            request_id,
            round(UNKNOWN_ROUTE_LOCK * 1000),
        ]

    def admitted(self, key: RouteKey, request_id: str, reply: list[Any]) -> Permit | _Wait:
        code = int(reply[0])
        if code == 0:
            return Permit(
                key=key,
                request_id=request_id,
                locked=bool(int(reply[1])),
                bucket=_text(reply[2]),
                limit=int(reply[3]),
                fresh=bool(int(reply[4])),
                admitted_at=time.monotonic(),
            )
        if code == 1:
            if _text(reply[2]) == "unknown":
                return _Wait(UNKNOWN_ROUTE_POLL, "unknown")
            return _Wait(int(reply[1]) / 1000, _text(reply[2]))
        if code == 2:
            raise RestError(
                f"{key.route} refused: Discord rejected this bot's token (401) within the last "
                "10 minutes; set DISCORD_TOKEN to the bot token from the Developer Portal",
                status=401,
            )
        self.invalid_count = int(reply[1])
        raise InvalidRequestLimit(
            f"{key.route} refused: {self.invalid_count} invalid requests (401/403/429) by this "
            f"bot in 10 minutes reached the guard's limit of {self.invalid_limit}; Cloudflare "
            "bans the IP at 10,000. Fix the failing calls and wait for the window to pass",
            status=None,
        )

    def learn_args(self, permit: Permit, limits: Limits | None) -> list[str | int] | None:
        """Arguments for the learning script, or None when the response tells nothing new."""
        if limits is None:  # no response: only the lock needs freeing
            if not permit.locked:
                return None
            limits = Limits(status=0)
        # The global slot was counted at admission, Discord counts it on arrival: the window's
        # margin covers the gap only while the answer is quicker than the margin.
        margin_ms = self.global_window_ms - 1000
        late = (
            not permit.key.exempt
            and margin_ms > 0
            and (time.monotonic() - permit.admitted_at) * 1000 > margin_ms
        )
        news = (
            late
            or permit.locked
            or permit.fresh
            or limits.status == 429
            or limits.invalid
            or limits.bucket != permit.bucket
            or (limits.limit and limits.limit != permit.limit)
        )
        if not news:
            return None
        return [
            self.prefix,
            permit.key.route,
            permit.key.major,
            permit.request_id,
            int(permit.locked),
            limits.bucket,
            limits.limit,
            limits.remaining,
            round(limits.reset_after * 1000) if limits.reset_after >= 0 else -1,
            limits.status,
            limits.scope,
            round(limits.retry_after * 1000),
            int(limits.invalid),
            margin_ms if late else 0,
            int(permit.key.bot_token_auth),
        ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unavailable(exc: Exception) -> RateLimiterUnavailable:
    return RateLimiterUnavailable(
        f"the shared REST rate limiter (Redis) is unreachable ({type(exc).__name__}); not "
        "sending unlimited requests. Check INGEST_STATE_URL/CELERY_BROKER_URL",
        status=None,
    )


class LocalState:
    """The two scripts over in-process state: the opt-in fallback while Redis is unreachable.

    Same arguments, same replies, so ``LimiterCore`` reads both alike. It limits this process
    only: several processes on the fallback at once may together exceed Discord's limits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.unauthorized_until = 0
        self.global_until = 0
        self.invalid: dict[int, int] = {}  # minute -> count
        self.routes: dict[str, str] = {}
        self.limits: dict[str, tuple[int, int]] = {}  # bucket -> (limit, period ms)
        self.buckets: dict[str, list[int]] = {}  # bucket|major -> [limit, remaining, reset, period]
        self.global_log: deque[int] = deque()
        self.locks: dict[str, tuple[str, int]] = {}  # route|major -> (request id, expiry)

    def _invalid_total(self, now: int) -> int:
        minute = now // 60000
        return sum(self.invalid.get(minute - i, 0) for i in range(10))

    def admit(self, args: list[str | int]) -> list[Any]:
        _, route, major, exempt, global_limit, window, invalid_limit, request_id, lock_ms = args
        with self._lock:
            now = round(time.monotonic() * 1000)
            if self.unauthorized_until > now:
                return [2]
            if int(invalid_limit) > 0 and self._invalid_total(now) >= int(invalid_limit):
                return [3, self._invalid_total(now)]
            if not int(exempt) and self.global_until > now:
                return [1, self.global_until - now, "global"]
            lock_key = f"{route}|{major}"
            bucket = self.routes.get(str(route))
            unknown = bucket is None
            state: list[int] | None = None
            fresh = 0
            if bucket is None:
                bucket = ""
                held = self.locks.get(lock_key)
                if held is not None and held[1] > now:
                    return [1, 0, "unknown"]
            elif bucket:
                known = self.buckets.get(f"{bucket}|{major}")
                if known is None:
                    limit, period = self.limits.get(bucket, (1, 1000))
                    known = [limit, limit, 0, period]
                state = list(known)  # stored only once admitted, as the script does
                if now >= state[2]:
                    state[1], state[2], fresh = state[0], now + state[3], 1
                if state[1] <= 0:
                    return [1, state[2] - now, "bucket"]
            if not int(exempt):
                while self.global_log and self.global_log[0] <= now - int(window):
                    self.global_log.popleft()
                if len(self.global_log) >= int(global_limit):
                    return [1, max(1, self.global_log[0] + int(window) - now), "global"]
                self.global_log.append(now)
            if state is not None:
                state[1] -= 1
                self.buckets[f"{bucket}|{major}"] = state
            if unknown:
                self.locks[lock_key] = (str(request_id), now + int(lock_ms))
            return [0, int(unknown), bucket, state[0] if state else 0, fresh]

    def learn(self, args: list[str | int]) -> int:
        # The fallback keeps each slot where admission put it (the last argument is ignored).
        (_, route, major, request_id, locked, bucket, limit, remaining, reset_after, status,
         scope, retry_ms, invalid, _, bot_token_auth) = args  # fmt: skip
        with self._lock:
            now = round(time.monotonic() * 1000)
            key = f"{bucket}|{major}"
            if bucket:
                self.routes[str(route)] = str(bucket)
                if int(limit) > 0 and int(reset_after) >= 0:
                    period = max(self.limits.get(str(bucket), (0, 0))[1], int(reset_after))
                    self.limits[str(bucket)] = (int(limit), period)
                    reset_at = now + int(reset_after)
                    state = self.buckets.get(key)
                    if state is None:
                        state = [int(limit), int(remaining), reset_at, period]
                    elif reset_at > state[2] - SAME_WINDOW_MS:
                        state = [int(limit), min(state[1], int(remaining)),
                                 max(state[2], reset_at), period]  # fmt: skip
                    self.buckets[key] = state
            elif 200 <= int(status) < 400 and int(locked):
                self.routes[str(route)] = ""
            if int(status) == 429:
                until = now + max(1, int(retry_ms))
                if scope == "global":
                    self.global_until = max(self.global_until, until)
                elif key in self.buckets:
                    self.buckets[key][1] = 0
                    self.buckets[key][2] = max(self.buckets[key][2], until)
            if int(status) == 401 and int(bot_token_auth):
                self.unauthorized_until = now + 600_000
            if int(invalid):
                self.invalid[now // 60000] = self.invalid.get(now // 60000, 0) + 1
            if int(locked) and self.locks.get(f"{route}|{major}", ("", 0))[0] == request_id:
                del self.locks[f"{route}|{major}"]
            return self._invalid_total(now)


class WaitObserver:
    """Receives how long each request waited for the limiter (the metrics implement it)."""

    def limiter_waited(self, seconds: float) -> None:
        pass

    def invalid_requests(self, count: int) -> None:
        pass


class _Shell:
    """What both shells share: the opt-in local fallback while Redis does not answer."""

    def __init__(
        self, core: LimiterCore, observer: WaitObserver | None, fallback: LocalState | None
    ) -> None:
        self.core = core
        self.observer = observer or WaitObserver()
        self.fallback = fallback
        self._on_fallback = False
        self._retry_redis_at = 0.0

    def _skip_redis(self) -> LocalState | None:
        """The fallback while on it, asking Redis again only every few seconds (not per call)."""
        if self._on_fallback and time.monotonic() < self._retry_redis_at:
            return self.fallback
        return None

    def _fallback(self, exc: Exception) -> LocalState:
        if self.fallback is None:
            raise _unavailable(exc) from None
        self._retry_redis_at = time.monotonic() + REDIS_RETRY_INTERVAL
        if not self._on_fallback:
            self._on_fallback = True
            log.warning(
                "Redis unreachable (%s): limiting this process alone until it answers",
                type(exc).__name__,
            )
        return self.fallback

    def _redis_answered(self, local: LocalState | None) -> None:
        if self._on_fallback and local is None:
            self._on_fallback = False
            log.info("Redis answers again: the bot-wide rate limits are back")


class RateLimiter(_Shell):
    """The limiter for a synchronous client (a prefork or threads Celery worker)."""

    def __init__(
        self,
        client: redis.Redis,
        core: LimiterCore,
        observer: WaitObserver | None = None,
        fallback: LocalState | None = None,
    ) -> None:
        super().__init__(core, observer, fallback)
        self._admit = client.register_script(_ADMIT)
        self._learn = client.register_script(_LEARN)

    def admit(self, key: RouteKey) -> Permit:
        """Block until ``key`` may be sent; raise if the bot must not send at all."""
        request_id = uuid.uuid4().hex
        args = self.core.admit_args(key, request_id)
        started = time.monotonic()
        while True:
            local = self._skip_redis()
            try:
                reply = local.admit(args) if local else self._admit(args=args)
            except redis.RedisError as exc:
                reply = self._fallback(exc).admit(args)
            else:
                self._redis_answered(local)
            outcome = self.core.admitted(key, request_id, reply)
            if isinstance(outcome, Permit):
                self.observer.limiter_waited(time.monotonic() - started)
                return outcome
            self.core.check_wait(key, time.monotonic() - started + outcome.seconds)
            time.sleep(outcome.seconds)

    def learn(self, permit: Permit, limits: Limits | None) -> None:
        args = self.core.learn_args(permit, limits)
        if args is None:
            return
        local = self._skip_redis()
        try:
            invalid = local.learn(args) if local else int(self._learn(args=args))
        except redis.RedisError as exc:
            if self.fallback is None:
                # The request was sent and answered: its result must reach the caller. The
                # next admit fails if Redis stays away; a held route lock expires by itself.
                log.warning("rate limits of a response not recorded: %s", type(exc).__name__)
                return
            invalid = self._fallback(exc).learn(args)
        self.core.invalid_count = invalid
        self.observer.invalid_requests(invalid)


class AsyncRateLimiter(_Shell):
    """The same limiter for asyncio code (the gateway, async handlers)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        core: LimiterCore,
        observer: WaitObserver | None = None,
        fallback: LocalState | None = None,
    ) -> None:
        super().__init__(core, observer, fallback)
        self._admit = client.register_script(_ADMIT)
        self._learn = client.register_script(_LEARN)

    async def admit(self, key: RouteKey) -> Permit:
        request_id = uuid.uuid4().hex
        args = self.core.admit_args(key, request_id)
        started = time.monotonic()
        while True:
            local = self._skip_redis()
            try:
                reply = local.admit(args) if local else await self._admit(args=args)
            except redis.RedisError as exc:
                reply = self._fallback(exc).admit(args)
            else:
                self._redis_answered(local)
            outcome = self.core.admitted(key, request_id, reply)
            if isinstance(outcome, Permit):
                self.observer.limiter_waited(time.monotonic() - started)
                return outcome
            self.core.check_wait(key, time.monotonic() - started + outcome.seconds)
            await asyncio.sleep(outcome.seconds)

    async def learn(self, permit: Permit, limits: Limits | None) -> None:
        args = self.core.learn_args(permit, limits)
        if args is None:
            return
        local = self._skip_redis()
        try:
            invalid = local.learn(args) if local else int(await self._learn(args=args))
        except redis.RedisError as exc:
            if self.fallback is None:
                # The request was sent and answered: its result must reach the caller. The
                # next admit fails if Redis stays away; a held route lock expires by itself.
                log.warning("rate limits of a response not recorded: %s", type(exc).__name__)
                return
            invalid = self._fallback(exc).learn(args)
        self.core.invalid_count = invalid
        self.observer.invalid_requests(invalid)
