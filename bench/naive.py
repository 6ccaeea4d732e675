"""The naive pipeline the benchmark compares against: what a first attempt would write.

One thread reads the gateway (websockets' sync client, zlib-stream), and per dispatch does
``json.loads``, validates with the same pydantic model, and calls Celery's ``send_task`` once
(one broker round trip per event). No batching, no sequence bookkeeping, no dead letters.

Run: ``python -m bench.naive --gateway ws://127.0.0.1:P --broker redis://127.0.0.1:6379/14``;
it prints ``ready`` once its session is READY and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import zlib
from typing import Any

from celery import Celery
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from ingest.models import model_for
from ingest.testing.simulator import DEFAULT_TOKEN

ZLIB_SUFFIX = b"\x00\x00\xff\xff"
INTENTS = (1 << 0) | (1 << 9)  # GUILDS, GUILD_MESSAGES (not privileged)
EVENTS = ("MESSAGE_CREATE", "GUILD_CREATE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive", description=__doc__)
    parser.add_argument("--gateway", required=True, help="ws:// URL of the simulator")
    parser.add_argument("--broker", required=True, help="Celery broker URL")
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument(
        "--short-argsrepr",
        action="store_true",
        help="pass argsrepr to send_task, sparing Celery's saferepr of the whole payload",
    )
    args = parser.parse_args(argv)

    app = Celery("naive", broker=args.broker, set_as_current=True)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)
    models = {event: model_for(event) for event in EVENTS}

    url = f"{args.gateway}/?v=10&encoding=json&compress=zlib-stream"
    stop = threading.Event()
    # No WebSocket pings (Discord uses its own heartbeat): a pong queued behind a backlog
    # would time the connection out while the client is still busy with earlier events.
    with connect(url, compression=None, max_size=None, ping_interval=None) as ws:
        signal.signal(signal.SIGTERM, lambda *_: (stop.set(), ws.close()))
        inflate = zlib.decompressobj()
        buffer = bytearray()
        sequence: list[int | None] = [None]

        def heartbeat(interval: float) -> None:
            while not stop.wait(interval):
                try:
                    ws.send(json.dumps({"op": 1, "d": sequence[0]}))
                except ConnectionClosed:
                    return

        try:
            for frame in ws:
                buffer += frame if isinstance(frame, bytes) else frame.encode()
                if not buffer.endswith(ZLIB_SUFFIX):
                    continue
                payload: dict[str, Any] = json.loads(inflate.decompress(bytes(buffer)))
                buffer.clear()
                op = payload["op"]
                if op == 10:
                    interval = payload["d"]["heartbeat_interval"] / 1000.0
                    threading.Thread(target=heartbeat, args=(interval,), daemon=True).start()
                    identify = {
                        "token": args.token,
                        "intents": INTENTS,
                        "properties": {"os": "linux", "browser": "naive", "device": "naive"},
                    }
                    ws.send(json.dumps({"op": 2, "d": identify}))
                elif op == 0:
                    sequence[0] = payload["s"]
                    event = payload["t"]
                    if event == "READY":
                        print("ready", flush=True)
                    model = models.get(event)
                    if model is not None:
                        model.model_validate(payload["d"])
                        name = f"discord.{event}"
                        if args.short_argsrepr:
                            app.send_task(
                                name, args=[payload["d"]], queue=name, argsrepr=f"[<{event}>]"
                            )
                        else:
                            app.send_task(name, args=[payload["d"]], queue=name)
        except ConnectionClosed:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
