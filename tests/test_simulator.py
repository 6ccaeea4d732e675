"""The gateway simulator behaves as Discord documents the gateway, seen from a raw client.

These drive it with plain ``websockets`` and ``urllib`` so a bug in our own gateway client
cannot hide a bug in the simulator the other tests rely on.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import pytest
import zstandard
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ingest.protocol import ZLIB_SUFFIX, CloseCode, Intents, Opcode
from ingest.testing import GatewaySimulator, SimulatorThread
from ingest.testing.simulator import sample_guild_create, sample_message_create

TOKEN = "sim-token"
T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout=20)

    return asyncio.run(bounded())


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), timeout)
    payload: dict[str, Any] = json.loads(message)
    return payload


async def open_gateway(
    sim: GatewaySimulator, query: str = "v=10&encoding=json", url: str | None = None
) -> ClientConnection:
    ws = await connect(f"{url or sim.url}/?{query}", compression=None)
    hello = await recv_json(ws)
    assert hello["op"] == Opcode.HELLO
    return ws


def identify(token: str = TOKEN, intents: int = 513, shard: list[int] | None = None) -> str:
    data: dict[str, Any] = {
        "token": token,
        "intents": intents,
        "properties": {"os": "linux", "browser": "test", "device": "test"},
    }
    if shard is not None:
        data["shard"] = shard
    return json.dumps({"op": Opcode.IDENTIFY, "d": data})


async def ready_session(
    sim: GatewaySimulator, **kwargs: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await open_gateway(sim)
    await ws.send(identify(**kwargs))
    ready = await recv_json(ws)
    assert ready["t"] == "READY"
    return ws, ready


async def close_code_after(ws: ClientConnection, payload: str | None = None) -> int | None:
    if payload is not None:
        await ws.send(payload)
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code is not None
    return ws.close_code


def http(
    url: str, token: str | None = TOKEN, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if token is not None:
        request.add_header("Authorization", f"Bot {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.timeout(30)
def test_hello_identify_ready_carries_session_and_resume_url() -> None:
    async def scenario() -> None:
        async with GatewaySimulator(heartbeat_interval_ms=1234) as sim:
            ws = await connect(f"{sim.url}/?v=10&encoding=json", compression=None)
            hello = await recv_json(ws)
            assert hello == {"op": 10, "d": {"heartbeat_interval": 1234}, "s": None, "t": None}
            await ws.send(identify())
            ready = await recv_json(ws)
            assert (ready["op"], ready["t"], ready["s"]) == (0, "READY", 1)
            data = ready["d"]
            assert data["v"] == 10
            assert data["user"]["bot"] is True
            assert data["shard"] == [0, 1]
            assert data["resume_gateway_url"] == sim.url + "/resume"
            assert "id" in data["application"]
            session = sim.sessions[data["session_id"]]
            assert (session.shard_id, session.sequence, session.connected) == (0, 1, True)
            assert sim.ready_shards() == [0]
            assert [r.shard_id for r in sim.identify_log] == [0]
            assert sim.received[0]["d"]["token"] == "[redacted]"
            await ws.close()

    run(scenario)


@pytest.mark.timeout(30)
def test_heartbeat_is_acked_and_recorded_per_session() -> None:
    async def scenario() -> None:
        async with GatewaySimulator() as sim:
            ws, ready = await ready_session(sim)
            await ws.send(json.dumps({"op": 1, "d": 1}))
            assert (await recv_json(ws))["op"] == Opcode.HEARTBEAT_ACK
            await sim.set_zombie(True)
            await ws.send(json.dumps({"op": 1, "d": 1}))
            await sim.request_heartbeat()
            assert (await recv_json(ws))["op"] == Opcode.HEARTBEAT  # no ACK came first
            assert sim.sessions[ready["d"]["session_id"]].heartbeats == [1, 1]
            await ws.close()

    run(scenario)


@pytest.mark.timeout(30)
def test_emitted_events_carry_increasing_sequence_numbers() -> None:
    async def scenario() -> None:
        async with GatewaySimulator() as sim:
            ws, _ = await ready_session(sim)
            await sim.emit_many("MESSAGE_CREATE", lambda i: sample_message_create(i), 5)
            frames = [await recv_json(ws) for _ in range(5)]
            assert [f["s"] for f in frames] == [2, 3, 4, 5, 6]
            assert {f["t"] for f in frames} == {"MESSAGE_CREATE"}
            assert len({f["d"]["id"] for f in frames}) == 5
            assert sim.emitted_count() == 5 and sim.emitted_count(0) == 5
            await ws.close()

    run(scenario)


@pytest.mark.timeout(30)
def test_resume_replays_exactly_the_missed_events_then_resumed() -> None:
    async def scenario() -> None:
        async with GatewaySimulator() as sim:
            ws, ready = await ready_session(sim)
            session_id = ready["d"]["session_id"]
            await sim.emit("TYPING_START", {"n": 0})
            assert (await recv_json(ws))["s"] == 2
            await ws.close(CloseCode.UNKNOWN_ERROR)  # not 1000: keeps the session resumable
            await sim.wait_until(lambda: not sim.sessions[session_id].connected)
            for n in (1, 2, 3):
                await sim.emit("TYPING_START", {"n": n})

            resume_url = ready["d"]["resume_gateway_url"]
            ws = await open_gateway(sim, url=resume_url)
            resume = {"token": TOKEN, "session_id": session_id, "seq": 2}
            await ws.send(json.dumps({"op": Opcode.RESUME, "d": resume}))
            frames = [await recv_json(ws) for _ in range(4)]
            assert [(f["t"], f["s"]) for f in frames] == [
                ("TYPING_START", 3),
                ("TYPING_START", 4),
                ("TYPING_START", 5),
                ("RESUMED", 6),
            ]
            assert [f["d"]["n"] for f in frames[:3]] == [1, 2, 3]
            assert sim.sessions[session_id].paths == ["/", "/resume"]
            assert sim.resume_log[-1].accepted and sim.resume_log[-1].replayed == 3
            await ws.close()

    run(scenario)


@pytest.mark.timeout(30)
def test_resume_after_normal_close_or_of_unknown_session_is_invalid() -> None:
    async def scenario() -> None:
        async with GatewaySimulator() as sim:
            ws, ready = await ready_session(sim)
            session_id = ready["d"]["session_id"]
            await ws.close(1000)  # a client's 1000 ends the session
            await sim.wait_until(lambda: not sim.sessions[session_id].connected)
            for sid in (session_id, "no-such-session"):
                ws = await open_gateway(sim)
                resume = {"token": TOKEN, "session_id": sid, "seq": 1}
                await ws.send(json.dumps({"op": Opcode.RESUME, "d": resume}))
                assert await recv_json(ws) == {"op": 9, "d": False, "s": None, "t": None}
                await ws.close()

    run(scenario)


@pytest.mark.timeout(30)
def test_tcp_drop_keeps_session_resumable() -> None:
    async def scenario() -> None:
        async with GatewaySimulator() as sim:
            ws, ready = await ready_session(sim)
            session_id = ready["d"]["session_id"]
            await sim.drop_connections()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            await sim.wait_until(lambda: not sim.sessions[session_id].connected)
            assert sim.sessions[session_id].resumable
            await sim.emit("MESSAGE_CREATE", sample_message_create(1))
            assert sim.sessions[session_id].sequence == 2

    run(scenario)


@pytest.mark.timeout(30)
def test_zlib_stream_frames_decode_with_one_decompressobj() -> None:
    async def scenario() -> None:
        async with GatewaySimulator() as sim:
            ws = await connect(
                f"{sim.url}/?v=10&encoding=json&compress=zlib-stream", compression=None
            )
            inflate = zlib.decompressobj()

            async def next_payload() -> dict[str, Any]:
                frame = await asyncio.wait_for(ws.recv(), 5)
                assert isinstance(frame, bytes) and frame.endswith(ZLIB_SUFFIX)
                payload: dict[str, Any] = json.loads(inflate.decompress(frame))
                return payload

            assert (await next_payload())["op"] == Opcode.HELLO
            await ws.send(identify())
            assert (await next_payload())["t"] == "READY"
            await sim.emit_many("MESSAGE_CREATE", sample_message_create, 20)
            assert [(await next_payload())["s"] for _ in range(20)] == list(range(2, 22))
            await ws.close()

    run(scenario)


@pytest.mark.timeout(30)
def test_zstd_stream_frames_decode_with_one_decompressobj() -> None:
    async def scenario() -> None:
        async with GatewaySimulator() as sim:
            ws = await connect(
                f"{sim.url}/?v=10&encoding=json&compress=zstd-stream", compression=None
            )
            inflate = zstandard.ZstdDecompressor().decompressobj()
            frame = await asyncio.wait_for(ws.recv(), 5)
            assert isinstance(frame, bytes)
            assert json.loads(inflate.decompress(frame))["op"] == Opcode.HELLO
            await ws.send(identify())
            frame = await asyncio.wait_for(ws.recv(), 5)
            assert isinstance(frame, bytes)
            assert json.loads(inflate.decompress(frame))["t"] == "READY"
            await ws.close()

    run(scenario)


@pytest.mark.parametrize(
    ("sim_options", "query", "payload", "expected"),
    [
        ({}, "v=10", identify(token="wrong"), CloseCode.AUTHENTICATION_FAILED),
        ({}, "v=9", identify(), CloseCode.INVALID_API_VERSION),
        ({}, "v=10", identify(intents="lots"), CloseCode.INVALID_INTENTS),  # type: ignore[arg-type]
        ({}, "v=10", identify(intents=int(Intents.MESSAGE_CONTENT)), CloseCode.DISALLOWED_INTENTS),
        ({"shard_count": 2}, "v=10", identify(shard=[2, 2]), CloseCode.INVALID_SHARD),
        ({"shard_count": 2}, "v=10", identify(shard=[0, 3]), CloseCode.INVALID_SHARD),
        ({"shard_count": 2}, "v=10", identify(), CloseCode.SHARDING_REQUIRED),
        ({}, "v=10", '{"op": 3, "d": {}}', CloseCode.NOT_AUTHENTICATED),
        ({}, "v=10", "{not json", CloseCode.DECODE_ERROR),
        ({}, "v=10", '{"op": 99, "d": null}', CloseCode.UNKNOWN_OPCODE),
        ({}, "v=10", '{"op": 1, "d": "' + "x" * 5000 + '"}', CloseCode.DECODE_ERROR),
    ],
    ids=[
        "bad-token",
        "bad-version",
        "bad-intents",
        "privileged",
        "shard-id",
        "shard-count",
        "sharding-required",
        "not-authenticated",
        "bad-json",
        "unknown-op",
        "oversized",
    ],
)
@pytest.mark.timeout(30)
def test_bad_client_input_gets_discords_close_code(
    sim_options: dict[str, Any], query: str, payload: str, expected: CloseCode
) -> None:
    async def scenario() -> None:
        async with GatewaySimulator(**sim_options) as sim:
            ws = await open_gateway(sim, query=query)
            assert await close_code_after(ws, payload) == expected
            assert sim.identify_log == []

    run(scenario)


@pytest.mark.timeout(30)
def test_allowed_privileged_intents_are_accepted() -> None:
    async def scenario() -> None:
        async with GatewaySimulator(allowed_privileged=[Intents.MESSAGE_CONTENT]) as sim:
            ws, _ = await ready_session(sim, intents=int(Intents.MESSAGE_CONTENT))
            await ws.close()

    run(scenario)


@pytest.mark.timeout(30)
def test_second_identify_closes_4005_and_flooding_closes_4008() -> None:
    async def scenario() -> None:
        async with GatewaySimulator(rate_limit_count=10) as sim:
            ws, _ = await ready_session(sim)
            assert await close_code_after(ws, identify()) == CloseCode.ALREADY_AUTHENTICATED
            ws = await open_gateway(sim)
            for _ in range(10):
                await ws.send('{"op": 1, "d": null}')
            assert await close_code_after(ws, '{"op": 1, "d": null}') == CloseCode.RATE_LIMITED

    run(scenario)


@pytest.mark.timeout(30)
def test_identify_within_the_bucket_interval_is_invalid_session_and_recorded() -> None:
    async def scenario() -> None:
        async with GatewaySimulator(shard_count=4, max_concurrency=2) as sim:
            first, _ = await ready_session(sim, shard=[0, 4])
            other_bucket, _ = await ready_session(sim, shard=[1, 4])
            ws = await open_gateway(sim)
            await ws.send(identify(shard=[2, 4]))  # bucket 0 again, well within 5 s
            assert await recv_json(ws) == {"op": 9, "d": False, "s": None, "t": None}
            assert [(v.shard_id, v.bucket) for v in sim.invalid_identifies] == [(2, 0)]
            assert [(r.shard_id, r.bucket) for r in sim.identify_log] == [(0, 0), (1, 1)]
            assert sim.ready_shards() == [0, 1]
            for conn in (first, other_bucket, ws):
                await conn.close()

    run(scenario)


@pytest.mark.timeout(30)
def test_reconnect_before_hello_and_server_ops_reach_the_client() -> None:
    async def scenario() -> None:
        async with GatewaySimulator() as sim:
            sim.reconnect_before_hello()
            ws = await connect(f"{sim.url}/?v=10&encoding=json", compression=None)
            assert (await recv_json(ws))["op"] == Opcode.RECONNECT
            assert (await recv_json(ws))["op"] == Opcode.HELLO
            await ws.send(identify())
            await recv_json(ws)
            await sim.send_reconnect()
            assert (await recv_json(ws))["op"] == Opcode.RECONNECT
            await sim.send_invalid_session(True)
            assert (await recv_json(ws))["d"] is True
            await sim.send_raw(b"\x00not json")
            assert await asyncio.wait_for(ws.recv(), 5) == b"\x00not json"
            await sim.close_connections(4000, "bye")
            assert await close_code_after(ws) == 4000
            await sim.wait_until(lambda: sim.ready_shards() == [])
            assert all(s.resumable for s in sim.sessions.values())

    run(scenario)


@pytest.mark.timeout(30)
def test_rest_endpoints_require_the_bot_token_and_count_identifies() -> None:
    async def scenario() -> None:
        async with GatewaySimulator(shard_count=2, max_concurrency=16) as sim:
            loop = asyncio.get_running_loop()

            def get(path: str, token: str | None = TOKEN) -> tuple[int, Any]:
                return http(sim.api_url + path, token)

            status, body = await loop.run_in_executor(None, get, "/gateway/bot")
            assert status == 200
            assert body["url"] == sim.url and body["shards"] == 2
            limit = body["session_start_limit"]
            assert limit["max_concurrency"] == 16 and limit["remaining"] == limit["total"]
            ws, _ = await ready_session(sim, shard=[0, 2])
            _, body = await loop.run_in_executor(None, get, "/gateway/bot")
            assert body["session_start_limit"]["remaining"] == limit["total"] - 1
            status, me = await loop.run_in_executor(None, get, "/users/@me")
            assert status == 200 and me["bot"] is True
            for token in (None, "wrong"):
                status, body = await loop.run_in_executor(None, get, "/users/@me", token)
                assert (status, body) == (401, {"message": "401: Unauthorized", "code": 0})
            await ws.close()

    run(scenario)


@pytest.mark.timeout(30)
def test_http_control_emits_generated_payloads_and_reports_state() -> None:
    with SimulatorThread() as sim:

        async def client() -> list[dict[str, Any]]:
            ws, _ = await ready_session(sim.sim)  # the url is all a client uses
            frames = [await recv_json(ws) for _ in range(3)]
            await ws.close()
            return frames

        async def drive() -> list[dict[str, Any]]:
            task = asyncio.create_task(client())
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None, lambda: sim.wait_until(lambda: bool(sim.sim.ready_shards()))
            )
            body = {"event": "MESSAGE_CREATE", "count": 3, "rate": None, "data": None}
            status, result = await loop.run_in_executor(
                None, lambda: http(sim.url.replace("ws", "http") + "/_sim/emit", None, body)
            )
            assert (status, result) == (200, {"emitted": 3})
            return await task

        frames = asyncio.run(asyncio.wait_for(drive(), 20))
        assert [f["s"] for f in frames] == [2, 3, 4]
        assert len({f["d"]["content"] for f in frames}) == 3
        status, state = http(sim.url.replace("ws", "http") + "/_sim/state", None)
        assert status == 200 and state["emitted"] == 3
        assert [s["sequence"] for s in state["sessions"].values()] == [4]
        assert sim.emitted_count() == 3 and len(sim.identify_log) == 1


def test_generated_payloads_are_realistic_and_sized() -> None:
    message = sample_message_create(7)
    assert 700 < len(json.dumps(message)) < 1300
    assert {"id", "author", "member", "mentions", "embeds", "content"} <= message.keys()
    guild = sample_guild_create(1, size_kb=50)
    assert 40_000 < len(json.dumps(guild)) < 60_000
    assert guild["roles"] and guild["channels"] and guild["members"]


@pytest.mark.timeout(30)
def test_cli_prints_its_urls_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest.testing", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        gateway = proc.stdout.readline().split()
        api = proc.stdout.readline().split()
        assert gateway[0] == "gateway" and gateway[1].startswith("ws://127.0.0.1:")
        assert api[0] == "api" and api[1].endswith("/api/v10")
        assert http(api[1] + "/gateway/bot")[0] == 200
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


@pytest.mark.timeout(30)
def test_resume_is_refused_once_the_buffer_or_the_window_no_longer_covers_it() -> None:
    async def scenario() -> None:
        async with GatewaySimulator(replay_buffer_size=3, resume_window=0.2) as sim:
            ws, ready = await ready_session(sim)
            session_id = ready["d"]["session_id"]
            await sim.drop_connections()
            await sim.wait_until(lambda: not sim.sessions[session_id].connected)
            await sim.emit_many("TYPING_START", lambda i: {"n": i}, 10)
            ws = await open_gateway(sim)
            resume = {"token": TOKEN, "session_id": session_id, "seq": 1}  # 2..8 are gone
            await ws.send(json.dumps({"op": Opcode.RESUME, "d": resume}))
            assert (await recv_json(ws))["op"] == Opcode.INVALID_SESSION
            await ws.close()
            await asyncio.sleep(0.3)
            assert not sim.sessions[session_id].resumable
            ws = await open_gateway(sim)
            resume["seq"] = 11
            await ws.send(json.dumps({"op": Opcode.RESUME, "d": resume}))
            assert (await recv_json(ws))["op"] == Opcode.INVALID_SESSION
            assert [r.accepted for r in sim.resume_log] == [False, False]
            await ws.close()

    run(scenario)


@pytest.mark.timeout(30)
def test_ready_lists_unavailable_guilds_then_bursts_their_guild_creates() -> None:
    async def scenario() -> None:
        async with GatewaySimulator(guilds_per_shard=3, guild_size_kb=4) as sim:
            ws, ready = await ready_session(sim)
            stubs = ready["d"]["guilds"]
            assert all(g["unavailable"] for g in stubs) and len(stubs) == 3
            creates = [await recv_json(ws) for _ in range(3)]
            assert [g["d"]["id"] for g in creates] == [g["id"] for g in stubs]
            assert [g["s"] for g in creates] == [2, 3, 4]
            await ws.close()

    run(scenario)


@pytest.mark.timeout(30)
def test_emit_many_paces_to_the_requested_rate() -> None:
    async def scenario() -> None:
        async with GatewaySimulator() as sim:
            ws, _ = await ready_session(sim)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await sim.emit_many("TYPING_START", lambda i: {"n": i}, 21, rate=100)
            assert 0.18 < loop.time() - started < 1.0
            assert [(await recv_json(ws))["d"]["n"] for _ in range(21)] == list(range(21))
            await ws.close()

    run(scenario)


# -- modes of servers that are not Discord ------------------------------------------------------


@pytest.mark.parametrize("first_sequence", [1, 0])
def test_session_id_reuse_mode_gives_every_identify_the_same_id_and_restarts_sequences(
    first_sequence: int,
) -> None:
    async def scenario() -> None:
        async with GatewaySimulator(
            token=TOKEN, reuse_session_id=True, first_sequence=first_sequence, identify_interval=0
        ) as sim:
            ws, ready = await ready_session(sim)
            await sim.emit("TYPING_START", {"channel_id": "1"})
            assert (await recv_json(ws))["s"] == first_sequence + 1
            await ws.close()
            ws, again = await ready_session(sim)
            assert again["d"]["session_id"] == ready["d"]["session_id"]
            assert ready["s"] == again["s"] == first_sequence
            await ws.close()

    run(scenario)


def test_zstd_frame_per_message_mode_sends_complete_independent_frames() -> None:
    async def scenario() -> None:
        async with GatewaySimulator(token=TOKEN, zstd_frame_per_message=True) as sim:
            ws = await connect(
                f"{sim.url}/?v=10&encoding=json&compress=zstd-stream", compression=None
            )
            frames = [await asyncio.wait_for(ws.recv(), 5)]
            await ws.send(identify())
            frames.append(await asyncio.wait_for(ws.recv(), 5))
            # Each frame decodes on its own: a fresh decompressor, no shared stream.
            decoded = [
                json.loads(zstandard.ZstdDecompressor().decompress(f))  # type: ignore[arg-type]
                for f in frames
            ]
            assert [d["op"] for d in decoded] == [Opcode.HELLO, Opcode.DISPATCH]
            await ws.close()

    run(scenario)


def test_poison_event_nests_deeper_than_orjson_writes_but_parses() -> None:
    async def scenario() -> None:
        async with GatewaySimulator(token=TOKEN) as sim:
            ws, _ready = await ready_session(sim)
            await sim.emit_poison(depth=400)
            raw = await asyncio.wait_for(ws.recv(), 5)
            payload = orjson.loads(raw)
            assert payload["t"] == "MESSAGE_CREATE" and payload["d"]["id"]
            with pytest.raises(orjson.JSONEncodeError):
                orjson.dumps(payload["d"])
            await ws.close()

    run(scenario)
