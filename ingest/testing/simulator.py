"""An in-process Discord Gateway v10 and REST stand-in for tests, the demo and the benchmark.

One port serves the WebSocket gateway, the two REST routes a bot calls before connecting, and
``/_sim/*`` control routes so a driver in another process can make the "Discord" side act.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ingest.protocol import (
    MAX_PAYLOAD_BYTES,
    PRIVILEGED_INTENTS,
    ZLIB_SUFFIX,
    CloseCode,
    Intents,
    Opcode,
)
from ingest.testing.content import strips_content, without_content
from ingest.testing.rest_sim import Reply, RestSimulator

try:  # zstd-stream is optional on the client side too; without it we refuse that mode
    import zstandard
except ImportError:  # pragma: no cover - zstandard is installed in the project venv
    zstandard = None  # type: ignore[assignment]

__all__ = [
    "SAMPLE_GENERATORS",
    "CommandRecord",
    "ConnectionRecord",
    "GatewaySimulator",
    "IdentifyRecord",
    "IdentifyViolation",
    "ResumeRecord",
    "Session",
    "SessionSnapshot",
    "SimulatorThread",
    "generate_payload",
    "sample_guild_create",
    "sample_guild_member_add",
    "sample_message_create",
    "sample_typing_start",
]

logger = logging.getLogger("ingest.testing.simulator")

DEFAULT_TOKEN: Final = "sim-token"
DEFAULT_HEARTBEAT_INTERVAL_MS: Final = 41250
RESUME_PATH: Final = "/resume"
API_PREFIX: Final = "/api/v10"
DISCORD_EPOCH_MS: Final = 1420070400000
# Ops a client may send; everything else is "unknown opcode" (4001), as Discord treats it.
CLIENT_OPS: Final = frozenset(
    {
        Opcode.HEARTBEAT,
        Opcode.IDENTIFY,
        Opcode.PRESENCE_UPDATE,
        Opcode.VOICE_STATE_UPDATE,
        Opcode.RESUME,
        Opcode.REQUEST_GUILD_MEMBERS,
        Opcode.REQUEST_SOUNDBOARD_SOUNDS,
    }
)
# Server-initiated closes after which Discord will not accept a RESUME of the session. A 1000
# from the server is not among them: only the client's own 1000/1001 ends a session.
_SESSION_ENDING_CLOSES: Final = frozenset(
    {
        CloseCode.AUTHENTICATION_FAILED,
        CloseCode.INVALID_SEQ,
        CloseCode.SESSION_TIMED_OUT,
        CloseCode.INVALID_SHARD,
        CloseCode.SHARDING_REQUIRED,
        CloseCode.INVALID_API_VERSION,
        CloseCode.INVALID_INTENTS,
        CloseCode.DISALLOWED_INTENTS,
    }
)
# websockets' handshake parser refuses request bodies; we lift the body off first, bounded.
_MAX_HTTP_HEAD: Final = 64 * 1024
_MAX_HTTP_BODY: Final = 1024 * 1024

Compression = Literal["zlib-stream", "zstd-stream"] | None
JSONDict = dict[str, Any]
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Records tests assert on
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdentifyRecord:
    time: float  # time.monotonic()
    shard_id: int
    session_id: str
    bucket: int


@dataclass(frozen=True, slots=True)
class IdentifyViolation:
    """An IDENTIFY that came sooner than ``identify_interval`` after the last in its bucket."""

    time: float
    shard_id: int
    bucket: int
    since_previous: float


@dataclass(frozen=True, slots=True)
class ResumeRecord:
    time: float
    session_id: str
    sequence: int  # the ``seq`` the client sent
    accepted: bool
    replayed: int  # dispatches replayed before RESUMED
    path: str


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """A command (op 3, 4, 8, 31) an identified connection sent, and which shard it came on."""

    time: float  # time.time(), comparable with a caller's issue time in another process
    shard_id: int
    op: int
    data: Any


@dataclass(slots=True)
class ConnectionRecord:
    opened_at: float
    path: str
    compress: Compression
    session_id: str | None = None
    close_code: int | None = None  # the code we (the server) closed with, if we did
    closed: bool = False


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """A copy of a ``Session`` safe to hand to another thread."""

    session_id: str
    shard_id: int
    shard_count: int
    sequence: int
    connected: bool
    resumable: bool
    heartbeats: tuple[int | None, ...]
    paths: tuple[str, ...]
    intents: int


@dataclass(slots=True)
class Session:
    """One Discord session: survives its connection for ``resume_window`` seconds."""

    session_id: str
    shard_id: int
    shard_count: int
    intents: int
    replay_limit: int
    sequence: int = 0
    connected: bool = False
    invalidated: bool = False
    disconnected_at: float | None = None
    heartbeats: list[int | None] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    # (sequence, encoded dispatch frame), contiguous in sequence
    buffer: deque[tuple[int, bytes]] = field(default_factory=deque)
    connection: _Connection | None = None
    resume_window: float = 180.0

    @property
    def resumable(self) -> bool:
        if self.invalidated:
            return False
        if self.connected or self.disconnected_at is None:
            return True
        return time.monotonic() - self.disconnected_at <= self.resume_window

    def snapshot(self) -> SessionSnapshot:
        return SessionSnapshot(
            session_id=self.session_id,
            shard_id=self.shard_id,
            shard_count=self.shard_count,
            sequence=self.sequence,
            connected=self.connected,
            resumable=self.resumable,
            heartbeats=tuple(self.heartbeats),
            paths=tuple(self.paths),
            intents=self.intents,
        )


# --------------------------------------------------------------------------------------------
# Wire helpers
# --------------------------------------------------------------------------------------------


def _frame(op: int, data: Any = None) -> bytes:
    return orjson.dumps({"op": int(op), "d": data, "s": None, "t": None})


def _dispatch_frame(event: str, sequence: int, encoded_data: bytes) -> bytes:
    # The data is encoded once per emit and spliced into each session's frame: emit is the
    # benchmark's hot path and a large bot fans one event out to many sessions.
    return b'{"op":0,"t":"%s","s":%d,"d":%s}' % (event.encode(), sequence, encoded_data)


class _StreamCompressor:
    """Transport compression: one stream per connection, flushed at every frame boundary."""

    def __init__(self, mode: Compression, *, zstd_frame_per_message: bool = False) -> None:
        self.mode = mode
        self._zlib = zlib.compressobj() if mode == "zlib-stream" else None
        self._zstd = (
            zstandard.ZstdCompressor().compressobj()
            if mode == "zstd-stream" and zstandard is not None
            else None
        )
        # Some servers (e.g. Spacebar) send each message as one complete zstd frame.
        self._zstd_frames = (
            zstandard.ZstdCompressor()
            if zstd_frame_per_message and self._zstd is not None and zstandard is not None
            else None
        )

    def compress(self, payload: bytes) -> bytes:
        if self._zstd_frames is not None:
            return self._zstd_frames.compress(payload)
        if self._zlib is not None:
            out = self._zlib.compress(payload) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
            assert out.endswith(ZLIB_SUFFIX)
            return out
        if self._zstd is not None:
            assert zstandard is not None
            return self._zstd.compress(payload) + self._zstd.flush(
                zstandard.COMPRESSOBJ_FLUSH_BLOCK
            )
        return payload


class _Connection:
    """One WebSocket connection and the state Discord keeps for it before/after IDENTIFY."""

    def __init__(
        self,
        ws: ServerConnection,
        path: str,
        query: dict[str, str],
        *,
        zstd_frame_per_message: bool = False,
    ) -> None:
        self.ws = ws
        self.path = path
        self.query = query
        compress = query.get("compress")
        self.compress: Compression = (
            "zlib-stream"
            if compress == "zlib-stream"
            else "zstd-stream"
            if compress == "zstd-stream" and zstandard is not None
            else None
        )
        self.compressor = _StreamCompressor(
            self.compress, zstd_frame_per_message=zstd_frame_per_message
        )
        self.session: Session | None = None
        self.authenticated = False
        self.pending_heartbeats: list[int | None] = []
        self.payload_times: deque[float] = deque()
        self.record = ConnectionRecord(time.monotonic(), path, self.compress)
        # Compressing and sending must happen in one order per connection, or the client's
        # inflate stream breaks; asyncio.Lock is FIFO, which keeps sequence order too.
        self._lock = asyncio.Lock()

    async def send(self, payload: bytes, *, compress: bool = True) -> None:
        async with self._lock:
            try:
                if self.compress is not None:
                    data = self.compressor.compress(payload) if compress else payload
                    await self.ws.send(data, text=False)
                else:
                    await self.ws.send(payload, text=True)
            except ConnectionClosed:
                # The handler notices the close and parks the session; the frame is in the
                # replay buffer if it was a dispatch.
                pass

    async def send_raw(self, payload: bytes | str, *, compress: bool) -> None:
        async with self._lock:
            with contextlib.suppress(ConnectionClosed):
                if isinstance(payload, str):
                    if compress and self.compress is not None:
                        await self.ws.send(self.compressor.compress(payload.encode()))
                    else:
                        await self.ws.send(payload)
                elif compress and self.compress is not None:
                    await self.ws.send(self.compressor.compress(payload))
                else:
                    await self.ws.send(payload, text=False)

    async def close(self, code: int, reason: str = "") -> None:
        if self.record.close_code is None:
            self.record.close_code = code
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(code, reason)


class _BodyConnection(ServerConnection):
    """Lifts an HTTP request body off before websockets' parser, which refuses bodies."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_body = b""
        self._head: bytearray | None = bytearray()

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            super().data_received(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > _MAX_HTTP_HEAD:
                self._hand_on(bytes(self._head))
            return
        head, rest = bytes(self._head[: end + 4]), bytes(self._head[end + 4 :])
        lines = head.split(b"\r\n")
        length = 0
        kept: list[bytes] = []
        for line in lines:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    self._hand_on(bytes(self._head))  # let websockets reject it
                    return
                continue
            kept.append(line)
        if length > _MAX_HTTP_BODY:
            self._hand_on(bytes(self._head))
            return
        if len(rest) < length:
            return  # wait for the rest of the body
        self.request_body = rest[:length]
        self._hand_on(b"\r\n".join(kept) + rest[length:])

    def eof_received(self) -> None:
        if self._head is not None:
            self._hand_on(bytes(self._head))
        super().eof_received()

    def _hand_on(self, data: bytes) -> None:
        self._head = None
        super().data_received(data)


def _json_response(connection: ServerConnection, status: HTTPStatus, body: Any) -> Response:
    response = connection.respond(status, orjson.dumps(body).decode())
    response.headers["Content-Type"] = "application/json"
    return response


def _rest_response(connection: ServerConnection, reply: Reply) -> Response:
    text = "" if reply.body is None else orjson.dumps(reply.body).decode()
    response = connection.respond(HTTPStatus(reply.status), text)
    if reply.body is not None:
        response.headers["Content-Type"] = "application/json"
    for name, value in reply.headers.items():
        response.headers[name] = value
    return response


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------


class GatewaySimulator:
    """Discord's side of the gateway, scriptable from tests.

    Use inside a running event loop: ``async with GatewaySimulator(port=0) as sim: ...``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str = DEFAULT_TOKEN,
        shard_count: int = 1,
        max_concurrency: int = 1,
        identify_interval: float = 5.0,
        heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS,
        allowed_privileged: Iterable[Intents] | int = 0,
        resume_window: float = 180.0,
        replay_buffer_size: int = 100_000,
        session_start_total: int = 1000,
        rate_limit_count: int = 120,
        rate_limit_window: float = 60.0,
        distinct_resume_path: bool = True,
        send_hello_first: bool = True,
        guilds_per_shard: int = 0,
        guild_size_kb: float = 2.0,
        application_id: int = 1100000000000000001,
        honour_message_content: bool = False,
        on_connect: Callable[[GatewaySimulator, ServerConnection], Awaitable[None] | None]
        | None = None,
        reuse_session_id: bool = False,
        first_sequence: int = 1,
        zstd_frame_per_message: bool = False,
        refuse_identify_with: int | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.token = token
        self.shard_count = shard_count
        self.max_concurrency = max_concurrency
        self.identify_interval = identify_interval
        self.heartbeat_interval_ms = heartbeat_interval_ms
        if isinstance(allowed_privileged, int):
            self.allowed_privileged = int(allowed_privileged)
        else:
            self.allowed_privileged = 0
            for flag in allowed_privileged:
                self.allowed_privileged |= int(flag)
        self.resume_window = resume_window
        self.replay_buffer_size = replay_buffer_size
        self.session_start_total = session_start_total
        self.session_start_remaining = session_start_total
        self.rate_limit_count = rate_limit_count
        self.rate_limit_window = rate_limit_window
        self.distinct_resume_path = distinct_resume_path
        self.send_hello_first = send_hello_first
        self.guilds_per_shard = guilds_per_shard
        self.guild_size_kb = guild_size_kb
        self.application_id = application_id
        # Off by default so tests and the benchmark keep their payloads; the CLI turns it on.
        self.honour_message_content = honour_message_content
        self.on_connect = on_connect
        # Modes of servers that are not Discord (Spacebar): one session id for every IDENTIFY
        # with sequences restarting at ``first_sequence``; zstd as one frame per message.
        self.reuse_session_id = reuse_session_id
        self.first_sequence = first_sequence
        self.zstd_frame_per_message = zstd_frame_per_message
        # Spacebar answers a bad token with close 4000 (not 4004) after IDENTIFY.
        self.refuse_identify_with = refuse_identify_with
        self._reused_session_id = secrets.token_hex(16)
        self.bot_user: JSONDict = {
            "id": str(application_id),
            "username": "ingest-sim",
            "discriminator": "0",
            "global_name": None,
            "avatar": None,
            "bot": True,
            "verified": True,
            "mfa_enabled": False,
            "flags": 0,
            "email": None,
        }

        # The REST routes a handler calls (messages, reactions, interactions): rest_sim.py.
        self.rest = RestSimulator(token=token, bot_user=self.bot_user, emit=self._emit_to_guild)
        self.identify_log: list[IdentifyRecord] = []
        self.resume_log: list[ResumeRecord] = []
        self.invalid_identifies: list[IdentifyViolation] = []
        self.sessions: dict[str, Session] = {}
        self.received: list[JSONDict] = []
        self.commands: list[CommandRecord] = []
        self.connections: list[ConnectionRecord] = []
        self.connections_opened = 0
        self.zombie = False

        self._server: Server | None = None
        self._port = 0
        self._started_at = time.monotonic()
        self._live: set[_Connection] = set()
        self._current: dict[int, Session] = {}  # shard id -> newest session
        self._last_identify: dict[int, float] = {}  # bucket -> monotonic time
        self._emitted: dict[int, int] = {}
        self._reconnect_before_hello = False
        self._background: set[asyncio.Task[Any]] = set()

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> GatewaySimulator:
        self._server = await serve(
            self._handle,
            self.host,
            self._requested_port,
            process_request=self._process_request,
            create_connection=_BodyConnection,
            # Discord neither negotiates permessage-deflate nor pings; a client must not
            # rely on either, so the simulator offers neither.
            compression=None,
            ping_interval=None,
            # Oversized frames are Discord's 4002, checked by us, not websockets' 1009.
            max_size=1024 * 1024,
            # /_sim/emit answers only after emitting, which may take longer than a handshake.
            open_timeout=None,
            close_timeout=2,
        )
        self._port = self._server.sockets[0].getsockname()[1]
        self._started_at = time.monotonic()
        logger.info("gateway simulator listening on %s (api %s)", self.url, self.api_url)
        return self

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> GatewaySimulator:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def _public_host(self) -> str:
        return "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host

    @property
    def url(self) -> str:
        return f"ws://{self._public_host}:{self._port}"

    @property
    def resume_url(self) -> str:
        return self.url + (RESUME_PATH if self.distinct_resume_path else "")

    @property
    def api_url(self) -> str:
        return f"http://{self._public_host}:{self._port}{API_PREFIX}"

    # ---- control API --------------------------------------------------------------------

    async def emit(self, event_name: str, data: Any, shard_id: int | None = None) -> None:
        """Dispatch to the current session of every shard (or one), live or resumable."""
        encoded = orjson.dumps(data)
        for session in self._targets(shard_id):
            self._emitted[session.shard_id] = self._emitted.get(session.shard_id, 0) + 1
            if self.honour_message_content and strips_content(
                event_name, data, session.intents, str(self.application_id)
            ):
                await self._dispatch(session, event_name, orjson.dumps(without_content(data)))
                continue
            await self._dispatch(session, event_name, encoded)

    async def emit_poison(
        self, depth: int = 400, event_name: str = "MESSAGE_CREATE", shard_id: int | None = None
    ) -> None:
        """Dispatch a valid event with an extra key nesting ``depth`` lists: JSON a parser takes
        (up to 1024 levels) but orjson cannot write back (past ~254), so it is spliced here."""
        head = orjson.dumps(sample_message_create(0)).rstrip(b"}")
        encoded = head + b',"nested":' + b"[" * depth + b"0" + b"]" * depth + b"}"
        for session in self._targets(shard_id):
            self._emitted[session.shard_id] = self._emitted.get(session.shard_id, 0) + 1
            await self._dispatch(session, event_name, encoded)

    async def emit_many(
        self,
        event_name: str,
        make_data: Callable[[int], Any],
        count: int,
        rate: float | None = None,
        shard_id: int | None = None,
    ) -> None:
        """Emit ``count`` events at ``rate`` per second (``None``: as fast as sockets take)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(count):
            if rate:
                delay = start + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif i % 64 == 63:
                # send() does not yield while the socket buffer has room; let clients run.
                await asyncio.sleep(0)
            await self.emit(event_name, make_data(i), shard_id)

    async def close_connections(
        self, code: int, reason: str = "", shard_id: int | None = None
    ) -> None:
        for conn in self._connections_for(shard_id, include_unidentified=True):
            if code in _SESSION_ENDING_CLOSES and conn.session is not None:
                conn.session.invalidated = True
            await conn.close(code, reason)

    async def drop_connections(self, shard_id: int | None = None) -> None:
        """Abort TCP with no close frame, as a network failure would."""
        for conn in self._connections_for(shard_id, include_unidentified=True):
            transport = conn.ws.transport
            if transport is not None:
                transport.abort()

    async def send_reconnect(self, shard_id: int | None = None) -> None:
        for conn in self._connections_for(shard_id):
            await conn.send(_frame(Opcode.RECONNECT))

    async def send_invalid_session(self, resumable: bool, shard_id: int | None = None) -> None:
        for conn in self._connections_for(shard_id):
            if not resumable and conn.session is not None:
                conn.session.invalidated = True
            await conn.send(_frame(Opcode.INVALID_SESSION, resumable))

    async def set_zombie(self, enabled: bool) -> None:
        """Stop (or resume) ACKing heartbeats, so the client sees a zombied connection."""
        self.zombie = enabled

    async def request_heartbeat(self, shard_id: int | None = None) -> None:
        for conn in self._connections_for(shard_id, include_unidentified=True):
            await conn.send(_frame(Opcode.HEARTBEAT))

    async def send_raw(
        self, data: bytes | str, shard_id: int | None = None, *, compress: bool = False
    ) -> None:
        """Send a frame as-is (bad JSON, unknown op, a corrupt compressed stream)."""
        for conn in self._connections_for(shard_id, include_unidentified=True):
            await conn.send_raw(data, compress=compress)

    def reconnect_before_hello(self) -> None:
        """Make the next connection get op 7 RECONNECT before its HELLO."""
        self._reconnect_before_hello = True

    # ---- introspection ------------------------------------------------------------------

    def emitted_count(self, shard_id: int | None = None) -> int:
        if shard_id is None:
            return sum(self._emitted.values())
        return self._emitted.get(shard_id, 0)

    def ready_shards(self) -> list[int]:
        return sorted(
            shard
            for shard, session in self._current.items()
            if session.connected and not session.invalidated
        )

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll ``predicate`` until true; ``TimeoutError`` if it is not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            await asyncio.sleep(0.005)

    def state(self) -> JSONDict:
        """A JSON-able summary, served at ``GET /_sim/state``."""
        now = time.monotonic()
        return {
            "url": self.url,
            "sessions": {
                sid: {
                    "shard_id": s.shard_id,
                    "sequence": s.sequence,
                    "connected": s.connected,
                    "resumable": s.resumable,
                    "heartbeats": len(s.heartbeats),
                    "paths": s.paths,
                }
                for sid, s in self.sessions.items()
            },
            "ready_shards": self.ready_shards(),
            "identify_log": [
                {
                    "ago": round(now - r.time, 3),
                    "shard_id": r.shard_id,
                    "session_id": r.session_id,
                    "bucket": r.bucket,
                }
                for r in self.identify_log
            ],
            "invalid_identifies": len(self.invalid_identifies),
            "resumes": [
                {"session_id": r.session_id, "accepted": r.accepted, "replayed": r.replayed}
                for r in self.resume_log
            ],
            "heartbeats": sum(len(s.heartbeats) for s in self.sessions.values()),
            "connections_opened": self.connections_opened,
            "emitted": self.emitted_count(),
            "received": len(self.received),
            "session_start_remaining": self.session_start_remaining,
        }

    # ---- internals: targets and dispatch ------------------------------------------------

    def _targets(self, shard_id: int | None) -> list[Session]:
        return [
            s
            for shard, s in self._current.items()
            if (shard_id is None or shard == shard_id) and s.resumable
        ]

    def _connections_for(
        self, shard_id: int | None, include_unidentified: bool = False
    ) -> list[_Connection]:
        out = []
        for conn in list(self._live):
            if conn.session is None:
                if include_unidentified and shard_id is None:
                    out.append(conn)
            elif shard_id is None or conn.session.shard_id == shard_id:
                out.append(conn)
        return out

    async def _dispatch(self, session: Session, event_name: str, encoded_data: bytes) -> None:
        # Sequence and buffer are updated before any await, so concurrent emits keep order.
        session.sequence += 1
        frame = _dispatch_frame(event_name, session.sequence, encoded_data)
        session.buffer.append((session.sequence, frame))
        if len(session.buffer) > session.replay_limit:
            session.buffer.popleft()
        conn = session.connection
        if conn is not None:
            await conn.send(frame)

    # ---- internals: HTTP ----------------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        split = urlsplit(request.path)
        path = split.path.rstrip("/") or "/"
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if path in ("/", RESUME_PATH):
                return None
            return _json_response(connection, HTTPStatus.NOT_FOUND, {"message": "404: Not Found"})
        body = connection.request_body if isinstance(connection, _BodyConnection) else b""
        try:
            return await self._route_http(connection, request, path, split.query, body)
        except (ValueError, TypeError, KeyError) as exc:
            # KeyError's str() is the repr of its argument; show the message itself.
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            return _json_response(
                connection, HTTPStatus.BAD_REQUEST, {"message": f"400: {reason}", "code": 50035}
            )

    async def _route_http(
        self,
        connection: ServerConnection,
        request: Request,
        path: str,
        query: str,
        body: bytes,
    ) -> Response:
        method = request.method
        if path == f"{API_PREFIX}/gateway":
            return _json_response(connection, HTTPStatus.OK, {"url": self.url})
        if path in (f"{API_PREFIX}/gateway/bot", f"{API_PREFIX}/users/@me"):
            if request.headers.get("Authorization") != f"Bot {self.token}":
                return _json_response(
                    connection,
                    HTTPStatus.UNAUTHORIZED,
                    {"message": "401: Unauthorized", "code": 0},
                )
            if path.endswith("/users/@me"):
                return _json_response(connection, HTTPStatus.OK, self.bot_user)
            return _json_response(connection, HTTPStatus.OK, self._gateway_bot())
        if path == "/_sim/state":
            return _json_response(connection, HTTPStatus.OK, self.state())
        if path.startswith("/_sim/") and method == "POST":
            params: JSONDict = orjson.loads(body) if body.strip() else {}
            for key, values in parse_qs(query).items():
                params.setdefault(key, values[-1])
            result = await self._control(path.removeprefix("/_sim/"), params)
            if result is not None:
                return _json_response(connection, HTTPStatus.OK, result)
        if path.startswith(f"{API_PREFIX}/"):
            payload = orjson.loads(body) if body.strip() else None
            reply = await self.rest.handle(
                method, path.removeprefix(API_PREFIX), request.headers, body, payload
            )
            if reply is not None:
                return _rest_response(connection, reply)
        return _json_response(connection, HTTPStatus.NOT_FOUND, {"message": "404: Not Found"})

    async def _emit_to_guild(self, event_name: str, data: Any, guild_id: str) -> None:
        await self.emit(event_name, data, shard_id=(int(guild_id) >> 22) % self.shard_count)

    def _gateway_bot(self) -> JSONDict:
        elapsed_ms = int((time.monotonic() - self._started_at) * 1000)
        return {
            "url": self.url,
            "shards": self.shard_count,
            "session_start_limit": {
                "total": self.session_start_total,
                "remaining": self.session_start_remaining,
                "reset_after": max(0, 86_400_000 - elapsed_ms),
                "max_concurrency": self.max_concurrency,
            },
        }

    async def _control(self, action: str, params: JSONDict) -> JSONDict | None:
        shard = params.get("shard_id")
        shard_id = None if shard is None else int(shard)
        if action == "emit":
            event = str(params["event"])
            count = int(params.get("count", 1))
            raw_rate = params.get("rate")
            rate = None if raw_rate in (None, "", "null") else float(raw_rate)
            data = params.get("data")
            options = {k: params[k] for k in ("size_kb", "guild_id", "channel_id") if k in params}
            if data is None:
                generate_payload(event, 0, **options)  # fail fast (400) on an unknown event

                def make(i: int) -> Any:
                    return generate_payload(event, i, **options)

            else:

                def make(i: int) -> Any:
                    return data

            job = self.emit_many(event, make, count, rate, shard_id)
            if params.get("wait", True) in (False, "false", "0"):
                task = asyncio.ensure_future(job)
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                return {"emitting": count}
            await job
            return {"emitted": count}
        if action == "close":
            await self.close_connections(
                int(params.get("code", 4000)), str(params.get("reason", "")), shard_id
            )
        elif action == "drop":
            await self.drop_connections(shard_id)
        elif action == "reconnect":
            await self.send_reconnect(shard_id)
        elif action == "invalid_session":
            resumable = params.get("resumable", False) in (True, "true", "1")
            await self.send_invalid_session(resumable, shard_id)
        elif action == "zombie":
            await self.set_zombie(params.get("enabled", True) in (True, "true", "1"))
        elif action == "heartbeat":
            await self.request_heartbeat(shard_id)
        else:
            return None
        return {"ok": True}

    # ---- internals: gateway -------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        split = urlsplit(ws.request.path if ws.request is not None else "/")
        path = split.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        conn = _Connection(ws, path, query, zstd_frame_per_message=self.zstd_frame_per_message)
        self.connections_opened += 1
        self.connections.append(conn.record)
        self._live.add(conn)
        try:
            if self.on_connect is not None:
                hook = self.on_connect(self, ws)
                if hook is not None:
                    await hook
            if self._reconnect_before_hello or not self.send_hello_first:
                self._reconnect_before_hello = False
                await conn.send(_frame(Opcode.RECONNECT))
            await conn.send(
                _frame(Opcode.HELLO, {"heartbeat_interval": self.heartbeat_interval_ms})
            )
            async for message in ws:
                close = await self._on_message(conn, message)
                if close is not None:
                    await conn.close(int(close), close.name)
                    break
        except ConnectionClosed:
            pass
        finally:
            self._live.discard(conn)
            conn.record.closed = True
            self._park(conn)

    def _park(self, conn: _Connection) -> None:
        """The connection is gone: keep its session resumable unless the close ended it."""
        session = conn.session
        if session is None or session.connection is not conn:
            return
        session.connection = None
        session.connected = False
        session.disconnected_at = time.monotonic()
        protocol = conn.ws.protocol
        rcvd = protocol.close_rcvd
        client_closed_first = protocol.close_rcvd_then_sent is not False and rcvd is not None
        if client_closed_first and rcvd is not None and rcvd.code in (1000, 1001):
            session.invalidated = True
        sent = conn.record.close_code
        if sent is not None and sent in _SESSION_ENDING_CLOSES:
            session.invalidated = True

    async def _on_message(self, conn: _Connection, message: str | bytes) -> CloseCode | None:
        raw = message.encode() if isinstance(message, str) else message
        if len(raw) > MAX_PAYLOAD_BYTES:
            return CloseCode.DECODE_ERROR
        now = time.monotonic()
        conn.payload_times.append(now)
        while conn.payload_times and conn.payload_times[0] <= now - self.rate_limit_window:
            conn.payload_times.popleft()
        if len(conn.payload_times) > self.rate_limit_count:
            return CloseCode.RATE_LIMITED
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return CloseCode.DECODE_ERROR
        if not isinstance(payload, dict) or not isinstance(payload.get("op"), int):
            return CloseCode.DECODE_ERROR
        self.received.append(_redacted(payload))
        op = payload["op"]
        if op not in CLIENT_OPS:
            return CloseCode.UNKNOWN_OPCODE
        data = payload.get("d")
        if op == Opcode.HEARTBEAT:
            beat = data if isinstance(data, int) else None
            if conn.session is not None:
                conn.session.heartbeats.append(beat)
            else:
                conn.pending_heartbeats.append(beat)
            if not self.zombie:
                await conn.send(_frame(Opcode.HEARTBEAT_ACK))
            return None
        if op == Opcode.IDENTIFY:
            if conn.authenticated:
                return CloseCode.ALREADY_AUTHENTICATED
            return await self._identify(conn, data)
        if op == Opcode.RESUME:
            if conn.authenticated:
                return CloseCode.ALREADY_AUTHENTICATED
            return await self._resume(conn, data)
        if not conn.authenticated or conn.session is None:
            return CloseCode.NOT_AUTHENTICATED
        self.commands.append(CommandRecord(time.time(), conn.session.shard_id, op, data))
        if op == Opcode.REQUEST_GUILD_MEMBERS and isinstance(data, dict):
            await self._dispatch(conn.session, "GUILD_MEMBERS_CHUNK", _members_chunk(data))
        return None  # presence, voice: accepted and recorded only

    async def _identify(self, conn: _Connection, data: Any) -> CloseCode | None:
        if not isinstance(data, dict):
            return CloseCode.DECODE_ERROR
        if self.refuse_identify_with is not None:
            return CloseCode(self.refuse_identify_with)
        if data.get("token") != self.token:
            logger.info("IDENTIFY with a wrong token: closing 4004")
            return CloseCode.AUTHENTICATION_FAILED
        if conn.query.get("v") != "10":
            return CloseCode.INVALID_API_VERSION
        intents = data.get("intents")
        if not isinstance(intents, int) or isinstance(intents, bool) or intents < 0:
            return CloseCode.INVALID_INTENTS
        if intents & int(PRIVILEGED_INTENTS) & ~self.allowed_privileged:
            return CloseCode.DISALLOWED_INTENTS
        shard = data.get("shard")
        if shard is None:
            if self.shard_count > 1:
                return CloseCode.SHARDING_REQUIRED
            shard_id, shard_count = 0, 1
        else:
            if (
                not isinstance(shard, list)
                or len(shard) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in shard)
            ):
                return CloseCode.INVALID_SHARD
            shard_id, shard_count = shard
            if shard_count != self.shard_count or not 0 <= shard_id < shard_count:
                return CloseCode.INVALID_SHARD

        now = time.monotonic()
        bucket = shard_id % max(1, self.max_concurrency)
        previous = self._last_identify.get(bucket)
        if previous is not None and now - previous < self.identify_interval:
            self.invalid_identifies.append(IdentifyViolation(now, shard_id, bucket, now - previous))
            logger.info(
                "IDENTIFY for shard %d came %.3f s after the last in bucket %d",
                shard_id,
                now - previous,
                bucket,
            )
            await conn.send(_frame(Opcode.INVALID_SESSION, False))
            return None
        self._last_identify[bucket] = now
        self.session_start_remaining = max(0, self.session_start_remaining - 1)

        session = Session(
            session_id=self._reused_session_id if self.reuse_session_id else secrets.token_hex(16),
            shard_id=shard_id,
            shard_count=shard_count,
            intents=intents,
            replay_limit=self.replay_buffer_size,
            resume_window=self.resume_window,
            sequence=self.first_sequence - 1,
        )
        self.sessions[session.session_id] = session
        self._current[shard_id] = session
        self.identify_log.append(IdentifyRecord(now, shard_id, session.session_id, bucket))
        self._attach(conn, session)
        guild_ids = [_guild_id(shard_id, g, shard_count) for g in range(self.guilds_per_shard)]
        ready = {
            "v": 10,
            "user": self.bot_user,
            "guilds": [{"id": gid, "unavailable": True} for gid in guild_ids],
            "session_id": session.session_id,
            "session_type": "normal",
            "resume_gateway_url": self.resume_url,
            "shard": [shard_id, shard_count],
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "presences": [],
            "relationships": [],
            "user_settings": {},
            "auth": {},
            "geo_ordered_rtc_regions": ["us-east", "us-central"],
            "_trace": ['["ingest-sim",{"micros":0}]'],
        }
        logger.info("shard %d identified: session %s", shard_id, session.session_id)
        await self._dispatch(session, "READY", orjson.dumps(ready))
        for index, gid in enumerate(guild_ids):
            guild = sample_guild_create(index, size_kb=self.guild_size_kb, guild_id=gid)
            await self._dispatch(session, "GUILD_CREATE", orjson.dumps(guild))
        return None

    async def _resume(self, conn: _Connection, data: Any) -> CloseCode | None:
        if not isinstance(data, dict):
            return CloseCode.DECODE_ERROR
        now = time.monotonic()
        session_id = data.get("session_id")
        seq = data.get("seq")
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        ok = (
            session is not None
            and data.get("token") == self.token
            and session.resumable
            and isinstance(seq, int)
            and seq <= session.sequence
            and (not session.buffer or seq >= session.buffer[0][0] - 1)
        )
        if not ok or session is None or not isinstance(seq, int):
            self.resume_log.append(
                ResumeRecord(now, str(session_id), int(seq or 0), False, 0, conn.path)
            )
            await conn.send(_frame(Opcode.INVALID_SESSION, False))
            return None
        # A resume can beat the server to noticing the old connection died: take the session.
        old = session.connection
        if old is not None and old is not conn:
            session.connection = None
            self._spawn(old.close(CloseCode.SESSION_TIMED_OUT.value, "session resumed elsewhere"))
        conn.authenticated = True
        conn.session = session
        conn.record.session_id = session.session_id
        session.paths.append(conn.path)
        # Replay by sequence, re-reading the buffer each step: emits during the replay append
        # to it (the connection is not attached yet) and must be replayed too, in order.
        replayed = 0
        next_seq = seq + 1
        while next_seq <= session.sequence and session.buffer:
            first = session.buffer[0][0]
            if next_seq < first:
                next_seq = first
            await conn.send(session.buffer[next_seq - first][1])
            replayed += 1
            next_seq += 1
        session.connection = conn
        session.connected = True
        session.disconnected_at = None
        session.heartbeats.extend(conn.pending_heartbeats)
        conn.pending_heartbeats.clear()
        self._current[session.shard_id] = session
        self.resume_log.append(
            ResumeRecord(now, session.session_id, seq, True, replayed, conn.path)
        )
        logger.info("session %s resumed: %d replayed", session.session_id, replayed)
        await self._dispatch(session, "RESUMED", orjson.dumps({"_trace": ['["ingest-sim"]']}))
        return None

    def _attach(self, conn: _Connection, session: Session) -> None:
        conn.authenticated = True
        conn.session = session
        conn.record.session_id = session.session_id
        session.connection = conn
        session.connected = True
        session.disconnected_at = None
        session.paths.append(conn.path)
        session.heartbeats.extend(conn.pending_heartbeats)
        conn.pending_heartbeats.clear()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _members_chunk(request: JSONDict) -> bytes:
    """One GUILD_MEMBERS_CHUNK answering an op 8: a member per requested id (or up to
    ``limit`` for a query), the nonce echoed as Discord does."""
    user_ids = request.get("user_ids")
    if isinstance(user_ids, list):
        members: list[JSONDict] = []
        for user_id in user_ids[:100]:
            member = _member(len(members), with_user=True)
            member["user"]["id"] = str(user_id)
            members.append(member)
    else:
        limit = request.get("limit")
        count = min(limit, 100) if isinstance(limit, int) and limit > 0 else 3
        members = [_member(i, with_user=True) for i in range(count)]
    chunk: JSONDict = {
        "guild_id": request.get("guild_id"),
        "members": members,
        "chunk_index": 0,
        "chunk_count": 1,
    }
    if isinstance(request.get("nonce"), str):
        chunk["nonce"] = request["nonce"]
    return orjson.dumps(chunk)


