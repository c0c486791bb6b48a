"""The offset a tokenizer commits after the position guard seeks (pure logic, Faust's own commit computation).

Faust commits the end of the first run of consecutive acked offsets, after merging recorded gaps into them. Two
cases stalled a partition's commits while its lag grew (every later restart replayed more):
- the guard seeks forward of the committed offset (to its stored position + 1): the offsets in between, already
  folded into the Table, are never delivered again, so no run starts at the committed offset;
- a recorded gap that also holds acked offsets (the first record after a hole, and every record re-read after a
  seek back into the hole): the merge left duplicates, and each commit advanced to the next duplicate only.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP
from intervaltree import IntervalTree

from streams.fast_consumer import GapSafeOffsets

TOPIC_PARTITION = TP("events", 6)


class _Bookkeeping:
    """The commit bookkeeping of a Faust consumer, without a broker: its own ack/gap/new-offset methods."""

    _new_offset = FaustConsumer._new_offset
    _add_gap = FaustConsumer._add_gap

    def __init__(self, committed: int) -> None:
        self._acked = defaultdict(list)
        self._acked_index = defaultdict(set)
        self._gap = defaultdict(IntervalTree)
        self._committed_offset = defaultdict(lambda: None)
        self._committed_offset[TOPIC_PARTITION] = committed

    def ack(self, offsets) -> None:
        """Consumer.ack's bookkeeping for each offset (only offsets at or past the committed one count)."""
        tp = TOPIC_PARTITION
        for offset in offsets:
            if offset >= self._committed_offset[tp] and offset not in self._acked_index[tp]:
                self._acked_index[tp].add(offset)
                self._acked[tp].append(offset)

    def commits(self, rounds: int = 3) -> list[int | None]:
        """What `rounds` successive commit intervals would commit."""
        out = []
        for _ in range(rounds):
            offset = self._new_offset(TOPIC_PARTITION)
            if offset is not None:
                self._committed_offset[TOPIC_PARTITION] = offset
            out.append(offset)
        return out


class _GapSafe(GapSafeOffsets, _Bookkeeping):
    """The same bookkeeping with the project's consumer mix-in (BatchConsumer and GapSafeConsumer use it)."""


def test_seek_forward_of_the_committed_offset_lets_commits_pass_the_settled_offsets():
    # committed 4674, the Table holds up to 4901 (the batches after the last commit), the first records delivered
    # after the restart start past 4902: the guard seeks to 4902, and 4674..4901 never come back
    old, new = _Bookkeeping(4674), _GapSafe(4674)
    for consumer in (old, new):
        consumer.ack(range(5000, 5100))  # the batch the guard dropped (acked as delivered)
        consumer.ack(range(4902, 5300))  # re-read after the seek
    asyncio.run(new.settle_before(TOPIC_PARTITION, 4902))
    assert old.commits() == [None, None, None]  # stalled at 4674 for good
    assert new.commits()[0] == 5300


def test_a_gap_that_also_holds_acked_offsets_commits_in_one_step():
    # the fetcher skipped 4902..4999 (a gap is recorded up to and including 5000, the first record after the
    # hole); the guard seeks back to 4902 and everything from there is delivered and acked
    old, new = _Bookkeeping(4674), _GapSafe(4674)
    for consumer in (old, new):
        consumer.ack(range(4674, 4902))
        asyncio.run(consumer._add_gap(TOPIC_PARTITION, 4902, 5000))
        consumer.ack(range(5000, 5100))
        consumer.ack(range(4902, 5300))
    assert old.commits() == [4903, 4904, 4905]  # one offset per commit interval
    assert new.commits() == [5300, None, None]


def test_settling_below_the_committed_offset_changes_nothing():
    consumer = _GapSafe(1000)
    asyncio.run(consumer.settle_before(TOPIC_PARTITION, 900))
    consumer.ack(range(1000, 1010))
    assert consumer.commits(1) == [1010]
