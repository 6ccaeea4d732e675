"""Shared fixtures: the real brokers on loopback, skipped on a laptop without them and
required (a failure, not a skip) when ``CI`` is set; the recorder app's record; and the counts
fault tests measure, printed in the terminal summary even without ``-s``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.support import (
    RABBITMQ_URL,
    RECORD_DB,
    REDIS_HOST,
    REDIS_PORT,
    Record,
    redis_url,
    require_broker,
)

REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}"


# Database numbers on the shared Redis, one per test file that flushes or uses fixed queue
# names (the task queues are always discord.<EVENT>), so files can run at the same time:
# 5 test_messages, 6 test_handlers, 7 test_publish, 11 test_end_to_end, 12 test_sharding,
# 15 test_deploy, 9 test_delivery, 10 the recorder app's records (RECORD_DB, a prefix per test),
# 13 test_operations, 14 the benchmark, 8 test_many_handlers, 1 test_gateway_integration
# (python -m ingest), 2 test_identify_budget, 3 test_rest* (no flush: a fresh namespace per test),
# 0 test_interactions, test_cache and test_cache_process, 4 test_commands*, 15 test_deploy and
# test_interactions_lane: all 16 are taken, so these share, each flushing or prefixing what it
# uses (files run one after another in a run; side by side they would need their own Redis).
# Take a free one for a new file and add it here.


@pytest.fixture
def redis_server() -> str:
    """Base URL of the shared Redis (add ``/<db>``); each test file keeps to its own db."""
    require_broker("redis")
    return REDIS_URL


@pytest.fixture
def rabbitmq_url() -> str:
    require_broker("rabbitmq")
    return RABBITMQ_URL


@pytest.fixture
def unique_event() -> str:
    """An event name no one else uses, so its queue ``discord.<name>`` is this test's alone."""
    return f"TEST_{uuid.uuid4().hex[:10].upper()}"


@pytest.fixture(autouse=True)
def _loggers_enabled() -> None:
    """Celery's in-process worker set-up disables existing loggers; later tests log again."""
    for logger in logging.Logger.manager.loggerDict.values():
        if isinstance(logger, logging.Logger):
            logger.disabled = False


@pytest.fixture
def record() -> Iterator[Record]:
    """An empty record of the recorder app (``tests.apps.recorder``) on the shared Redis; give
    a worker ``record.env()``."""
    require_broker("redis")
    found = Record(redis_url(RECORD_DB), f"{uuid.uuid4().hex}:")
    yield found
    found.clear()
    found.close()


MEASURED = "measured"


@pytest.fixture
def measured(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Report a count a test measured: printed under "measured" at the end of every run (a
    fault test's numbers are its evidence, and ``-s`` is not how CI runs)."""

    def add(line: str) -> None:
        request.node.user_properties.append((MEASURED, line))

    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [
        f"{report.nodeid}: {value}"
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == MEASURED
    ]
    if lines:
        terminalreporter.write_sep("-", "measured")
        for line in lines:
            terminalreporter.write_line(line)
