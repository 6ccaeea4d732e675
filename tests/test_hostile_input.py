"""Property tests: whatever a hostile or broken peer sends, the session core never raises, never
breaks Discord's send limits, and reports every unusable frame; event models only ever accept a
payload or raise ``ValidationError``.

The session is driven the way ``ingest.gateway`` drives it (connect, identify when asked, close
when told, reconnect) with an explicit clock, so a whole run of frames and ticks is one example.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.compression import Compression, zstd_available
from ingest.errors import CommandRateLimited, NotConnected, PayloadTooLarge
from ingest.models import EVENT_MODELS, validate_event
from ingest.protocol import (
    COMMAND_WINDOW_SECONDS,
    COMMANDS_PER_WINDOW,
    MAX_PAYLOAD_BYTES,
    ZLIB_SUFFIX,
    Opcode,
)
from ingest.session import (
    Close,
    Dispatch,
    IdentifyRequired,
    Rejected,
    Session,
    SessionConfig,
    State,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = {p.stem: json.loads(p.read_text()) for p in (ROOT / "tests" / "samples").glob("*.json")}
TOKEN = "hostile-input-token-0123456789"
EVENT_NAMES = sorted(EVENT_MODELS)
SAMPLE_NAMES = sorted(SAMPLES)
# Opcodes the session understands when Discord sends them; any other is "unknown opcode".
KNOWN_INBOUND_OPS = frozenset(
    {
        Opcode.DISPATCH,
        Opcode.HEARTBEAT,
        Opcode.RECONNECT,
        Opcode.INVALID_SESSION,
        Opcode.HELLO,
        Opcode.HEARTBEAT_ACK,
    }
)
READING = frozenset(
    {
        State.AWAITING_HELLO,
        State.AWAITING_IDENTIFY,
        State.IDENTIFYING,
        State.RESUMING,
        State.CONNECTED,
    }
)


def examples(count: int) -> settings:
    """A fixed example budget; no per-example deadline (a burst step is slow by design)."""
    return settings(max_examples=count, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# The oracle: which frames are unusable no matter what state the session is in


def must_be_rejected(message: bytes) -> bool:
    """True for a frame that is not a gateway payload at all: bad JSON, not an object, no integer
    op, or an op Discord never sends us."""
    try:
        payload = orjson.loads(message)
    except orjson.JSONDecodeError:
        return True
    if not isinstance(payload, dict):
        return True
    op = payload.get("op")
    return not isinstance(op, int) or op not in KNOWN_INBOUND_OPS


# ---------------------------------------------------------------------------------------------
# The shell, played by the test


@dataclass
class Driver:
    compression: Compression = Compression.NONE
    auto_commit: bool = False
    session: Session = field(init=False)
    now: float = 0.0
    connection: int = 0
    # (connection number, time, text) of every frame the session gave us to send.
    sent: list[tuple[int, float, str]] = field(default_factory=list)
    rejected: int = 0
    compressor: Any = None
    stream_intact: bool = True

    def __post_init__(self) -> None:
        self.session = Session(
            SessionConfig(
                token=TOKEN,
                intents=513,
                gateway_url="wss://gateway.example",
                compression=self.compression,
                auto_commit=self.auto_commit,
                max_message_bytes=1 << 20,
                max_frame_bytes=1 << 20,
            ),
            rng=random.Random(7).random,
        )
        self.connect()

    # -- connection ----------------------------------------------------------------------------

    def connect(self) -> None:
        plan = self.session.next_connection(self.now)
        if plan is None:
            return
        self.now += plan.delay
        self.session.connection_made(self.now)
        self.connection += 1
        self.compressor = zlib.compressobj()
        self.stream_intact = True

    def pump(self) -> list[Any]:
        """Drain both outboxes and act on the events as ``ingest.gateway`` does."""
        seen: list[Any] = []
        for _ in range(10):  # identify/reconnect may produce more events; they settle quickly
            for text in self.session.data_to_send():
                self.sent.append((self.connection, self.now, text))
            events = self.session.events_received()
            if not events:
                break
            seen.extend(events)
            for event in events:
                if isinstance(event, Rejected):
                    self.rejected += 1
                elif isinstance(event, IdentifyRequired):
                    self.session.identify(self.now)
                elif isinstance(event, Dispatch):
                    check_model(event.event, event.data)
                    self.session.commit(event.sequence, event.session_id)
                elif isinstance(event, Close):
                    self.session.connection_lost(event.code, self.now)
            if self.session.state is State.DISCONNECTED:
                self.connect()
        return seen

    # -- what the peer does --------------------------------------------------------------------

    def wire(self, message: bytes) -> bytes:
        """``message`` as the peer's transport would frame it."""
        if self.compression is Compression.ZLIB_STREAM:
            out: bytes = self.compressor.compress(message) + self.compressor.flush(
                zlib.Z_SYNC_FLUSH
            )
            return out
        return message

    def feed(self, frame: bytes | str) -> list[Any]:
        """Feed one frame; assert it was reported if the oracle says it is unusable."""
        reading = self.session.state in READING
        before_ignored = self.session.frames_ignored
        self.session.receive_frame(frame, self.now)
        events = self.pump()
        if not reading:
            assert self.session.frames_ignored == before_ignored + 1, "a frame vanished uncounted"
        return events

    def feed_message(self, message: bytes, as_text: bool) -> None:
        """A whole, correctly framed message: if it is unusable, a Rejected must say so."""
        reading = self.session.state in READING
        if as_text:
            events = self.feed(message.decode("utf-8", errors="replace"))
            message = message.decode("utf-8", errors="replace").encode()
        elif self.compression is Compression.ZLIB_STREAM and not self.stream_intact:
            self.feed(self.wire(message))
            return  # the inflate context is already broken: no oracle for what comes out
        else:
            events = self.feed(self.wire(message))
        if reading and must_be_rejected(message):
            assert any(isinstance(e, Rejected) for e in events), (message[:200], events)

    def feed_corrupt(self, data: bytes) -> None:
        """Bytes that claim to be part of the compressed stream but are not."""
        self.feed(data)
        self.stream_intact = False

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.session.tick(self.now)
        self.pump()

    def app_send(self, op: int, d: Any) -> None:
        # The caller's errors (JSONEncodeError: d is not JSON); nothing is sent.
        with contextlib.suppress(
            NotConnected, CommandRateLimited, PayloadTooLarge, orjson.JSONEncodeError
        ):
            self.session.send(op, d, self.now)
        self.pump()

    def peer_closed(self, code: int | None) -> None:
        if self.session.state is State.CLOSING or self.session.finished:
            return
        self.session.connection_lost(code, self.now)
        self.pump()
        if self.session.state is State.DISCONNECTED:
            self.connect()

    # -- the checks every example ends with ------------------------------------------------------

    def check_limits(self) -> None:
        by_connection: dict[int, list[float]] = {}
        for connection, at, text in self.sent:
            size = len(text.encode())
            assert size <= MAX_PAYLOAD_BYTES, f"sent a {size}-byte payload"
            by_connection.setdefault(connection, []).append(at)
        for times in by_connection.values():
            for i in range(len(times) - COMMANDS_PER_WINDOW):
                span = times[i + COMMANDS_PER_WINDOW] - times[i]
                # Reconnect delays make the clock inexact: allow float rounding, nothing more.
                assert span >= COMMAND_WINDOW_SECONDS - 1e-9, (
                    f"{COMMANDS_PER_WINDOW + 1} payloads within {span} s"
                )
        assert TOKEN not in repr(self.session) and TOKEN not in repr(self.session.config)


