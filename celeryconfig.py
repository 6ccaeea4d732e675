"""Celery settings for ``celery -A tasks worker`` (flat, lowercase, read by config_from_object).

The broker comes from the environment like the gateway's: CELERY_BROKER_URL, then REDIS_URL,
then the embedded Redis both processes share. Set CELERY_TASK_ALWAYS_EAGER=1 in tests.
Every module-level name without a leading underscore is a setting (``celery report`` lists them).
"""

import os as _os
import sys as _sys
from collections.abc import Callable as _Callable
from typing import TypeVar as _TypeVar

from ingest.brokers import broker_url_from_env as _broker_url_from_env
from ingest.brokers import redis_tls_options as _redis_tls_options
from ingest.errors import ConfigError as _ConfigError

_T = _TypeVar("_T")


def _setting(read: _Callable[[], _T]) -> _T:
    # Bad configuration ends the worker as it ends the gateway: one line, exit 2, instead of
    # a traceback from inside Celery's config import.
    try:
        return read()
    except _ConfigError as exc:
        print(f"discord-ingest: {exc}", file=_sys.stderr)
        raise SystemExit(2) from None


task_always_eager = _os.environ.get("CELERY_TASK_ALWAYS_EAGER", "").lower() in {"1", "true", "yes"}
task_eager_propagates = task_always_eager

# Importing this module never starts the embedded broker (tests import the app); a booting
# worker starts it (ingest.handlers, on celeryd_init), as does the gateway.
broker_url = _broker_url_from_env(_os.environ, start=False)
broker_connection_retry_on_startup = True

# rediss:// (Heroku Redis: self-signed certificate) is read as the gateway reads it: any
# spelling of ssl_cert_reqs, ssl_ca_certs; bare rediss:// is unverified TLS, warned once.
broker_use_ssl = _setting(lambda: _redis_tls_options(broker_url))
redis_backend_use_ssl = broker_use_ssl


def _worker_concurrency() -> int:
    # Procfile hosts report the host's CPUs on a small dyno; Celery's default (one child per
    # CPU) then runs out of memory. Heroku sets WEB_CONCURRENCY per dyno size.
    for name in ("CELERY_WORKER_CONCURRENCY", "WEB_CONCURRENCY"):
        value = _os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise _ConfigError(f"{name}={value!r} must be a positive whole number")
            return int(value)
    return 2


# --concurrency on the command line still wins.
worker_concurrency = _setting(_worker_concurrency)
# The worker's own publishing (a handler's .delay()) holds at most one connection per pool
# slot: bounded by the concurrency, so the connection budget in the README holds.
broker_pool_limit = worker_concurrency

# The gateway writes JSON only; refusing pickle keeps a bad message from running code.
accept_content = ["json"]
task_serializer = "json"

# Handlers return nothing anyone waits for.
result_backend = None
task_ignore_result = True

# Also set on EventTask; repeated here for tasks that are not event handlers.
task_acks_late = True
task_reject_on_worker_lost = True

_visibility_timeout = int(_os.environ.get("INGEST_VISIBILITY_TIMEOUT", "3600"))

broker_transport_options = {
    # Redis only: an unacked message returns to its queue after this long. It must exceed the
    # longest handler run (plus its ETA, if any), or a slow handler's event runs twice.
    # One hour leaves room for handlers that take minutes; lower it only with short handlers.
    # It is also how long a message a worker held when it lost Redis waits to run again.
    "visibility_timeout": _visibility_timeout,
    # Workers sweep for such messages every interval x throttle seconds (kombu: 10 x 10) under
    # a mutex that outlives a dead sweeper by unacked_mutex_expire (kombu: 300 s). Scale both
    # with a short visibility timeout, or it would be the sweep, not the timeout, that waits.
    "unacked_restore_interval": max(1, min(10, _visibility_timeout // 10)),
    "unacked_restore_throttle": 1 if _visibility_timeout < 1000 else 10,
    "unacked_mutex_expire": min(300, _visibility_timeout),
    "socket_timeout": 10,
    "socket_connect_timeout": 10,
    "socket_keepalive": True,
    "retry_on_timeout": False,
}

# With acks_late each prefetched message is held unacked; keep few per process so a lost
# worker returns little, while still hiding the broker round trip.
worker_prefetch_multiplier = 4
# Off: after a reconnect Celery would shrink the prefetch count and grow it back with one
# basic.qos per ack, sent from whichever thread acks. With the threads pool on RabbitMQ those
# threads share one py-amqp connection, wait for each other's qos-ok and the worker hangs
# for good after a broker restart (seen with stop_app/start_app). The full prefetch from the
# start is what a worker without that feature does anyway.
worker_enable_prefetch_count_reduction = False

# Heroku sends SIGTERM with 30 s to go; with REMAP_SIGTERM=SIGQUIT the worker gets a soft
# shutdown: running handlers get this long to finish, then their messages are requeued.
worker_soft_shutdown_timeout = 20.0
worker_enable_soft_shutdown_on_idle = True

worker_hijack_root_logger = True
worker_redirect_stdouts = True
