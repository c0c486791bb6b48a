"""The batch consumer path (streams/fast_consumer.py, DOMAINTOK_CONSUMER=batch) on a real broker.

A second tokenizer worker joins the group and leaves it again while events are being produced: every user's final
window must count exactly the events sent (nothing lost, nothing counted twice), and the worker must really have
used the batch path. Plus the setting's parsing.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid

import pytest

from streams.clients import EventProducer
from localkafka.demo import build_artifacts, event_rows, producer_overrides, start_tokenizer, stop_process, wait_ready
from streams.records import decode_sequence

BATCH_MARKER = "batch delivery from topic"


def _newest_counts(settings, expected: dict[str, int], timeout: float) -> dict[str, int]:
    """Per user, the largest n_events seen on the sequences topic (stops once every user reached `expected`)."""
    from confluent_kafka import Consumer

    consumer = Consumer(settings.confluent_consumer(f"check-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe([settings.topic_sequences])
    best: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and any(best.get(u, 0) < n for u, n in expected.items()):
            for m in consumer.consume(2000, 0.5):
                if m.error() is None:
                    rec = decode_sequence(m.value())
                    best[rec.user_id] = max(best.get(rec.user_id, 0), rec.n_events)
        # a little longer: an over-count (a replay counted twice) would show up after the expected value
        for m in consumer.consume(5000, 2.0):
            if m.error() is None:
                rec = decode_sequence(m.value())
                best[rec.user_id] = max(best.get(rec.user_id, 0), rec.n_events)
    finally:
        consumer.close()
    return best


@pytest.mark.slow
@pytest.mark.requires_apache("rebalance with a member leaving: the embedded broker can wedge such a group")
def test_batch_consumer_loses_nothing_when_a_worker_joins_and_leaves(kafka_settings, tmp_path):
    events, tok, tok_dir, _ = build_artifacts(tmp_path, "ecommerce", 60, 6000, seed=5)
    rows = event_rows(events, tok)
    expected = dict(collections.Counter(events.column(tok.schema.user_id).cast("string").to_pylist()))
    app_id = f"fast-{uuid.uuid4().hex[:8]}"
    logs = [tmp_path / f"{app_id}-{i}.log" for i in range(2)]
    env = {"DOMAINTOK_CONSUMER": "batch", "DOMAINTOK_BATCH_WITHIN": "0.05"}
    procs = [start_tokenizer(kafka_settings, tok_dir, app_id, logs[0], **env)]
    produced = threading.Event()

    def produce() -> None:  # ~15 s of steady traffic, so batches are in flight during both rebalances
        with EventProducer(kafka_settings, fingerprint=tok.fingerprint, **producer_overrides()) as producer:
            for i in range(0, len(rows), 100):
                producer.send_many(rows[i : i + 100])
                producer.flush()
                time.sleep(0.25)
        produced.set()

    try:
        wait_ready(procs[0], logs[0])
        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        time.sleep(2)
        procs.append(start_tokenizer(kafka_settings, tok_dir, app_id, logs[1], **env))  # joins: rebalance
        wait_ready(procs[1], logs[1])
        time.sleep(3)  # both members consume for a while
        assert stop_process(procs[1]) is not None  # leaves (SIGTERM): rebalance back to one member
        thread.join(60)
        assert produced.is_set()
        counts = _newest_counts(kafka_settings, expected, timeout=90)
        assert procs[0].poll() is None, logs[0].read_text()[-2000:]
    finally:
        for proc in procs:
            stop_process(proc)
    text = [log.read_text(errors="replace") for log in logs]
    assert BATCH_MARKER in text[0] and BATCH_MARKER in text[1]
    assert "Drain messages raised" not in text[0] + text[1]
    missing = {u: (counts.get(u, 0), n) for u, n in expected.items() if counts.get(u, 0) < n}
    extra = {u: (counts[u], n) for u, n in expected.items() if counts.get(u, 0) > n}
    assert not missing, f"events lost (seen, sent): {dict(list(missing.items())[:5])}"
    assert not extra, f"events counted twice (seen, sent): {dict(list(extra.items())[:5])}"


def test_batches_wait_for_table_recovery_and_drop_older_generations():
    """A batch fetched while tables are restored is held until they are (then filtered by generation): processed
    mid-recovery, a user's window read empty and its sequence went backwards (30 events, then 1) in a CI run."""
    import asyncio
    from types import SimpleNamespace

    from streams.fast_consumer import BatchStream

    tables = SimpleNamespace(actives_ready=False)
    app = SimpleNamespace(tables=tables, consumer_generation_id=7)
    stream = SimpleNamespace(app=app, should_stop=False)
    messages = [SimpleNamespace(generation_id=g, offset=n) for n, g in enumerate((7, 8, 8))]

    async def scenario():
        task = asyncio.ensure_future(BatchStream._when_tables_ready(stream, messages))
        await asyncio.sleep(0.3)
        assert not task.done(), "handed to the agent before the tables were recovered"
        app.consumer_generation_id = 8  # a rebalance happened meanwhile: generation 7's records are read again
        tables.actives_ready = True
        return await asyncio.wait_for(task, 2)

    ready = asyncio.run(scenario())
    assert [m.offset for m in ready] == [1, 2]
    stream.should_stop = True  # a stopping stream does not wait
    tables.actives_ready = False
    assert asyncio.run(asyncio.wait_for(BatchStream._when_tables_ready(stream, messages), 2)) == messages[1:]


