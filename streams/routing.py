"""Which input partition owns a user: the home partition, where the user's window lives, whatever the producer did.

A user's Table state lives in the changelog partition of one input partition, so all of the user's events must be
folded there. Producers do not agree on where a key goes: Java clients, Faust and `domaintok produce` hash keys
with murmur2, librdkafka clients (kcat, confluent-kafka in Python, Go, .NET, C/C++) with CRC32 by default, and any
client may pick partitions itself. The home partition is the murmur2 one (Kafka's Java default); an event read on
another partition is forwarded to its home partition by the tokenizer worker (streams/tokenizer_agent.py), with
the `domaintok-forwarded-from` header naming where it was first read, so that a replayed forward is never counted
twice.
"""

from __future__ import annotations

import time
from functools import lru_cache

from aiokafka.partitioner import murmur2


def home_partition(key: bytes, partitions: int) -> int:
    """The partition a murmur2 (Java default) partitioner gives `key` among `partitions`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class HomePartitions:
    """`home(key)` for a topic of `partitions` partitions, cached per key (murmur2 is pure Python here)."""

    def __init__(self, partitions: int, cache_size: int = 1 << 17) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self.partitions = partitions
        self._home = lru_cache(maxsize=cache_size)(lambda key: home_partition(key, partitions))

    def __call__(self, key: bytes) -> int:
        return self._home(key)


def format_origin(partition: int, offset: int) -> bytes:
    """The `domaintok-forwarded-from` header value: where the event was first read (`partition/offset`)."""
    return f"{partition}/{offset}".encode()


def parse_origin(value: str) -> tuple[int, int]:
    """(partition, offset) of a `domaintok-forwarded-from` header value; ValueError when malformed."""
    partition, sep, offset = value.partition("/")
    if not sep or not partition.isdigit() or not offset.isdigit():
        raise ValueError(f"domaintok-forwarded-from header {value[:60]!r} is not '<partition>/<offset>'")
    return int(partition), int(offset)


class RateLimitedWarning:
    """Counts occurrences and lets one line through per `every` seconds (the first at once) with the count since."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._last = -float("inf")
        self._pending = 0

    def add(self, count: int, now: float | None = None) -> int | None:
        """Add `count`; returns the count to report when a line is due, else None."""
        self._pending += count
        now = time.monotonic() if now is None else now
        if self._pending and now - self._last >= self.every:
            self._last = now
            due, self._pending = self._pending, 0
            return due
        return None
