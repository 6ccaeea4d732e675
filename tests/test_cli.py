"""The command line a newcomer drives: ``python -m ingest simulate`` against a running
simulator, ``broker stop``, the one-line configuration errors, the MESSAGE_CONTENT warning and
JSON logs in the worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ingest import Gateway
from ingest.brokers import embedded_socket, ensure_embedded_broker, stop_embedded_broker
from ingest.config import load_config
from ingest.errors import ConfigError
from ingest.protocol import Intents, default_intents
from ingest.testing import SimulatorThread
from ingest.testing.processes import free_port
from tests.support import ROOT, Proc, base_env, gateway_process, short_tempdir, worker_process

TOKEN = "sim-token"


def ingest(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest", *args],
        cwd=ROOT,
        env=base_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def simulator() -> Iterator[tuple[Proc, str]]:
    """``python -m ingest simulate`` on a free port, as Procfile.dev runs it; (process, URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "ingest", "simulate", "--port", str(port)]
    proc = Proc("simulator", [*cmd, "--allow-privileged", "MESSAGE_CONTENT"], base_env())
    try:
        proc.wait_for_line("gateway ws://", timeout=20)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        assert proc.stop() == 0


def gateway_sees(url: str, intents: int, drive: list[list[str]]) -> tuple[Gateway, list[Any]]:
    """Connect a Gateway, run each ``simulate`` command in ``drive``, return what it saw."""
    messages: list[Any] = []

    async def scenario() -> Gateway:
        gateway = Gateway(TOKEN, intents, url.replace("http", "ws"), backoff_base=0.01)
        gateway.on("MESSAGE_CREATE", messages.append)
        task = asyncio.create_task(gateway.run())
        loop = asyncio.get_running_loop()
        while gateway.session_id is None:
            await asyncio.sleep(0.01)
        for args in drive:
            first_session = gateway.session_id
            result = await loop.run_in_executor(None, lambda a=args: ingest("simulate", *a))
            assert result.returncode == 0, result.stderr
            deadline = loop.time() + 20
            while loop.time() < deadline:
                if args[0] == "say" and messages:
                    break
                if args[0] == "reconnect" and gateway.resumes:
                    break
                if args[0] == "invalid-session" and gateway.session_id not in (None, first_session):
                    break
                await asyncio.sleep(0.01)
        await gateway.stop()
        await asyncio.wait_for(task, 10)
        return gateway

    return asyncio.run(asyncio.wait_for(scenario(), 60)), messages


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("intents", "dm", "content"),
    [
        (default_intents() | Intents.MESSAGE_CONTENT, False, "!hello"),
        (default_intents(), False, ""),  # like Discord: no intent, no guild message content
        (default_intents(), True, "!hello"),  # DMs keep their content
    ],
    ids=["with-intent", "without-intent", "dm-without-intent"],
)
def test_simulate_say_reaches_the_gateway_honouring_the_content_intent(
    simulator: tuple[Proc, str], intents: int, dm: bool, content: str
) -> None:
    _, url = simulator
    say = ["say", "!hello", "--url", url, "--author", "ada", *(["--dm"] if dm else [])]
    _, messages = gateway_sees(url, int(intents), [say])
    assert [(m.content, m.author.username, m.guild_id is None) for m in messages] == [
        (content, "ada", dm)
    ]


@pytest.mark.timeout(90)
def test_simulate_reconnect_resumes_and_invalid_session_starts_a_new_session(
    simulator: tuple[Proc, str],
) -> None:
    _, url = simulator

    gateway, _ = gateway_sees(
        url,
        int(default_intents()),
        [["reconnect", "--url", url], ["invalid-session", "--url", url]],
    )
    assert gateway.resumes == 1
    state = json.loads(ingest("simulate", "state", "--url", url).stdout)
    assert len(state["identify_log"]) == 2, state  # the first session, then the new one
    assert [r["accepted"] for r in state["resumes"]] == [True]


