"""The gateway simulator with a pre-encoded "blast" mode, so the benchmark measures the client.

The stock simulator builds, encodes and compresses every frame as it sends it (~20k frames/s,
on the same two cores as the gateway under test). ``POST /_sim/blast`` instead prepares every
frame first (payload, dispatch frame, zlib-stream compression, WebSocket framing), untimed, and
then writes them to the socket: all at once, or one by one at a fixed rate, recording the
monotonic time each frame went out. ``CLOCK_MONOTONIC`` is system-wide on Linux, so those
times compare directly with what another process on the machine reads.

Run: ``python -m bench.fastsim --port P`` (the stock ``/_sim/*`` routes all work too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from ingest.testing.simulator import DEFAULT_TOKEN, GatewaySimulator, generate_payload

# Server-to-client frames are not masked: FIN + binary opcode, then the length.
_FIN_BINARY = 0x82


def ws_binary_frame(payload: bytes) -> bytes:
    """One complete unmasked WebSocket binary frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", _FIN_BINARY, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", _FIN_BINARY, 126, n) + payload
    return struct.pack("!BBQ", _FIN_BINARY, 127, n) + payload


@dataclass
class Blast:
    event: str
    count: int
    rate: float | None
    first_index: int  # payload i of the first frame: sample_message_create's nonce is 10**7 + i
    prepared_seconds: float = 0.0
    started_at: float | None = None  # monotonic time of the first write
    finished_at: float | None = None  # monotonic time of the last write (not of its delivery)
    sent: int = 0
    wire_bytes: int = 0
    send_times: list[float] = field(default_factory=list)  # rate mode only, one per frame
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "count": self.count,
            "rate": self.rate,
            "first_index": self.first_index,
            "prepared_seconds": self.prepared_seconds,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "sent": self.sent,
            "wire_bytes": self.wire_bytes,
            "done": self.finished_at is not None or self.error is not None,
            "error": self.error,
        }


class FastSimulator(GatewaySimulator):
    """``GatewaySimulator`` plus ``/_sim/blast``, ``/_sim/blast_state``, ``/_sim/blast_times``.

    It reaches into the simulator's session and connection (``_current``, ``conn._lock``,
    ``conn.compressor``) because the compressed stream is per connection: the frames must be
    compressed by that connection's compressor, in order, with nothing else sent between.
    Holding the connection's send lock from preparation to the last write guarantees that
    (a heartbeat ACK due meanwhile waits; heartbeats come every 41 s).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.blast: Blast | None = None
        self._next_index = 0
        self._blasting: asyncio.Task[None] | None = None

    async def _control(self, action: str, params: dict[str, Any]) -> dict[str, Any] | None:
        if action == "blast":
            if self._blasting is not None and not self._blasting.done():
                raise ValueError("a blast is still running")
            event = str(params.get("event", "MESSAGE_CREATE"))
            count = int(params.get("count", 1000))
            raw_rate = params.get("rate")
            rate = None if raw_rate in (None, "", "null", 0) else float(raw_rate)
            options = {k: params[k] for k in ("size_kb",) if k in params}
            generate_payload(event, 0, **options)  # an unknown event is a 400 now, not later
            self.blast = Blast(event, count, rate, self._next_index)
            self._next_index += count
            self._blasting = asyncio.ensure_future(self._run_blast(self.blast, options))
            return {"blasting": count, "first_index": self.blast.first_index}
        if action == "blast_state":
            return {"blast": None if self.blast is None else self.blast.summary()}
        if action == "blast_times":
            blast = self.blast
            return {
                "first_index": None if blast is None else blast.first_index,
                "send_times": [] if blast is None else blast.send_times,
            }
        return await super()._control(action, params)

    async def _run_blast(self, blast: Blast, options: dict[str, Any]) -> None:
        try:
            await self._blast(blast, options)
        except Exception as exc:  # noqa: BLE001 - reported to the driver through blast_state
            blast.error = repr(exc)

    async def _blast(self, blast: Blast, options: dict[str, Any]) -> None:
        sessions = self._targets(None)
        if len(sessions) != 1 or sessions[0].connection is None:
            raise RuntimeError(f"blast needs exactly one connected session, not {len(sessions)}")
        session = sessions[0]
        conn = session.connection
        assert conn is not None
        async with conn._lock:
            prepared_at = time.monotonic()
            frames: list[bytes] = []
            event = blast.event
            for k in range(blast.count):
                data = orjson.dumps(generate_payload(event, blast.first_index + k, **options))
                session.sequence += 1
                frame = b'{"op":0,"t":"%s","s":%d,"d":%s}' % (
                    event.encode(),
                    session.sequence,
                    data,
                )
                # Replays are not benchmarked; the bounded buffer keeps a resume possible.
                session.buffer.append((session.sequence, frame))
                if len(session.buffer) > session.replay_limit:
                    session.buffer.popleft()
                frames.append(ws_binary_frame(conn.compressor.compress(frame)))
                if k % 2000 == 1999:
                    await asyncio.sleep(0)  # keep /_sim/state answering during a long prepare
            self._emitted[session.shard_id] = self._emitted.get(session.shard_id, 0) + blast.count
            blast.wire_bytes = sum(len(f) for f in frames)
            blast.prepared_seconds = time.monotonic() - prepared_at
            transport = conn.ws.transport
            if blast.rate is None:
                # One write: the kernel and the client's reading speed set the pace from here.
                blast.started_at = time.monotonic()
                transport.write(b"".join(frames))
                blast.sent = blast.count
                blast.finished_at = time.monotonic()
            else:
                loop = asyncio.get_running_loop()
                interval = 1.0 / blast.rate
                start = loop.time() + 0.05
                times = blast.send_times
                for k, wire in enumerate(frames):
                    delay = start + k * interval - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    now = time.monotonic()
                    if blast.started_at is None:
                        blast.started_at = now
                    transport.write(wire)
                    times.append(now)
                    blast.sent += 1
                blast.finished_at = time.monotonic()
            # Let the transport drain before anything else (an ACK) may use the connection.
            while transport.get_write_buffer_size() > 0 and not transport.is_closing():
                await asyncio.sleep(0.001)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fastsim",
        description="Gateway simulator with the benchmark's pre-encoded /_sim/blast route",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--replay-buffer", type=int, default=5000)
    args = parser.parse_args(argv)

    async def run() -> None:
        sim = FastSimulator(
            host=args.host,
            port=args.port,
            token=args.token,
            identify_interval=0.0,
            replay_buffer_size=args.replay_buffer,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with sim:
            print(f"gateway {sim.url}", flush=True)
            await stop.wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