def _redacted(payload: JSONDict) -> JSONDict:
    data = payload.get("d")
    if isinstance(data, dict) and "token" in data:
        return {**payload, "d": {**data, "token": "[redacted]"}}
    return payload


# --------------------------------------------------------------------------------------------
# Running in a thread, for clients in another thread or process
# --------------------------------------------------------------------------------------------


class SimulatorThread:
    """A ``GatewaySimulator`` on its own event loop in a daemon thread; sync wrappers."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._sim: GatewaySimulator | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None

    # ---- lifecycle ----
    def start(self, timeout: float = 10.0) -> SimulatorThread:
        self._thread = threading.Thread(target=self._run, name="gateway-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("gateway simulator did not start")
        if self._error is not None:
            raise RuntimeError("gateway simulator failed to start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopped.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            try:
                self._sim = await GatewaySimulator(**self._kwargs).start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                raise
            self._ready.set()
            try:
                await self._stopped.wait()
            finally:
                await self._sim.stop()

        with contextlib.suppress(Exception):
            asyncio.run(main())

    # ---- access ----
    @property
    def sim(self) -> GatewaySimulator:
        """The simulator itself; touch it only on its loop (``call``/``read``)."""
        if self._sim is None:
            raise RuntimeError("SimulatorThread is not started")
        return self._sim

    @property
    def url(self) -> str:
        return self.sim.url

    @property
    def api_url(self) -> str:
        return self.sim.api_url

    @property
    def resume_url(self) -> str:
        return self.sim.resume_url

    @property
    def port(self) -> int:
        return self.sim.port

    def call(
        self,
        coro_fn: Callable[..., Coroutine[Any, Any, T]],
        *args: Any,
        timeout: float | None = 60.0,
        **kwargs: Any,
    ) -> T:
        """Run ``coro_fn(*args, **kwargs)`` on the simulator's loop and wait for it."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("SimulatorThread.call from the simulator's own thread")
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro_fn(*args, **kwargs), self._loop)
        return future.result(timeout)

    def read(self, fn: Callable[[GatewaySimulator], T]) -> T:
        """Run ``fn(sim)`` on the simulator's loop: a consistent read of its state."""
        sim = self.sim
        if threading.current_thread() is self._thread:
            return fn(sim)

        async def run() -> T:
            return fn(sim)

        return self.call(run)

    def emit(self, event_name: str, data: Any, shard_id: int | None = None) -> None:
        self.call(self.sim.emit, event_name, data, shard_id)

    def emit_poison(
        self, depth: int = 400, event_name: str = "MESSAGE_CREATE", shard_id: int | None = None
    ) -> None:
        self.call(self.sim.emit_poison, depth, event_name, shard_id)

    def emit_many(
        self,
        event_name: str,
        make_data: Callable[[int], Any],
        count: int,
        rate: float | None = None,
        shard_id: int | None = None,
        timeout: float | None = 300.0,
    ) -> None:
        self.call(self.sim.emit_many, event_name, make_data, count, rate, shard_id, timeout=timeout)

    def close_connections(self, code: int, reason: str = "", shard_id: int | None = None) -> None:
        self.call(self.sim.close_connections, code, reason, shard_id)

    def drop_connections(self, shard_id: int | None = None) -> None:
        self.call(self.sim.drop_connections, shard_id)

    def send_reconnect(self, shard_id: int | None = None) -> None:
        self.call(self.sim.send_reconnect, shard_id)

    def send_invalid_session(self, resumable: bool, shard_id: int | None = None) -> None:
        self.call(self.sim.send_invalid_session, resumable, shard_id)

    def set_zombie(self, enabled: bool) -> None:
        self.call(self.sim.set_zombie, enabled)

    def request_heartbeat(self, shard_id: int | None = None) -> None:
        self.call(self.sim.request_heartbeat, shard_id)

    def send_raw(
        self, data: bytes | str, shard_id: int | None = None, *, compress: bool = False
    ) -> None:
        self.call(self.sim.send_raw, data, shard_id, compress=compress)

    def reconnect_before_hello(self) -> None:
        self.read(lambda sim: sim.reconnect_before_hello())

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll ``predicate`` on the simulator's loop (it may read ``sim`` directly)."""
        self.call(self.sim.wait_until, predicate, timeout, timeout=timeout + 5.0)

    @property
    def identify_log(self) -> list[IdentifyRecord]:
        return self.read(lambda sim: list(sim.identify_log))

    @property
    def resume_log(self) -> list[ResumeRecord]:
        return self.read(lambda sim: list(sim.resume_log))

    @property
    def invalid_identifies(self) -> list[IdentifyViolation]:
        return self.read(lambda sim: list(sim.invalid_identifies))

    @property
    def sessions(self) -> dict[str, SessionSnapshot]:
        return self.read(lambda sim: {k: s.snapshot() for k, s in sim.sessions.items()})

    @property
    def received(self) -> list[JSONDict]:
        return self.read(lambda sim: list(sim.received))

    def commands(self, shard_id: int | None = None) -> list[CommandRecord]:
        """Commands received (op 3, 4, 8, 31), of one shard or all, in arrival order."""
        return self.read(
            lambda sim: [c for c in sim.commands if shard_id is None or c.shard_id == shard_id]
        )

    @property
    def connections_opened(self) -> int:
        return self.read(lambda sim: sim.connections_opened)

    def emitted_count(self, shard_id: int | None = None) -> int:
        return self.read(lambda sim: sim.emitted_count(shard_id))

    def ready_shards(self) -> list[int]:
        return self.read(lambda sim: sim.ready_shards())

    def state(self) -> JSONDict:
        return self.read(lambda sim: sim.state())


