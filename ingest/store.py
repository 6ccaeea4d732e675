"""Where sessions survive the process: session id, committed sequence, resume URL, per shard.

Redis when one is reachable (every gateway process and ``python -m ingest status`` see the same
state), else one small JSON file per shard, written atomically.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol

from ingest.brokers import async_redis, is_redis_url
from ingest.session import SessionState

log = logging.getLogger("ingest.store")

KEY_PREFIX = "ingest:session"
# Per shard, a line for `python -m ingest status` about a shard that cannot get going.
PROBLEM_PREFIX = "ingest:problem"


class SessionStore(Protocol):
    async def load(self, shard_id: int, shard_count: int) -> SessionState | None: ...

    async def save(self, states: Sequence[SessionState]) -> None: ...

    async def forget(self, shard_id: int, shard_count: int) -> None:
        """The shard's session is dead (or deliberately ended): nothing may resume it."""

    async def load_all(self) -> list[SessionState]: ...

    async def report_problem(self, shard_id: int, shard_count: int, problem: str | None) -> None:
        """Record (or, with None, clear) what keeps the shard from getting a session."""

    async def load_problems(self) -> dict[str, str]:
        """``"<shard>/<count>"`` -> the problem last reported for it."""

    async def close(self) -> None: ...


def _optional_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _encode(state: SessionState) -> str:
    return json.dumps(asdict(replace(state, saved_at=time.time())))


def _decode(raw: str | bytes) -> SessionState | None:
    try:
        data: dict[str, Any] = json.loads(raw)
        return SessionState(
            session_id=str(data["session_id"]),
            sequence=None if data.get("sequence") is None else int(data["sequence"]),
            resume_url=data.get("resume_url"),
            shard_id=int(data.get("shard_id", 0)),
            shard_count=int(data.get("shard_count", 1)),
            epoch=str(data.get("epoch") or ""),
            heartbeat_latency=_optional_float(data.get("heartbeat_latency")),
            saved_at=_optional_float(data.get("saved_at")),
        )
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable stored session")
        return None


class RedisSessionStore:
    def __init__(self, url: str, prefix: str = KEY_PREFIX) -> None:
        self._redis = async_redis(url, socket_timeout=5, socket_connect_timeout=5)
        self._prefix = prefix
        # Outside "<prefix>:*", which load_all() reads as sessions.
        self._problems = PROBLEM_PREFIX if prefix == KEY_PREFIX else f"{prefix}-problems"

    async def report_problem(self, shard_id: int, shard_count: int, problem: str | None) -> None:
        if problem is None:
            await self._redis.hdel(self._problems, f"{shard_id}/{shard_count}")
        else:
            await self._redis.hset(self._problems, f"{shard_id}/{shard_count}", problem)

    async def load_problems(self) -> dict[str, str]:
        raw: dict[bytes | str, bytes | str] = await self._redis.hgetall(self._problems)
        return {_text(k): _text(v) for k, v in raw.items()}

    def _key(self, shard_id: int, shard_count: int) -> str:
        return f"{self._prefix}:{shard_count}:{shard_id}"

    async def load(self, shard_id: int, shard_count: int) -> SessionState | None:
        raw = await self._redis.get(self._key(shard_id, shard_count))
        return None if raw is None else _decode(raw)

    async def save(self, states: Sequence[SessionState]) -> None:
        if not states:
            return
        pipe = self._redis.pipeline(transaction=False)
        for state in states:
            pipe.set(self._key(state.shard_id, state.shard_count), _encode(state))
        await pipe.execute()

    async def forget(self, shard_id: int, shard_count: int) -> None:
        await self._redis.delete(self._key(shard_id, shard_count))

    async def load_all(self) -> list[SessionState]:
        states = []
        async for key in self._redis.scan_iter(match=f"{self._prefix}:*"):
            raw = await self._redis.get(key)
            state = None if raw is None else _decode(raw)
            if state is not None:
                states.append(state)
        return sorted(states, key=lambda s: (s.shard_count, s.shard_id))

    async def close(self) -> None:
        await self._redis.aclose()


class FileSessionStore:
    """One file per shard, so processes running different shard ranges never clobber each other."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def _problem_path(self, shard_id: int, shard_count: int) -> Path:
        return self._dir / f"problem-{shard_id}-of-{shard_count}.txt"

    async def report_problem(self, shard_id: int, shard_count: int, problem: str | None) -> None:
        path = self._problem_path(shard_id, shard_count)
        if problem is None:
            path.unlink(missing_ok=True)
        else:
            self._dir.mkdir(parents=True, exist_ok=True)
            path.write_text(problem)

    async def load_problems(self) -> dict[str, str]:
        problems = {}
        for path in sorted(self._dir.glob("problem-*-of-*.txt")):
            shard_id, _, shard_count = path.stem[len("problem-") :].partition("-of-")
            problems[f"{shard_id}/{shard_count}"] = path.read_text()
        return problems

    def _path(self, shard_id: int, shard_count: int) -> Path:
        return self._dir / f"session-{shard_id}-of-{shard_count}.json"

    async def load(self, shard_id: int, shard_count: int) -> SessionState | None:
        path = self._path(shard_id, shard_count)
        try:
            return _decode(path.read_text())
        except FileNotFoundError:
            return None

    async def save(self, states: Sequence[SessionState]) -> None:
        if states:
            await asyncio.to_thread(self._write, list(states))

    def _write(self, states: list[SessionState]) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        for state in states:
            target = self._path(state.shard_id, state.shard_count)
            fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".session-")
            with os.fdopen(fd, "w") as handle:
                handle.write(_encode(state))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)

    async def forget(self, shard_id: int, shard_count: int) -> None:
        self._path(shard_id, shard_count).unlink(missing_ok=True)

    async def load_all(self) -> list[SessionState]:
        states = []
        for path in sorted(self._dir.glob("session-*-of-*.json")):
            state = _decode(path.read_text())
            if state is not None:
                states.append(state)
        return sorted(states, key=lambda s: (s.shard_count, s.shard_id))

    async def close(self) -> None:
        return None


def store_for(state_url: str | None, broker_url: str, data_dir: Path) -> SessionStore:
    """Redis if the state URL or the broker is Redis; a file in ``data_dir`` otherwise."""
    url = state_url or broker_url
    if is_redis_url(url):
        return RedisSessionStore(url)
    if state_url and state_url.startswith("file://"):
        return FileSessionStore(Path(state_url[len("file://") :]))
    return FileSessionStore(data_dir / "sessions")