def check_model(event: str, data: Any) -> None:
    with contextlib.suppress(ValidationError):
        validate_event(event, data)


# ---------------------------------------------------------------------------------------------
# Generators
#
# Hypothesis spends ~3 ms drawing one nested JSON value on the CI machines; the bulk of each
# hostile payload therefore comes from ``Fuzz``, a seeded generator, while Hypothesis chooses
# the shape of a run (which steps, in what order, which seeds) and shrinks that.

EDGE_INTS = (0, 1, -1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63))
HUGE_INTS = (2**64, 10**30, -(10**30), -(2**63) - 1, 10**400)
EDGE_FLOATS = (0.0, -0.0, 0.5, 1e308, -1e308, 5e-324, float("inf"), float("nan"))
EDGE_TEXT = ("", "0", "-1", "1180000000000000001", "\x00", "\\", '"', "\ud7ff\U0001f600", "null")
GATEWAY_OPS = tuple(int(op) for op in Opcode)
RESUME_URLS = (
    "wss://resume.example",
    "wss://[",
    "http://[::1",
    "",
    "ftp://x",
    "wss://" + "x" * 3000,
)


def encode(value: Any) -> bytes:
    # The standard library writes any int (and NaN/Infinity); orjson refuses both, and a hostile
    # peer is not bound by what orjson writes.
    return json.dumps(value, separators=(",", ":")).encode()


