"""Two MESSAGE_CREATE handlers of one module: one inline, one on a queue of its own."""

from ingest.handlers import current_event
from ingest.models import MessageCreate
from tests.handler_app import key, notify, on, record

HEAVY_QUEUE = "handler_app.heavy"


@on("MESSAGE_CREATE")
def audit(message: MessageCreate) -> None:
    store = record()
    store.sadd(key("audit"), message.id)
    store.incr(key("audit:runs"))
    store.rpush(key("order"), f"audit:{message.id}")
    if message.content.startswith("notify"):
        notify.delay(message.id)


@on("MESSAGE_CREATE", queue=HEAVY_QUEUE)
def index(message: MessageCreate) -> None:
    store = record()
    store.sadd(key("index"), message.id)
    store.incr(key("index:runs"))
    store.hset(key("index:sequence"), str(message.id), str(current_event().sequence))
