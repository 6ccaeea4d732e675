"""The sans-I/O Discord Gateway session: frames and ``now`` go in, frames and events come out.

Nothing here awaits, sleeps or reads a clock. The shell feeds received frames and the time,
drains ``data_to_send()`` and ``events_received()``, sleeps until ``next_deadline()`` and opens
the connection ``next_connection()`` names. Misbehaviour of the peer never raises: it becomes a
``Rejected`` event or a ``Close`` instruction.
"""

from __future__ import annotations

import enum
import random
import re
import secrets
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson

from ingest.compression import Compression, DecompressionError, Inflater, make_inflater
from ingest.errors import (
    CommandRateLimited,
    ConfigError,
    FatalGatewayError,
    NotConnected,
    PayloadTooLarge,
)
from ingest.protocol import (
    API_VERSION,
    COMMAND_WINDOW_SECONDS,
    COMMANDS_PER_WINDOW,
    MAX_PAYLOAD_BYTES,
    RESUMABLE_CLOSE,
    CloseCode,
    Opcode,
    Reconnect,
    classify_close,
)

# Full member lists (query "" and limit 0) may be asked once per guild per 30 s.
GUILD_MEMBERS_INTERVAL: Final = 30.0
# A connection must stay up this long before the reconnect backoff starts over.
STABLE_CONNECTION_SECONDS: Final = 5.0
# Discord sends HELLO at once; a connection that stays silent this long is given up.
HELLO_TIMEOUT: Final = 20.0
# Discord's session ids are 32 hex digits; a much longer one could not fit in a RESUME.
MAX_SESSION_ID_LENGTH: Final = 128
# Failed connects to a stored resume URL before resuming via the configured gateway URL.
MAX_RESUME_URL_FAILURES: Final = 3
# Consecutive connections closed before READY before we say loudly what is likely wrong.
CLOSES_BEFORE_READY_ALARM: Final = 3

# The scalar members (t, s, op) before a final "d" key: what is left of the frame, less its
# closing brace, is the dispatch's data exactly as the server encoded it.
_HEAD_BEFORE_DATA: Final = re.compile(
    rb'\s*\{\s*(?:"(?:[^"\\]|\\.)*"\s*:\s*(?:"(?:[^"\\]|\\.)*"|-?[0-9.eE+-]+|null|true|false)'
    rb'\s*,\s*)*"d"\s*:\s*'
)


_MAX_HEAD_BYTES: Final = 1024


def _data_bytes(payload: dict[str, Any], raw: bytes) -> bytes | None:
    """``d`` cut out of the frame when it is the frame's last key (Discord's own layout)."""
    if next(reversed(payload)) != "d":
        return None
    # Discord's head (t, s, op) is tens of bytes; looking no further bounds the cost of a
    # hostile frame with huge strings before its "d".
    head = _HEAD_BEFORE_DATA.match(raw, 0, _MAX_HEAD_BYTES)
    if head is None:
        return None
    end = len(raw.rstrip())
    if end == 0 or raw[end - 1] != 0x7D:  # "}"
        return None
    data = raw[head.end() : end - 1].rstrip()
    # The cut runs from the first "d" to the end: one JSON value, unless the frame repeats a key
    # after it ({"d":..,"t":..} or two "d"s), and then it is not JSON at all. A body a worker
    # cannot decode would be committed and never replayed, so check it once (a C-speed parse).
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return data


def _usable_gateway_url(url: object) -> bool:
    """A resume URL we can connect to; anything else falls back to the configured gateway."""
    if not isinstance(url, str) or len(url) > 2048:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. "wss://[": an unbalanced IPv6 bracket
        return False
    return parts.scheme in ("ws", "wss") and bool(parts.netloc)


class State(enum.Enum):
    DISCONNECTED = "disconnected"
    AWAITING_HELLO = "awaiting_hello"
    AWAITING_IDENTIFY = "awaiting_identify"  # HELLO seen; waiting for the identify scheduler
    IDENTIFYING = "identifying"
    RESUMING = "resuming"
    CONNECTED = "connected"  # READY or RESUMED received
    CLOSING = "closing"  # we asked the shell to close the socket
    STOPPED = "stopped"
    FATAL = "fatal"


