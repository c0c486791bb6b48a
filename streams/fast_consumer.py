"""Batch delivery for Faust: a consumer that hands a stream each fetched partition batch at once, and the stream
class whose `take_events` reads those batches. Selected with `DOMAINTOK_CONSUMER=batch` (see streams/app.py).

Why: stock Faust moves every record through `Consumer._drain_messages` (one `wait_first` = four asyncio tasks per
record), the conductor (a lock, flow-control and producer-buffer waits, an Event, a queue put) and the stream's
per-event iterator (processors, sensors, an ack), ~125-140 us of CPU per record (notes/kafka-measurements.md).
Here the drain loop does that work once per fetched partition batch for topics a `BatchStream.take_events` reads;
every other topic (table changelogs during recovery, other agents) keeps the stock per-message path unchanged.

Wiring, all through Faust's own extension points, no module globals touched:
  * `BatchStream` is given as the app's `Stream` setting (`faust.App(..., Stream=BatchStream)`);
  * `BatchTransport` (aiokafka driver, `Consumer = BatchConsumer`) is the app's consumer transport:
    `use_batch_consumer(app)` sets it through the public `App.transport` property; a package can instead
    register it under the `faust.transports` entry point and select it by URL scheme (`broker_consumer`).

Guarantees kept (and tested in tests/streams/test_fast_consumer.py, including a worker joining and leaving):
  * offsets: every delivered record is acked through `Consumer.ack` after the agent resumes the generator
    (never on an exception or close, unlike stock `take_events`), so the committed offset only passes records
    the agent finished, and gaps block commits exactly as in stock Faust;
  * rebalance: queued batches are cleared by `flow_control.clear()` (queues are `clear_on_resume`), the drain
    loop's put is abandoned when the flow is suspended, records of an older consumer generation are dropped
    before they reach the agent, a batch reaches the agent only once the tables are recovered
    (`tables.actives_ready`), and the batch in the agent's hands is tracked as unacked, so the revoke
    handler's `wait_empty()` waits for it before committing (stock Faust does not track it);
  * limits: the fast path is taken only when the stream's channel is one plain topic (no pattern, no
    `active_partitions`) that no other stream consumes; otherwise stock `take_events` runs. Per-event stream
    sensors (`on_stream_event_in/out`, `on_message_in`) are not called on the fast path.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import faust
from faust.transport.consumer import CONSUMER_FETCHING, ensure_TP
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, EventT, Message
from mode.utils.times import want_seconds

__all__ = [
    "BatchConsumer", "BatchConsumerThread", "BatchStream", "BatchTransport", "GapSafeConsumer", "GapSafeOffsets",
    "GapSafeTransport", "use_batch_consumer", "use_gap_safe_consumer",
]


class BatchConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    """The aiokafka consumer thread with a shorter fetch wait than Faust's hard-coded 1,500 ms.

    Why: aiokafka keeps one fetch in flight per broker and leaves out partitions that still have unconsumed
    records; data arriving on those partitions waits until the in-flight fetch returns, which for idle partitions
    is after fetch_max_wait_ms. On a single broker that added up to 1.5 s to the tokenizer's latency.
    """

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        wait_ms = getattr(self.transport, "fetch_max_wait_ms", None)
        if wait_ms is not None:
            consumer._fetch_max_wait_ms = int(wait_ms)  # read when the consumer starts its Fetcher
        return consumer


class GapSafeOffsets:
    """Committed offsets that advance past a gap whose offsets were also acked, and seeks made on the consumer thread
    (`_seek`); mixed into both consumer classes.

    Faust records a hole in the fetched offsets as a gap interval that includes the first offset after the hole,
    and when it computes the offset to commit it appends the gap's offsets to the acked list without removing
    those already acked. The commit then stops at the first duplicate (it takes the first run of consecutive
    numbers), so each commit interval moves the committed offset by one or two. A hole is always followed by
    acks inside it: the first record after it, and, when the position guard seeks back over the hole, every
    record re-read there. One gap seek froze a partition's commits for minutes and made every later restart
    replay more. Here the gap is merged into the acked offsets as a set, so the commit advances to the end of
    the consecutive run at once.
    """

    def _new_offset(self, tp: TP) -> int | None:
        acked = self._acked[tp]
        gap = self._gap.get(tp)
        if acked and gap:
            top = max(acked)
            filled = set(acked)
            for interval in gap.overlap(0, top):
                filled.update(range(interval.begin, interval.end))
            acked[:] = sorted(filled)
            gap.chop(0, max(acked[-1], top) + 1)
        return super()._new_offset(tp)

    async def _seek(self, partition: TP, offset: int) -> None:
        """Seek on the consumer's own thread, where aiokafka lives.

        Why: upstream calls aiokafka's `seek` straight from the agent's thread. That edits the fetcher's record map and
        completes a future of the consumer thread's event loop (uvloop) from outside it, neither of which is thread
        safe: after the position guard sought three partitions at once, the worker fetched nothing more for minutes
        (the rebalance fault test lost 65 events so under CPU load, and 535 in a CI run). The fetcher's `KeyError`
        that `BatchConsumer._drain_messages` retries most likely came from the same race.
        """
        thread = self._thread
        await thread.call_thread(thread.seek, partition, offset)

    async def settle_before(self, tp: TP, offset: int) -> None:
        """Let commits pass every offset below `offset`: the caller holds them as done (the position guard's
        stored position covers them, or they are absent from the log).

        Why: when the guard seeks a partition forward of its committed offset (to its stored position + 1) or
        accepts a hole, the offsets in between are never delivered and acked again, and Faust will not commit
        past an offset that is neither acked nor in a gap: the partition's committed offset would stay where it
        was while its lag grew, and every restart would replay more.
        """
        committed = self._committed_offset.get(tp)
        if committed is not None and offset - 1 >= committed:
            await self._add_gap(tp, committed, offset - 1)


class BatchConsumer(GapSafeOffsets, aiokafka_driver.Consumer):
    """aiokafka-driver consumer that puts whole fetched partition batches into per-topic queues.

    `batch_queue(topic)` registers a topic for batch delivery (called by `BatchStream.take_events`); records of
    other topics go through the stock per-message callback, one `wait_first` per record as upstream.
    """

    #: fetched batches waiting for the stream, per topic: bounds memory (each batch <= max_poll_records)
    batch_queue_maxsize = 8

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch_queues: dict[str, asyncio.Queue] = {}
        # How often each partition (`seek`) and every partition (`perform_seek`) was sought: see `_deliver_at`.
        self._seeks: collections.Counter[TP] = collections.Counter()
        self._seek_rounds = 0

    async def seek(self, partition: TP, offset: int) -> None:
        self._seeks[ensure_TP(partition)] += 1
        await super().seek(partition, offset)

    async def perform_seek(self) -> None:
        self._seek_rounds += 1
        await super().perform_seek()

    def _new_consumer_thread(self) -> BatchConsumerThread:
        return BatchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def batch_queue(self, topic: str) -> asyncio.Queue:
        """The queue of `list[Message]` batches for `topic` (created on first call; cleared on rebalance)."""
        queue = self._batch_queues.get(topic)
        if queue is None:
            queue = self.app.FlowControlQueue(maxsize=self.batch_queue_maxsize, clear_on_resume=True)
            self._batch_queues[topic] = queue
        return queue

    def track_batch(self, messages: Sequence[Message]) -> None:
        """Mark a batch as in progress, so a revoke waits (`wait_empty`) until the agent acked it."""
        self._unacked_messages.update(messages)

    async def _fresh_records(self, tp: TP, records: list) -> list:
        """Records at or after the read offset (as upstream), recording gaps so commits cannot skip over them."""
        r_offset = self._read_offset[tp]
        out = records if r_offset is None else [r for r in records if r.offset >= r_offset]
        if out and r_offset:
            first = out[0].offset
            if first - r_offset > 1 and self.app.topics.acks_enabled_for(tp.topic):
                await self._add_gap(tp, r_offset + 1, first)
            prev = first
            for r in out[1:]:  # compacted topics / transaction markers leave holes inside a batch too
                if r.offset - prev > 1 and self.app.topics.acks_enabled_for(tp.topic):
                    await self._add_gap(tp, prev + 1, r.offset)
                prev = r.offset
        return out

    async def _deliver_batch(self, queue: asyncio.Queue, messages: list) -> None:
        await self.app.flow_control.acquire()
        await self.app.producer.buffer.wait_until_ebb()
        # with the time it arrived: take_events' `within` runs from the oldest record's arrival (see _collect)
        await queue.put((time.monotonic(), messages))

    async def _deliver_at(self, tp: TP, queue: asyncio.Queue, messages: list) -> None:
        """Queue `messages` (all of `tp`) for the stream, then move `tp`'s read offset past them, unless `tp` was
        sought while the put waited.

        Why: the put waits whenever the stream is behind (a full queue, flow control), and meanwhile the agent can
        seek `tp` back (the position guard over a hole). Setting the read offset to this batch's end after such a
        seek (as upstream's loop does) made the drain loop drop every re-fetched record below it as already read:
        the hole the seek was meant to fill stayed open until the guard sought again.
        """
        sought = (self._seek_rounds, self._seeks[tp])
        await self.wait_first(self._deliver_batch(queue, messages), self.suspend_flow.wait())
        if (self._seek_rounds, self._seeks[tp]) == sought:
            self._read_offset[tp] = messages[-1].offset

    async def _deliver_each(self, tp: TP, messages: list) -> None:
        """Stock per-message delivery (conductor callback), as upstream's drain loop does it."""
        callback = self.callback
        set_read_offset = self._read_offset.__setitem__
        for n, message in enumerate(messages):
            if not self.flow_active:
                return
            if n and not n % 100:
                await asyncio.sleep(0)
            await self.wait_first(callback(message), self.suspend_flow.wait())
            set_read_offset(tp, message.offset)

    async def _drain_messages(self, fetcher: Any) -> None:  # noqa: C901 - mirrors upstream's loop
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        to_message = self._to_message
        app = self.app
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                try:
                    records, active = await self._wait_next_records(1.0)
                except KeyError as exc:
                    # aiokafka's fetched_records races a reassignment (its record map loses a partition mid-loop).
                    # Fetch again: records skipped this way surface as a hole that the worker's
                    # position guard (streams/positions.py) seeks back over, so nothing is lost.
                    self.log.warning("fetch raced a rebalance, fetching again: %r", exc)
                    continue
                await self.sleep(0)
                if records is None or self.should_stop:
                    continue
                if not self.flow_active:
                    # As upstream getmany: back to the committed offsets. Mid-rebalance a partition can already be
                    # gone (IllegalStateError "No current assignment"); upstream logs that and goes on, and so do
                    # we: the new assignment seeks on its own, and letting it escape crashed the Fetcher.
                    try:
                        await self.perform_seek()
                    except Exception as exc:  # noqa: BLE001 - same handling as upstream
                        self.log.warning("exception performing seek when flow not active: %r", exc)
                    continue
                generation = app.consumer_generation_id
                for tp, recs in records.items():
                    if not self.flow_active or app.consumer_generation_id != generation:
                        break
                    if active is not None and tp not in active and tp not in self._buffered_partitions:
                        continue
                    fresh = await self._fresh_records(tp, recs)
                    if not fresh:
                        continue
                    app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                    messages = [to_message(tp, r) for r in fresh]
                    queue = self._batch_queues.get(tp.topic)
                    if queue is None:
                        await self._deliver_each(tp, messages)
                        continue
                    if self._commit_every is not None and self._n_acked >= self._commit_every:
                        self._n_acked = 0
                        await self.commit()
                    await self._deliver_at(tp, queue, messages)
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)


