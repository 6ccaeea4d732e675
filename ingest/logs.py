"""Logging set-up for the gateway process: text or JSON lines, secrets scrubbed from every line,
and warnings a peer can provoke rate-limited so a flood of bad payloads cannot fill the disk.
A Celery worker gets the same JSON lines through Celery's logging signals.

The code never logs the token; the scrubbing filter is the second lock on that door.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

REDACTED: Final = "[REDACTED]"
# Warnings of one kind (one format string) logged per period before the rest are only counted.
DEFAULT_BURST: Final = 20
DEFAULT_PERIOD_SECONDS: Final = 60.0


class RedactingFilter(logging.Filter):
    """Replaces every secret in a record's message, exception and stack text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s and len(s) >= 8]

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: let the handler report it
            return True
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            # Format once here so the formatter prints our scrubbed copy, never the original.
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and exc, when there is one).

    ``context`` adds fields per record (a worker adds the running task's name and id).
    """

    def __init__(self, context: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__()
        self._context = context

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._context is not None:
            entry.update(self._context())
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str, secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # websockets logs every frame at DEBUG, IDENTIFY (and its token) included.
    logging.getLogger("websockets").setLevel(max(logging.INFO, root.level))


def log_format_from_env(env: Mapping[str, str]) -> str:
    return env.get("INGEST_LOG_FORMAT", "text").strip().lower() or "text"


def _task_context() -> dict[str, Any]:
    from celery import current_task  # type: ignore[import-untyped]

    task = current_task  # a proxy: falsy outside a task
    if not task or task.request.id is None:
        return {}
    return {"task_name": task.name, "task_id": task.request.id}


def _json_for_celery(logger: logging.Logger, **_: Any) -> None:
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter(_task_context))


def connect_worker_logging() -> None:
    """With ``INGEST_LOG_FORMAT=json``, make a Celery worker's log lines the gateway's JSON.

    Celery builds its own handlers when the worker boots, then fires these signals; swapping
    the formatters there keeps its levels, files and stdout redirection as they are.
    """
    if log_format_from_env(os.environ) != "json":
        return
    from celery.signals import (  # type: ignore[import-untyped]
        after_setup_logger,
        after_setup_task_logger,
    )

    after_setup_logger.connect(_json_for_celery, weak=False)
    after_setup_task_logger.connect(_json_for_celery, weak=False)


# ---------------------------------------------------------------------------------------------
# Rate-limited warnings


@dataclass(slots=True)
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


class RateLimitedLogger:
    """Logs the first ``burst`` records of each kind (format string) per ``period``, then only
    counts them: one line says suppression started, and the next record of that kind after the
    period first logs ``suppressed K similar warnings``. At most ``burst + 2`` lines per kind
    per period, whatever a peer sends."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = DEFAULT_BURST,
        period: float = DEFAULT_PERIOD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self.suppressed_total = 0

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: object) -> None:
        self.log(logging.ERROR, msg, *args)

    def log(self, level: int, msg: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = self._clock()
        with self._lock:
            window = self._windows.get(msg)
            summary = 0
            if window is None or now - window.started >= self.period:
                summary = window.suppressed if window is not None else 0
                window = self._windows[msg] = _Window(now)
            if window.logged < self.burst:
                window.logged += 1
                emit, announce = True, False
            else:
                window.suppressed += 1
                self.suppressed_total += 1
                emit, announce = False, window.suppressed == 1
            remaining = window.started + self.period - now
        # stacklevel 2: the line that asked for the warning, not this helper.
        if summary:
            self.logger.log(
                level,
                "suppressed %d similar warnings in the last %.0f s (%s)",
                summary,
                self.period,
                _kind(msg),
                stacklevel=2,
            )
        if emit:
            self.logger.log(level, msg, *args, stacklevel=2)
        elif announce:
            self.logger.log(
                level,
                "more than %d warnings like this in %.0f s; counting the rest for %.0f s: %s",
                self.burst,
                self.period,
                remaining,
                _kind(msg),
                stacklevel=2,
            )

    def flush(self) -> None:
        """Log what is still only counted (e.g. at shutdown)."""
        with self._lock:
            pending = [(msg, w.suppressed) for msg, w in self._windows.items() if w.suppressed]
            for msg, _ in pending:
                self._windows[msg].suppressed = 0
        for msg, count in pending:
            self.logger.warning(
                "suppressed %d similar warnings in the last %.0f s (%s)",
                count,
                self.period,
                _kind(msg),
            )


def _kind(msg: str) -> str:
    return msg.split("%", 1)[0].strip().rstrip(":") or msg


_throttled: dict[str, RateLimitedLogger] = {}
_throttled_lock = threading.Lock()


def throttled(logger: logging.Logger) -> RateLimitedLogger:
    """The process-wide rate-limited view of ``logger`` (one budget per format string, shared
    by every shard, so N shards under attack still write a bounded number of lines)."""
    with _throttled_lock:
        limited = _throttled.get(logger.name)
        if limited is None:
            limited = _throttled[logger.name] = RateLimitedLogger(logger)
        return limited


def suppressed_warnings() -> int:
    """Warnings counted instead of logged since start, across every throttled logger."""
    with _throttled_lock:
        return sum(limited.suppressed_total for limited in _throttled.values())


def flush_throttled() -> None:
    with _throttled_lock:
        limited = list(_throttled.values())
    for one in limited:
        one.flush()