# --------------------------------------------------------------------------------------------
# Realistic payloads (shapes per Discord's docs), distinct per index ``i``
# --------------------------------------------------------------------------------------------

_BASE_MS: Final = 1_735_689_600_000  # 2025-01-01, fixed so payloads are reproducible
DEFAULT_GUILD_ID: Final = "1180000000000000001"
DEFAULT_CHANNEL_ID: Final = "1180000000000000101"
_WORDS: Final = (
    "deploy",
    "queue",
    "worker",
    "shard",
    "gateway",
    "resume",
    "heartbeat",
    "latency",
    "broker",
    "task",
    "celery",
    "event",
    "payload",
    "merge",
    "review",
    "release",
    "rollback",
    "metrics",
    "alert",
    "channel",
    "thread",
    "embed",
    "reaction",
)


def _snowflake(i: int, worker: int = 1) -> str:
    return str(((_BASE_MS - DISCORD_EPOCH_MS + i) << 22) | (worker << 17) | (i & 0xFFF))


def _iso(i: int) -> str:
    seconds = _BASE_MS // 1000 + i
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".000000+00:00"


def _guild_id(shard_id: int, index: int, shard_count: int) -> str:
    # Discord routes guild g to shard (g >> 22) % shard_count; pick ids that honour it.
    base = (_BASE_MS - DISCORD_EPOCH_MS) // shard_count * shard_count + shard_id
    return str(((base + index * shard_count) << 22) | 0x10000 | index & 0xFFF)


