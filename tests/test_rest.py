"""The REST client and its shared limiter against the simulator's REST routes and a real Redis.

Each test keys its limits under a fresh namespace in Redis db 3, so tests never share state.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ingest.errors import (
    ConfigError,
    InvalidRequestLimit,
    RateLimiterUnavailable,
    RateLimitWaitTooLong,
    RestError,
)
from ingest.models import Interaction, Message
from ingest.ratelimit import LimiterCore, Limits, RateLimiter, RouteKey
from ingest.rest import AsyncRest, Rest, RestMetrics, Settings, rest_metrics
from ingest.testing import GatewaySimulator, SimulatorThread
from tests.test_simulator import ready_session, recv_json

TOKEN = "sim-token"
CHANNEL = 1180000000000000101


@pytest.fixture
def state_url(redis_server: str) -> str:
    return f"{redis_server}/3"


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(port=0) as thread:
        yield thread


def client(
    sim: SimulatorThread,
    state_url: str,
    token: str = TOKEN,
    namespace: str | None = None,
    **limits: Any,
) -> Rest:
    settings = Settings(token=token, api_url=sim.api_url, state_url=state_url, **limits)
    return Rest(settings, namespace=namespace or uuid.uuid4().hex)


def statuses(sim: SimulatorThread) -> list[int]:
    return sim.read(lambda s: [r.status for r in s.rest.log])


def interaction(number: int = 1) -> Interaction:
    return Interaction.model_validate(
        {
            "id": str(1190000000000000000 + number),
            "application_id": "1100000000000000001",
            "type": 2,
            "token": f"interaction-token-{number}",
            "version": 1,
            "app_permissions": "0",
            "entitlements": [],
            "authorizing_integration_owners": {},
            "attachment_size_limit": 8388608,
        }
    )


# ---- the calls a handler makes ----------------------------------------------------------


def test_send_message_reply_and_reaction_return_discords_objects(
    sim: SimulatorThread, state_url: str
) -> None:
    rest = client(sim, state_url)
    sent = rest.send_message(CHANNEL, "hello")
    answer = rest.reply(sent, "hello back")
    rest.add_reaction(CHANNEL, answer.id, "👍")

    assert isinstance(sent, Message) and sent.content == "hello"
    assert sent.author.id == 1100000000000000001  # the bot user
    assert answer.message_reference is not None
    assert answer.message_reference.message_id == sent.id
    assert sim.read(lambda s: s.rest.reactions) == [(str(CHANNEL), str(answer.id), "👍")]


def test_interaction_callbacks_are_typed_and_exempt_from_the_global_limit(
    sim: SimulatorThread, state_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A bot over its global limit must still answer interactions within 3 seconds.
    rest = client(sim, state_url, global_limit=1)
    rest.send_message(CHANNEL, "uses the whole global budget")
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="httpx"):
        rest.defer(interaction(1), ephemeral=True)
        rest.respond(interaction(2), "pong")
        follow = rest.follow_up(interaction(1), "done")

    assert time.monotonic() - started < 0.9  # no wait for the global window
    callbacks = sim.read(lambda s: [(c["id"], c["body"]) for c in s.rest.callbacks])
    assert callbacks == [
        ("1190000000000000001", {"type": 5, "data": {"flags": 64}}),
        ("1190000000000000002", {"type": 4, "data": {"content": "pong"}}),
    ]
    assert isinstance(follow, Message) and follow.content == "done"
    assert "/webhooks/1100000000000000001/***" in caplog.text  # httpx logs the URL...
    assert "interaction-token" not in caplog.text  # ...but never the token in it


def test_message_created_through_rest_comes_back_as_message_create_from_the_bot(
    state_url: str,
) -> None:
    async def scenario() -> None:
        async with GatewaySimulator(port=0) as sim:
            ws, _ready = await ready_session(sim)
            settings = Settings(token=TOKEN, api_url=sim.api_url, state_url=state_url)
            async with AsyncRest(settings, namespace=uuid.uuid4().hex) as rest:
                sent = await rest.send_message(CHANNEL, "!hello")
            dispatch = await recv_json(ws)
            await ws.close()
        assert dispatch["t"] == "MESSAGE_CREATE"
        assert dispatch["d"]["id"] == str(sent.id)
        assert dispatch["d"]["author"]["id"] == sim.bot_user["id"]

    asyncio.run(asyncio.wait_for(scenario(), 20))


# ---- limits ------------------------------------------------------------------------------


def test_sync_and_async_clients_share_one_bucket_without_a_429(
    sim: SimulatorThread, state_url: str
) -> None:
    sim.read(lambda s: s.rest.configure(message_limit=3, message_period=1.0))
    namespace = uuid.uuid4().hex
    sync = client(sim, state_url, namespace=namespace)
    settings = Settings(token=TOKEN, api_url=sim.api_url, state_url=state_url)

    async def send_async(count: int) -> None:
        async with AsyncRest(settings, namespace=namespace) as rest:
            await asyncio.gather(*(rest.send_message(CHANNEL, "async") for _ in range(count)))

    started = time.monotonic()
    for _ in range(3):
        sync.send_message(CHANNEL, "sync")
    asyncio.run(send_async(4))  # the bucket is empty: these wait for the next windows
    elapsed = time.monotonic() - started

    assert statuses(sim) == [200] * 7
    assert 1.9 <= elapsed < 4.0  # three windows: 3 + 3 + 1


def test_a_wait_longer_than_max_wait_raises_instead_of_blocking_the_worker(
    sim: SimulatorThread, state_url: str
) -> None:
    # A 10 s window with 1 request: the second would wait ~10 s, over a 0.5 s allowance.
    sim.read(lambda s: s.rest.configure(message_limit=1, message_period=10.0))
    rest = client(sim, state_url, max_wait=0.5)
    rest.send_message(CHANNEL, "first")
    started = time.monotonic()
    with pytest.raises(RateLimitWaitTooLong) as caught:
        rest.send_message(CHANNEL, "second")
    assert time.monotonic() - started < 0.5
    assert caught.value.status == 429 and "DISCORD_REST_MAX_WAIT" in str(caught.value)
    assert statuses(sim) == [200]  # nothing sent, no 429 earned


def test_a_global_429_holds_back_every_process_of_the_bot(
    sim: SimulatorThread, state_url: str
) -> None:
    # Discord allows 1/s here while the clients believe 50/s: only the 429 can teach them.
    sim.read(lambda s: setattr(s.rest, "global_limit", 1))
    namespace = uuid.uuid4().hex
    first, second = (client(sim, state_url, namespace=namespace) for _ in range(2))
    limited_before = rest_metrics.rate_limited["global"]
    first.send_message(CHANNEL, "takes the only slot")
    retried = threading.Thread(target=first.send_message, args=(CHANNEL + 1, "429, then retried"))
    retried.start()
    sim.wait_until(lambda: any(r.status == 429 for r in sim.sim.rest.log))
    second.send_message(CHANNEL + 2, "must wait for the global window")
    retried.join(10)

    log = sim.read(lambda s: list(s.rest.log))
    limited = [r for r in log if r.status == 429]
    assert limited[0].scope == "global"
    window_opens = log[0].at + 1.0
    from_second = next(r for r in log if r.major == str(CHANNEL + 2))
    assert from_second.at >= window_opens - 0.01  # held back, not sent into the 429
    assert sum(r.status == 200 for r in log) == 3
    assert rest_metrics.rate_limited["global"] - limited_before == len(limited)


def test_a_route_whose_bucket_is_unknown_admits_one_request_at_a_time(
    sim: SimulatorThread, state_url: str
) -> None:
    sim.read(lambda s: s.rest.configure(message_limit=2, message_period=1.0))
    rest = client(sim, state_url)

    async def burst() -> None:
        await asyncio.gather(
            *(asyncio.to_thread(rest.send_message, CHANNEL, "x") for _ in range(6))
        )

    asyncio.run(burst())
    # Without the lock, all six would fly before any bucket header came back: four 429s.
    assert statuses(sim) == [200] * 6


def test_a_lost_first_request_leaves_the_route_unknown_not_unlimited(state_url: str) -> None:
    import redis

    limiter = RateLimiter(
        redis.Redis.from_url(state_url), LimiterCore(TOKEN, namespace=uuid.uuid4().hex)
    )
    key = RouteKey.of("POST", "/channels/{channel_id}/messages", {"channel_id": 1})
    first = limiter.admit(key)
    limiter.learn(first, None)  # the connection failed: no headers came back
    assert first.locked and limiter.admit(key).locked


def test_a_response_already_answered_is_kept_when_redis_goes_away_before_learning() -> None:
    import redis

    from tests.brokers import PrivateRedis

    server = PrivateRedis()
    server.start()
    try:
        limiter = RateLimiter(redis.Redis.from_url(server.url), LimiterCore(TOKEN))
        key = RouteKey.of("GET", "/channels/{channel_id}", {"channel_id": 1})
        permit = limiter.admit(key)
        server.stop()
        limiter.learn(permit, Limits(200, "bucket", 5, 4, 1.0))  # the caller gets its result
        with pytest.raises(RateLimiterUnavailable):
            limiter.admit(key)  # but nothing more is sent
    finally:
        server.close()


def test_wrong_token_raises_401_after_at_most_two_requests_across_processes(
    sim: SimulatorThread, state_url: str
) -> None:
    namespace = uuid.uuid4().hex
    workers = [client(sim, state_url, token="wrong", namespace=namespace) for _ in range(3)]
    errors = []
    for _ in range(3):
        for rest in workers:
            with pytest.raises(RestError) as caught:
                rest.send_message(CHANNEL, "never sent")
            errors.append(caught.value)

    assert {e.status for e in errors} == {401}
    assert len(statuses(sim)) <= 2
    assert all("wrong" not in str(e) for e in errors)  # the token never shows


def test_an_expired_interaction_token_does_not_lock_out_the_bots_token(
    sim: SimulatorThread, state_url: str
) -> None:
    # Discord answers 401 (50027) to a follow-up past the token's 15 minutes: that token is
    # dead, the bot's own token is not, and every other route must go on working.
    late = interaction(3)
    sim.read(lambda s: s.rest.expired_tokens.add(late.token))
    rest = client(sim, state_url)
    with pytest.raises(RestError) as caught:
        rest.follow_up(late, "too late")
    assert (caught.value.status, caught.value.code) == (401, 50027)
    sent = rest.send_message(CHANNEL, "still allowed")
    assert sent.content == "still allowed"


def test_invalid_request_guard_stops_a_loop_of_403s_before_the_threshold(
    sim: SimulatorThread, state_url: str
) -> None:
    sim.read(lambda s: s.rest.forbidden_channels.add(str(CHANNEL)))
    rest = client(sim, state_url, invalid_limit=10)
    forbidden = 0
    with pytest.raises(InvalidRequestLimit, match="10 invalid requests"):
        for _ in range(100):
            with pytest.raises(RestError) as caught:
                rest.send_message(CHANNEL, "no access")
            if isinstance(caught.value, InvalidRequestLimit):
                raise caught.value
            assert (caught.value.status, caught.value.code) == (403, 50001)
            forbidden += 1
    assert forbidden == 10
    assert statuses(sim) == [403] * 10


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]  # nothing listens here once closed
    return port


def test_redis_unreachable_fails_clearly_and_sends_nothing(sim: SimulatorThread) -> None:
    rest = client(sim, f"redis://127.0.0.1:{closed_port()}/0")
    with pytest.raises(RateLimiterUnavailable, match="unreachable"):
        rest.send_message(CHANNEL, "unlimited is not an option")
    assert statuses(sim) == []


def test_opt_in_local_fallback_keeps_limits_in_process_while_redis_is_down(
    sim: SimulatorThread,
) -> None:
    sim.read(lambda s: s.rest.configure(message_limit=3, message_period=1.0))
    rest = client(sim, f"redis://127.0.0.1:{closed_port()}/0", local_fallback=True)
    started = time.monotonic()

    async def burst() -> None:
        await asyncio.gather(
            *(asyncio.to_thread(rest.send_message, CHANNEL, "x") for _ in range(7))
        )

    asyncio.run(burst())
    assert statuses(sim) == [200] * 7
    assert time.monotonic() - started >= 1.9  # three windows: 3 + 3 + 1


def test_a_post_is_not_retried_after_a_5xx_unless_the_caller_asks(
    sim: SimulatorThread, state_url: str
) -> None:
    rest = client(sim, state_url)
    sim.read(lambda s: s.rest.fail_next.extend([502]))
    with pytest.raises(RestError) as caught:
        rest.send_message(CHANNEL, "maybe applied")
    assert caught.value.status == 502
    assert statuses(sim) == [502]

    sim.read(lambda s: s.rest.fail_next.extend([502]))
    rest.request(
        "POST", "/channels/{channel_id}/messages", channel_id=CHANNEL, json={}, retry_unsafe=True
    )
    sim.read(lambda s: s.rest.fail_next.extend([503]))
    rest.add_reaction(CHANNEL, 1, "✅")  # PUT is idempotent: retried
    assert statuses(sim) == [502, 502, 200, 503, 204]


def test_route_needs_every_parameter() -> None:
    settings = Settings(token=TOKEN, api_url="http://127.0.0.1:9", state_url="redis://x")
    with pytest.raises(TypeError, match="channel_id"):
        Rest(settings).request("GET", "/channels/{channel_id}")


# ---- pure pieces -------------------------------------------------------------------------


def test_429_scope_comes_from_headers_or_the_global_flag_and_shared_is_not_invalid() -> None:
    user = Limits.of(
        429, {"X-RateLimit-Scope": "user", "X-RateLimit-Bucket": "b"}, {"retry_after": 1.5}
    )
    legacy = Limits.of(429, {}, {"retry_after": 0.2, "global": True})
    shared = Limits.of(429, {"X-RateLimit-Scope": "shared"}, {"retry_after": 3})
    assert (user.scope, user.retry_after, user.invalid) == ("user", 1.5, True)
    assert (legacy.scope, legacy.retry_after) == ("global", 0.2)
    assert not shared.invalid


def test_buckets_are_keyed_by_major_parameter_and_tokens_never_enter_redis() -> None:
    one = RouteKey.of("post", "/channels/{channel_id}/messages", {"channel_id": 1})
    two = RouteKey.of("POST", "/channels/{channel_id}/messages", {"channel_id": 2})
    hook = RouteKey.of(
        "POST",
        "/interactions/{interaction_id}/{interaction_token}/callback",
        {"interaction_id": 5, "interaction_token": "secret-token"},
    )
    assert one.route == two.route and one.major != two.major
    assert hook.exempt and not one.exempt
    assert "secret-token" not in hook.major


def test_metrics_scrape_requests_429s_invalid_count_and_limiter_wait() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    metrics = RestMetrics()
    metrics.request("POST /channels/{channel_id}/messages", 200)
    metrics.limited("user")
    metrics.invalid_requests(7)
    metrics.limiter_waited(0.003)
    registry = CollectorRegistry()
    registry.register(metrics)
    text = generate_latest(registry).decode()

    assert (
        'discord_ingest_rest_requests_total{route="POST /channels/{channel_id}/messages",'
        'status="200"} 1.0' in text
    )
    assert 'discord_ingest_rest_rate_limited_total{scope="user"} 1.0' in text
    assert "discord_ingest_rest_invalid_requests 7.0" in text
    assert 'discord_ingest_rest_limiter_wait_seconds_bucket{le="0.005"} 1.0' in text


def test_from_env_reads_token_and_limits_and_refuses_bad_values() -> None:
    env = {
        "DISCORD_TOKEN": "t",
        "INGEST_STATE_URL": "redis://127.0.0.1:6379/3",
        "DISCORD_API_URL": "http://api",
        "DISCORD_REST_GLOBAL_LIMIT": "1200",
    }
    settings = Settings.from_env(env)
    assert (settings.api_url, settings.global_limit) == ("http://api", 1200)
    with pytest.raises(ConfigError, match="DISCORD_TOKEN"):
        Settings.from_env({})
    with pytest.raises(ConfigError, match="DISCORD_REST_GLOBAL_LIMIT"):
        Settings.from_env({**env, "DISCORD_REST_GLOBAL_LIMIT": "fast"})
    with pytest.raises(ConfigError, match="INGEST_STATE_URL"):
        Settings.from_env({"DISCORD_TOKEN": "t", "CELERY_BROKER_URL": "amqp://guest@x//"})
    secret = Settings.from_env({**env, "DISCORD_TOKEN": "very-secret-token"})
    assert "very-secret-token" not in repr(Rest(secret))