def test_simulate_without_a_simulator_says_so_in_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = ingest("simulate", "say", "hi", "--url", url)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "no simulator answers at" in result.stderr


def test_simulate_say_with_no_gateway_connected_sends_nothing_and_says_why(
    simulator: tuple[Proc, str],
) -> None:
    _, url = simulator
    result = ingest("simulate", "say", "hi", "--url", url)
    assert result.returncode == 1 and "no gateway is connected" in result.stderr


def test_simulate_help_shows_the_commands_the_options_and_the_token() -> None:
    result = ingest("simulate", "--help")
    assert result.returncode == 0
    for needle in ("say", "emit", "reconnect", "invalid-session", "--port", "sim-token"):
        assert needle in result.stdout


# -- configuration errors -----------------------------------------------------------------


def test_http_gateway_url_is_a_config_error_not_an_endless_reconnect() -> None:
    started = time.monotonic()
    result = ingest(DISCORD_TOKEN=TOKEN, DISCORD_GATEWAY_URL="http://127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "DISCORD_GATEWAY_URL" in result.stderr
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("name", "url", "ok"),
    [
        ("CELERY_BROKER_URL", "amqps://guest:secret@broker:5671//", True),
        ("CELERY_BROKER_URL", "rediss://broker:6380/0", True),
        ("REDIS_URL", "redis://broker:6379/0", True),
        ("CELERY_BROKER_URL", "http://guest:secret@broker/", False),
        ("DISCORD_API_URL", "ws://127.0.0.1:1/api/v10", False),
    ],
)
def test_url_schemes_are_checked_before_anything_connects(name: str, url: str, ok: bool) -> None:
    env = {"DISCORD_TOKEN": TOKEN, "DISCORD_GATEWAY_URL": "ws://127.0.0.1:1", name: url}
    if ok:
        assert load_config(env).token == TOKEN
        return
    with pytest.raises(ConfigError) as raised:
        load_config(env)
    message = str(raised.value)
    assert name in message and "secret" not in message
    if name == "CELERY_BROKER_URL":
        assert "amqps://" in message


@pytest.mark.timeout(60)
def test_worker_with_a_bad_broker_url_prints_one_line_and_exits_2() -> None:
    worker = worker_process(
        base_env(CELERY_BROKER_URL="http://broker.invalid/"), app="tests.demo_app"
    )
    try:
        worker.wait_for(lambda _: worker.popen.poll() is not None, 30, "the worker to exit")
        assert worker.stop() == 2
    finally:
        worker.kill()
    text = worker.text()
    assert "Traceback" not in text
    assert [line for line in worker.output() if line.startswith("celery worker:")] == [
        "celery worker: broker URL 'http://broker.invalid/': No such transport: http; use "
        "redis://, rediss://, redis+socket://, amqp://, amqps:// or pyamqp://"
    ]


# -- the embedded broker --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_broker_stop_ends_the_embedded_broker_but_not_under_a_connected_process() -> None:
    with short_tempdir() as data_dir:
        ensure_embedded_broker(data_dir)
        client = redis.Redis(unix_socket_path=str(embedded_socket(data_dir)))
        try:
            client.ping()  # a gateway or worker still connected
            refused = ingest("broker", "stop", "--data-dir", str(data_dir))
            assert refused.returncode == 1 and "still connected" in refused.stderr
            assert client.ping()
        finally:
            client.close()
        stopped = ingest("broker", "stop", INGEST_DATA_DIR=str(data_dir))
        assert stopped.returncode == 0 and "stopped the embedded broker" in stopped.stdout
        assert not embedded_socket(data_dir).exists()
        again = ingest("broker", "stop", "--data-dir", str(data_dir))
        assert again.returncode == 0 and "no embedded broker running" in again.stdout