def _user(i: int) -> JSONDict:
    return {
        "id": _snowflake(i, worker=3),
        "username": f"user{i}",
        "global_name": f"User {i}",
        "discriminator": "0",
        "avatar": f"{i:032x}",
        "avatar_decoration_data": None,
        "public_flags": 0,
    }


def _member(i: int, with_user: bool = False) -> JSONDict:
    member: JSONDict = {
        "nick": None if i % 3 else f"nick{i}",
        "avatar": None,
        "banner": None,
        "roles": [_snowflake(7000 + i % 5, worker=4)],
        "joined_at": _iso(i),
        "premium_since": None,
        "deaf": False,
        "mute": False,
        "flags": 0,
        "pending": False,
        "communication_disabled_until": None,
    }
    if with_user:
        member["user"] = _user(i)
    return member


def sample_message_create(
    i: int,
    channel_id: str = DEFAULT_CHANNEL_ID,
    guild_id: str = DEFAULT_GUILD_ID,
    **_: Any,
) -> JSONDict:
    """A MESSAGE_CREATE ``d`` of about 0.9 KB; id, author and content differ per ``i``."""
    words = " ".join(_WORDS[(i + k) % len(_WORDS)] for k in range(8))
    mention = _user(i + 1)
    return {
        "id": _snowflake(i, worker=2),
        "channel_id": channel_id,
        "guild_id": guild_id,
        "author": _user(i),
        "member": _member(i),
        "content": f"message {i}: {words} <@{mention['id']}>",
        "timestamp": _iso(i),
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [mention],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": False,
        "type": 0,
        "flags": 0,
        "components": [],
        "nonce": str(10_000_000 + i),
    }


