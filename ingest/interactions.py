"""Interactions answered within Discord's 3 seconds: one initial response, and an opt-in auto-defer.

``InitialResponses`` decides who gives an interaction its one initial response (the handler's
``respond``, its ``defer``, or the auto-defer timer) with a ``SET NX`` per interaction id in the
state Redis, so two of them can never both reach Discord as initial responses, whichever process
or thread sends them. ``AutoDefer`` is the timer a handler registered with ``auto_defer`` runs
under: budget seconds after the gateway received the event, it defers (type 5) unless the
handler answered first; the handler's later ``respond`` is then sent as a follow-up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, Final

import redis

from ingest.brokers import sync_redis
from ingest.errors import ConfigError

log = logging.getLogger("ingest.interactions")

KEY_PREFIX: Final = "ingest:interaction:"
# An interaction token answers for 15 minutes; after that nobody can respond anyway.
CLAIM_TTL: Final = 15 * 60
DEFAULT_BUDGET: Final = 2.0
# Interaction types (Discord's): a component's deferral is type 6 (the message it sits on is
# edited later); PING and autocomplete have no deferral at all.
MESSAGE_COMPONENT: Final = 3
NOT_DEFERRABLE: Final = frozenset({1, 4})
BUDGET_ENV: Final = "INGEST_AUTO_DEFER_SECONDS"
RESPONDED: Final = b"responded"
DEFERRING: Final = b"deferring"
DEFERRED: Final = b"deferred"
# How long a respond that lost to a deferral in flight waits for Discord to accept it: a
# follow-up sent before the deferral is accepted would be refused (unknown interaction).
DEFERRAL_WAIT: Final = 5.0
REDIS_TIMEOUT: Final = 2.0


class InitialResponses:
    """Per interaction id, who sent (or is sending) the initial response: ``SET NX`` claims it.

    ``claim`` is True for exactly one caller per interaction: it sends the callback. Redis being
    unreachable counts as a won claim (the answer matters more than the coordination: Discord
    refuses a second initial response with an error, it never shows two).
    """

    def __init__(self, url: str, namespace: str = "") -> None:
        self._url = url
        self._prefix = f"{KEY_PREFIX}{namespace}:" if namespace else KEY_PREFIX
        self._client: tuple[int, redis.Redis] | None = None

    def _redis(self) -> redis.Redis:
        # Per process: a forked prefork child must not share its parent's socket.
        if self._client is None or self._client[0] != os.getpid():
            self._client = (os.getpid(), sync_redis(self._url, timeout=REDIS_TIMEOUT))
        return self._client[1]

    def claim(self, interaction_id: int | str, state: bytes) -> bool:
        key = self._prefix + str(interaction_id)
        try:
            won = self._redis().set(key, state, nx=True, ex=CLAIM_TTL)
        except (redis.RedisError, OSError) as exc:
            log.warning("interaction state unavailable, answering %s anyway: %r", key, exc)
            return True
        return bool(won)

    def mark(self, interaction_id: int | str, state: bytes) -> None:
        try:
            self._redis().set(self._prefix + str(interaction_id), state, ex=CLAIM_TTL)
        except (redis.RedisError, OSError) as exc:
            log.warning("interaction state unavailable, %s not marked: %r", interaction_id, exc)

    def release(self, interaction_id: int | str) -> None:
        """The claimed callback failed: whoever answers next may send it."""
        try:
            self._redis().delete(self._prefix + str(interaction_id))
        except (redis.RedisError, OSError) as exc:
            log.warning("interaction state unavailable, %s stays claimed: %r", interaction_id, exc)

    def wait_deferred(
        self, interaction_id: int | str, timeout: float = DEFERRAL_WAIT
    ) -> bytes | None:
        """Wait while a deferral is in flight; the state then (None if the claim was released)."""
        deadline = time.monotonic() + timeout
        key = self._prefix + str(interaction_id)
        while True:
            try:
                raw = self._redis().get(key)
            except (redis.RedisError, OSError):
                return None
            state = raw if isinstance(raw, bytes) else None
            if state != DEFERRING or time.monotonic() >= deadline:
                return state
            time.sleep(0.01)


def budget_of(option: object, env: dict[str, str] | None = None) -> float | None:
    """Seconds from receipt to deferral for ``@on(..., auto_defer=option)``; None: off.

    ``True`` takes ``INGEST_AUTO_DEFER_SECONDS`` (default 2 s: a deferral needs a round trip
    to Discord, which must land before the 3 s are over); a number is the budget itself.
    """
    if option is None or option is False:
        return None
    if option is True:
        raw = (os.environ if env is None else env).get(BUDGET_ENV, "").strip()
        if not raw:
            return DEFAULT_BUDGET
        try:
            budget = float(raw)
        except ValueError:
            budget = -1.0
        if not 0 < budget < 3:
            raise ConfigError(f"{BUDGET_ENV} must be a number of seconds in (0, 3), got {raw!r}")
        return budget
    if isinstance(option, int | float) and 0 < option < 3:
        return float(option)
    raise ConfigError(f"auto_defer must be True or seconds in (0, 3), got {option!r}")


class AutoDefer:
    """Defers ``interaction`` once ``budget`` seconds have passed since ``received_at``.

    Started before the handler runs, cancelled when it returns. ``defer`` is the REST client's
    ``defer``, which claims the initial response first: a handler that already responded wins,
    and then no deferral is sent.
    """

    deferrals: ClassVar[int] = 0  # per process: sent by the timer

    def __init__(
        self,
        interaction: Any,
        budget: float,
        received_at: float | None,
        defer: Callable[[Any], bool],
    ) -> None:
        self.interaction = interaction
        now = time.time()
        start = received_at if received_at else now
        # The gateway's clock, not ours: a worker behind it must not defer later than the
        # budget from now, only earlier (a deferral too late is an interaction failed).
        self.delay = min(budget, max(0.0, start + budget - now))
        self._defer = defer
        self._timer = threading.Timer(self.delay, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> AutoDefer:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        # A deferral already on its way finishes before the task is acked.
        self._timer.join(DEFERRAL_WAIT)

    def _fire(self) -> None:
        try:
            if self._defer(self.interaction):
                AutoDefer.deferrals += 1
                log.info("interaction %s deferred: no response within budget", self.interaction.id)
        except Exception as exc:  # noqa: BLE001 - a timer thread has nobody to raise to
            log.warning("auto-defer of interaction %s failed: %r", self.interaction.id, exc)