class GapSafeConsumer(GapSafeOffsets, aiokafka_driver.Consumer):
    """The stock aiokafka-driver consumer (per-message delivery) with GapSafeOffsets' commits."""


class GapSafeTransport(aiokafka_driver.Transport):
    """The stock aiokafka transport with `GapSafeConsumer` (`DOMAINTOK_CONSUMER=faust`)."""

    Consumer = GapSafeConsumer


def use_gap_safe_consumer(app: faust.App) -> faust.App:
    """Make `app` consume through the stock per-message consumer with gap-safe commits (before anything starts)."""
    app.transport = GapSafeTransport(app.conf.broker_consumer, app)
    return app


class BatchTransport(aiokafka_driver.Transport):
    """The aiokafka transport with `BatchConsumer` as its consumer class."""

    Consumer = BatchConsumer
    #: the worker consumer's fetch_max_wait_ms (None: Faust's 1,500)
    fetch_max_wait_ms: int | None = None


def use_batch_consumer(app: faust.App, *, fetch_max_wait: float | None = 0.1) -> faust.App:
    """Make `app` consume through `BatchTransport` (before anything starts; the producer transport is unchanged).

    `fetch_max_wait`: seconds the broker may hold a fetch with no new data (None keeps Faust's 1.5 s).
    """
    transport = BatchTransport(app.conf.broker_consumer, app)
    transport.fetch_max_wait_ms = None if fetch_max_wait is None else int(fetch_max_wait * 1000)
    app.transport = transport
    return app