# ---------------------------------------------------------------------------------------------
# What comes out of the core


@dataclass(frozen=True, slots=True)
class Dispatch:
    """An op 0 event, in sequence order; ``data`` is the parsed ``d``.

    ``raw`` is the whole frame as received (for a dead letter); ``data_json`` the bytes of
    ``d`` cut from it, when they could be, so they need not be serialised again. ``epoch``
    names the IDENTIFY that began the session: a server may reuse session ids.
    """

    event: str
    sequence: int
    data: Any
    session_id: str | None
    shard_id: int
    raw: bytes = b""
    data_json: bytes | None = None
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class SessionStarted:
    session_id: str
    resume_url: str | None


@dataclass(frozen=True, slots=True)
class SessionResumed:
    session_id: str
    sequence: int | None


@dataclass(frozen=True, slots=True)
class SessionLost:
    """Discord would not resume: events after ``committed_sequence`` may never arrive."""

    session_id: str
    committed_sequence: int | None
    received_sequence: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class HeartbeatAcked:
    latency: float


@dataclass(frozen=True, slots=True)
class IdentifyRequired:
    """HELLO arrived and there is nothing to resume: ask the identify scheduler, then call
    ``Session.identify``."""

    shard_id: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A frame we could not use: kept for the dead-letter place with its reason."""

    reason: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Instruction: close the socket with ``code`` now; the core already knows what comes next."""

    code: int
    reason: str
    action: Reconnect
    cause: str = "closed"  # a short label for metrics: zombie, op7, op9, broker_outage, ...


@dataclass(frozen=True, slots=True)
class Fatal:
    error: FatalGatewayError


@dataclass(frozen=True, slots=True)
class ClosedBeforeReady:
    """Several connections in a row ended before READY: the token or intents are likely wrong."""

    count: int
    close_code: int | None


Event = (
    Dispatch
    | SessionStarted
    | SessionResumed
    | SessionLost
    | HeartbeatAcked
    | IdentifyRequired
    | Rejected
    | Close
    | Fatal
    | ClosedBeforeReady
)


@dataclass(frozen=True, slots=True)
class ConnectPlan:
    url: str
    delay: float
    resume: bool


@dataclass(frozen=True, slots=True)
class SessionState:
    """What must survive a restart for Discord to replay what we missed."""

    session_id: str
    sequence: int | None
    resume_url: str | None
    shard_id: int = 0
    shard_count: int = 1
    # Names the IDENTIFY that began the session, in task ids: a server may reuse session ids.
    epoch: str = ""
    # For `python -m ingest status` only: not needed to resume.
    heartbeat_latency: float | None = None
    saved_at: float | None = None  # wall-clock time of the save, set by the store


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class SessionConfig:
    token: str = field(repr=False)
    intents: int
    gateway_url: str
    shard_id: int = 0
    shard_count: int = 1
    compression: Compression = Compression.ZLIB_STREAM
    large_threshold: int | None = None
    presence: Mapping[str, Any] | None = None
    properties: Mapping[str, str] = field(
        default_factory=lambda: {
            "os": "linux",
            "browser": "discord-ingest",
            "device": "discord-ingest",
        }
    )
    # With auto_commit every received sequence counts as done at once (in-process handlers);
    # a broker pipeline turns it off and calls ``commit`` when the broker has accepted.
    auto_commit: bool = True
    max_message_bytes: int = 64 * 1024 * 1024
    max_frame_bytes: int = 16 * 1024 * 1024
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    hello_timeout: float = HELLO_TIMEOUT

    def __repr__(self) -> str:
        return (
            f"SessionConfig(token='[REDACTED]', intents={self.intents}, "
            f"gateway_url={self.gateway_url!r}, shard=[{self.shard_id}, {self.shard_count}])"
        )


