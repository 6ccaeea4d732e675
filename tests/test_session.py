"""The session core driven by scripted payloads and an explicit clock: no sockets, no sleeping."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from ingest.compression import Compression
from ingest.errors import CommandRateLimited, NotConnected, PayloadTooLarge
from ingest.protocol import RESUMABLE_CLOSE as RESUMABLE_CLOSE_CODE
from ingest.protocol import CloseCode, Intents, Opcode, Reconnect, classify_close
from ingest.session import (
    Backoff,
    Close,
    Dispatch,
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

TOKEN = "MTA5.secret-token.abc"
BASE_URL = "wss://gateway.example"
RESUME_URL = "wss://resume.example"


def frame(op: int, d: Any = None, s: int | None = None, t: str | None = None) -> str:
    return orjson.dumps({"op": op, "d": d, "s": s, "t": t}).decode()


def hello(interval_ms: int = 40_000) -> str:
    return frame(Opcode.HELLO, {"heartbeat_interval": interval_ms})


def ready(session_id: str = "sess-1", seq: int = 1) -> str:
    return frame(
        Opcode.DISPATCH,
        {"session_id": session_id, "resume_gateway_url": RESUME_URL, "v": 10, "user": {}},
        s=seq,
        t="READY",
    )


def dispatch(seq: int, t: str = "MESSAGE_CREATE", d: Any = None) -> str:
    return frame(Opcode.DISPATCH, d if d is not None else {"id": str(seq)}, s=seq, t=t)


def sent(session: Session) -> list[dict[str, Any]]:
    return [orjson.loads(text) for text in session.data_to_send()]


def make_session(
    *,
    rng_value: float = 0.5,
    compression: Compression = Compression.NONE,
    auto_commit: bool = True,
    resume_from: SessionState | None = None,
    **config: Any,
) -> Session:
    return Session(
        SessionConfig(
            token=TOKEN,
            intents=config.pop("intents", int(Intents.GUILDS | Intents.GUILD_MESSAGES)),
            gateway_url=BASE_URL,
            compression=compression,
            auto_commit=auto_commit,
            **config,
        ),
        resume_from=resume_from,
        rng=lambda: rng_value,
    )


def connected(session: Session, now: float = 0.0, seq: int = 1) -> Session:
    """Run a session through HELLO, IDENTIFY and READY."""
    plan = session.next_connection(now)
    assert plan is not None
    session.connection_made(now)
    session.receive_frame(hello(), now)
    session.identify(now)
    session.receive_frame(ready(seq=seq), now)
    session.data_to_send()
    session.events_received()
    return session


# -- HELLO, IDENTIFY, READY ----------------------------------------------------------------------


def test_hello_then_identify_carries_token_intents_properties_shard_presence_threshold() -> None:
    presence = {"status": "idle", "activities": [], "since": None, "afk": False}
    session = make_session(shard_id=3, shard_count=8, presence=presence, large_threshold=100)
    session.next_connection(0.0)
    session.connection_made(0.0)
    session.receive_frame(hello(), 0.0)
    assert session.events_received() == [IdentifyRequired(3)]
    assert sent(session) == []  # waits for the identify scheduler
    session.identify(0.0)
    (identify,) = sent(session)
    assert identify["op"] == Opcode.IDENTIFY
    d = identify["d"]
    assert d["token"] == TOKEN
    assert d["intents"] == int(Intents.GUILDS | Intents.GUILD_MESSAGES)
    assert set(d["properties"]) == {"os", "browser", "device"}
    assert d["shard"] == [3, 8]
    assert d["presence"] == presence
    assert d["large_threshold"] == 100


def test_ready_stores_session_id_and_resume_url_and_is_dispatched() -> None:
    session = make_session()
    session.next_connection(0.0)
    session.connection_made(0.0)
    session.receive_frame(hello(), 0.0)
    session.identify(0.0)
    session.events_received()
    session.receive_frame(ready("abc"), 1.0)
    events = session.events_received()
    assert events[0] == SessionStarted("abc", RESUME_URL)
    assert isinstance(events[1], Dispatch) and events[1].event == "READY"
    assert session.session_id == "abc"
    assert session.resume_url == RESUME_URL
    assert session.state is State.CONNECTED


def test_dispatches_come_out_in_order_with_their_sequence() -> None:
    session = connected(make_session())
    for seq in range(2, 7):
        session.receive_frame(dispatch(seq), 1.0)
    events = session.events_received()
    assert [e.sequence for e in events if isinstance(e, Dispatch)] == [2, 3, 4, 5, 6]
    assert session.sequence == 6


# -- heartbeats ----------------------------------------------------------------------------------


def test_first_heartbeat_is_jittered_then_every_interval_with_last_sequence() -> None:
    session = make_session(rng_value=0.25)
    session.next_connection(0.0)
    session.connection_made(0.0)
    session.receive_frame(hello(40_000), 0.0)
    assert session.next_deadline() == pytest.approx(10.0)  # 40 s x 0.25
    session.identify(0.0)
    session.receive_frame(ready(seq=1), 0.5)
    session.receive_frame(dispatch(2), 0.6)
    session.data_to_send()
    session.tick(9.9)
    assert sent(session) == []
    session.tick(10.0)
    assert sent(session) == [{"op": Opcode.HEARTBEAT, "d": 2}]
    assert session.next_deadline() == pytest.approx(50.0)
    session.receive_frame(frame(Opcode.HEARTBEAT_ACK), 10.05)
    acks = [e for e in session.events_received() if isinstance(e, HeartbeatAcked)]
    assert acks and acks[0].latency == pytest.approx(0.05)
    assert session.heartbeat_latency == pytest.approx(0.05)
    session.tick(50.0)
    assert sent(session) == [{"op": Opcode.HEARTBEAT, "d": 2}]


def test_server_requested_heartbeat_is_answered_at_once() -> None:
    session = connected(make_session())
    session.receive_frame(frame(Opcode.HEARTBEAT), 3.0)
    assert sent(session) == [{"op": Opcode.HEARTBEAT, "d": 1}]


def test_no_ack_since_last_heartbeat_is_a_zombie_closed_non_1000_and_resumed() -> None:
    session = connected(make_session(rng_value=0.0))
    session.tick(0.0)
    assert sent(session)[0]["op"] == Opcode.HEARTBEAT
    session.tick(40.0)  # no ACK arrived
    (close,) = session.events_received()
    assert isinstance(close, Close)
    assert close.code not in (1000, 1001)
    assert close.action is Reconnect.RESUME
    assert sent(session) == []
    session.connection_lost(close.code, 40.1)
    plan = session.next_connection(40.1)
    assert plan is not None and plan.resume and plan.url.startswith(RESUME_URL)
    session.connection_made(41.0)
    session.receive_frame(hello(), 41.0)
    (resume,) = sent(session)
    assert resume == {
        "op": Opcode.RESUME,
        "d": {"token": TOKEN, "session_id": "sess-1", "seq": 1},
    }


def test_an_acked_heartbeat_is_not_a_zombie() -> None:
    session = connected(make_session(rng_value=0.0))
    session.tick(0.0)
    session.receive_frame(frame(Opcode.HEARTBEAT_ACK), 0.1)
    session.events_received()
    session.tick(40.0)
    assert not any(isinstance(e, Close) for e in session.events_received())
    assert sent(session)[0]["op"] == Opcode.HEARTBEAT


# -- op 7 and op 9 -------------------------------------------------------------------------------


def test_reconnect_op7_resumes_on_the_resume_url() -> None:
    session = connected(make_session())
    session.receive_frame(frame(Opcode.RECONNECT), 5.0)
    (close,) = session.events_received()
    assert isinstance(close, Close) and close.code != 1000
    session.connection_lost(close.code, 5.0)
    plan = session.next_connection(5.0)
    assert plan is not None and plan.resume
    assert plan.url.startswith(RESUME_URL)
    assert "v=10" in plan.url and "encoding=json" in plan.url


def test_reconnect_before_hello_is_handled() -> None:
    session = make_session()
    session.next_connection(0.0)
    session.connection_made(0.0)
    session.receive_frame(frame(Opcode.RECONNECT), 0.1)
    (close,) = session.events_received()
    assert isinstance(close, Close)
    session.connection_lost(close.code, 0.2)
    plan = session.next_connection(0.2)
    assert plan is not None and not plan.resume and plan.url.startswith(BASE_URL)


def test_invalid_session_resumable_reconnects_and_resumes() -> None:
    session = connected(make_session())
    session.receive_frame(frame(Opcode.INVALID_SESSION, True), 5.0)
    (close,) = session.events_received()
    assert isinstance(close, Close) and close.action is Reconnect.RESUME
    session.connection_lost(close.code, 5.0)
    plan = session.next_connection(5.0)
    assert plan is not None and plan.resume


@pytest.mark.parametrize("rng_value, expected_wait", [(0.0, 1.0), (0.5, 3.0), (1.0, 5.0)])
def test_invalid_session_not_resumable_waits_1_to_5_s_then_identifies_on_base_url(
    rng_value: float, expected_wait: float
) -> None:
    session = connected(make_session(rng_value=rng_value), seq=1)
    session.receive_frame(dispatch(2), 1.0)
    session.events_received()
    session.receive_frame(frame(Opcode.INVALID_SESSION, False), 5.0)
    events = session.events_received()
    lost = [e for e in events if isinstance(e, SessionLost)]
    assert lost == [SessionLost("sess-1", 2, 2, "Discord invalidated the session (op 9)")]
    close = next(e for e in events if isinstance(e, Close))
    session.connection_lost(close.code, 5.0)
    plan = session.next_connection(5.0)
    assert plan is not None
    assert plan.delay == pytest.approx(expected_wait)
    assert not plan.resume and plan.url.startswith(BASE_URL)
    session.connection_made(8.0)
    session.receive_frame(hello(), 8.0)
    assert session.events_received() == [IdentifyRequired(0)]
    assert session.session_id is None and session.sequence is None


# -- close codes ---------------------------------------------------------------------------------

CLOSE_TABLE = [
    (4000, Reconnect.RESUME),
    (4001, Reconnect.RESUME),
    (4002, Reconnect.RESUME),
    (4003, Reconnect.RESUME),
    (4004, Reconnect.FATAL),
    (4005, Reconnect.RESUME),
    (4007, Reconnect.NEW_SESSION),
    (4008, Reconnect.RESUME),
    (4009, Reconnect.NEW_SESSION),
    (4010, Reconnect.FATAL),
    (4011, Reconnect.FATAL),
    (4012, Reconnect.FATAL),
    (4013, Reconnect.FATAL),
    (4014, Reconnect.FATAL),
    (1000, Reconnect.RESUME),
    (1001, Reconnect.RESUME),
    (1006, Reconnect.RESUME),
    (1011, Reconnect.RESUME),
    (None, Reconnect.RESUME),
]


@pytest.mark.parametrize("code, action", CLOSE_TABLE)
def test_close_code_decides_resume_new_session_or_fatal(
    code: int | None, action: Reconnect
) -> None:
    session = connected(make_session())
    session.connection_lost(code, 10.0)
    events = session.events_received()
    if action is Reconnect.FATAL:
        assert session.state is State.FATAL
        (fatal,) = [e for e in events if isinstance(e, Fatal)]
        assert fatal.error.close_code == code
        assert session.next_connection(10.0) is None
        return
    plan = session.next_connection(10.0)
    assert plan is not None
    if action is Reconnect.RESUME:
        assert plan.resume and session.session_id == "sess-1"
    else:
        assert not plan.resume and session.session_id is None
        assert any(isinstance(e, SessionLost) for e in events)


@pytest.mark.parametrize(
    "code, hint",
    [
        (4004, "DISCORD_TOKEN"),
        (4010, "DISCORD_SHARD_IDS"),
        (4011, "DISCORD_SHARD_COUNT"),
        (4012, "v10"),
        (4013, "DISCORD_INTENTS"),
    ],
)
def test_fatal_close_messages_say_what_to_fix(code: int, hint: str) -> None:
    assert hint in classify_close(code).explanation


def test_4014_names_the_privileged_intents_to_enable_in_the_portal() -> None:
    intents = int(Intents.MESSAGE_CONTENT | Intents.GUILD_MEMBERS | Intents.GUILDS)
    text = classify_close(CloseCode.DISALLOWED_INTENTS, intents).explanation
    assert "Message Content Intent" in text and "Server Members Intent" in text
    assert "Presence Intent" not in text
    assert "Developer Portal" in text


# -- backoff -------------------------------------------------------------------------------------


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    backoff = Backoff(base=1.0, cap=8.0, rng=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    backoff.reset()
    assert backoff.next_delay() == 1.0
    half = Backoff(base=1.0, cap=8.0, rng=lambda: 0.5)
    assert [half.next_delay() for _ in range(3)] == [0.5, 1.0, 2.0]


def test_backoff_resets_only_after_a_stable_connection() -> None:
    session = make_session(rng_value=1.0)
    first = session.next_connection(0.0)
    assert first is not None and first.delay == 0.0
    delays = []
    now = 0.0
    for _ in range(3):  # connections that fail before READY
        session.connection_made(now)
        session.connection_lost(1006, now + 0.1)
        plan = session.next_connection(now)
        assert plan is not None
        delays.append(plan.delay)
        now += 1
    assert delays == [1.0, 2.0, 4.0]
    connected_at = now
    session.connection_made(now)
    session.receive_frame(hello(), now)
    session.identify(now)
    session.receive_frame(ready(), now)
    session.connection_lost(1006, connected_at + 60)
    plan = session.next_connection(connected_at + 60)
    assert plan is not None and plan.delay == 1.0


# -- compression and bad input -------------------------------------------------------------------


def zlib_frames(*messages: str) -> Iterator[bytes]:
    compressor = zlib.compressobj()
    for message in messages:
        yield compressor.compress(message.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH)


def test_zlib_stream_uses_one_context_and_buffers_until_the_suffix() -> None:
    session = make_session(compression=Compression.ZLIB_STREAM)
    plan = session.next_connection(0.0)
    assert plan is not None and "compress=zlib-stream" in plan.url
    session.connection_made(0.0)
    messages = [hello(), ready(), dispatch(2), dispatch(3)]
    frames = list(zlib_frames(*messages))
    session.receive_frame(frames[0], 0.0)
    session.identify(0.0)
    # Split one message across two frames: nothing comes out until the suffix arrives.
    session.receive_frame(frames[1][:5], 0.1)
    assert [e for e in session.events_received() if isinstance(e, Dispatch)] == []
    session.receive_frame(frames[1][5:], 0.1)
    session.receive_frame(frames[2], 0.2)
    session.receive_frame(frames[3], 0.3)
    seqs = [e.sequence for e in session.events_received() if isinstance(e, Dispatch)]
    assert seqs == [1, 2, 3]


def test_corrupt_zlib_is_rejected_and_the_connection_resumes() -> None:
    session = make_session(compression=Compression.ZLIB_STREAM)
    session.next_connection(0.0)
    session.connection_made(0.0)
    session.receive_frame(b"\x78\x9cgarbage-not-deflate\x00\x00\xff\xff", 0.0)
    events = session.events_received()
    assert isinstance(events[0], Rejected) and "zlib" in events[0].reason
    assert isinstance(events[1], Close) and events[1].action is Reconnect.RESUME


def test_zlib_bomb_is_refused_without_inflating_it() -> None:
    session = make_session(compression=Compression.ZLIB_STREAM, max_message_bytes=1_000_000)
    session.next_connection(0.0)
    session.connection_made(0.0)
    compressor = zlib.compressobj(9)
    bomb = compressor.compress(b"\x00" * 50_000_000) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 100_000
    session.receive_frame(bomb, 0.0)
    events = session.events_received()
    assert isinstance(events[0], Rejected) and "exceeds" in events[0].reason


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("{not json", "bad JSON"),
        ('{"op": 99, "d": null}', "unknown opcode 99"),
        ('["op", 0]', "not a gateway payload"),
        ('{"op": 0, "d": {}, "t": "MESSAGE_CREATE"}', "without an event name or sequence"),
    ],
)
def test_malformed_frames_are_rejected_and_the_session_carries_on(bad: str, reason: str) -> None:
    session = connected(make_session())
    session.receive_frame(bad, 1.0)
    (rejected,) = session.events_received()
    assert isinstance(rejected, Rejected) and reason in rejected.reason
    assert rejected.raw == bad.encode()
    session.receive_frame(dispatch(2), 1.1)
    assert [e.sequence for e in session.events_received() if isinstance(e, Dispatch)] == [2]
    assert session.state is State.CONNECTED


# -- outbound limits -----------------------------------------------------------------------------


def test_payload_over_4096_bytes_is_refused_and_never_sent() -> None:
    session = connected(make_session())
    with pytest.raises(PayloadTooLarge, match="4096"):
        session.send(Opcode.PRESENCE_UPDATE, {"x": "a" * 5000}, 1.0)
    assert sent(session) == []


def test_120_commands_per_60_s_with_slots_kept_for_heartbeats() -> None:
    session = connected(make_session(rng_value=0.0))
    sent(session)
    now = 1.0
    accepted = 0
    with pytest.raises(CommandRateLimited) as excinfo:
        for _ in range(200):
            session.update_presence(now, status="online")
            accepted += 1
    # Identify went at t=0; the rest of the window minus the heartbeat reserve is ours.
    assert accepted == 120 - 5 - 1
    assert 0 < excinfo.value.retry_after <= 60
    session.tick(now)  # a heartbeat still goes out
    assert sent(session)[-1]["op"] == Opcode.HEARTBEAT
    session.update_presence(61.0)  # the window has moved on


def test_commands_need_a_connected_session() -> None:
    session = make_session()
    with pytest.raises(NotConnected):
        session.send(Opcode.PRESENCE_UPDATE, {}, 0.0)


def test_full_member_list_once_per_guild_per_30_s() -> None:
    session = connected(make_session())
    session.request_guild_members(1.0, guild_id=42)
    with pytest.raises(CommandRateLimited) as excinfo:
        session.request_guild_members(10.0, guild_id=42)
    assert excinfo.value.retry_after == pytest.approx(21.0)
    session.request_guild_members(10.0, guild_id=43)  # another guild
    session.request_guild_members(10.0, guild_id=42, query="ab", limit=10)  # not a full list
    session.request_guild_members(31.0, guild_id=42)
    payloads = sent(session)
    assert [p["d"]["guild_id"] for p in payloads] == ["42", "43", "42", "42"]
    assert all(p["op"] == Opcode.REQUEST_GUILD_MEMBERS for p in payloads)


def test_voice_state_and_presence_payloads() -> None:
    session = connected(make_session())
    session.update_voice_state(1.0, guild_id=1, channel_id=None, self_mute=True)
    session.update_presence(1.0, status="dnd", activities=[{"name": "x", "type": 0}])
    voice, presence = sent(session)
    assert voice == {
        "op": Opcode.VOICE_STATE_UPDATE,
        "d": {"guild_id": "1", "channel_id": None, "self_mute": True, "self_deaf": False},
    }
    assert presence["d"]["status"] == "dnd" and presence["d"]["activities"][0]["name"] == "x"


# -- committed sequence --------------------------------------------------------------------------


def test_without_auto_commit_heartbeat_and_resume_carry_the_committed_sequence() -> None:
    session = connected(make_session(auto_commit=False, rng_value=0.0))
    for seq in range(2, 11):
        session.receive_frame(dispatch(seq), 1.0)
    session.commit(6, "sess-1")
    session.tick(1.0)
    assert sent(session)[-1] == {"op": Opcode.HEARTBEAT, "d": 6}
    assert session.sequence == 10 and session.committed_sequence == 6
    snapshot = session.snapshot()
    assert snapshot is not None and snapshot.sequence == 6
    session.commit(3, "sess-1")  # commits never go backwards
    session.commit(99, "another-session")  # a stale session's commit is ignored
    assert session.committed_sequence == 6


def test_replay_of_events_still_in_flight_is_not_handed_over_twice() -> None:
    session = connected(make_session(auto_commit=False))
    for seq in range(2, 6):
        session.receive_frame(dispatch(seq), 1.0)
    session.commit(3, "sess-1")
    session.events_received()
    session.receive_frame(frame(Opcode.RECONNECT), 2.0)
    session.connection_lost(4000, 2.0)
    session.next_connection(2.0)
    session.connection_made(2.0)
    session.receive_frame(hello(), 2.0)
    assert sent(session)[0]["d"]["seq"] == 3
    for seq in (4, 5, 6):  # Discord replays 4 and 5, then a new event 6
        session.receive_frame(dispatch(seq), 2.1)
    session.receive_frame(frame(Opcode.DISPATCH, None, s=6, t="RESUMED"), 2.2)
    events = session.events_received()
    assert [e.sequence for e in events if isinstance(e, Dispatch)] == [6]
    assert any(isinstance(e, SessionResumed) for e in events)


def test_after_discarding_uncommitted_events_a_replay_hands_them_over_again() -> None:
    session = connected(make_session(auto_commit=False))
    for seq in range(2, 6):
        session.receive_frame(dispatch(seq), 1.0)
    session.commit(3, "sess-1")
    session.events_received()
    session.discard_uncommitted()
    session.reconnect("broker outage")
    (close,) = session.events_received()
    session.connection_lost(close.code, 2.0)
    session.next_connection(2.0)
    session.connection_made(2.0)
    session.receive_frame(hello(), 2.0)
    for seq in (4, 5):
        session.receive_frame(dispatch(seq), 2.1)
    assert [e.sequence for e in session.events_received() if isinstance(e, Dispatch)] == [4, 5]


def test_a_persisted_session_is_resumed_on_start() -> None:
    state = SessionState(session_id="old", sequence=41, resume_url=RESUME_URL)
    session = make_session(auto_commit=False, resume_from=state)
    plan = session.next_connection(0.0)
    assert plan is not None and plan.resume and plan.url.startswith(RESUME_URL)
    session.connection_made(0.0)
    session.receive_frame(hello(), 0.0)
    assert sent(session) == [
        {"op": Opcode.RESUME, "d": {"token": TOKEN, "session_id": "old", "seq": 41}}
    ]


def test_stop_closes_resumably_and_ends_the_session() -> None:
    session = connected(make_session())
    session.close(5.0, resumable=True)
    (close,) = session.events_received()
    assert isinstance(close, Close) and close.code not in (1000, 1001)
    session.connection_lost(close.code, 5.0)
    assert session.state is State.STOPPED
    assert session.next_connection(5.0) is None


def test_the_token_never_appears_in_reprs() -> None:
    session = connected(make_session())
    assert TOKEN not in repr(session)
    assert TOKEN not in repr(session.config)
    assert "REDACTED" in repr(session.config)


def test_resume_before_anything_is_committed_asks_for_a_full_replay_not_null() -> None:
    session = make_session(auto_commit=False)
    session.next_connection(0.0)
    session.connection_made(0.0)
    session.receive_frame(hello(), 0.0)
    session.identify(0.0)
    session.receive_frame(ready(), 0.1)  # READY received but not yet committed
    session.events_received()
    session.receive_frame(frame(Opcode.RECONNECT), 0.2)
    session.connection_lost(RESUMABLE_CLOSE_CODE, 0.2)
    session.next_connection(0.2)
    session.connection_made(0.3)
    session.data_to_send()
    session.receive_frame(hello(), 0.3)
    assert sent(session) == [
        {"op": Opcode.RESUME, "d": {"token": TOKEN, "session_id": "sess-1", "seq": 0}}
    ]


def test_a_server_requested_beat_does_not_arm_the_zombie_check() -> None:
    session = connected(make_session(rng_value=0.0))
    session.tick(0.0)  # scheduled beat
    session.receive_frame(frame(Opcode.HEARTBEAT_ACK), 0.1)
    session.receive_frame(frame(Opcode.HEARTBEAT), 39.99)  # Discord asks just before our beat
    session.events_received()
    session.tick(40.0)  # its ACK is still on the way: not a zombie
    assert not any(isinstance(e, Close) for e in session.events_received())
    assert [p["op"] for p in sent(session)] == [Opcode.HEARTBEAT] * 3


def test_no_zombie_verdict_while_the_owner_has_paused_reading() -> None:
    session = connected(make_session(rng_value=0.0))
    session.tick(0.0)
    session.inbound_paused = True  # the ACK may sit unread behind paused dispatches
    session.tick(40.0)
    assert not any(isinstance(e, Close) for e in session.events_received())
    session.inbound_paused = False
    session.tick(80.0)
    assert any(isinstance(e, Close) and e.cause == "zombie" for e in session.events_received())


def test_a_silent_peer_is_given_up_after_the_hello_timeout() -> None:
    session = make_session(hello_timeout=5.0)
    session.next_connection(0.0)
    session.connection_made(0.0)
    assert session.next_deadline() == 5.0
    session.tick(5.0)
    (close,) = session.events_received()
    assert isinstance(close, Close) and close.cause == "hello_timeout"


# -- hardening (issue #10) -----------------------------------------------------------------------


def test_a_first_dispatch_numbered_0_is_handed_over() -> None:
    session = make_session()
    session.next_connection(0.0)
    session.connection_made(0.0)
    session.receive_frame(hello(), 0.0)
    session.identify(0.0)
    session.receive_frame(ready(seq=0), 0.0)
    session.receive_frame(dispatch(1), 0.0)
    handed = [e.sequence for e in session.events_received() if isinstance(e, Dispatch)]
    assert handed == [0, 1]


def test_dispatch_carries_its_frame_and_the_data_bytes_as_sent() -> None:
    session = connected(make_session())
    wire = b'{"t":"MESSAGE_CREATE","s":2,"op":0,"d":{"id":"2", "content" :"a \\"d\\": {"}  }'
    session.receive_frame(wire, 1.0)
    (event,) = session.events_received()
    assert isinstance(event, Dispatch)
    assert event.raw == wire
    assert event.data_json == b'{"id":"2", "content" :"a \\"d\\": {"}'
    # d not last: nothing is cut, the owner serialises the parsed data instead.
    session.receive_frame(dispatch(3), 1.0)
    (event,) = session.events_received()
    assert isinstance(event, Dispatch) and event.data_json is None


@pytest.mark.parametrize(
    "wire",
    [
        b'{"t":"MESSAGE_CREATE","s":2,"op":0,"d":{"id":"1"},"t":"MESSAGE_CREATE"}',
        b'{"t":"MESSAGE_CREATE","s":2,"op":0,"d":{"id":"1"},"d":{"id":"2"}}',
    ],
    ids=["key repeated after d", "d twice"],
)
def test_a_frame_repeating_a_key_after_d_is_not_cut(wire: bytes) -> None:
    # The parser keeps the last value of a repeated key; the cut would run from the first "d"
    # to the end and be no JSON at all: such a frame's data is serialised from what was parsed.
    session = connected(make_session())
    session.receive_frame(wire, 1.0)
    (event,) = session.events_received()
    assert isinstance(event, Dispatch) and event.data_json is None
    assert event.data == orjson.loads(wire)["d"]


def identify_once(session: Session, now: float, session_id: str, seq: int = 1) -> str:
    """One connection that identifies; returns the epoch the IDENTIFY began."""
    session.next_connection(now)
    session.connection_made(now)
    session.receive_frame(hello(), now)
    session.identify(now)
    session.receive_frame(ready(session_id, seq=seq), now)
    session.data_to_send()
    session.events_received()
    return session.epoch


def test_every_identify_begins_a_new_epoch_and_a_resume_keeps_it() -> None:
    session = make_session()
    first = identify_once(session, 0.0, "same-id")
    assert first and session.snapshot() is not None
    assert session.snapshot().epoch == first  # type: ignore[union-attr]
    # A resume keeps the epoch: replays must keep their task ids.
    session.connection_lost(None, 10.0)
    session.next_connection(10.0)
    session.connection_made(10.0)
    session.receive_frame(hello(), 10.0)
    session.receive_frame(frame(Opcode.DISPATCH, None, s=2, t="RESUMED"), 10.0)
    assert session.epoch == first
    # The server invalidates it and hands out the same session id again.
    session.receive_frame(frame(Opcode.INVALID_SESSION, False), 11.0)
    session.connection_lost(RESUMABLE_CLOSE_CODE, 11.0)
    second = identify_once(session, 20.0, "same-id")
    assert second and second != first
    session.receive_frame(dispatch(2), 21.0)
    (event,) = session.events_received()
    assert isinstance(event, Dispatch) and event.epoch == second
    # A restarted process resumes with the persisted epoch.
    restored = make_session(resume_from=session.snapshot())
    assert restored.epoch == second


def test_a_non_resumable_stop_forgets_the_session_at_once() -> None:
    session = connected(make_session())
    session.close(5.0, resumable=False)
    assert session.snapshot() is None
    (close,) = session.events_received()
    assert isinstance(close, Close) and close.code == CloseCode.NORMAL


def test_a_resume_url_that_never_answers_is_given_up_for_the_gateway_url() -> None:
    state = SessionState(session_id="old", sequence=7, resume_url=RESUME_URL)
    session = make_session(auto_commit=False, resume_from=state)
    urls = []
    for attempt in range(4):
        plan = session.next_connection(float(attempt))
        assert plan is not None and plan.resume
        urls.append(plan.url.split("?")[0].rstrip("/"))
        session.connection_lost(None, float(attempt))  # the connect itself failed
    assert urls == [RESUME_URL, RESUME_URL, RESUME_URL, BASE_URL]
    assert session.snapshot() == SessionState("old", 7, None)
    # Resumed there (still the same session, RESUME not IDENTIFY).
    session.connection_made(5.0)
    session.receive_frame(hello(), 5.0)
    assert sent(session)[0]["op"] == Opcode.RESUME


def test_a_resume_url_that_answers_hello_keeps_its_place() -> None:
    state = SessionState(session_id="old", sequence=7, resume_url=RESUME_URL)
    session = make_session(auto_commit=False, resume_from=state)
    for attempt in range(5):
        plan = session.next_connection(float(attempt))
        assert plan is not None and plan.url.startswith(RESUME_URL)
        session.connection_made(float(attempt))
        session.receive_frame(hello(), float(attempt))
        session.connection_lost(None, float(attempt))  # dropped after HELLO: not the URL's fault


def test_closes_before_ready_raise_an_alarm_once_and_ready_resets_it() -> None:
    from ingest.session import CLOSES_BEFORE_READY_ALARM, ClosedBeforeReady

    session = make_session()
    alarms = []
    for attempt in range(CLOSES_BEFORE_READY_ALARM + 2):
        plan = session.next_connection(float(attempt))
        assert plan is not None  # 4000 is not fatal: it keeps retrying
        session.connection_made(float(attempt))
        session.receive_frame(hello(), float(attempt))
        session.identify(float(attempt))
        session.connection_lost(4000, float(attempt))
        alarms += [e for e in session.events_received() if isinstance(e, ClosedBeforeReady)]
    assert alarms == [ClosedBeforeReady(CLOSES_BEFORE_READY_ALARM, 4000)]
    assert session.closes_before_ready == CLOSES_BEFORE_READY_ALARM + 2
    identify_once(session, 100.0, "finally")
    assert session.closes_before_ready == 0


def test_a_presence_too_large_for_identify_is_a_configuration_error() -> None:
    from ingest.errors import ConfigError

    presence = {"status": "online", "activities": [{"name": "x" * 5000, "type": 0}]}
    with pytest.raises(ConfigError, match="presence"):
        make_session(presence=presence)


def test_an_identify_that_fails_in_the_shell_closes_and_retries_with_backoff() -> None:
    session = make_session()
    session.next_connection(0.0)
    session.connection_made(0.0)
    session.receive_frame(hello(), 0.0)
    session.events_received()
    session.identify_failed("identify failed: RuntimeError")
    (close,) = session.events_received()
    assert isinstance(close, Close) and close.cause == "identify_failed"
    session.connection_lost(close.code, 1.0)
    plan = session.next_connection(1.0)
    assert plan is not None and not plan.resume and plan.delay > 0


def test_a_frame_with_a_huge_head_before_d_is_serialised_not_scanned() -> None:
    # Cutting d out looks at the first KB only: a hostile head cannot make it scan megabytes.
    session = connected(make_session())
    wire = b'{"t":"MESSAGE_CREATE","x":"' + b"a" * 100_000 + b'","s":2,"op":0,"d":{"id":"2"}}'
    session.receive_frame(wire, 1.0)
    (event,) = session.events_received()
    assert isinstance(event, Dispatch) and event.sequence == 2
    assert event.data == {"id": "2"} and event.data_json is None
