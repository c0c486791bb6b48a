"""The Faust tokenizer app: events -> per-user windows (changelog-backed Table) -> sequences, bad events -> dead-letter.

Run with `faust -A streams.app worker -l info --without-web` or `domaintok worker tokenize`; every setting comes from the
environment (`domaintok.settings.Settings.from_env`), never from code. Importing this module builds nothing: `create_app` is the
factory, and the module attribute `app` (what `faust -A` reads) is built from the environment on first access.

At-least-once, in this order per micro-batch: (1) Table writes and sends are queued, (2) the producer is flushed and
every send's delivery awaited, (3) only then does `take_events` ack the batch's events, so the committed offset never
passes an event whose window and sequence are not on the broker. A crash before (3) replays the batch; the stored
window's input offset (StoredWindow) makes the replay skip events it already holds, so n_events stays exact and the
re-sent sequences are duplicates a consumer drops by its max-n_events rule.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import faust
from faust.types import TP

from domaintok.errors import DomaintokError
from domaintok.settings import Settings
from streams import logs, metrics
from streams.positions import PositionGuard
from streams.records import encode_record
from streams.routing import HomePartitions, RateLimitedWarning
from streams.settings import KafkaSettings
from streams.tokenizer_agent import EventDecoders, Message, load_tokenizer, process_batch

log = logging.getLogger("domaintok.worker.tokenize")


def _consumer_settings(config: Settings) -> dict:
    """Faust settings of the consumer path: the batch path needs its Stream class (the transport is set after)."""
    if config.consumer == "batch":
        from streams.fast_consumer import BatchStream

        return {"Stream": BatchStream}
    return {}


def create_app(config: Settings, settings: KafkaSettings) -> faust.App:
    """The tokenizer worker's Faust app: the tokenize agent over the events topic, the per-user windows Table, the lag
    timer and the metrics endpoint. Loads the tokenizer first (refusing pickles, other versions, edited content)."""
    tok = load_tokenizer(config.tokenizer_dir)
    app = _faust_app(config, settings)
    worker = TokenizeWorker(app, config, settings, tok)

    @app.agent(worker.events)
    async def tokenize(stream):
        logs.install()  # Faust set up logging when its worker started: from here on, one format for every line
        # Records go out through app.producer (TokenizeWorker.send), so declare the output topics as Topic.send would.
        await worker.sequences.maybe_declare()
        await worker.dead_letter.maybe_declare()
        async for batch in stream.take_events(config.batch_size, within=config.batch_within):
            try:
                await worker.handle_batch(batch)
            except Exception as exc:  # noqa: BLE001 - every failure ends the process, see crash_exit
                crash_exit(exc)

    app.timer(interval=5.0)(worker.report_lag)
    app.conf.domaintok_config = config  # for tests and the worker command
    metrics.serve(config.metrics_port, config.metrics_host)
    return app


def _faust_app(config: Settings, settings: KafkaSettings) -> faust.App:
    """The Faust App with the worker's settings and its consumer path (batch delivery or stock + gap-safe commits)."""
    app = faust.App(
        config.app_id,
        **settings.faust_settings(),
        store=config.store,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=config.commit_interval,
        producer_linger=config.producer_linger,
        producer_max_batch_size=262144,
        web_host="127.0.0.1",
        web_port=config.web_port,
        web_bind="127.0.0.1",
        **_consumer_settings(config),
    )
    if config.consumer == "batch":
        from streams.fast_consumer import use_batch_consumer

        use_batch_consumer(app, fetch_max_wait=config.fetch_max_wait)
    else:
        from streams.fast_consumer import use_gap_safe_consumer

        use_gap_safe_consumer(app)
    return app