class Fuzz:
    """Hostile JSON-ish values from a seed: edge numbers, odd strings, nesting, wrong types."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def integer(self) -> int:
        r = self.r
        roll = r.random()
        if roll < 0.35:
            return r.choice(EDGE_INTS)
        if roll < 0.45:
            return r.choice(HUGE_INTS)
        return r.getrandbits(r.randrange(1, 66)) * r.choice((1, -1))

    def text(self) -> str:
        r = self.r
        roll = r.random()
        if roll < 0.3:
            return r.choice(EDGE_TEXT)
        if roll < 0.35:
            return "x" * r.randrange(1000, 6000)  # bigger than a whole gateway command
        alphabet = (0x20, 0x7E) if roll < 0.8 else (0x80, 0x2FFF)
        return "".join(chr(r.randint(*alphabet)) for _ in range(r.randrange(0, 16)))

    def scalar(self) -> Any:
        r = self.r
        kind = r.randrange(6)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind == 2:
            return self.integer()
        if kind == 3:
            return r.choice(EDGE_FLOATS) if r.random() < 0.5 else r.uniform(-1e6, 1e6)
        return self.text()

    def value(self, depth: int = 0) -> Any:
        r = self.r
        if depth >= 3 or r.random() < 0.55:
            return self.scalar()
        if r.random() < 0.5:
            return [self.value(depth + 1) for _ in range(r.randrange(0, 4))]
        return {self.text(): self.value(depth + 1) for _ in range(r.randrange(0, 4))}

    def op(self) -> Any:
        r = self.r
        roll = r.random()
        if roll < 0.5:
            return r.choice(GATEWAY_OPS)
        if roll < 0.8:
            return r.randrange(-3, 40)
        return self.scalar()

    # -- messages ------------------------------------------------------------------------------

    def valid(self) -> bytes:
        r = self.r
        kind = r.choice(("hello", "ready", "dispatch", "dispatch", "ack", "beat", "op7", "op9"))
        if kind == "hello":
            return hello(r.choice((41_250, 45_000, 1_000)))
        if kind == "ready":
            session_id = r.choice(("a", "sess-1", "x" * 32, "x" * 5000, ""))
            resume_url = r.choice(RESUME_URLS)
            return ready(session_id, r.randrange(1, 6), resume_url)
        if kind == "dispatch":
            event = r.choice(SAMPLE_NAMES)
            return dispatch(event, SAMPLES[event], r.randrange(1, 10_000))
        if kind == "ack":
            return encode({"op": 11})
        if kind == "beat":
            return encode({"op": 1, "d": None})
        if kind == "op7":
            return encode({"op": 7, "d": None})
        return encode({"op": 9, "d": r.random() < 0.5})

    def payload(self) -> bytes:
        """Shaped like a payload, any op, any types, extra keys."""
        r = self.r
        payload: dict[str, Any] = {"op": self.op()}
        if r.random() < 0.8:
            payload["d"] = self.value()
        if r.random() < 0.6:
            payload["s"] = self.integer() if r.random() < 0.7 else self.scalar()
        if r.random() < 0.6:
            payload["t"] = r.choice(EVENT_NAMES) if r.random() < 0.6 else self.scalar()
        if r.random() < 0.2:
            payload[self.text()] = self.value()
        return encode(payload)

    def mutated(self) -> bytes:
        """A valid payload with something wrong somewhere, ``d`` included."""
        payload = json.loads(self.valid())
        for _ in range(self.r.randrange(1, 4)):
            self.mutate(payload)
        return encode(payload)

    def mutate(self, document: Any) -> None:
        paths = list(paths_of(document))
        if not paths:
            return
        path = self.r.choice(paths)
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and self.r.random() < 0.4:
            del parent[path[-1]]
        else:
            parent[path[-1]] = self.value(2) if self.r.random() < 0.7 else self.value()

    def garbage(self) -> bytes:
        """Not a payload at all: bytes, text, truncated JSON, a JSON scalar or array."""
        r = self.r
        kind = r.randrange(5)
        if kind == 0:
            return r.randbytes(r.randrange(0, 64))
        if kind == 1:
            return self.text().encode()
        if kind == 2:
            whole = self.valid()
            return whole[: r.randrange(0, len(whole))]
        if kind == 3:
            return encode(self.scalar())
        return encode([self.value(1) for _ in range(r.randrange(0, 3))])

    def message(self) -> bytes:
        return getattr(self, self.r.choice(("valid", "payload", "mutated", "mutated", "garbage")))()


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every (key, key, ...) path into a JSON document."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, child in items:
        yield (*prefix, key)
        yield from paths_of(child, (*prefix, key))


def hello(interval: Any = 41_250) -> bytes:
    return encode({"op": 10, "d": {"heartbeat_interval": interval}, "s": None, "t": None})


def ready(
    session_id: Any = "sess-1", sequence: int = 1, resume_url: Any = "wss://resume.example"
) -> bytes:
    d = {"session_id": session_id, "resume_gateway_url": resume_url, "v": 10}
    return encode({"op": 0, "d": d, "s": sequence, "t": "READY"})


def dispatch(event: str, data: Any, sequence: int) -> bytes:
    return encode({"op": 0, "d": data, "s": sequence, "t": event})


seeds = st.integers(min_value=0, max_value=2**32)

# Natively drawn values too, for the single-frame test where Hypothesis' own edge cases and
# shrinking are worth their cost.
native_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(EDGE_INTS + HUGE_INTS),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
)
native_values = st.recursive(
    native_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def native_payloads(draw: st.DrawFn) -> bytes:
    payload: dict[str, Any] = {
        "op": draw(st.sampled_from(GATEWAY_OPS) | st.integers(-3, 40) | native_scalars)
    }
    for key, values in (
        ("d", native_values),
        ("s", native_scalars),
        ("t", st.sampled_from(EVENT_NAMES) | native_scalars),
    ):
        if draw(st.booleans()):
            payload[key] = draw(values)
    return encode(payload)


@st.composite
def steps(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """What happens on the wire and the clock, in order."""
    out: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(
            st.sampled_from(
                ["msg", "msg", "msg", "text", "tick", "tick", "send", "burst", "close", "beats"]
            )
        )
        if kind in ("msg", "text"):
            out.append(("msg", draw(seeds), kind == "text"))
        elif kind == "tick":
            # Quarter seconds: exact in binary, so the 60-s window arithmetic is exact too.
            out.append(("tick", draw(st.integers(0, 400)) / 4))
        elif kind == "send":
            out.append(("send", draw(seeds)))
        elif kind == "burst":
            # The application tries far more than 120 commands in a short while.
            out.append(("burst", draw(st.integers(100, 300)), draw(st.integers(0, 8)) / 4))
        elif kind == "beats":
            # The peer asks for heartbeats (op 1) much faster than the limit allows.
            out.append(("beats", draw(st.integers(50, 200))))
        else:
            codes = st.sampled_from([None, 1000, 1001, 4000, 4007, 4008, 4009, 4900, 3000])
            out.append(("close", draw(codes)))
    return out


def run_steps(driver: Driver, script: list[tuple[Any, ...]]) -> None:
    for step in script:
        match step:
            case ("msg", seed, as_text):
                driver.feed_message(Fuzz(seed).message(), as_text)
            case ("tick", seconds):
                driver.tick(seconds)
            case ("send", seed):
                fuzz = Fuzz(seed)
                driver.app_send(fuzz.r.randrange(0, 40), fuzz.value())
            case ("burst", count, spacing):
                for _ in range(count):
                    driver.app_send(int(Opcode.PRESENCE_UPDATE), {"status": "online"})
                    driver.tick(spacing)
            case ("beats", count):
                for _ in range(count):
                    driver.feed_message(encode({"op": 1, "d": None}), False)
                    driver.tick(0.25)
            case ("close", code):
                driver.peer_closed(code)
    driver.check_limits()


def handshake(driver: Driver, interval: Any = 41_250) -> None:
    driver.feed_message(hello(interval), False)
    driver.feed_message(ready(), False)


# ---------------------------------------------------------------------------------------------
# The session core


@examples(2000)
@given(
    message=native_payloads() | st.binary(max_size=48) | st.text(max_size=48).map(str.encode),
    as_text=st.booleans(),
    connected=st.booleans(),
)
def test_any_single_frame_is_used_or_rejected_never_raised(
    message: bytes, as_text: bool, connected: bool
) -> None:
    driver = Driver()
    if connected:
        handshake(driver)
    driver.feed_message(message, as_text)
    driver.check_limits()


@examples(2000)
@given(seed=seeds, as_text=st.booleans(), connected=st.booleans(), count=st.integers(1, 20))
def test_runs_of_fuzzed_frames_are_used_or_rejected_never_raised(
    seed: int, as_text: bool, connected: bool, count: int
) -> None:
    driver = Driver()
    if connected:
        handshake(driver)
    fuzz = Fuzz(seed)
    for _ in range(count):
        driver.feed_message(fuzz.message(), as_text)
    driver.check_limits()


@examples(2000)
@given(script=steps(), interval=st.sampled_from([41_250, 1_000, 10, 1, 0.001]))
def test_frames_ticks_and_sends_in_any_order_keep_discords_limits(
    script: list[tuple[Any, ...]], interval: float
) -> None:
    driver = Driver()
    handshake(driver, interval)
    run_steps(driver, script)


@examples(1000)
@given(
    script=steps(),
    corruptions=st.lists(
        st.tuples(
            st.integers(0, 12),
            st.sampled_from(["truncate", "flip", "random", "prefix", "raw"]),
            seeds,
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_zlib_stream_mutations_are_rejected_and_the_session_recovers(
    script: list[tuple[Any, ...]], corruptions: list[tuple[int, str, int]]
) -> None:
    driver = Driver(compression=Compression.ZLIB_STREAM)
    handshake(driver)
    for at, how, seed in corruptions:
        script.insert(min(at, len(script)), ("corrupt", how, seed))
    for step in script:
        if step[0] == "corrupt":
            corrupt(driver, step[1], step[2])
        else:
            run_steps(driver, [step])
    driver.check_limits()


def corrupt(driver: Driver, how: str, seed: int) -> None:
    rng = random.Random(seed)
    reading = driver.session.state in READING
    intact = driver.stream_intact
    rejected = driver.rejected
    good = driver.wire(ready())
    if how == "truncate":
        # A message cut short, then the suffix: the deflate stream is missing its end.
        frame = good[: rng.randrange(0, len(good) - 4)] + ZLIB_SUFFIX
    elif how == "flip":
        data = bytearray(good)
        data[rng.randrange(len(data) - 4)] ^= 1 << rng.randrange(8)
        frame = bytes(data)
    elif how == "random":
        frame = rng.randbytes(rng.randrange(0, 200)) + ZLIB_SUFFIX
    elif how == "prefix":
        # Only part of a message, never completed: buffered (bounded by max_frame_bytes).
        frame = good[: len(good) // 2]
    else:
        # Not compressed at all, as if the peer forgot the transport compression.
        frame = ready()
    driver.feed_corrupt(frame)
    assert not driver.session.finished
    if reading and intact and how == "random":
        # Garbage where deflate data belongs, then the end-of-message marker: noticed at once.
        assert driver.rejected > rejected


def test_a_flood_of_requested_heartbeats_stays_within_120_per_minute() -> None:
    driver = Driver()
    handshake(driver)
    for _ in range(1000):
        driver.feed_message(encode({"op": 1, "d": None}), False)
        driver.feed_message(encode({"op": 11}), False)
    driver.tick(0.25)
    driver.check_limits()
    assert len(driver.sent) <= COMMANDS_PER_WINDOW
    assert driver.session.commands_dropped > 0


def test_a_tiny_heartbeat_interval_cannot_make_us_flood() -> None:
    driver = Driver()
    handshake(driver, interval=1)  # one millisecond
    for _ in range(2000):
        driver.feed_message(encode({"op": 11}), False)
        driver.tick(0.25)
    driver.check_limits()


def test_an_oversized_session_id_is_rejected_not_raised_on_resume() -> None:
    driver = Driver()
    driver.feed_message(hello(), False)
    driver.feed_message(ready("s" * 5000), False)
    driver.peer_closed(4000)
    assert driver.rejected == 1 and driver.session.session_id is None
    driver.feed_message(hello(), False)  # a RESUME with it would be 5 kB
    driver.check_limits()


@pytest.mark.parametrize("url", RESUME_URLS[1:])
def test_an_unusable_resume_url_falls_back_to_the_gateway_url(url: str) -> None:
    driver = Driver()
    driver.feed_message(hello(), False)
    driver.feed_message(ready(resume_url=url), False)
    driver.peer_closed(4000)  # the next connection resumes: it must not choke on the URL
    assert driver.session.resume_url is None
    assert driver.session.state is State.AWAITING_HELLO  # reconnected, resuming
    assert driver.connection == 2


def test_frames_after_we_asked_to_close_are_counted() -> None:
    driver = Driver()
    handshake(driver)
    driver.session.reconnect("test")
    # Do not pump: the shell has not closed the socket yet; the peer keeps talking.
    before = driver.session.frames_ignored
    driver.session.receive_frame(b"not json", driver.now)
    driver.session.receive_frame("{}", driver.now)
    assert driver.session.frames_ignored == before + 2


# ---------------------------------------------------------------------------------------------
# The zlib bomb: 1 GB of zeros in about 1 MB of deflate

BOMB_SCRIPT = textwrap.dedent(
    """
    import threading, time, zlib
    import psutil
    from ingest.compression import Compression
    from ingest.protocol import ZLIB_SUFFIX
    from ingest.session import Rejected, Session, SessionConfig, State

    proc = psutil.Process()
    compressor = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    parts = [compressor.compress(b'{"op":0,"t":"MESSAGE_CREATE","s":2,"d":{"content":"')]
    for _ in range(1024):  # 1 GiB of zeros, never held at once
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    bomb = b"".join(parts)
    del parts
    assert bomb.endswith(ZLIB_SUFFIX)

    session = Session(SessionConfig(token="t" * 20, intents=1, gateway_url="wss://x",
                                    compression=Compression.ZLIB_STREAM))
    session.next_connection(0.0)
    session.connection_made(0.0)
    peak = [proc.memory_info().rss]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    before = proc.memory_info().rss
    sampler.start()
    started = time.monotonic()
    session.receive_frame(bomb, 1.0)
    elapsed = time.monotonic() - started
    done.set()
    sampler.join()
    events = session.events_received()
    rejected = [e for e in events if isinstance(e, Rejected)]
    print("compressed", len(bomb))
    print("before", before)
    print("peak", peak[0])
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork/exec,
    # so under a big pytest process it would report the parent's size, not ours.
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    print("maxrss", int(hwm.split()[1]) * 1024)
    print("seconds", elapsed)
    print("rejected", rejected[0].reason if rejected else None)
    print("closing", session.state is State.CLOSING)
    """
)


@pytest.mark.timeout(60)
def test_a_one_gigabyte_zlib_bomb_is_rejected_within_200_mb() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert int(report["compressed"]) < 2 * 1024 * 1024  # it really is a bomb
    assert report["rejected"] != "None" and "exceeds" in report["rejected"]
    assert report["closing"] == "True"
    limit = 200 * 1024 * 1024
    assert int(report["peak"]) < limit, report
    # The kernel's own high-water mark, which no sampling interval can miss.
    assert int(report["maxrss"]) < limit, report


ZSTD_BOMB_SCRIPT = (
    BOMB_SCRIPT.replace(
        "compression=Compression.ZLIB_STREAM", "compression=Compression.ZSTD_STREAM"
    )
    .replace("assert bomb.endswith(ZLIB_SUFFIX)\n", "")
    .replace(
        """compressor = zlib.compressobj(9)
