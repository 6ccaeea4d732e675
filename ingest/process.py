"""The gateway process: shards of one bot, one pipeline into the broker, clean SIGTERM.

``python -m ingest`` builds this from the environment. It loads the same Celery app the workers
load, so it publishes exactly the event types some handler wants.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
from typing import Any

from ingest.brokers import is_redis_url, redis_py_url, state_url_of
from ingest.cache_writer import CacheWriter, cache_writer_for
from ingest.command_relay import CommandRelay
from ingest.config import Config
from ingest.discovery import fetch_gateway_bot
from ingest.errors import BrokerUnavailable, ConfigError, FatalGatewayError, RestError
from ingest.gateway import Gateway
from ingest.identify import (
    BudgetedIdentifyScheduler,
    IdentifyScheduler,
    LocalIdentifyScheduler,
    RedisIdentifyScheduler,
    session_budget_for,
)
from ingest.metrics import Metrics, redis_queue_depths, serve_metrics
from ingest.pipeline import Pipeline
from ingest.protocol import Intents
from ingest.publish import Publisher, publisher_for
from ingest.routing import DEAD_LETTER_QUEUE, route_for
from ingest.session import (
    ClosedBeforeReady,
    Event,
    SessionLost,
    SessionResumed,
    SessionStarted,
)
from ingest.store import SessionStore, store_for

log = logging.getLogger("ingest.process")

# Heroku sends SIGKILL 30 s after SIGTERM; finish well inside it.
SHUTDOWN_BUDGET_SECONDS = 20.0


def load_celery_app(module_name: str) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"INGEST_CELERY_APP={module_name!r} cannot be imported ({exc}); run from the "
            "project directory or set INGEST_CELERY_APP"
        ) from None
    app = getattr(module, "app", None) or getattr(module, "celery", None)
    if app is None:
        raise ConfigError(f"INGEST_CELERY_APP={module_name!r} has no Celery `app`")
    return app


class GatewayProcess:
    def __init__(self, config: Config, *, publisher: Publisher | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self._publisher = publisher
        self.gateways: list[Gateway] = []
        self.pipeline: Pipeline | None = None
        self.store: SessionStore | None = None
        self.cache: CacheWriter | None = None
        self._shutdown = asyncio.Event()
        self._ready: set[int] = set()
        self.shard_count = 1
        self.metrics_port: int | None = None
        self.identify_scheduler: IdentifyScheduler | None = None
        self._problem_shards: set[int] = set()
        self._reports: set[asyncio.Future[None]] = set()
        self.relay: CommandRelay | None = None

    def request_shutdown(self) -> None:
        log.info("shutdown requested")
        self._shutdown.set()

    async def run(self) -> None:
        config = self.config
        from ingest.fanout import fan_out
        from ingest.handlers import published_tasks, subscribed_events

        app = load_celery_app(config.celery_app)
        subscribed = frozenset(subscribed_events(app)) | config.extra_events
        if not subscribed:
            log.warning("no handlers found in %s: every event will be dropped", config.celery_app)
        log.info("publishing %d event types: %s", len(subscribed), ", ".join(sorted(subscribed)))
        if subscribed & {"MESSAGE_CREATE", "MESSAGE_UPDATE"} and not (
            config.intents & Intents.MESSAGE_CONTENT
        ):
            log.warning(
                "the MESSAGE_CONTENT intent is off: guild messages reach your handlers with "
                "empty content (DMs and mentions of the bot excepted); add it to "
                "DISCORD_INTENTS and enable it in the Developer Portal"
            )

        max_concurrency = 1
        start_limit = None
        if config.gateway_url is not None:
            gateway_url = config.gateway_url
            shard_count = config.shard_count or 1
        else:
            try:
                bot = await fetch_gateway_bot(config.api_url, config.token)
            except RestError as exc:
                raise FatalGatewayError(f"cannot reach Discord's API: {exc}") from None
            gateway_url = bot.url
            shard_count = config.shard_count or bot.shards
            start_limit = bot.session_start_limit
            max_concurrency = start_limit.max_concurrency
            self.metrics.identify_budget_remaining = start_limit.remaining
        self.shard_count = shard_count
        shard_ids = config.shard_ids or tuple(range(shard_count))
        if max(shard_ids) >= shard_count:
            raise ConfigError(
                f"DISCORD_SHARD_IDS names shard {max(shard_ids)} but there are {shard_count} "
                "shards: set DISCORD_SHARD_COUNT or fix DISCORD_SHARD_IDS"
            )
        shared_budget = None
        if start_limit is not None:
            # Any Redis all processes reach will do, even with sessions kept in files.
            urls = [u for u in (config.state_url, config.broker_url) if u and is_redis_url(u)]
            redis_url = redis_py_url(urls[0]) if urls else None
            shared_budget = session_budget_for(config.token, redis_url, shard_ids, shard_count)

        publisher = fan_out(
            self._publisher or publisher_for(config.broker_url, app), published_tasks(app)
        )
        await self._connect_publisher(publisher)
        if self._shutdown.is_set():
            log.info("stopped before the broker answered; nothing was received")
            await publisher.close()
            return
        await publisher.declare(
            [route_for(e).queue for e in sorted(subscribed)] + [DEAD_LETTER_QUEUE]
        )
        self.store = store_for(config.state_url, config.broker_url, config.data_dir)
        self.cache = cache_writer_for(config, publisher)
        self.pipeline = pipeline = Pipeline(
            publisher,
            subscribed=subscribed,
            store=self.store,
            metrics=self.metrics,
            batch_size=config.batch_size,
            linger_seconds=config.linger_seconds,
            max_buffered_events=config.max_buffered_events,
            max_buffered_bytes=config.max_buffered_bytes,
            max_outage_seconds=config.max_outage_seconds,
            cache=self.cache,
        )
        resumable = {
            shard_id: await self.store.load(shard_id, shard_count) for shard_id in shard_ids
        }
        if self.cache is not None:
            for shard_id, state in resumable.items():
                if state is not None and not await self.cache.filled(shard_id, shard_count):
                    log.info(
                        "shard %d: the cache holds nothing of its session; identifying "
                        "instead of resuming, so READY and GUILD_CREATEs fill it",
                        shard_id,
                    )
                    resumable[shard_id] = None
        to_identify = sum(1 for state in resumable.values() if state is None)
        scheduler = self._identify_scheduler(max_concurrency)
        if start_limit is not None:
            if start_limit.remaining < to_identify:
                raise FatalGatewayError(
                    f"session_start_limit: {start_limit.remaining} of {start_limit.total} "
                    f"session starts left today but {to_identify} shards need one; starting "
                    f"now would get the token reset. Retry in {start_limit.reset_after:.0f} s "
                    "or run fewer shards (DISCORD_SHARD_IDS)"
                )
            scheduler = BudgetedIdentifyScheduler(
                scheduler,
                remaining=start_limit.remaining,
                total=start_limit.total,
                reset_after=start_limit.reset_after,
                shared=shared_budget,
            )
        self.identify_scheduler = scheduler
        for shard_id in shard_ids:
            resume_from = resumable[shard_id]
            if resume_from is not None:
                log.info(
                    "shard %d will resume session %s from sequence %s",
                    shard_id,
                    resume_from.session_id,
                    resume_from.sequence,
                )
            gateway = Gateway(
                config.token,
                config.intents,
                gateway_url,
                shard_id=shard_id,
                shard_count=shard_count,
                compression=config.compression,
                resume_from=resume_from,
                identify_scheduler=scheduler,
                on_dispatch=pipeline.accept,
                on_rejected=pipeline.reject,
                on_lifecycle=self._on_lifecycle,
                connect_gate=pipeline.wait_until_healthy,
                read_gate=pipeline.has_room,
            )
            pipeline.attach(gateway)
            self.gateways.append(gateway)
        self.metrics.shard_readers.append(self._shard_rows)
        self.metrics.buffered = lambda: (pipeline.buffered, pipeline.buffered_bytes)
        self.metrics.cause_readers.append(
            lambda: [(g.reconnect_causes, g.resume_causes) for g in self.gateways]
        )
        if config.metrics_port is not None:
            self.metrics_port = serve_metrics(
                self.metrics,
                config.metrics_port,
                queue_depths=redis_queue_depths(
                    config.broker_url,
                    [route_for(e).queue for e in sorted(subscribed)] + [DEAD_LETTER_QUEUE],
                ),
            )

        # Gateway commands from workers (ingest.commands) come through the state Redis.
        commands_url = state_url_of(config.state_url, config.broker_url)
        relaying: asyncio.Task[None] | None = None
        if commands_url is None:
            log.info("gateway commands off: they need a Redis (INGEST_STATE_URL)")
        else:
            self.relay = CommandRelay(commands_url, shard_count, self.gateways)
            self.metrics.collectors.append(self.relay.metrics)
            relaying = asyncio.create_task(self.relay.run(), name="commands")
        publishing = asyncio.create_task(pipeline.run(), name="pipeline")
        shards = {
            asyncio.create_task(g.run(), name=f"shard-{g.shard_id}"): g for g in self.gateways
        }
        stop = asyncio.create_task(self._shutdown.wait())
        fatal: BaseException | None = None
        pending = set(shards)
        while pending:
            done, _ = await asyncio.wait(
                pending | {stop, publishing}, return_when=asyncio.FIRST_COMPLETED
            )
            if publishing in done:
                # Never expected: without it nothing commits. Exit, and let the process
                # manager restart us; the sessions resume from what was committed.
                fatal = publishing.exception() or RuntimeError("the publisher stopped")
                log.error("publisher task ended: %r", fatal)
                break
            for task in done - {stop}:
                pending.discard(task)
                if task.exception() is not None and fatal is None:
                    fatal = task.exception()
            if stop in done or fatal is not None:
                break
        if relaying is not None:
            # Commands it took and did not send stay in Redis: the next owner sends them.
            relaying.cancel()
            await asyncio.wait({relaying}, timeout=5)
        await self._stop(shards, publishing, publisher)
        if fatal is not None:
            raise fatal

    async def _connect_publisher(self, publisher: Publisher) -> None:
        delay = 0.5
        while not self._shutdown.is_set():
            try:
                await publisher.connect()
                return
            except BrokerUnavailable as exc:
                log.error("broker not answering (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _identify_scheduler(self, max_concurrency: int) -> IdentifyScheduler:
        url = self.config.state_url or self.config.broker_url
        if is_redis_url(url):
            return RedisIdentifyScheduler(redis_py_url(url), max_concurrency)
        return LocalIdentifyScheduler(max_concurrency)

    async def _stop(
        self,
        shards: dict[asyncio.Task[None], Gateway],
        publishing: asyncio.Task[None],
        publisher: Publisher,
    ) -> None:
        """Stop reading, publish what is held, persist, leave the sessions resumable."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_BUDGET_SECONDS
        for gateway in self.gateways:
            await gateway.stop(resumable=True)
        running = [t for t in shards if not t.done()]
        if running:
            await asyncio.wait(running, timeout=5)
        assert self.pipeline is not None
        await self.pipeline.drain(timeout=max(1.0, deadline - loop.time() - 2))
        publishing.cancel()
        # Let it unwind before its clients close under it (a save in flight would fail).
        await asyncio.wait({publishing}, timeout=5)
        await publisher.close()
        if self.cache is not None:
            await self.cache.close()
        if self.identify_scheduler is not None:
            await self.identify_scheduler.close()
        if self.store is not None:
            await self.store.close()
        summary = self.metrics.summary()
        log.info(
            "stopped: %d received, %d published, %d dropped (no handler), %d invalid",
            summary["received"],
            summary["published"],
            summary["dropped"],
            summary["invalid"],
        )

    def _report_problem(self, gateway: Gateway, problem: str | None) -> None:
        """Tell `python -m ingest status` (through the store) what keeps a shard from READY."""
        store = self.store
        if store is None:
            return

        async def report() -> None:
            try:
                await store.report_problem(gateway.shard_id, self.shard_count, problem)
            except Exception as exc:  # noqa: BLE001 - status is a convenience, never a failure
                log.warning("could not record shard %d's problem: %r", gateway.shard_id, exc)

        task = asyncio.ensure_future(report())
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    def _on_lifecycle(self, gateway: Gateway, event: Event) -> None:
        if isinstance(event, ClosedBeforeReady):
            self._problem_shards.add(gateway.shard_id)
            self._report_problem(
                gateway,
                f"{event.count} connections in a row closed before READY (last close code "
                f"{event.close_code}): check DISCORD_TOKEN and DISCORD_INTENTS",
            )
        if isinstance(event, SessionStarted | SessionResumed):
            if self.relay is not None:
                self.relay.shard_connected(gateway.shard_id)
            if gateway.shard_id in self._problem_shards:
                self._problem_shards.discard(gateway.shard_id)
                self._report_problem(gateway, None)
            if gateway.shard_id not in self._ready:
                self._ready.add(gateway.shard_id)
                total = len(self.gateways)
                next_slot = (
                    self.identify_scheduler.next_slot_in()
                    if self.identify_scheduler is not None
                    else None
                )
                if len(self._ready) == total:
                    log.info("all %d shards ready", total)
                elif next_slot is None:
                    log.info("shards ready %d/%d", len(self._ready), total)
                else:
                    log.info(
                        "shards ready %d/%d, next bucket in %.1f s",
                        len(self._ready),
                        total,
                        next_slot,
                    )
        elif isinstance(event, SessionLost):
            self.metrics.sessions_lost += 1
            if self.pipeline is not None:
                self.pipeline.session_ended(gateway)

    def _shard_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "shard_id": g.shard_id,
                "session_id": g.session_id,
                "received_sequence": g.session.sequence,
                "committed_sequence": g.session.committed_sequence,
                "heartbeat_latency_seconds": g.latency,
                "reconnects": g.reconnects,
                "resumes": g.resumes,
                "rejected": g.rejected_count,
                "closes_before_ready": g.session.closes_before_ready,
                "state": g.session.state.value,
            }
            for g in self.gateways
        ]


def run_process(config: Config) -> int:
    """Run until SIGTERM/SIGINT; the exit code for the shell."""

    async def main() -> None:
        process = GatewayProcess(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, process.request_shutdown)
        await process.run()

    try:
        asyncio.run(main())
    except (ConfigError, FatalGatewayError) as exc:
        print(f"discord-ingest: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except Exception as exc:
        # A bug, not a configuration problem: keep the traceback, exit so we get restarted.
        log.exception("gateway process failed")
        print(f"discord-ingest: internal error: {exc!r}", file=sys.stderr)
        return 1
    return 0