class TokenizeWorker:
    """What the tokenize agent does with each micro-batch: the position guard, process_batch, the sends and their
    delivery, all before take_events acks the batch."""

    def __init__(self, app: faust.App, config: Settings, settings: KafkaSettings, tok) -> None:
        self.app, self.settings, self.tok = app, settings, tok
        self.max_length = config.max_length or tok.max_length
        self.decoders = EventDecoders(tok.event_struct)
        raw = {"key_serializer": "raw", "value_serializer": "raw"}
        self.events = app.topic(settings.topic_events, partitions=settings.partitions, **raw)
        self.sequences = app.topic(settings.topic_sequences, partitions=settings.partitions, **raw)
        self.dead_letter = app.topic(settings.topic_dead_letter, partitions=settings.partitions, **raw)
        # use_partitioner: keys are the input's raw key bytes, so the changelog partition = the input partition
        # (producers use murmur2, as Faust does); this is also what lets the agent write inside take_events().
        self.windows = app.Table(
            "user-windows", partitions=settings.partitions, use_partitioner=True, key_type=bytes, value_type=bytes,
            schema=faust.Schema(key_type=bytes, value_type=bytes, **raw),
        )
        # The resume point per input partition, in the Table (streams/positions.py): Faust's committed offset can
        # skip events after a restart with a backlog (faust-streaming issue 596) and redeliver the last one.
        self.guard = PositionGuard(self.windows, settings.partitions, first_offset=self.first_offset)
        self._home: HomePartitions | None = None
        self._misrouted_warning = RateLimitedWarning(every=60.0)

    def first_offset(self, partition: int, offset: int) -> int | None:
        """The offset of the first record at or after `offset` in `partition` of the events topic, as the broker
        has it now (None when it cannot tell within a few seconds): the position guard's check that a hole is
        absent from the log before giving its offsets up. A short-lived consumer outside the group (assign, no
        commits), about 0.1 s, asked only of a hole that outlived a seek."""
        from confluent_kafka import Consumer, TopicPartition

        # read_uncommitted as aiokafka's default: the records Faust's consumer would deliver
        conf = self.settings.confluent_consumer(f"{self.app.conf.id}-hole-check",
                                                **{"isolation.level": "read_uncommitted"})
        consumer = Consumer(conf)
        try:
            consumer.assign([TopicPartition(self.settings.topic_events, partition, offset)])
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                if msg.error():
                    log.warning("hole check of partition %d at %d: %s", partition, offset, msg.error())
                    return None
                return msg.offset()
            return None
        finally:
            consumer.close()

    def home_partitions(self) -> HomePartitions:
        """Events read off their user's home partition go there (streams/routing.py): home from the topic's real
        partition count, which may differ from the Table's after the topic grew."""
        partitions = self.app.consumer.topic_partitions(self.settings.topic_events) or self.settings.partitions
        if self._home is None or self._home.partitions != partitions:
            if partitions != self.settings.partitions:
                log.warning("event=partition_count topic=%s partitions=%d table_partitions=%d: the events topic no "
                            "longer matches the tokenizer's Table; see the README's 'Growing partitions'",
                            self.settings.topic_events, partitions, self.settings.partitions)
            self._home = HomePartitions(partitions)
        return self._home

    async def handle_batch(self, batch) -> None:
        messages = [
            Message(
                m.key, m.value, list(m.headers or ()), m.topic, m.partition, m.offset, int((m.timestamp or 0) * 1000)
            )
            for m in (ev.message for ev in batch)
        ]
        screened = self.guard.screen(messages, time.monotonic())
        await self._seek(screened)
        t0 = time.perf_counter()
        # the guard's replays are not folded again, but re-send their users' stored windows (see stored_sequences)
        result = process_batch(self.tok, self.decoders, screened.keep, self.windows, self.max_length,
                               replays=screened.replays, home=self.home_partitions())
        self.guard.record(screened.keep)
        metrics.BATCH_SECONDS.labels("tokenize").observe(time.perf_counter() - t0)
        metrics.BATCH_SIZE.labels("tokenize").observe(len(messages))
        metrics.EVENTS_IN.labels("tokenize").inc(len(messages))
        await self._send(result)
        metrics.RECORDS_OUT.labels("tokenize").inc(len(result.sequences))
        if result.dead_letters or result.replayed or screened.replayed or screened.dropped:
            metrics.log_kv(log, "batch", events=len(messages), sequences=len(result.sequences),
                           dead_lettered=len(result.dead_letters), replayed=result.replayed + screened.replayed,
                           dropped=screened.dropped)

    async def _seek(self, screened) -> None:
        """The position guard's seeks (a gap after a restart) and the offsets it takes as absent, settled so the
        committed offset can pass them."""
        consumer = self.app.consumer
        for partition, offset in screened.seeks.items():
            metrics.log_kv(log, "gap", partition=partition, seek_to=offset, arrived=screened.arrived.get(partition),
                           dropped=screened.dropped)
            tp = TP(self.settings.topic_events, partition)
            await consumer.seek(tp, offset)
            await consumer.settle_before(tp, offset)  # below the stored position: folded already, commit past it
        for partition, first, last in screened.present_holes:
            log.warning("offsets %d..%d of partition %d are on the broker but did not arrive after a seek: "
                        "seeking again", first, last, partition)
        for partition, first, last in screened.accepted_holes:
            log.warning("offsets %d..%d of partition %d are absent from the log (transaction markers, compaction, "
                        "retention): passed over", first, last, partition)
            await consumer.settle_before(TP(self.settings.topic_events, partition), last + 1)

    async def _send(self, result) -> None:
        """Sequences, dead letters and forwards, then every delivery (and the changelog) confirmed.

        Straight to the app's producer (Faust's public Producer.send): one record costs ~5x less than through
        Topic.send, whose per-record FutureMessage/sensor/callback machinery was a quarter of the worker's CPU."""
        send = self.app.producer.send
        settings = self.settings
        futures = [await send(settings.topic_sequences, key, encode_record(rec), None, None, None)
                   for key, rec in result.sequences]
        for d in result.dead_letters:
            futures.append(await send(settings.topic_dead_letter, d.key, d.value, None, None, d.headers))
            metrics.DEAD_LETTERED.labels("tokenize", d.reason_class).inc()
        for f in result.forwards:
            futures.append(await send(settings.topic_events, f.key, f.value, f.partition, f.timestamp_ms / 1000,
                                      f.headers))
        if result.forwards:
            metrics.MISROUTED.labels("tokenize").inc(len(result.forwards))
            due = self._misrouted_warning.add(len(result.forwards))
            if due:
                log.warning("event=misrouted count=%d: events arrived off their user's home partition (a producer "
                            "not using murmur2 key partitioning, or a changed partition count) and were forwarded "
                            "there", due)
        # Deliveries (sequences, dead letters, forwards, changelog) confirmed before take_events acks the batch.
        await self.app.producer.flush()
        if futures:
            await asyncio.gather(*futures)

    async def report_lag(self) -> None:
        """domaintok_consumer_lag{stage="tokenize"}: high watermark minus the next offset to read, summed over the
        worker's assigned events partitions."""
        consumer = self.app.consumer
        lag = 0
        try:
            for tp in consumer.assignment():
                if tp.topic != self.settings.topic_events:
                    continue
                high = consumer.highwater(tp)
                position = await consumer.position(tp)
                if high is not None and position is not None:
                    lag += max(high - position, 0)
        except Exception as exc:  # noqa: BLE001 - mid-rebalance a partition can be gone: report next time
            log.debug("consumer lag not read: %r", exc)
            return
        metrics.CONSUMER_LAG.labels("tokenize").set(lag)


