"""The asyncio shell around the session core: moves frames, sleeps until deadlines, reconnects.

All protocol decisions are the core's (``ingest.session``); this module only owns the socket,
the timer and the handlers. ``Gateway`` works on its own, in-process, without Celery.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from ingest.compression import Compression, zstd_available
from ingest.errors import CommandRateLimited, FatalGatewayError
from ingest.identify import IdentifyScheduler, LocalIdentifyScheduler
from ingest.logs import throttled
from ingest.protocol import Intents, default_intents
from ingest.session import (
    Close,
    ClosedBeforeReady,
    Dispatch,
    Event,
    Fatal,
    HeartbeatAcked,
    IdentifyRequired,
    Rejected,
    Session,
    SessionConfig,
    SessionLost,
    SessionResumed,
    SessionStarted,
    SessionState,
    State,
)

log = logging.getLogger("ingest.gateway")

Handler = Callable[[Any], Any]
DispatchHook = Callable[["Gateway", Dispatch], None]
RejectedHook = Callable[["Gateway", Rejected], None]
LifecycleHook = Callable[["Gateway", Event], None]
ConnectGate = Callable[[], Awaitable[None]]

DEFAULT_GATEWAY_URL = "wss://gateway.discord.gg"


class _NoFrameLogger(logging.LoggerAdapter[logging.Logger]):
    """websockets logs every frame at DEBUG, IDENTIFY and RESUME with their token included, and
    its truncation still leaves most of the token in the line: our sockets never log DEBUG."""

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


_socket_log = _NoFrameLogger(logging.getLogger("websockets.client"))


class Gateway:
    """One shard's connection to Discord's Gateway.

    ``on(event, handler)`` registers sync or async handlers that receive the validated model;
    sync ones run in a thread so no handler can starve the heartbeat. A pipeline that owns the
    delivery instead passes ``on_dispatch`` and commits sequences itself.
    """

    def __init__(
        self,
        token: str,
        intents: int | Intents | None = None,
        gateway_url: str = DEFAULT_GATEWAY_URL,
        *,
        shard_id: int = 0,
        shard_count: int = 1,
        compression: str | Compression = Compression.ZLIB_STREAM,
        presence: dict[str, Any] | None = None,
        large_threshold: int | None = None,
        resume_from: SessionState | None = None,
        identify_scheduler: IdentifyScheduler | None = None,
        on_dispatch: DispatchHook | None = None,
        on_rejected: RejectedHook | None = None,
        on_lifecycle: LifecycleHook | None = None,
        connect_gate: ConnectGate | None = None,
        read_gate: asyncio.Event | None = None,
        backoff_base: float = 1.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        hello_timeout: float = 20.0,
    ) -> None:
        comp = Compression(compression)
        if comp is Compression.ZSTD_STREAM and not zstd_available():
            log.warning("zstd-stream asked for but zstandard is not installed; using zlib-stream")
            comp = Compression.ZLIB_STREAM
        self._session = Session(
            SessionConfig(
                token=token,
                intents=int(default_intents() if intents is None else intents),
                gateway_url=gateway_url,
                shard_id=shard_id,
                shard_count=shard_count,
                compression=comp,
                presence=presence,
                large_threshold=large_threshold,
                auto_commit=on_dispatch is None,
                backoff_base=backoff_base,
                max_message_bytes=max_message_bytes,
                hello_timeout=hello_timeout,
            ),
            resume_from=resume_from,
        )
        self._handlers: dict[str, list[Handler]] = {}
        self._identify = identify_scheduler or LocalIdentifyScheduler()
        self._on_dispatch = on_dispatch
        self._on_rejected = on_rejected
        self._on_lifecycle = on_lifecycle
        self._connect_gate = connect_gate
        # Cleared by the owner while it holds all it may: we stop reading (TCP pushes back on
        # Discord) rather than buffer without bound. Timers, and so heartbeats, keep running.
        self._read_gate = read_gate
        self._ws: ClientConnection | None = None
        self._outbox: asyncio.Queue[str | Close] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._stop_requested: asyncio.Event | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._identifying: asyncio.Task[None] | None = None
        self.rejected_count = 0
        self.reconnects = 0
        self.resumes = 0
        # Why each connection ended, and which of those causes led to a RESUME: for metrics.
        self.reconnect_causes: Counter[str] = Counter()
        self.resume_causes: Counter[str] = Counter()
        self._last_cause = "start"

    def __repr__(self) -> str:
        return f"<Gateway {self._session!r}>"

    # -- the seed's surface --------------------------------------------------------------------

    @property
    def seq(self) -> int | None:
        return self._session.sequence

    @property
    def session_id(self) -> str | None:
        return self._session.session_id

    @property
    def shard_id(self) -> int:
        return self._session.shard_id

    @property
    def session(self) -> Session:
        return self._session

    @property
    def latency(self) -> float | None:
        return self._session.heartbeat_latency

    def on(self, event: str, handler: Handler | None = None) -> Any:
        """Register ``handler`` for dispatch ``event`` (``"*"`` for all); usable as a decorator."""

        def register(fn: Handler) -> Handler:
            self._handlers.setdefault(event, []).append(fn)
            return fn

        return register if handler is None else register(handler)

    async def run(self) -> None:
        """Connect and keep the session alive until ``stop()``; raises on a fatal close."""
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        session = self._session
        while True:
            plan = session.next_connection(loop.time())
            if plan is None:
                break
            if plan.delay > 0:
                log.info("shard %d reconnecting in %.2f s", self.shard_id, plan.delay)
                if await self._wait_or_stop(plan.delay):
                    session.close(loop.time())
                    continue
            if self._connect_gate is not None:
                gate = asyncio.ensure_future(self._connect_gate())
                stop = asyncio.ensure_future(self._stop_requested.wait())
                await asyncio.wait({gate, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not gate.done():
                    gate.cancel()
                    session.close(loop.time())
                    continue
            if self._stop_requested.is_set():
                session.close(loop.time())
                continue
            log.info(
                "shard %d connecting to %s (%s)",
                self.shard_id,
                plan.url.split("?")[0],
                "resume" if plan.resume else "identify",
            )
            await self._connection(plan.url)
        await self._drain_handlers()
        if session.fatal_error is not None:
            raise session.fatal_error

    async def stop(self, *, resumable: bool = True) -> None:
        """Close the connection; a resumable close (the default) lets a later run resume."""
        if self._stop_requested is not None:
            self._stop_requested.set()
        loop = asyncio.get_running_loop()
        self._session.close(loop.time(), resumable=resumable)
        self._process_events()

    async def send_payload(self, op: int, d: Any) -> None:
        """Send a gateway command, waiting for a slot of the 120-per-60-s budget if needed."""
        await self._send_with(lambda now: self._session.send(op, d, now))

    async def update_presence(self, **kwargs: Any) -> None:
        await self._send_with(lambda now: self._session.update_presence(now, **kwargs))

    async def update_voice_state(self, **kwargs: Any) -> None:
        await self._send_with(lambda now: self._session.update_voice_state(now, **kwargs))

    async def request_guild_members(self, **kwargs: Any) -> None:
        """Raises ``CommandRateLimited`` for a full member list asked again within 30 s."""
        loop = asyncio.get_running_loop()
        self._session.request_guild_members(loop.time(), **kwargs)
        self._flush()

    def send_queued(self) -> None:
        """Hand the socket what was queued on ``session`` directly (``session.send``)."""
        self._flush()

    async def _send_with(self, command: Callable[[float], None]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                command(loop.time())
            except CommandRateLimited as exc:
                await asyncio.sleep(exc.retry_after)
                continue
            self._flush()
            return

    # -- pipeline hooks ------------------------------------------------------------------------

    def commit(self, sequence: int, session_id: str | None) -> None:
        self._session.commit(sequence, session_id)

    def close_for_outage(self) -> None:
        """The owner cannot take more events: close resumably and forget what it did not keep."""
        self._session.discard_uncommitted()
        self._session.reconnect("broker not accepting events", "broker_outage")
        self._process_events()

    # -- the connection ------------------------------------------------------------------------

    async def _connection(self, url: str) -> None:
        loop = asyncio.get_running_loop()
        session = self._session
        try:
            ws = await connect(
                url,
                compression=None,  # Discord compresses at the transport level (zlib-stream)
                max_size=session.config.max_frame_bytes,
                ping_interval=None,  # Discord's heartbeat is the keepalive
                open_timeout=15,
                close_timeout=5,
                user_agent_header="DiscordBot (discord-ingest, 0.1)",
                logger=_socket_log,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            log.warning("shard %d could not connect: %s", self.shard_id, exc)
            self.reconnects += 1
            self._count_reconnect("connect_failed")
            session.connection_lost(None, loop.time())
            return
        if session.finished:
            # stop() came during the handshake; connection_made() would undo it.
            await ws.close()
            return
        self._ws = ws
        self._outbox = asyncio.Queue()
        session.connection_made(loop.time())
        self._arm_timer()  # the HELLO deadline: a silent peer must not hang us
        writer = asyncio.create_task(self._writer(ws, self._outbox))
        code: int | None = None
        try:
            async for frame in ws:
                session.receive_frame(frame, loop.time())
                self._process_events()
                if self._read_gate is not None and not self._read_gate.is_set():
                    session.inbound_paused = True
                    try:
                        await self._read_gate.wait()
                    finally:
                        session.inbound_paused = False
        except ConnectionClosed:
            pass
        finally:
            self._cancel_timer()
            writer.cancel()
            self._ws = None
            self._outbox = None
        rcvd = ws.protocol.close_rcvd
        code = rcvd.code if rcvd is not None else None
        if session.state is not State.CLOSING:
            self.reconnects += 1
            self._count_reconnect("dropped" if code is None else f"close_{code}")
            log.warning("shard %d connection closed by Discord (code %s)", self.shard_id, code)
        session.connection_lost(code, loop.time())
        self._process_events()

    async def _writer(self, ws: ClientConnection, outbox: asyncio.Queue[str | Close]) -> None:
        try:
            while True:
                item = await outbox.get()
                if isinstance(item, Close):
                    await ws.close(item.code, item.reason[:120])
                    return
                await ws.send(item)
        except ConnectionClosed:
            return

    def _flush(self) -> None:
        data = self._session.data_to_send()
        if self._outbox is not None:
            for text in data:
                self._outbox.put_nowait(text)

    def _process_events(self) -> None:
        """Drain the core: frames to the writer, events to their owners, re-arm the timer."""
        self._flush()
        for event in self._session.events_received():
            if isinstance(event, Dispatch):
                self._deliver(event)
            elif isinstance(event, Close):
                self._on_close(event)
            elif isinstance(event, Rejected):
                self.rejected_count += 1
                throttled(log).warning(
                    "shard %d rejected a payload: %s", self.shard_id, event.reason
                )
                if self._on_rejected is not None:
                    self._on_rejected(self, event)
            else:
                self._on_lifecycle_event(event)
        self._arm_timer()

    def _count_reconnect(self, cause: str) -> None:
        self.reconnect_causes[cause] += 1
        self._last_cause = cause

    def _on_close(self, event: Close) -> None:
        log.info("shard %d closing (%d): %s", self.shard_id, event.code, event.reason)
        if event.cause != "stop":
            self._count_reconnect(event.cause)
        if self._outbox is not None:
            self._outbox.put_nowait(event)
        elif self._ws is None:
            # Nothing to close: the core moves on as if the socket were gone.
            loop = asyncio.get_event_loop()
            self._session.connection_lost(event.code, loop.time())

    def _on_lifecycle_event(self, event: Event) -> None:
        if isinstance(event, IdentifyRequired):
            # A wait begun on an earlier connection still holds our place in the queue: it
            # identifies on whichever connection is waiting when the slot comes.
            if self._identifying is None or self._identifying.done():
                self._identifying = asyncio.ensure_future(self._identify_when_allowed())
        elif isinstance(event, SessionStarted):
            log.info("shard %d ready, session %s", self.shard_id, event.session_id)
        elif isinstance(event, SessionResumed):
            self.resumes += 1
            self.resume_causes[self._last_cause] += 1
            log.info(
                "shard %d resumed session %s at sequence %s",
                self.shard_id,
                event.session_id,
                event.sequence,
            )
        elif isinstance(event, SessionLost):
            log.warning(
                "shard %d lost session %s (%s): committed %s, received %s; "
                "events in between may be missing",
                self.shard_id,
                event.session_id,
                event.reason,
                event.committed_sequence,
                event.received_sequence,
            )
        elif isinstance(event, Fatal):
            log.error("shard %d fatal: %s", self.shard_id, event.error)
        elif isinstance(event, ClosedBeforeReady):
            log.error(
                "shard %d: %d connections in a row closed before READY (last close code %s); "
                "likely a wrong DISCORD_TOKEN or intents the bot may not use "
                "(DISCORD_INTENTS); still retrying with backoff",
                self.shard_id,
                event.count,
                event.close_code,
            )
        elif isinstance(event, HeartbeatAcked):
            pass
        if self._on_lifecycle is not None:
            self._on_lifecycle(self, event)

    async def _identify_when_allowed(self) -> None:
        # Runs as its own task: an exception here would be seen by no one and leave the shard
        # waiting for an IDENTIFY that never comes. Close and retry instead (a bad presence,
        # the one configuration problem here, is refused when the session is built).
        try:
            await self._identify.acquire(self.shard_id)
            if self._session.state is State.AWAITING_IDENTIFY:
                log.info("shard %d identifying", self.shard_id)
                self._session.identify(asyncio.get_running_loop().time())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("shard %d could not identify; reconnecting", self.shard_id)
            self._session.identify_failed(f"identify failed: {type(exc).__name__}")
        self._process_events()

    # -- timers --------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        deadline = self._session.next_deadline()
        if deadline == self._timer_at:
            return
        self._cancel_timer()
        if deadline is not None:
            loop = asyncio.get_event_loop()
            self._timer = loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._session.tick(asyncio.get_event_loop().time())
        self._process_events()

    async def _wait_or_stop(self, delay: float) -> bool:
        assert self._stop_requested is not None
        try:
            await asyncio.wait_for(self._stop_requested.wait(), delay)
        except TimeoutError:
            return False
        return True

    # -- in-process handlers -------------------------------------------------------------------

    def _deliver(self, dispatch: Dispatch) -> None:
        if dispatch.event == "RATE_LIMITED" and isinstance(dispatch.data, dict):
            # Discord refused one of our commands (e.g. REQUEST_GUILD_MEMBERS): say so; the
            # event itself flows on to handlers like any other.
            log.warning(
                "shard %d: Discord rate-limited opcode %s; retry after %s s",
                self.shard_id,
                dispatch.data.get("opcode"),
                dispatch.data.get("retry_after"),
            )
        if self._on_dispatch is not None:
            self._on_dispatch(self, dispatch)
            return
        handlers = self._handlers.get(dispatch.event, []) + self._handlers.get("*", [])
        if not handlers:
            return
        from pydantic import ValidationError

        from ingest.models import validate_event

        try:
            model = validate_event(dispatch.event, dispatch.data)
        except Exception as exc:
            # One bad event (or a model that raises something else) must not stop run().
            self.rejected_count += 1
            if not isinstance(exc, ValidationError):
                log.exception(
                    "shard %d %s seq %d could not be validated",
                    self.shard_id,
                    dispatch.event,
                    dispatch.sequence,
                )
                return
            log.warning(
                "shard %d %s seq %d failed validation: %s",
                self.shard_id,
                dispatch.event,
                dispatch.sequence,
                exc.errors(include_url=False, include_input=False),
            )
            return
        for handler in handlers:
            if inspect.iscoroutinefunction(handler):
                task = asyncio.ensure_future(self._run_async(handler, model))
            else:
                task = asyncio.ensure_future(asyncio.to_thread(self._run_sync, handler, model))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _run_async(self, handler: Handler, model: Any) -> None:
        try:
            await handler(model)
        except Exception:
            log.exception("handler %r failed", handler)

    @staticmethod
    def _run_sync(handler: Handler, model: Any) -> None:
        try:
            handler(model)
        except Exception:
            log.exception("handler %r failed", handler)

    async def _drain_handlers(self) -> None:
        if self._identifying is not None:
            self._identifying.cancel()
        pending = [t for t in self._background if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=10)


__all__ = ["DEFAULT_GATEWAY_URL", "FatalGatewayError", "Gateway", "websockets"]
