"""From dispatch to broker: validate, build the task message, publish in batches, then commit.

A sequence counts as done only when the broker has accepted its task (or it needed none), in
arrival order, so the committed sequence a shard heartbeats and resumes from is always durable.
During a broker outage events wait in a buffer bounded in events and bytes; past a bound (or
the time limit) the buffer is dropped, the sessions close resumably, and Discord replays once
the broker is back. No single event can stop this: whatever fails on one becomes a dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson
from pydantic import ValidationError

from ingest.cache_writer import CacheWriter, Command
from ingest.errors import BrokerUnavailable
from ingest.gateway import Gateway
from ingest.logs import throttled
from ingest.messages import TaskMessage, build_dead_letter_message, build_event_message
from ingest.metrics import Metrics
from ingest.models import validate_event
from ingest.publish import Publisher
from ingest.routing import DEAD_LETTER_TASK
from ingest.session import Dispatch, Rejected
from ingest.store import SessionStore

log = logging.getLogger("ingest.publisher")

# orjson writes at most this nesting; a worker's json decoder (recursive, Python's limit of
# 1000 frames shared with Celery's own stack) must be able to read every body we publish.
MAX_TASK_DEPTH = 254


@dataclass(slots=True)
class _Entry:
    gateway: Gateway
    session_id: str | None
    sequence: int | None
    event: str
    message: TaskMessage | None  # None: nothing to publish, only a sequence to pass
    received_at: float
    cache: list[Command] | None = None  # written before the message is published
    # Bytes held: the task body and the cache commands (a GUILD_CREATE no handler wants still
    # carries the whole guild for the cache). Counted once, added on hold, taken on publish.
    weight: int = field(init=False)

    def __post_init__(self) -> None:
        size = 0 if self.message is None else len(self.message.body)
        for command in self.cache or ():
            size += sum(len(part) for part in command if isinstance(part, bytes | str))
        self.weight = size


class Pipeline:
    def __init__(
        self,
        publisher: Publisher,
        *,
        subscribed: frozenset[str] | None,
        store: SessionStore | None = None,
        metrics: Metrics | None = None,
        batch_size: int = 500,
        linger_seconds: float = 0.002,
        max_buffered_events: int = 100_000,
        max_buffered_bytes: int = 256 * 1024 * 1024,
        max_outage_seconds: float = 30.0,
        save_interval: float = 0.2,
        cache: CacheWriter | None = None,
    ) -> None:
        self.publisher = publisher
        self.cache = cache
        self.subscribed = subscribed  # None: publish every event type
        self.store = store
        self.metrics = metrics or Metrics()
        self.batch_size = batch_size
        self.linger = linger_seconds
        self.max_buffered = max_buffered_events
        self.max_buffered_bytes = max_buffered_bytes
        self._buffered_bytes = 0
        self.max_outage = max_outage_seconds
        self.save_interval = save_interval
        self._queue: deque[_Entry] = deque()
        # Entries per gateway still waiting: a dropped event may commit at once only when
        # nothing before it on its shard is still unpublished.
        self._waiting: dict[tuple[int, str | None], int] = {}
        self._wakeup = asyncio.Event()
        self._healthy = asyncio.Event()
        self._healthy.set()
        # The gateways' read gate: cleared while the buffer is full and the broker merely slow.
        self.has_room = asyncio.Event()
        self.has_room.set()
        self._gateways: list[Gateway] = []
        self._dirty: set[int] = set()
        self._save_lock = asyncio.Lock()
        self._last_save = 0.0
        self._outage_since: float | None = None
        self._stopping = False

    # -- wiring --------------------------------------------------------------------------------

    def attach(self, gateway: Gateway) -> None:
        self._gateways.append(gateway)

    async def wait_until_healthy(self) -> None:
        """The gateways' connect gate: no (re)connect while the broker refuses events."""
        await self._healthy.wait()

    @property
    def buffered(self) -> int:
        return len(self._queue)

    @property
    def buffered_bytes(self) -> int:
        """Task message bodies and cache commands held, not yet accepted by the broker."""
        return self._buffered_bytes

    def _over_budget(self) -> str | None:
        if len(self._queue) >= self.max_buffered:
            return f"{len(self._queue)} events buffered (INGEST_MAX_BUFFERED_EVENTS)"
        if self._buffered_bytes >= self.max_buffered_bytes:
            return f"{self._buffered_bytes} bytes buffered (INGEST_MAX_BUFFERED_BYTES)"
        return None

    def _hold(self, entry: _Entry) -> None:
        self._queue.append(entry)
        self._buffered_bytes += entry.weight

    def session_ended(self, gateway: Gateway) -> None:
        """The gateway's session is gone: forget it in the store now, not at the next save."""
        self._dirty.add(id(gateway))
        self._last_save = 0.0
        self._wakeup.set()

    # -- the gateway side (synchronous, on the reader's path) ----------------------------------

    def accept(self, gateway: Gateway, dispatch: Dispatch) -> None:
        now = time.monotonic()
        event = dispatch.event
        self.metrics.received(event)
        message: TaskMessage | None = None
        if self.subscribed is not None and event not in self.subscribed:
            self.metrics.dropped(event)
        else:
            try:
                message = self._event_message(dispatch)
            except Exception as exc:  # noqa: BLE001 - one event must never stop the gateway
                message = self._poisoned(dispatch, exc)
        # Per shard *and session*: after Discord replaces a session, the new one's events do
        # not wait behind the old one's (whose commits the session would ignore anyway).
        key = (id(gateway), dispatch.session_id)
        cache = None
        if self.cache is not None:
            # Published or not: the cache sees every event it keeps.
            cache = self.cache.commands(
                event, dispatch.data, dispatch.shard_id, gateway.session.config.shard_count
            )
        if message is None and cache is None and not self._waiting.get(key):
            # Nothing of this session is in flight: an unwanted event is done at once.
            gateway.commit(dispatch.sequence, dispatch.session_id)
            self._dirty.add(id(gateway))
            return
        self._waiting[key] = self._waiting.get(key, 0) + 1
        self._hold(
            _Entry(gateway, dispatch.session_id, dispatch.sequence, event, message, now, cache)
        )
        over = self._over_budget()
        if over is not None:
            if self._outage_since is not None:
                self._shed(over)
            else:
                # A burst (a RESUME replay, GUILD_CREATEs) faster than the broker takes it:
                # stop reading until the buffer drains; nothing needs to be dropped.
                self.has_room.clear()
                self._wakeup.set()
        elif len(self._queue) >= self.batch_size or not self._wakeup.is_set():
            self._wakeup.set()

    def _event_message(self, dispatch: Dispatch) -> TaskMessage:
        """Validate and build the task message: every step that can fail on one event."""
        event = dispatch.event
        session_id = dispatch.session_id or ""
        data_json = _task_argument(dispatch)
        try:
            validate_event(event, dispatch.data)
        except ValidationError as exc:
            reason = f"{event} failed validation: " + "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                for err in exc.errors(include_url=False)
            )
            throttled(log).warning(
                "shard %d seq %d: %s", dispatch.shard_id, dispatch.sequence, reason[:500]
            )
            self.metrics.invalid(event)
            return build_dead_letter_message(
                reason=reason,
                raw=data_json,
                event=event,
                shard_id=dispatch.shard_id,
                sequence=dispatch.sequence,
                session_id=session_id,
                epoch=dispatch.epoch,
            )
        return build_event_message(
            event,
            data_json,
            shard_id=dispatch.shard_id,
            sequence=dispatch.sequence,
            session_id=session_id,
            epoch=dispatch.epoch,
            # Wall clock, not monotonic: a worker on another machine compares it with its own.
            # On the reader's path, right after the frame was read and parsed.
            received_at=time.time(),
        )

    def _poisoned(self, dispatch: Dispatch, exc: Exception) -> TaskMessage | None:
        """An event we could not turn into a task: keep its frame as a dead letter, move on."""
        reason = f"{dispatch.event} could not be processed: {type(exc).__name__}: {exc}"
        throttled(log).error(
            "shard %d seq %d: %s", dispatch.shard_id, dispatch.sequence, reason[:500]
        )
        self.metrics.invalid(dispatch.event)
        try:
            return build_dead_letter_message(
                reason=reason[:2000],
                raw=dispatch.raw,
                event=dispatch.event,
                shard_id=dispatch.shard_id,
                sequence=dispatch.sequence,
                session_id=dispatch.session_id or "",
                epoch=dispatch.epoch,
            )
        except Exception:
            # Not even a dead letter: the sequence still passes, the traceback is logged.
            log.exception("shard %d seq %d: no dead letter", dispatch.shard_id, dispatch.sequence)
            return None

    def reject(self, gateway: Gateway, rejected: Rejected) -> None:
        """A frame the session could not read: keep it in the dead-letter queue, counted."""
        self.metrics.invalid("(frame)")
        message = build_dead_letter_message(
            reason=rejected.reason,
            raw=rejected.raw,
            event=None,
            shard_id=gateway.shard_id,
            sequence=None,
            session_id=gateway.session_id or "",
        )
        # No sequence: it holds no commit back, it only needs publishing.
        self._hold(_Entry(gateway, None, None, "(frame)", message, time.monotonic()))
        self._wakeup.set()

    def _shed(self, why: str) -> None:
        """Give up what we hold: close the sessions resumably; Discord will replay it."""
        dropped = len(self._queue)
        log.error(
            "broker outage: %s; dropping %d uncommitted events and closing sessions "
            "resumably until the broker answers",
            why,
            dropped,
        )
        self.metrics.shed(dropped)
        self._queue.clear()
        self._buffered_bytes = 0
        self._waiting.clear()
        self._healthy.clear()
        self.has_room.set()
        for gateway in self._gateways:
            gateway.close_for_outage()

    # -- the broker side -----------------------------------------------------------------------

    async def run(self) -> None:
        """Publish until ``drain()``; never raises for a broker problem."""
        delay = 0.05
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.save_interval)
                await self._save_if_due()
                if not self._healthy.is_set():
                    await self._probe()
                continue
            if self.linger and len(self._queue) < self.batch_size and not self._stopping:
                await asyncio.sleep(self.linger)
            batch = [self._queue[i] for i in range(min(self.batch_size, len(self._queue)))]
            messages = [e.message for e in batch if e.message is not None]
            started = time.monotonic()
            try:
                if self.cache is not None:
                    await self.cache.before_publish(
                        [c for e in batch if e.cache for c in e.cache], bool(messages)
                    )
                await self.publisher.publish(messages)
            except Exception as exc:
                # Whatever a client library raises, the batch stays held and is retried: a
                # publisher bug must stall progress (visibly), never drop events or stop us.
                if not isinstance(exc, BrokerUnavailable):
                    log.exception(
                        "publisher raised %s; treating it as an outage", type(exc).__name__
                    )
                    exc = BrokerUnavailable(repr(exc))
                self._on_outage(exc)
                outage = self._outage_since
                if self._stopping and outage is not None and time.monotonic() - outage > 5:
                    log.error("shutting down with the broker down; Discord will replay")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            if self.cache is not None:
                self.cache.published()
            self._on_published(batch, len(messages), started)
            await self._save_if_due()

    def _on_outage(self, exc: BrokerUnavailable) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            log.error("broker not accepting events (%s); buffering", exc)
            self.metrics.broker_up(False)
        if not self._queue:
            return
        over = self._over_budget()
        if over is not None:
            self._shed(over)
        elif now - self._outage_since > self.max_outage:
            self._shed(f"broker down for {now - self._outage_since:.0f} s")

    async def _probe(self) -> None:
        # The cache's Redis too, when it is not the broker: the events wait for it as well, and
        # resuming while it is down would only replay into the same wall.
        cache_up = self.cache is None or await self.cache.ping()
        if cache_up and await self.publisher.ping():
            log.info("broker answering again; sessions will resume")
            self._outage_since = None
            self.metrics.broker_up(True)
            self._healthy.set()

    def _on_published(self, batch: list[_Entry], published: int, started: float) -> None:
        now = time.monotonic()
        if self._outage_since is not None:
            log.info("broker accepting events again")
            self._outage_since = None
            self.metrics.broker_up(True)
            self._healthy.set()
        # The batch may have been shed meanwhile (an outage bound hit while we awaited).
        if not self._queue or self._queue[0] is not batch[0]:
            return
        latest: dict[tuple[int, str | None], _Entry] = {}
        for entry in batch:
            self._queue.popleft()
            self._buffered_bytes -= entry.weight
            if entry.sequence is not None:
                key = (id(entry.gateway), entry.session_id)
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key]
                latest[key] = entry
            if entry.message is not None and entry.message.task_name != DEAD_LETTER_TASK:
                self.metrics.published(entry.event, now - entry.received_at)
        if (
            not self.has_room.is_set()
            and len(self._queue) <= self.max_buffered // 2
            and self._buffered_bytes <= self.max_buffered_bytes // 2
        ):
            self.has_room.set()
        for entry in latest.values():
            assert entry.sequence is not None
            entry.gateway.commit(entry.sequence, entry.session_id)
            self._dirty.add(id(entry.gateway))
        self.metrics.batch(published, now - started)

    async def _save_if_due(self, force: bool = False) -> None:
        if self.store is None or not self._dirty:
            return
        now = time.monotonic()
        if not force and now - self._last_save < self.save_interval:
            return
        # One save at a time (run() and drain() both save): an older snapshot must never land
        # after a newer one.
        async with self._save_lock:
            saving = set(self._dirty)
            states = []
            dead = []
            for gateway in self._gateways:
                if id(gateway) in saving:
                    state = gateway.session.snapshot()
                    if state is None:
                        dead.append(gateway.session.config)
                    else:
                        states.append(state)
            try:
                for config in dead:
                    await self.store.forget(config.shard_id, config.shard_count)
                await self.store.save(states)
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not stop publishing
                log.warning("could not persist sessions: %s: %s", type(exc).__name__, exc)
                return
            # Marks added while we awaited stay for the next save.
            self._dirty -= saving
            self._last_save = now

    async def drain(self, timeout: float) -> None:
        """Publish what is held (bounded by ``timeout``), then persist the sessions."""
        self._stopping = True
        self._wakeup.set()
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._queue:
            log.warning(
                "stopping with %d events unpublished; Discord will replay them", len(self._queue)
            )
        self._dirty.update(id(g) for g in self._gateways)
        await self._save_if_due(force=True)

    def gateways(self) -> Iterable[Gateway]:
        return tuple(self._gateways)


def _task_argument(dispatch: Dispatch) -> bytes:
    """The task's argument: ``d`` as the server sent it, else serialised once (bounded depth).

    Each ``[`` or ``{`` opens at most one level, so a body with fewer than ``MAX_TASK_DEPTH`` of
    them is shallow enough for any worker; a deeper one raises (and becomes a dead letter).
    """
    data_json = dispatch.data_json
    if data_json is not None and data_json.count(b"[") + data_json.count(b"{") < MAX_TASK_DEPTH:
        return data_json
    try:
        return orjson.dumps(dispatch.data)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"payload nests deeper than {MAX_TASK_DEPTH} levels ({exc})") from None