def test_a_seek_while_a_batch_waits_to_be_queued_is_not_undone():
    """The drain loop queues a fetched batch, waiting while the stream is behind; if the agent seeks that partition
    back meanwhile (the position guard over a hole), the read offset must stay at the seek target. Moved to the
    batch's end (upstream's order), every re-fetched record below it was dropped as read: the hole stayed open."""
    import asyncio
    import collections
    from types import SimpleNamespace

    from faust.types import TP

    from streams.fast_consumer import BatchConsumer

    tp, other = TP("events", 0), TP("events", 1)

    async def scenario():
        gate = asyncio.Event()

        async def deliver(queue, messages):
            await gate.wait()
            queue.put_nowait(messages)

        async def wait_first(*coros):
            tasks = [asyncio.ensure_future(c) for c in coros]
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()

        consumer = SimpleNamespace(_seek_rounds=0, _seeks=collections.Counter(), _read_offset={},
                                   _deliver_batch=deliver, wait_first=wait_first, suspend_flow=asyncio.Event())
        queue: asyncio.Queue = asyncio.Queue()

        def batch(*offsets):
            return [SimpleNamespace(offset=o) for o in offsets]

        gate.set()
        await BatchConsumer._deliver_at(consumer, tp, queue, batch(20, 21))
        assert consumer._read_offset[tp] == 21  # no seek: past the batch, as upstream
        gate.clear()
        waiting = asyncio.ensure_future(BatchConsumer._deliver_at(consumer, tp, queue, batch(22, 23)))
        await asyncio.sleep(0.05)
        consumer._seeks[tp] += 1  # what BatchConsumer.seek records, then Consumer.seek sets the read offset
        consumer._read_offset[tp] = 10
        gate.set()
        await waiting
        assert consumer._read_offset[tp] == 10, "the seek back was undone by the batch that waited"
        gate.clear()
        waiting = asyncio.ensure_future(BatchConsumer._deliver_at(consumer, other, queue, batch(7)))
        await asyncio.sleep(0.05)
        consumer._seek_rounds += 1  # perform_seek: every partition back to its committed offset
        consumer._read_offset[other] = 3
        gate.set()
        await waiting
        assert consumer._read_offset[other] == 3
        gate.clear()
        waiting = asyncio.ensure_future(BatchConsumer._deliver_at(consumer, other, queue, batch(8)))
        await asyncio.sleep(0.05)
        consumer._seeks[tp] += 1  # a seek of another partition changes nothing here
        gate.set()
        await waiting
        assert consumer._read_offset[other] == 8
        assert [[m.offset for m in b] for b in (queue.get_nowait() for _ in range(4))] == [[20, 21], [22, 23], [7], [8]]

    asyncio.run(scenario())


def test_seeks_run_on_the_consumer_thread():
    """aiokafka lives on the consumer thread's event loop; a seek made from the agent's thread (upstream) edited its
    fetcher from outside and the worker stopped fetching (a rebalance test lost 65 events, a CI run 535)."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from faust.types import TP

    from streams.fast_consumer import GapSafeOffsets

    calls = []

    class Thread:
        def seek(self, tp, offset):
            calls.append(("seek", tp, offset, threading.current_thread().name))

        async def call_thread(self, fun, *args):
            result = []
            worker = threading.Thread(target=lambda: result.append(fun(*args)), name="consumer-thread")
            worker.start()
            worker.join()
            return result[0]

    consumer = SimpleNamespace(_thread=Thread())
    asyncio.run(GapSafeOffsets._seek(consumer, TP("events", 2), 41))
    assert calls == [("seek", TP("events", 2), 41, "consumer-thread")]
