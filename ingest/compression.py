"""Transport decompression for the gateway: one context per connection, bounded output.

Discord's ``zlib-stream`` sends one deflate stream per connection, each message ending with
``00 00 ff ff``; a message may span frames. Output is inflated in bounded steps so a
decompression bomb is refused before it can use the memory it asks for.
"""

from __future__ import annotations

import enum
import zlib
from typing import Protocol

from ingest.protocol import ZLIB_SUFFIX


class Compression(enum.Enum):
    NONE = "none"
    ZLIB_STREAM = "zlib-stream"
    ZSTD_STREAM = "zstd-stream"


# Output is produced at most this much at a time, so memory tracks what was really inflated.
INFLATE_STEP = 1 << 20


class DecompressionError(Exception):
    """The stream is corrupt or a message is too large; the connection cannot continue."""


class Inflater(Protocol):
    def feed(self, frame: bytes) -> bytes | None:
        """Return a whole decompressed message, or None while a message is still incomplete."""


class ZlibStreamInflater:
    def __init__(self, max_message_bytes: int, max_buffered_bytes: int) -> None:
        self._inflate = zlib.decompressobj()
        self._buffer = bytearray()
        self._max_message = max_message_bytes
        self._max_buffered = max_buffered_bytes

    def feed(self, frame: bytes) -> bytes | None:
        self._buffer += frame
        if len(self._buffer) > self._max_buffered:
            raise DecompressionError(f"compressed message exceeds {self._max_buffered} bytes")
        if not self._buffer.endswith(ZLIB_SUFFIX):
            return None
        data = bytes(self._buffer)
        self._buffer.clear()
        try:
            # Inflate in bounded steps: a small frame must not expand to GBs, and asking zlib
            # for all of max_message at once would let it build that much twice over.
            piece = self._inflate.decompress(data, INFLATE_STEP)
            if len(piece) < INFLATE_STEP and not self._inflate.unconsumed_tail:
                return piece  # the common case: one step, no copies
            out = bytearray(piece)
            while True:
                tail = self._inflate.unconsumed_tail
                piece = self._inflate.decompress(tail, INFLATE_STEP)
                out += piece
                if len(out) > self._max_message:
                    raise DecompressionError(
                        f"decompressed message exceeds {self._max_message} bytes"
                    )
                if len(piece) < INFLATE_STEP and not self._inflate.unconsumed_tail:
                    return bytes(out)
        except zlib.error as exc:
            raise DecompressionError(f"corrupt zlib stream: {exc}") from None


class _Collect:
    """The sink of a zstd stream writer: refuses output past the message bound as it comes."""

    def __init__(self, limit: int) -> None:
        self.out = bytearray()
        self._limit = limit

    def write(self, data: bytes) -> int:
        self.out += data
        if len(self.out) > self._limit:
            raise DecompressionError(f"decompressed message exceeds {self._limit} bytes")
        return len(data)


class ZstdStreamInflater:
    """zstd-stream: one stream per connection with a flushed block per message (Discord), or one
    complete zstd frame per message (other servers); output comes in ``INFLATE_STEP`` pieces."""

    def __init__(self, max_message_bytes: int, max_buffered_bytes: int) -> None:
        import zstandard  # optional extra

        self._sink = _Collect(max_message_bytes)
        # A stream writer decodes across frame boundaries and hands output over in bounded
        # pieces, so a small bomb is refused after one step past the limit, not after GBs.
        self._inflate = zstandard.ZstdDecompressor().stream_writer(
            self._sink,  # type: ignore[arg-type]  # it only needs write()
            write_size=INFLATE_STEP,
            closefd=False,
        )
        self._max_buffered = max_buffered_bytes

    def feed(self, frame: bytes) -> bytes | None:
        if len(frame) > self._max_buffered:
            raise DecompressionError(f"compressed frame exceeds {self._max_buffered} bytes")
        try:
            self._inflate.write(frame)
        except DecompressionError:
            raise
        except Exception as exc:  # noqa: BLE001 - zstandard.ZstdError; the module is optional
            raise DecompressionError(f"corrupt zstd stream: {exc}") from None
        out = bytes(self._sink.out)
        self._sink.out.clear()
        return out or None


def zstd_available() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def make_inflater(
    compression: Compression, max_message_bytes: int, max_buffered_bytes: int
) -> Inflater | None:
    if compression is Compression.ZLIB_STREAM:
        return ZlibStreamInflater(max_message_bytes, max_buffered_bytes)
    if compression is Compression.ZSTD_STREAM:
        return ZstdStreamInflater(max_message_bytes, max_buffered_bytes)
    return None