def sample_typing_start(
    i: int,
    channel_id: str = DEFAULT_CHANNEL_ID,
    guild_id: str = DEFAULT_GUILD_ID,
    **_: Any,
) -> JSONDict:
    return {
        "channel_id": channel_id,
        "guild_id": guild_id,
        "user_id": _snowflake(i, worker=3),
        "timestamp": _BASE_MS // 1000 + i,
        "member": _member(i, with_user=True),
    }


def sample_guild_member_add(i: int, guild_id: str = DEFAULT_GUILD_ID, **_: Any) -> JSONDict:
    return {**_member(i, with_user=True), "guild_id": guild_id}


def sample_guild_create(
    i: int, size_kb: float = 50.0, guild_id: str | None = None, **_: Any
) -> JSONDict:
    """A GUILD_CREATE ``d`` of roughly ``size_kb`` kilobytes, grown by its member list."""
    gid = guild_id or _snowflake(i, worker=5)
    roles = [
        {
            "id": gid if r == 0 else _snowflake(7000 + r, worker=4),
            "name": "@everyone" if r == 0 else f"role-{r}",
            "color": (r * 0x1F2E3D) & 0xFFFFFF,
            "hoist": r % 2 == 1,
            "icon": None,
            "unicode_emoji": None,
            "position": r,
            "permissions": "1071698660929",
            "managed": False,
            "mentionable": r % 3 == 0,
            "flags": 0,
        }
        for r in range(5)
    ]
    channels: list[JSONDict] = [
        {
            "id": _snowflake(100 * i + c, worker=6),
            "type": 0,
            "guild_id": gid,
            "name": f"channel-{c}",
            "position": c,
            "permission_overwrites": [],
            "topic": None,
            "nsfw": False,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "parent_id": None,
        }
        for c in range(6)
    ]
    guild: JSONDict = {
        "id": gid,
        "name": f"guild {i}",
        "icon": None,
        "splash": None,
        "discovery_splash": None,
        "owner_id": _snowflake(i, worker=3),
        "afk_channel_id": None,
        "afk_timeout": 300,
        "verification_level": 1,
        "default_message_notifications": 1,
        "explicit_content_filter": 2,
        "roles": roles,
        "emojis": [],
        "stickers": [],
        "features": ["COMMUNITY", "NEWS"],
        "mfa_level": 0,
        "application_id": None,
        "system_channel_id": channels[0]["id"],
        "system_channel_flags": 0,
        "rules_channel_id": None,
        "vanity_url_code": None,
        "description": None,
        "banner": None,
        "premium_tier": 1,
        "premium_subscription_count": 3,
        "preferred_locale": "en-US",
        "public_updates_channel_id": None,
        "nsfw_level": 0,
        "premium_progress_bar_enabled": False,
        "joined_at": _iso(i),
        "large": False,
        "unavailable": False,
        "member_count": 0,
        "voice_states": [],
        "members": [],
        "channels": channels,
        "threads": [],
        "presences": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "soundboard_sounds": [],
    }
    base_size = len(orjson.dumps(guild))
    member_size = len(orjson.dumps(_member(0, with_user=True))) + 1
    count = max(1, int((size_kb * 1024 - base_size) / member_size))
    guild["members"] = [_member(i * 100_000 + m, with_user=True) for m in range(count)]
    guild["member_count"] = count
    guild["large"] = count > 250
    return guild


SAMPLE_GENERATORS: Final[dict[str, Callable[..., JSONDict]]] = {
    "MESSAGE_CREATE": sample_message_create,
    "GUILD_CREATE": sample_guild_create,
    "TYPING_START": sample_typing_start,
    "GUILD_MEMBER_ADD": sample_guild_member_add,
}


def generate_payload(event: str, i: int, **options: Any) -> JSONDict:
    """The ``i``-th generated ``d`` for ``event``; ``KeyError`` if we have no generator."""
    try:
        generator = SAMPLE_GENERATORS[event]
    except KeyError:
        known = ", ".join(SAMPLE_GENERATORS)
        raise KeyError(f"no generator for {event!r}; known: {known}") from None
    return generator(i, **options)