class BatchStream(faust.Stream):
    """`faust.Stream` whose `take_events` reads whole fetched batches from a `BatchConsumer` (else: stock)."""

    def _batch_topic(self) -> str | None:
        """The topic name when the fast path applies (see the module docstring), else None."""
        channel = self.channel
        topics = getattr(channel, "topics", None)
        if not isinstance(self.app.consumer, BatchConsumer) or getattr(channel, "pattern", None) or not topics:
            return None
        if len(topics) != 1 or getattr(channel, "active_partitions", None) is not None:
            return None
        (name,) = topics
        if any(name in getattr(t, "topics", ()) for t in self.app.topics if t is not channel):
            return None  # another stream reads it too: batches would starve that one
        return name

    async def take_events(self, max_: int, within: Any) -> AsyncIterator[Sequence[EventT]]:
        """Lists of at most `max_` events: yielded when `max_` are buffered or `within` seconds passed.

        Same contract as `faust.Stream.take_events`, except that events are acked only when the consumer of the
        generator asks for the next list (not when it raises or closes the generator).
        """
        topic = self._batch_topic()
        if topic is None:
            async for events in super().take_events(max_, within):
                yield events
            return
        consumer: BatchConsumer = self.app.consumer  # type: ignore[assignment]
        queue = consumer.batch_queue(topic)
        aiter(self.channel)  # subscribes the topic (app.topics) unless app.stream() did already, as stock does
        self.log.info("batch delivery from topic %r (streams.fast_consumer)", topic)
        timeout = want_seconds(within) if within else None
        decode = self.channel.decode
        carry: tuple[float, list] = (0.0, [])
        while not self.should_stop:
            messages, carry = await self._collect(queue, carry, max_, timeout)
            messages = await self._when_tables_ready(messages)
            if not messages:
                continue
            consumer.track_batch(messages)
            events = [await decode(m, propagate=True) for m in messages]
            yield events
            ack = consumer.ack
            for m in messages:
                ack(m)

    async def _when_tables_ready(self, messages: list) -> list:
        """`messages` once the app's tables are recovered, less those of an older consumer generation.

        Why: table recovery resumes the app's flow to read the changelogs, so a batch of a newly assigned partition
        fetched from its committed offset can reach the agent while that partition's Table rows are still being
        restored; processed then, a user's window reads as empty or stale and a sequence goes out with n_events
        going backwards. Faust seeks every partition
        back to its committed offset when recovery completes, so such a batch is read again anyway; waiting keeps
        the first copy and the second is a replay that the position guard skips. The wait comes before the batch
        is tracked, so it never holds up a revoke (which waits for tracked batches only).
        """
        tables = self.app.tables
        while not tables.actives_ready and not self.should_stop:
            await asyncio.sleep(0.05)
        generation = self.app.consumer_generation_id
        return [m for m in messages if m.generation_id == generation]

    async def _collect(
        self, queue: asyncio.Queue, carry: tuple[float, list], max_: int, timeout: float | None
    ) -> tuple[list, tuple[float, list]]:
        """Up to `max_` messages of the current consumer generation: those carried over, then queued batches.

        The wait ends `timeout` seconds after the OLDEST collected message arrived, not after the call began: a
        batch that queued up while the agent worked on the previous one has waited already, so it goes at once with
        whatever else is queued, and `within` bounds how long a record waits here whatever the agent's pace (with
        a deadline from the call, every batch waited `within` on top of the agent's own time, which under load
        was the largest part of the tokenizer's latency). Returns the messages and the carry (the arrival time
        of the first leftover message, the leftovers).
        """
        generation = self.app.consumer_generation_id
        last_arrival, carried = carry  # arrival of the newest batch collected so far
        messages = [m for m in carried if m.generation_id == generation]
        deadline = None
        if messages and timeout is not None:
            deadline = last_arrival + timeout
        while len(messages) < max_:
            try:
                arrived, batch = queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                got = await self.wait_first(queue.get(), timeout=remaining)
                if got.stopped or not got.done:
                    break
                arrived, batch = got.results[0]
            if batch and batch[0].generation_id == self.app.consumer_generation_id:
                if not messages and timeout is not None:
                    deadline = arrived + timeout
                last_arrival = arrived
                messages.extend(batch)
        # The loop stops once max_ is reached, so leftovers come from the newest batch (or from the carry itself)
        return messages[:max_], (last_arrival, messages[max_:])