def crash_exit(exc: BaseException) -> None:
    """End the worker process when the agent fails (a send refused by the broker, a bug).

    Why: Faust logs a crashed agent and keeps the process alive with nothing consuming, so the worker would sit idle
    with its partitions assigned. Exiting instead hands the partitions over and lets the process supervisor restart
    it; nothing is lost because the failed batch was never acknowledged (the fault suite kills workers at random
    points to prove that). CancelledError (rebalances, shutdown) is not an Exception and never gets here.
    """
    log.critical("tokenize agent failed, exiting (the batch was not acknowledged and will be replayed): %r", exc,
                 exc_info=exc)
    logging.shutdown()
    os._exit(EXIT_AGENT_FAILED)


EXIT_AGENT_FAILED = 70  # EX_SOFTWARE


def _app_from_env() -> faust.App:
    settings = KafkaSettings.from_env()
    if not settings.bootstrap_servers:
        raise DomaintokError("KAFKA_BOOTSTRAP_SERVERS is not set (start one with `domaintok broker`)")
    config = Settings.from_env()
    if not config.tokenizer_dir:
        raise DomaintokError("DOMAINTOK_TOKENIZER_DIR is not set (the fitted tokenizer directory)")
    return create_app(config, settings)


def __getattr__(name: str):
    """`faust -A streams.app worker` reads `app`: it is built from the environment then, never by an import of this
    module (which tests and tools do for Settings and create_app)."""
    if name == "app":
        built = globals()["app"] = _app_from_env()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