chunk = bytes(1 << 20)
parts = [compressor.compress(b'{"op":0,"t":"MESSAGE_CREATE","s":2,"d":{"content":"')]
for _ in range(1024):  # 1 GiB of zeros, never held at once
    parts.append(compressor.compress(chunk))
parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))""",
        """import zstandard
compressor = zstandard.ZstdCompressor(level=3).compressobj()
chunk = bytes(1 << 20)
parts = [compressor.compress(b'{"op":0,"t":"MESSAGE_CREATE","s":2,"d":{"content":"')]
for _ in range(2048):  # 2 GiB of zeros, never held at once
    parts.append(compressor.compress(chunk))
parts.append(compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
del compressor""",
    )
)


@pytest.mark.skipif(not zstd_available(), reason="zstandard not installed")
@pytest.mark.timeout(60)
def test_a_two_gigabyte_zstd_bomb_is_rejected_within_200_mb() -> None:
    # The replacements above really happened.
    assert "zstandard" in ZSTD_BOMB_SCRIPT and "ZLIB_SUFFIX)" not in ZSTD_BOMB_SCRIPT
    result = subprocess.run(
        [sys.executable, "-c", ZSTD_BOMB_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert int(report["compressed"]) < 100 * 1024, report  # a 64 KB frame...
    assert report["rejected"] != "None" and "exceeds" in report["rejected"]  # ...refused
    assert report["closing"] == "True"
    limit = 200 * 1024 * 1024
    assert int(report["peak"]) < limit, report
    assert int(report["maxrss"]) < limit, report


@pytest.mark.skipif(not zstd_available(), reason="zstandard not installed")
def test_zstd_one_complete_frame_per_message_is_decoded_across_frames() -> None:
    import zstandard

    session = Session(
        SessionConfig(
            token="t" * 20, intents=1, gateway_url="wss://x", compression=Compression.ZSTD_STREAM
        )
    )
    session.next_connection(0.0)
    session.connection_made(0.0)
    compressor = zstandard.ZstdCompressor()
    session.receive_frame(compressor.compress(hello()), 0.0)
    session.identify(0.0)
    session.receive_frame(compressor.compress(ready("sess", 1)), 0.0)
    for sequence in range(2, 12):
        session.receive_frame(compressor.compress(dispatch("TYPING_START", {}, sequence)), 0.0)
    events = session.events_received()
    assert not [e for e in events if isinstance(e, Rejected)]
    assert [e.sequence for e in events if isinstance(e, Dispatch)] == list(range(1, 12))
    assert session.state is State.CONNECTED


# ---------------------------------------------------------------------------------------------
# Event models

FIELD_NAMES = {
    name: tuple(sorted({f.alias or key for key, f in model.model_fields.items()}))
    for name, model in EVENT_MODELS.items()
}


def model_payload(name: str, seed: int, kind: str) -> Any:
    fuzz = Fuzz(seed)
    r = fuzz.r
    if kind == "fields":
        # The model's own field names, random values: every type error a model can meet.
        keys = FIELD_NAMES[name]
        chosen = r.sample(keys, r.randrange(0, len(keys) + 1)) if keys else []
        data = {key: fuzz.value(1) for key in chosen}
        if r.random() < 0.2:
            data[fuzz.text()] = fuzz.value()
        return data
    if kind == "anything":
        return fuzz.value()
    # A real payload with one to three things wrong, anywhere in it.
    data = json.loads(json.dumps(SAMPLES.get(name, {})))
    for _ in range(r.randrange(1, 4)):
        fuzz.mutate(data)
    return data


@examples(3200)
@given(
    name=st.sampled_from(EVENT_NAMES),
    seed=seeds,
    kind=st.sampled_from(["fields", "sample", "sample", "anything"]),
)
def test_event_models_accept_or_raise_validation_error_nothing_else(
    name: str, seed: int, kind: str
) -> None:
    check_model(name, model_payload(name, seed, kind))


@examples(300)
@given(name=st.sampled_from(EVENT_NAMES), data=native_values)
def test_event_models_meet_natively_drawn_values(name: str, data: Any) -> None:
    check_model(name, data)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_every_model_accepts_its_sample(name: str) -> None:
    validate_event(name, SAMPLES[name])