class Backoff:
    """Capped exponential backoff with full jitter; ``reset`` after a stable connection."""

    def __init__(self, base: float, cap: float, rng: Callable[[], float]) -> None:
        self.base = base
        self.cap = cap
        self.attempts = 0
        self._rng = rng

    def next_delay(self) -> float:
        delay: float = self._rng() * min(self.cap, self.base * float(1 << self.attempts))
        self.attempts = min(self.attempts + 1, 32)
        return delay

    def reset(self) -> None:
        self.attempts = 0


class SendBudget:
    """Discord allows 120 commands per 60 s per connection; keep slots for heartbeats."""

    def __init__(self, reserved: int) -> None:
        self._sent: deque[float] = deque()
        self.reserved = reserved

    def _trim(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - COMMAND_WINDOW_SECONDS:
            self._sent.popleft()

    def retry_after(self, now: float, essential: bool) -> float:
        """0 if a command may go now, else seconds until a slot frees."""
        self._trim(now)
        limit = COMMANDS_PER_WINDOW if essential else COMMANDS_PER_WINDOW - self.reserved
        if len(self._sent) < limit:
            return 0.0
        oldest_blocking = self._sent[len(self._sent) - limit]
        return oldest_blocking + COMMAND_WINDOW_SECONDS - now

    def record(self, now: float) -> None:
        self._sent.append(now)

    def in_window(self, now: float) -> int:
        self._trim(now)
        return len(self._sent)

    def clear(self) -> None:
        self._sent.clear()


# ---------------------------------------------------------------------------------------------
# The session


class Session:
    def __init__(
        self,
        config: SessionConfig,
        *,
        resume_from: SessionState | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self._rng = rng
        self.state = State.DISCONNECTED
        self._backoff = Backoff(config.backoff_base, config.backoff_cap, rng)
        # Room for heartbeats (at Discord's ~41 s interval, 2 per minute) plus identify/resume
        # and server-requested beats.
        self._budget = SendBudget(reserved=5)
        self._outbox: list[str] = []
        self._events: list[Event] = []

        self.session_id: str | None = None
        self.resume_url: str | None = None
        # Highest sequence received; highest handed to the owner in this session (a replay up to
        # it is not handed over twice); highest the owner says is durable.
        self.sequence: int | None = None
        # None: nothing handed over yet (a server may number its first event 0).
        self._delivered: int | None = None
        self.committed_sequence: int | None = None
        self.epoch = ""
        if resume_from is not None:
            self.session_id = resume_from.session_id
            self.resume_url = resume_from.resume_url
            self.sequence = resume_from.sequence
            self.committed_sequence = resume_from.sequence
            self._delivered = resume_from.sequence
            self.epoch = resume_from.epoch
        # Connects to the resume URL that failed before HELLO, and connections in a row that
        # Discord closed before READY/RESUMED.
        self.resume_url_failures = 0
        self._resume_url_planned = False
        self.closes_before_ready = 0
        self.last_close_code: int | None = None
        # A bad presence would fail every IDENTIFY: refuse it now, as configuration.
        try:
            self._checked(Opcode.IDENTIFY, self._identify_data())
        except PayloadTooLarge as exc:
            raise ConfigError(f"IDENTIFY would be refused: {exc} (check the presence)") from None

        self.heartbeat_interval: float | None = None
        self.heartbeat_latency: float | None = None
        self._next_heartbeat: float | None = None
        self._last_heartbeat_sent: float | None = None
        self._awaiting_ack = False
        self._connected_at: float | None = None
        self._pending_action: Reconnect | None = None
        self._forced_delay: float | None = None
        self._inflater: Inflater | None = None
        self._member_requests: dict[int, float] = {}
        self.fatal_error: FatalGatewayError | None = None
        self._stopping = False
        self._attempted = False
        # Set by the shell while it holds off reading (backpressure).
        self.inbound_paused = False
        self._hello_deadline: float | None = None
        # Frames that arrived after we asked to close (never read), and commands not sent
        # because even an essential one may not break the 120-per-60-s limit.
        self.frames_ignored = 0
        self.commands_dropped = 0

    def __repr__(self) -> str:
        return (
            f"<Session shard=[{self.config.shard_id}, {self.config.shard_count}] "
            f"state={self.state.value} session_id={self.session_id!r} sequence={self.sequence} "
            f"committed={self.committed_sequence}>"
        )

    # -- outboxes ------------------------------------------------------------------------------

    def data_to_send(self) -> list[str]:
        out, self._outbox = self._outbox, []
        return out

    def events_received(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    @property
    def shard_id(self) -> int:
        return self.config.shard_id

    @property
    def resumable(self) -> bool:
        return self.session_id is not None

    @property
    def finished(self) -> bool:
        return self.state in (State.STOPPED, State.FATAL)

    def snapshot(self) -> SessionState | None:
        """The persisted form: only the committed sequence, never one the broker lacks."""
        if self.session_id is None:
            return None
        return SessionState(
            session_id=self.session_id,
            sequence=self.committed_sequence,
            resume_url=self.resume_url,
            shard_id=self.config.shard_id,
            shard_count=self.config.shard_count,
            epoch=self.epoch,
            heartbeat_latency=self.heartbeat_latency,
        )

    # -- connection lifecycle ------------------------------------------------------------------

    def next_connection(self, now: float) -> ConnectPlan | None:
        """Where and when to connect next; None once stopped or fatal."""
        if self.finished:
            return None
        if self.state is not State.DISCONNECTED:
            raise RuntimeError(f"next_connection() while {self.state.value}: close first")
        if self._forced_delay is not None:
            delay, self._forced_delay = self._forced_delay, None
        elif not self._attempted:
            delay = 0.0  # the very first connection
        else:
            delay = self._backoff.next_delay()
        resume = self.resumable
        self._resume_url_planned = bool(resume and self.resume_url)
        base = self.resume_url if resume and self.resume_url else self.config.gateway_url
        return ConnectPlan(url=self._with_query(base), delay=delay, resume=resume)

    def _with_query(self, url: str) -> str:
        parts = urlsplit(url)
        query = {"v": str(API_VERSION), "encoding": "json"}
        if self.config.compression is not Compression.NONE:
            query["compress"] = self.config.compression.value
        return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", urlencode(query), ""))

    def connection_made(self, now: float) -> None:
        self.state = State.AWAITING_HELLO
        self._attempted = True
        self._budget.clear()
        self._inflater = make_inflater(
            self.config.compression, self.config.max_message_bytes, self.config.max_frame_bytes
        )
        self._next_heartbeat = None
        self._last_heartbeat_sent = None
        self._awaiting_ack = False
        self._connected_at = None
        self._pending_action = None
        self._hello_deadline = now + self.config.hello_timeout

    def connection_lost(self, code: int | None, now: float) -> None:
        """The socket is gone: ``code`` is the peer's close code, None for a drop with no frame."""
        self._attempted = True
        if self.finished:
            return
        self._count_early_loss(code)
        if self._connected_at is not None and now - self._connected_at >= STABLE_CONNECTION_SECONDS:
            self._backoff.reset()
        self._connected_at = None
        self._next_heartbeat = None
        self._inflater = None
        if self.state is State.CLOSING and self._pending_action is not None:
            action = self._pending_action
            reason = "closed by us"
        else:
            rule = classify_close(code, self.config.intents)
            action, reason = rule.action, rule.explanation
        self._pending_action = None
        if action is Reconnect.FATAL:
            self._fail(FatalGatewayError(reason, close_code=code))
            return
        if self._stopping:
            self.state = State.STOPPED
            return
        if action is Reconnect.NEW_SESSION:
            self._forget_session(reason)
        self.state = State.DISCONNECTED

    def _count_early_loss(self, code: int | None) -> None:
        """Track connections that never got going: a dead resume URL, or closes before READY."""
        if self._resume_url_planned:
            # Never heard HELLO from the resume URL: after a few, resume via the gateway URL.
            self.resume_url_failures += 1
            if self.resume_url_failures >= MAX_RESUME_URL_FAILURES:
                self.resume_url = None
        self._resume_url_planned = False
        if self.state in (State.IDENTIFYING, State.RESUMING, State.AWAITING_IDENTIFY):
            self.closes_before_ready += 1
            self.last_close_code = code
            if self.closes_before_ready == CLOSES_BEFORE_READY_ALARM:
                self._events.append(ClosedBeforeReady(self.closes_before_ready, code))

    def close(self, now: float, *, resumable: bool = True) -> None:
        """Stop for good: a resumable close (non-1000) lets the next process resume.

        A non-resumable close forgets the session at once: nothing may resume it later.
        """
        self._stopping = True
        if not resumable:
            self._clear_session()
        if self.state in (State.DISCONNECTED,):
            self.state = State.STOPPED
            return
        if self.state is State.CLOSING or self.finished:
            return
        code = RESUMABLE_CLOSE if resumable else CloseCode.NORMAL
        self._request_close(code, "shutting down", Reconnect.RESUME, "stop")

    # -- inbound -------------------------------------------------------------------------------

    def receive_frame(self, frame: bytes | str, now: float) -> None:
        if self.state in (State.CLOSING, State.DISCONNECTED) or self.finished:
            self.frames_ignored += 1
            return
        if isinstance(frame, str):
            message: bytes = frame.encode()
        elif self._inflater is not None:
            try:
                inflated = self._inflater.feed(frame)
            except DecompressionError as exc:
                self._events.append(Rejected(str(exc), bytes(frame[:4096])))
                # The inflate context is broken: nothing later on this connection can be read.
                self._request_close(
                    RESUMABLE_CLOSE, "bad compressed stream", Reconnect.RESUME, "corrupt_stream"
                )
                return
            if inflated is None:
                return
            message = inflated
        else:
            message = bytes(frame)
        if len(message) > self.config.max_message_bytes:
            self._events.append(Rejected("message too large", message[:4096]))
            return
        try:
            payload = orjson.loads(message)
        except orjson.JSONDecodeError as exc:
            self._events.append(Rejected(f"bad JSON: {exc}", message))
            return
        if not isinstance(payload, dict) or not isinstance(payload.get("op"), int):
            self._events.append(Rejected("not a gateway payload (no integer op)", message))
            return
        self._receive_payload(payload, message, now)

    def _receive_payload(self, payload: dict[str, Any], raw: bytes, now: float) -> None:
        op = payload["op"]
        match op:
            case Opcode.DISPATCH:
                self._on_dispatch(payload, raw, now)
            case Opcode.HEARTBEAT:
                # Discord asks for a beat now; answer at once. It does not move the schedule,
                # nor arm the zombie check: only our own scheduled beats do that.
                self._send_heartbeat(now, scheduled=False)
            case Opcode.HEARTBEAT_ACK:
                self._awaiting_ack = False
                if self._last_heartbeat_sent is not None:
                    self.heartbeat_latency = now - self._last_heartbeat_sent
                    self._events.append(HeartbeatAcked(self.heartbeat_latency))
            case Opcode.HELLO:
                self._on_hello(payload, raw, now)
            case Opcode.RECONNECT:
                self._request_close(
                    RESUMABLE_CLOSE, "Discord asked to reconnect (op 7)", Reconnect.RESUME, "op7"
                )
            case Opcode.INVALID_SESSION:
                self._on_invalid_session(payload.get("d") is True)
            case _:
                self._events.append(Rejected(f"unknown opcode {op}", raw))

    def _on_hello(self, payload: dict[str, Any], raw: bytes, now: float) -> None:
        d = payload.get("d")
        interval = d.get("heartbeat_interval") if isinstance(d, dict) else None
        if not isinstance(interval, int | float) or isinstance(interval, bool) or interval <= 0:
            self._events.append(Rejected("HELLO without a heartbeat_interval", raw))
            self._request_close(RESUMABLE_CLOSE, "bad HELLO", Reconnect.RESUME, "bad_hello")
            return
        if self.state is not State.AWAITING_HELLO:
            self._events.append(Rejected("HELLO received twice", raw))
            return
        self.heartbeat_interval = interval / 1000.0
        # The resume URL answered: whatever happens next on it is not the URL's fault.
        self.resume_url_failures = 0
        self._resume_url_planned = False
        # Jitter the first beat so shards reconnecting together do not beat together.
        self._next_heartbeat = now + self.heartbeat_interval * self._rng()
        self._awaiting_ack = False
        self._last_heartbeat_sent = None
        if self.resumable:
            self._send_resume(now)
        else:
            self.state = State.AWAITING_IDENTIFY
            self._events.append(IdentifyRequired(self.config.shard_id))

    def _on_dispatch(self, payload: dict[str, Any], raw: bytes, now: float) -> None:
        event = payload.get("t")
        sequence = payload.get("s")
        if (
            not isinstance(event, str)
            or not isinstance(sequence, int)
            or isinstance(sequence, bool)
        ):
            self._events.append(Rejected("dispatch without an event name or sequence", raw))
            return
        data = payload.get("d")
        if event == "READY":
            ready: dict[str, Any] = data if isinstance(data, dict) else {}
            session_id = ready.get("session_id")
            if not isinstance(session_id, str) or len(session_id) > MAX_SESSION_ID_LENGTH:
                self._events.append(Rejected("READY without a usable session_id", raw))
                self._request_close(
                    RESUMABLE_CLOSE, "bad READY", Reconnect.NEW_SESSION, "bad_ready"
                )
                return
            self.session_id = session_id
            resume_url = ready.get("resume_gateway_url")
            self.resume_url = resume_url if _usable_gateway_url(resume_url) else None
            self.state = State.CONNECTED
            self._connected_at = now
            self.closes_before_ready = 0
            self._events.append(SessionStarted(self.session_id, self.resume_url))
        elif event == "RESUMED":
            self.state = State.CONNECTED
            self._connected_at = now
            self.closes_before_ready = 0
            if self.session_id is not None:
                self._events.append(SessionResumed(self.session_id, self.sequence))
        if self.sequence is None or sequence > self.sequence:
            self.sequence = sequence
        if self._delivered is not None and sequence <= self._delivered:
            # A replay of something the owner already holds (still in flight to the broker).
            return
        self._delivered = sequence
        self._events.append(
            Dispatch(
                event,
                sequence,
                data,
                self.session_id,
                self.config.shard_id,
                raw,
                _data_bytes(payload, raw),
                self.epoch,
            )
        )
        if self.config.auto_commit:
            self.committed_sequence = sequence

    def _on_invalid_session(self, resumable: bool) -> None:
        if resumable and self.resumable:
            self._request_close(
                RESUMABLE_CLOSE,
                "invalid session, resumable (op 9)",
                Reconnect.RESUME,
                "op9_resumable",
            )
            return
        self._forget_session("Discord invalidated the session (op 9)")
        # Discord asks for a 1-5 s wait before a fresh IDENTIFY.
        self._forced_delay = 1.0 + 4.0 * self._rng()
        self._request_close(RESUMABLE_CLOSE, "invalid session (op 9)", Reconnect.NEW_SESSION, "op9")

    def _forget_session(self, reason: str) -> None:
        if self.session_id is not None:
            self._events.append(
                SessionLost(self.session_id, self.committed_sequence, self.sequence, reason)
            )
        self._clear_session()

    def _clear_session(self) -> None:
        self.session_id = None
        self.resume_url = None
        self.sequence = None
        self.committed_sequence = None
        self._delivered = None
        self.epoch = ""
        self.resume_url_failures = 0

    # -- timers --------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        if self.state is State.AWAITING_HELLO:
            return self._hello_deadline
        if self.state in (State.CLOSING, State.DISCONNECTED) or self.finished:
            return None
        return self._next_heartbeat

    def tick(self, now: float) -> None:
        if self.state is State.AWAITING_HELLO:
            if self._hello_deadline is not None and now >= self._hello_deadline:
                self._request_close(
                    RESUMABLE_CLOSE, "no HELLO from Discord", Reconnect.RESUME, "hello_timeout"
                )
            return
        if self._next_heartbeat is None or now < self._next_heartbeat:
            return
        if self.state in (State.CLOSING, State.DISCONNECTED) or self.finished:
            return
        if self._awaiting_ack and not self.inbound_paused:
            # No ACK since our last beat: the connection is a zombie. (Not while our owner has
            # paused reading: the ACK may be waiting unread behind the dispatches.)
            self._request_close(
                RESUMABLE_CLOSE, "no heartbeat ACK (zombie connection)", Reconnect.RESUME, "zombie"
            )
            return
        self._send_heartbeat(now)
        assert self.heartbeat_interval is not None
        self._next_heartbeat = now + self.heartbeat_interval

    # -- outbound ------------------------------------------------------------------------------

    def identify(self, now: float) -> None:
        """Send IDENTIFY; call after ``IdentifyRequired`` once the scheduler allows it."""
        if self.state is not State.AWAITING_IDENTIFY:
            return
        self._enqueue(Opcode.IDENTIFY, self._identify_data(), now, essential=True)
        self.state = State.IDENTIFYING
        # A new session begins: its task ids must differ from any earlier session's, even
        # if the server hands out the same session id and restarts its sequences.
        self.epoch = secrets.token_hex(8)

    def identify_failed(self, reason: str) -> None:
        """The shell could not identify (scheduler error): close, and retry with backoff."""
        if self.state in (State.DISCONNECTED, State.CLOSING) or self.finished:
            return
        self._request_close(RESUMABLE_CLOSE, reason, Reconnect.RESUME, "identify_failed")

    def _identify_data(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "token": self.config.token,
            "intents": self.config.intents,
            "properties": dict(self.config.properties),
            "compress": False,
        }
        if self.config.shard_count > 1 or self.config.shard_id:
            d["shard"] = [self.config.shard_id, self.config.shard_count]
        if self.config.large_threshold is not None:
            d["large_threshold"] = self.config.large_threshold
        if self.config.presence is not None:
            d["presence"] = dict(self.config.presence)
        return d

    def _send_resume(self, now: float) -> None:
        d = {
            "token": self.config.token,
            "session_id": self.session_id,
            # Nothing durable yet in this session (e.g. READY still in flight): ask Discord
            # to replay it all rather than send a null it would refuse.
            "seq": self.committed_sequence or 0,
        }
        self._enqueue(Opcode.RESUME, d, now, essential=True)
        self.state = State.RESUMING

    def _send_heartbeat(self, now: float, *, scheduled: bool = True) -> None:
        # The committed sequence, never one the broker may not have (see docs/delivery.md).
        if not self._enqueue(Opcode.HEARTBEAT, self.committed_sequence, now, essential=True):
            return  # not sent (send budget spent): no ACK to wait for
        self._last_heartbeat_sent = now
        if scheduled:
            self._awaiting_ack = True

    def send(self, op: int, d: Any, now: float) -> None:
        """Queue a command from the application; raises instead of breaking Discord's limits."""
        if self.state is not State.CONNECTED:
            raise NotConnected(f"cannot send op {op}: session is {self.state.value}")
        self._enqueue(op, d, now, essential=False)

    def _enqueue(self, op: int, d: Any, now: float, *, essential: bool) -> bool:
        """Queue a payload; False if an essential one had to be dropped for the budget."""
        text = self._checked(op, d)
        wait = self._budget.retry_after(now, essential)
        if wait > 0:
            if essential:
                # A peer asking for beats faster than the limit gets the ones that fit: Discord
                # would close us (4008) for the rest.
                self.commands_dropped += 1
                return False
            raise CommandRateLimited(
                f"120 commands per 60 s: op {op} may be sent in {wait:.1f} s", wait
            )
        self._budget.record(now)
        self._outbox.append(text)
        return True

    @staticmethod
    def _checked(op: int, d: Any) -> str:
        text = orjson.dumps({"op": int(op), "d": d}).decode()
        if len(text.encode()) > MAX_PAYLOAD_BYTES:
            raise PayloadTooLarge(
                f"op {op} payload is {len(text.encode())} bytes; Discord allows {MAX_PAYLOAD_BYTES}"
            )
        return text

    def send_retry_after(self, now: float) -> float:
        return self._budget.retry_after(now, essential=False)

    def update_presence(
        self,
        now: float,
        *,
        status: str = "online",
        activities: Sequence[Mapping[str, Any]] = (),
        afk: bool = False,
        since: int | None = None,
    ) -> None:
        d = {
            "since": since,
            "activities": [dict(a) for a in activities],
            "status": status,
            "afk": afk,
        }
        self.send(Opcode.PRESENCE_UPDATE, d, now)

    def update_voice_state(
        self,
        now: float,
        *,
        guild_id: int,
        channel_id: int | None,
        self_mute: bool = False,
        self_deaf: bool = False,
    ) -> None:
        d = {
            "guild_id": str(guild_id),
            "channel_id": None if channel_id is None else str(channel_id),
            "self_mute": self_mute,
            "self_deaf": self_deaf,
        }
        self.send(Opcode.VOICE_STATE_UPDATE, d, now)

    def request_guild_members(
        self,
        now: float,
        *,
        guild_id: int,
        query: str | None = "",
        limit: int = 0,
        presences: bool = False,
        user_ids: Sequence[int] | None = None,
        nonce: str | None = None,
    ) -> None:
        full_list = user_ids is None and query == "" and limit == 0
        if full_list:
            last = self._member_requests.get(guild_id)
            if last is not None and now - last < GUILD_MEMBERS_INTERVAL:
                wait = GUILD_MEMBERS_INTERVAL - (now - last)
                raise CommandRateLimited(
                    f"full member list of guild {guild_id} may be requested again in {wait:.1f} s",
                    wait,
                )
        d: dict[str, Any] = {"guild_id": str(guild_id), "limit": limit, "presences": presences}
        if user_ids is not None:
            d["user_ids"] = [str(u) for u in user_ids]
        else:
            d["query"] = query
        if nonce is not None:
            d["nonce"] = nonce
        self.send(Opcode.REQUEST_GUILD_MEMBERS, d, now)
        if full_list:
            self._member_requests[guild_id] = now

    # -- commits from the owner ----------------------------------------------------------------

    def commit(self, sequence: int, session_id: str | None) -> None:
        """Everything up to ``sequence`` of ``session_id`` is durable (the broker accepted it)."""
        if session_id != self.session_id or session_id is None:
            return  # a late commit for a session Discord has since replaced
        if self.committed_sequence is None or sequence > self.committed_sequence:
            self.committed_sequence = sequence

    def discard_uncommitted(self) -> None:
        """The owner dropped events it held; let a replay hand them over again."""
        self._delivered = self.committed_sequence

    def reconnect(self, reason: str, cause: str = "owner") -> None:
        """The owner wants a fresh connection that resumes (e.g. after a broker outage)."""
        if self.state in (State.DISCONNECTED, State.CLOSING) or self.finished:
            return
        # The owner gates the reconnect itself (e.g. until the broker answers): no backoff.
        self._forced_delay = 0.0
        self._request_close(RESUMABLE_CLOSE, reason, Reconnect.RESUME, cause)

    # -- internals -----------------------------------------------------------------------------

    def _request_close(self, code: int, reason: str, action: Reconnect, cause: str) -> None:
        if self.state is State.CLOSING or self.finished:
            return
        self.state = State.CLOSING
        self._pending_action = action
        self._events.append(Close(code, reason, action, cause))

    def _fail(self, error: FatalGatewayError) -> None:
        self.state = State.FATAL
        self.fatal_error = error
        self._events.append(Fatal(error))
