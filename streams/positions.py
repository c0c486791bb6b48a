"""The tokenizer's own input positions: per input partition, the offset of the newest event folded into the Table.

Why: Faust's committed offsets are not a safe resume point. After a restart with a backlog, its recovery can hand
the agent events that start past the committed offset (faust-streaming issue 596: in-memory queues cleared while
the fetcher already moved on) and then commit over the hole (its gap bookkeeping treats missing offsets as
compacted). The per-user replay check (StoredWindow.offset) would then make such a skip permanent. So the resume
point lives in the Table, written in the same changelog flush as the windows (before the batch is acked):

- an event at the stored position + 1 is processed; one at or below it is a replay and skipped;
- one further on means events were skipped: it is dropped and the partition is sought back to position + 1.

Each position is stored under a key that murmur2-partitions to its own input partition, so it shares the
changelog partition of that partition's windows and moves with it on a rebalance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, MutableMapping, Sequence
from typing import Protocol

from aiokafka.partitioner import murmur2

KEY_PREFIX = b"\x00domaintok-position:"  # a NUL first byte: no user id (UTF-8 text key) starts with it


class _Positioned(Protocol):
    partition: int
    offset: int


def position_key(partition: int, partitions: int) -> bytes:
    """The Table key of `partition`'s position: the first `KEY_PREFIX + "p:i"` that murmur2 maps to `partition`."""
    prefix = KEY_PREFIX + f"{partition}:".encode()
    for i in range(1_000_000):
        key = prefix + str(i).encode()
        if (murmur2(key) & 0x7FFFFFFF) % partitions == partition:
            return key
    raise AssertionError(f"no position key for partition {partition} of {partitions}")  # pragma: no cover


@dataclasses.dataclass
class Screened:
    """One batch after the position check."""

    keep: list  # messages to process, in arrival order
    replayed: int = 0  # at or below the stored position: already in the Table
    replays: list = dataclasses.field(default_factory=list)  # those messages (their users' windows are re-sent)
    dropped: int = 0  # past a hole: dropped, the partition is sought back
    seeks: dict[int, int] = dataclasses.field(default_factory=dict)  # partition -> offset to seek to
    arrived: dict[int, int] = dataclasses.field(default_factory=dict)  # partition -> offset that came instead
    accepted_holes: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (partition, from, to)
    # holes the broker says hold records, sought again: (partition, from, to)
    present_holes: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Seek:
    target: int
    count: int
    at: float


class PositionGuard:
    """Screens each batch against the stored positions and records the new ones after processing.

    A hole still there `retry_after` seconds after the seek back over it is either offsets that do not exist in
    the log (transaction markers, compaction, retention) or a seek that did not take. With `first_offset` (the
    offset of the first record at or after a given one on the broker, None when it cannot tell) the guard asks the
    broker: the hole is accepted exactly when none of its offsets exist, else it seeks again, for as long as it
    takes (events that exist are never given up). Without it, a hole that survives `max_seeks` seeks is accepted.
    Either way an accepted hole is reported.
    """

    def __init__(self, table: MutableMapping[bytes, bytes], partitions: int, *, retry_after: float = 2.0,
                 max_seeks: int = 3, first_offset: Callable[[int, int], int | None] | None = None) -> None:
        self.table = table
        self.keys = [position_key(p, partitions) for p in range(partitions)]
        self.retry_after = retry_after
        self.max_seeks = max_seeks
        self.first_offset = first_offset
        self._seeks: dict[int, _Seek] = {}

    def stored(self, partition: int) -> int | None:
        raw = self.table.get(self.keys[partition])
        return None if raw is None else int(raw)

    def screen(self, messages: Sequence[_Positioned], now: float) -> Screened:
        out = Screened(keep=[])
        expect: dict[int, int | None] = {}
        blocked: set[int] = set()
        for msg in messages:
            p = msg.partition
            if p not in expect:
                pos = self.stored(p)
                expect[p] = None if pos is None else pos + 1
            nxt = expect[p]
            if p in blocked:
                out.dropped += 1
                continue
            if nxt is not None and msg.offset < nxt:
                out.replayed += 1
                out.replays.append(msg)
                continue
            if nxt is not None and msg.offset > nxt and not self._give_up(p, nxt, msg.offset, now, out):
                out.arrived.setdefault(p, msg.offset)
                blocked.add(p)
                out.dropped += 1
                continue
            self._seeks.pop(p, None)
            out.keep.append(msg)
            expect[p] = msg.offset + 1
        return out

    def _give_up(self, p: int, nxt: int, got: int, now: float, out: Screened) -> bool:
        """True when the hole nxt..got-1 is to be accepted; otherwise arranges a seek back to `nxt`."""
        seek = self._seeks.get(p)
        if seek is None or seek.target != nxt:
            self._seeks[p] = _Seek(nxt, 1, now)
            out.seeks[p] = nxt
            return False
        if now - seek.at < self.retry_after:
            return False  # events fetched before the seek are still draining
        if self.first_offset is not None:
            first = self.first_offset(p, nxt)
            absent = first is not None and first >= got  # nothing in nxt..got-1 exists on the broker
            if not absent:
                out.present_holes.append((p, nxt, got - 1))
        else:
            absent = seek.count >= self.max_seeks
        if absent:
            del self._seeks[p]
            out.accepted_holes.append((p, nxt, got - 1))
            return True
        seek.count += 1
        seek.at = now
        out.seeks[p] = nxt
        return False

    def record(self, kept: Sequence[_Positioned]) -> None:
        """Store the newest processed offset per partition (after the windows: same changelog partition, later)."""
        newest: dict[int, int] = {}
        for msg in kept:
            newest[msg.partition] = max(msg.offset, newest.get(msg.partition, -1))
        for p, offset in newest.items():
            self.table[self.keys[p]] = str(offset).encode()
