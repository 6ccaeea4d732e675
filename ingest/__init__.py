"""discord-ingest: Discord Gateway events into Celery tasks, one validated task per event type.

``Gateway`` is the in-process client; ``python -m ingest`` is the gateway process.
"""

from ingest.errors import (
    BrokerUnavailable,
    CommandRateLimited,
    ConfigError,
    FatalGatewayError,
    IngestError,
    PayloadTooLarge,
)
from ingest.gateway import Gateway
from ingest.protocol import CloseCode, Intents, Opcode

__all__ = [
    "BrokerUnavailable",
    "CloseCode",
    "CommandRateLimited",
    "ConfigError",
    "FatalGatewayError",
    "Gateway",
    "IngestError",
    "Intents",
    "Opcode",
    "PayloadTooLarge",
]