# -- what the gateway and the worker log ----------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("with_content", [False, True], ids=["intent-off", "intent-on"])
def test_gateway_warns_once_at_start_when_message_content_is_off(with_content: bool) -> None:
    intents = "DEFAULT,MESSAGE_CONTENT" if with_content else "DEFAULT"
    with (
        short_tempdir() as data_dir,
        SimulatorThread(token=TOKEN, allowed_privileged=[Intents.MESSAGE_CONTENT]) as sim,
    ):
        env = base_env(
            DISCORD_TOKEN=TOKEN,
            DISCORD_GATEWAY_URL=sim.url,
            DISCORD_INTENTS=intents,
            INGEST_DATA_DIR=str(data_dir),
            INGEST_CELERY_APP="tests.demo_app",
        )
        gateway = gateway_process(env)
        try:
            gateway.wait_for_line("all 1 shards ready")
            sim.emit("MESSAGE_CREATE", {"id": "1", "channel_id": "2", "guild_id": "3"})
            assert gateway.stop() == 0
        finally:
            gateway.kill()
            stop_embedded_broker(data_dir)
    warnings = [line for line in gateway.output() if "MESSAGE_CONTENT intent is off" in line]
    assert len(warnings) == (0 if with_content else 1), gateway.text()


@pytest.mark.timeout(90)
def test_worker_logs_json_lines_with_ingest_log_format_json() -> None:
    with short_tempdir() as data_dir:
        env = base_env(INGEST_LOG_FORMAT="json", INGEST_DATA_DIR=str(data_dir))
        worker = worker_process(env, app="tests.demo_app", concurrency=1)
        try:
            worker.wait_for_line("ready.", timeout=60)
            assert worker.stop() == 0
        finally:
            worker.kill()
            stop_embedded_broker(data_dir)
    entries = [json.loads(line) for line in worker.output() if line.startswith("{")]
    ready = [e for e in entries if e["message"].endswith("ready.")]
    assert ready and ready[0]["level"] == "INFO" and ready[0]["logger"]
    assert not any(line.startswith("[20") for line in worker.output()), worker.text()


# -- the local loop -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_procfile_dev_runs_the_loop_and_stops_within_honchos_5_s() -> None:
    """Procfile.dev as written, on a free port, a private data dir and the test app."""
    port = str(free_port())
    with short_tempdir() as tmp:
        procfile = (ROOT / "Procfile.dev").read_text()
        procfile = procfile.replace("8765", port).replace(".ingest/dev", str(tmp / "dev"))
        procfile = procfile.replace("-A tasks", "-A tests.demo_app")
        (tmp / "Procfile").write_text(procfile)
        bin_dir = str(Path(sys.executable).parent)
        env = base_env(
            INGEST_CELERY_APP="tests.demo_app", PATH=f"{bin_dir}:{os.environ.get('PATH', '')}"
        )
        honcho = [sys.executable, "-m", "honcho", "-f", str(tmp / "Procfile"), "-d", str(ROOT)]
        loop = Proc("honcho", [*honcho, "start"], env)
        try:
            loop.wait_for_line("all 1 shards ready", timeout=60)
            loop.wait_for_line("ready.", timeout=60)
            said = ingest("simulate", "say", "!hello", "--url", f"http://127.0.0.1:{port}")
            assert said.returncode == 0, said.stderr
            loop.wait_for_line("demo app saw message", timeout=30)
            assert "'!hello'" in next(x for x in loop.output() if "demo app saw message" in x)
            # The handler's REST reply reached the simulator and came back as an event: the
            # workers of the loop have the token and API URL the gateway has.
            loop.wait_for_line("'Hello from the demo app!'", timeout=30)
            started = time.monotonic()
            loop.signal(signal.SIGINT)  # Ctrl-C
            loop.popen.wait(timeout=30)
            stopped_in = time.monotonic() - started
        finally:
            loop.kill()
            stop_embedded_broker(tmp / "dev")
    assert "SIGKILL" not in loop.text(), loop.text()
    assert stopped_in < 5.0
