"""Interactions: one initial response whoever sends it, the opt-in auto-defer against the
simulator (which records interaction callbacks), and the gateway's receipt time as a handler
sees it. The auto-defer runs for real: simulator -> `python -m ingest` -> Redis -> a stock
worker of the test's own app (tests/apps/interactions.py) -> REST back to the simulator.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from ingest.ages import AGE_BUCKETS, start_ages
from ingest.errors import ConfigError
from ingest.handlers import current_event, event_handler
from ingest.interactions import DEFAULT_BUDGET, DEFERRING, AutoDefer, budget_of
from ingest.messages import HEADER_RECEIVED_AT
from ingest.models import Interaction
from ingest.rest import AsyncRest, Rest, Settings
from ingest.routing import FAST_QUEUE, fast_events, route_for
from ingest.testing import SimulatorThread
from tests.support import base_env, gateway_process, redis_url, worker_process

REDIS_DB = 0  # this file's own database on the shared Redis (see conftest)
TOKEN = "sim-token"
APPLICATION_ID = "1100000000000000001"


def interaction_payload(name: str, number: int | None = None) -> dict[str, Any]:
    number = number if number is not None else uuid.uuid4().int % 10**12
    return {
        "id": str(1190000000000000000 + number),
        "application_id": APPLICATION_ID,
        "type": 2,
        "token": f"interaction-token-{number}",
        "version": 1,
        "data": {"id": "1", "name": name, "type": 1},
        "channel_id": "1180000000000000101",
        "app_permissions": "0",
        "entitlements": [],
        "authorizing_integration_owners": {},
    }


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(port=0) as thread:
        yield thread


def callbacks(sim: SimulatorThread, interaction_id: str) -> list[int]:
    """The callback types the simulator received for one interaction, in order."""
    return sim.read(
        lambda s: [c["body"]["type"] for c in s.rest.callbacks if c["id"] == interaction_id]
    )


def follow_ups(sim: SimulatorThread, content: str) -> list[str]:
    return sim.read(
        lambda s: [
            m["content"]
            for m in s.rest.messages
            if m.get("webhook_id") == APPLICATION_ID and m["content"] == content
        ]
    )


# ---- one initial response ---------------------------------------------------------------


def test_respond_after_a_deferral_is_a_follow_up_and_defer_after_respond_sends_nothing(
    sim: SimulatorThread,
) -> None:
    settings = Settings(token=TOKEN, api_url=sim.api_url, state_url=redis_url(REDIS_DB))
    with Rest(settings, namespace=uuid.uuid4().hex) as rest:
        deferred = Interaction.model_validate(interaction_payload("a"))
        answered = Interaction.model_validate(interaction_payload("b"))
        assert rest.defer(deferred) is True
        rest.respond(deferred, "after the deferral")
        rest.respond(answered, "at once")
        assert rest.defer(answered) is False  # already answered: nothing to acknowledge
        assert rest.defer(deferred) is False  # a second deferral is never sent

    assert callbacks(sim, str(deferred.id)) == [5]
    assert follow_ups(sim, "after the deferral") == ["after the deferral"]
    assert callbacks(sim, str(answered.id)) == [4]


def test_respond_waiting_on_a_deferral_that_fails_answers_as_the_initial_response(
    sim: SimulatorThread,
) -> None:
    # The auto-defer claimed the response, then its callback failed and gave the claim back:
    # the handler's answer must go as the initial response, not a follow-up nothing anchors.
    settings = Settings(token=TOKEN, api_url=sim.api_url, state_url=redis_url(REDIS_DB))
    namespace = uuid.uuid4().hex
    with Rest(settings, namespace=namespace) as rest:
        pending = Interaction.model_validate(interaction_payload("c"))
        initial = rest.initial_responses
        assert initial.claim(pending.id, DEFERRING)  # a deferral in flight
        waiting = threading.Event()
        wait_deferred = initial.wait_deferred

        def noting_the_wait(*args: Any, **kwargs: Any) -> bytes | None:
            waiting.set()
            return wait_deferred(*args, **kwargs)

        initial.wait_deferred = noting_the_wait  # type: ignore[method-assign]
        answering = threading.Thread(target=rest.respond, args=(pending, "in time"))
        answering.start()
        assert waiting.wait(5)  # respond found the deferral and waits for it
        initial.release(pending.id)  # ...which failed
        answering.join(10)
    assert callbacks(sim, str(pending.id)) == [4]
    assert follow_ups(sim, "in time") == []


def test_a_component_is_deferred_as_an_update_of_its_message(sim: SimulatorThread) -> None:
    # Type 5 would post a new "thinking..." message under a button; a component defers with 6.
    settings = Settings(token=TOKEN, api_url=sim.api_url, state_url=redis_url(REDIS_DB))
    with Rest(settings, namespace=uuid.uuid4().hex) as rest:
        button = Interaction.model_validate({**interaction_payload("button"), "type": 3})
        assert rest.defer(button, update=True) is True
    assert callbacks(sim, str(button.id)) == [6]


@pytest.mark.parametrize(("skew", "expected"), [(5.0, 2.0), (0.0, 2.0), (-1.5, 0.5), (-9.0, 0.0)])
def test_auto_defer_never_waits_longer_than_its_budget_whatever_the_clocks(
    skew: float, expected: float
) -> None:
    # received_at is the gateway's clock: a worker whose clock is behind (skew > 0) must not
    # push the deferral past the 3 s window; an old event (skew < 0) defers sooner.
    never = AutoDefer(Interaction.model_validate(interaction_payload("x")), 2.0, None, bool)
    now = time.time()
    timer = AutoDefer(never.interaction, 2.0, now + skew, bool)
    assert timer.delay == pytest.approx(expected, abs=0.05)


def test_auto_defer_budget_defaults_to_two_seconds_and_refuses_what_cannot_work() -> None:
    assert budget_of(True, {}) == DEFAULT_BUDGET == 2.0
    assert budget_of(True, {"INGEST_AUTO_DEFER_SECONDS": "1.5"}) == 1.5
    assert budget_of(0.5) == 0.5
    assert budget_of(None) is None and budget_of(False) is None
    for bad in ({"INGEST_AUTO_DEFER_SECONDS": "3"}, {"INGEST_AUTO_DEFER_SECONDS": "soon"}):
        with pytest.raises(ConfigError, match="INGEST_AUTO_DEFER_SECONDS"):
            budget_of(True, bad)
    with pytest.raises(ConfigError, match="auto_defer"):
        budget_of(5)
    app = Celery("bad-budget", set_as_current=False)
    with pytest.raises(ConfigError):  # at registration, not at the first interaction
        event_handler(app)("INTERACTION_CREATE", auto_defer=4)(lambda i: None)


def test_current_event_gives_the_gateways_receipt_time_in_seconds() -> None:
    app = Celery("received-at", set_as_current=False)
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    seen: list[float | None] = []

    @event_handler(app)("INTERACTION_CREATE")
    def handler(interaction: Interaction) -> None:
        seen.append(current_event().received_at)

    handler.apply(
        args=[interaction_payload("x")], headers={HEADER_RECEIVED_AT: 1_764_480_000_123_456}
    )
    handler.apply(args=[interaction_payload("y")])  # no header (not from the gateway): None
    assert seen == [pytest.approx(1_764_480_000.123456, abs=1e-6), None]


# ---- auto-defer, for real ------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_auto_defer_slow_handler_gets_one_deferral_then_its_follow_up_fast_one_none(
    sim: SimulatorThread,
) -> None:
    broker = redis_url(REDIS_DB)
    client = redis.Redis.from_url(broker)
    client.flushdb()
    env = base_env(
        INGEST_CELERY_APP="tests.apps.interactions",
        DISCORD_TOKEN=TOKEN,
        DISCORD_GATEWAY_URL=sim.url,
        DISCORD_API_URL=sim.api_url,
        CELERY_BROKER_URL=broker,
        INGEST_STATE_URL=broker,
        INTERACTION_SLOW_SECONDS="3",
    )
    worker = worker_process(env, "discord.fast", app="tests.apps.interactions", concurrency=4)
    gateway = gateway_process(env)
    try:
        gateway.wait_for_line("all 1 shards ready", timeout=30)
        worker.wait_for_line("ready", timeout=30)
        slow, fast = interaction_payload("slow"), interaction_payload("fast")
        emitted = time.monotonic()
        sim.emit("INTERACTION_CREATE", slow)
        sim.emit("INTERACTION_CREATE", fast)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not follow_ups(sim, "answer to slow"):
            time.sleep(0.05)
        types = {
            "slow": callbacks(sim, slow["id"]),
            "fast": callbacks(sim, fast["id"]),
        }
        deferred_at = sim.read(
            lambda s: [c["at"] for c in s.rest.callbacks if c["id"] == slow["id"]]
        )
    finally:
        gateway.kill()
        worker.stop()
        client.close()

    assert follow_ups(sim, "answer to slow") == ["answer to slow"], worker.text()[-3000:]
    assert types == {"slow": [5], "fast": [4]}
    assert follow_ups(sim, "answer to fast") == []  # answered by its callback, not a follow-up
    # Deferred after the 2 s budget and well inside Discord's 3 s (sim clock is monotonic too).
    assert 1.9 <= deferred_at[0] - emitted < 2.9


def test_each_handler_start_is_observed_as_its_age_since_receipt() -> None:
    app = Celery("ages", set_as_current=False)
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True

    @event_handler(app)("TYPING_START")
    def handler(data: dict[str, Any]) -> None:
        pass

    before = list(start_ages.buckets.get("TYPING_START", [0] * (len(AGE_BUCKETS) + 1)))
    received = int((time.time() - 0.3) * 1_000_000)  # 300 ms ago, at the gateway
    handler.apply(args=[{}], headers={HEADER_RECEIVED_AT: received})
    after = start_ages.buckets["TYPING_START"]
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed == [AGE_BUCKETS.index(0.5)]  # 0.25 < 0.3 s <= 0.5
    assert any(
        sample.labels.get("event") == "TYPING_START"
        for family in start_ages.collect()
        for sample in family.samples
    )


def test_fast_lane_holds_interactions_by_default_and_what_INGEST_FAST_EVENTS_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def queues() -> tuple[str, str, str]:
        route_for.cache_clear()
        fast_events.cache_clear()
        return tuple(  # type: ignore[return-value]
            route_for(event).queue
            for event in ("INTERACTION_CREATE", "AUTO_MODERATION_ACTION_EXECUTION", "READY")
        )

    try:
        monkeypatch.delenv("INGEST_FAST_EVENTS", raising=False)
        assert queues() == (FAST_QUEUE, "discord.AUTO_MODERATION_ACTION_EXECUTION", "discord.READY")
        monkeypatch.setenv(
            "INGEST_FAST_EVENTS", "INTERACTION_CREATE, AUTO_MODERATION_ACTION_EXECUTION"
        )
        assert queues() == (FAST_QUEUE, FAST_QUEUE, "discord.READY")
        monkeypatch.setenv("INGEST_FAST_EVENTS", "-")
        assert queues() == (
            "discord.INTERACTION_CREATE",
            "discord.AUTO_MODERATION_ACTION_EXECUTION",
            "discord.READY",
        )
    finally:
        monkeypatch.undo()
        route_for.cache_clear()
        fast_events.cache_clear()


def test_async_client_shares_the_one_initial_response_with_the_sync_one(
    sim: SimulatorThread,
) -> None:
    settings = Settings(token=TOKEN, api_url=sim.api_url, state_url=redis_url(REDIS_DB))
    namespace = uuid.uuid4().hex
    deferred = Interaction.model_validate(interaction_payload("c"))
    answered = Interaction.model_validate(interaction_payload("d"))

    async def main() -> bool:
        async with AsyncRest(settings, namespace=namespace) as rest:
            await rest.respond(deferred, "async after the deferral")
            await rest.respond(answered, "async at once")
            return await rest.defer(deferred)

    with Rest(settings, namespace=namespace) as rest:
        assert rest.defer(deferred) is True
        assert asyncio.run(main()) is False
        assert rest.defer(answered) is False

    assert callbacks(sim, str(deferred.id)) == [5]
    assert follow_ups(sim, "async after the deferral") == ["async after the deferral"]
    assert callbacks(sim, str(answered.id)) == [4]
