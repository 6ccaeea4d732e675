"""A MESSAGE_CREATE handler in a second module that fails once on messages saying "flaky"."""

from ingest.handlers import current_event
from ingest.models import MessageCreate
from tests.handler_app import key, on, record


class Flaky(Exception):
    """A transient failure: the handler asks Celery to retry it."""


@on("MESSAGE_CREATE", autoretry_for=(Flaky,), max_retries=3)
def flaky(message: MessageCreate) -> None:
    store = record()
    attempts = store.hincrby(key("flaky:attempts"), str(message.id), 1)
    store.rpush(key("order"), f"flaky:{message.id}")
    if message.content.startswith("flaky") and attempts == 1:
        raise Flaky(f"first attempt at {message.id}")
    store.sadd(key("flaky"), message.id)
    store.incr(key("flaky:runs"))
    store.hset(key("flaky:sequence"), str(message.id), str(current_event().sequence))
