"""The encoder worker: sequences topic -> model -> embeddings topic, in size/time-bounded micro-batches.

Offsets are committed only after the producer confirmed every record of the batch (at-least-once); SIGTERM finishes
the batch in hand, commits and closes. `select_newest` and `encode_batch` are pure so they are tested without Kafka.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from domaintok.errors import ArtifactError, DomaintokError
from streams import metrics
from streams.records import (
    STAGE_ENCODE,
    EmbeddingRecord,
    SequenceRecord,
    content_type_of,
    dead_letter_headers,
    decode_sequence,
    encode_record,
)
from streams.settings import KafkaSettings

log = logging.getLogger("domaintok.worker.encode")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    model_dir: str
    group_id: str = "domaintok-encoder"
    # Large: when the encoder falls behind, one batch holds several windows per user and select_newest keeps the
    # newest only, so the work per batch is bounded by the number of users, not by the input rate.
    batch_size: int = 2048  # sequences per micro-batch at most
    batch_within: float = 0.01  # seconds to wait for a batch to fill once its first record is in (latency)
    device: str | None = None  # default: CUDA when present, else CPU
    tokenizer_dir: str | None = None  # when given, the model must match its fingerprint at start
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # Seconds to sleep after each batch: a test/ops knob that makes the encoder slower than its input on purpose
    # (backpressure drills: lag must grow, memory stay flat, the backlog drain once the input slows). 0 = off.
    throttle: float = 0.0


def select_newest(records: Sequence[SequenceRecord]) -> list[SequenceRecord]:
    """One record per user: the one with the largest n_events (later wins ties), first-seen user order."""
    best: dict[str, SequenceRecord] = {}
    for rec in records:
        cur = best.get(rec.user_id)
        if cur is None or rec.n_events >= cur.n_events:
            best[rec.user_id] = rec
    return list(best.values())


def encode_batch(model: Any, records: Sequence[SequenceRecord], version: str, batch_size: int = 256) -> list[EmbeddingRecord]:
    """EmbeddingRecords for `records` (already deduplicated), one embed_sequences call."""
    from domaintok.models.embedding import embed_sequences  # torch only where the model runs

    if not records:
        return []
    emb = embed_sequences(model, [np.asarray(r.input_ids, dtype=np.int64) for r in records], batch_size=batch_size)  # (N, H)
    now = time.time_ns() // 1000
    return [
        EmbeddingRecord(
            user_id=r.user_id,
            embedding=row.tolist(),
            n_events=r.n_events,
            last_event_ts=r.last_event_ts,
            model_version=version,
            produced_at=now,
            source_ts_ms=r.source_ts_ms,
        )
        for r, row in zip(records, emb)
    ]


class EncoderWorker:
    """confluent-kafka consumer (manual commits, 6 s session) + producer around the model."""

    def __init__(self, config: EncoderConfig, settings: KafkaSettings) -> None:
        from domaintok.models.embedding import load_encoder, model_version

        expected = None
        if config.tokenizer_dir:
            from streams.tokenizer_agent import load_tokenizer

            expected = load_tokenizer(config.tokenizer_dir).fingerprint
        self.model = load_encoder(config.model_dir, device=config.device, expected_fingerprint=expected)
        self.fingerprint = self.model.config.tokenizer_fingerprint
        self.version = model_version(config.model_dir)
        self.config = config
        self.settings = settings
        self.consumer = Consumer(
            settings.confluent_consumer(config.group_id, **{"enable.auto.commit": False, "session.timeout.ms": 6000})
        )
        self.producer = Producer(settings.confluent_producer(**{"linger.ms": 2}))
        self._stop = False
        self._failed: list[str] = []
        self.encoded = 0

    def stop(self, *_: Any) -> None:
        self._stop = True

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self._failed.append(f"{msg.topic()}: {err.str()}")

    def _dead(self, msg, reason: str) -> None:
        headers = dead_letter_headers(
            msg.headers(), error=reason, topic=msg.topic(), partition=msg.partition(), offset=msg.offset(), stage=STAGE_ENCODE
        )
        self.producer.produce(self.settings.topic_dead_letter, value=msg.value(), key=msg.key(), headers=headers,
                              on_delivery=self._on_delivery)
        metrics.DEAD_LETTERED.labels("encode", reason.split(":", 1)[0][:40]).inc()

    def poll_batch(self) -> list:
        deadline = time.monotonic() + self.config.batch_within
        msgs: list = []
        while len(msgs) < self.config.batch_size:
            if msgs:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                want = self.config.batch_size - len(msgs)
            else:
                # consume(n) blocks until n records or the timeout: ask for one first so a batch starts at once
                timeout, want = 0.5, 1
                deadline = time.monotonic() + self.config.batch_within
            got = self.consumer.consume(want, timeout=timeout)
            msgs.extend(m for m in got if not (m.error() and m.error().code() == KafkaError._PARTITION_EOF))
            if not msgs:
                break  # nothing within the idle poll: let run() check stop/idle
        return msgs

    def process(self, msgs: list) -> int:
        """Decode, dedupe, embed, produce, wait for every delivery, then commit. Returns embeddings produced."""
        records: list[SequenceRecord] = []
        for msg in msgs:
            if msg.error():
                if msg.error().fatal():
                    raise DomaintokError(f"consumer error: {msg.error()}")
                # transient (a broker restarting, a rebalance): librdkafka retries by itself
                metrics.log_kv(log, "consumer_error", error=msg.error().str())
                continue
            try:
                rec = decode_sequence(msg.value(), content_type_of(msg.headers()))
            except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as exc:
                self._dead(msg, f"invalid sequence record: {exc}")
                continue
            if rec.fingerprint != self.fingerprint:
                self._dead(msg, f"fingerprint: sequence {rec.fingerprint!r} != model {self.fingerprint!r}")
                continue
            records.append(rec)
        metrics.EVENTS_IN.labels("encode").inc(len(msgs))
        metrics.BATCH_SIZE.labels("encode").observe(len(msgs))
        t0 = time.perf_counter()
        out = encode_batch(self.model, select_newest(records), self.version)
        metrics.BATCH_SECONDS.labels("encode").observe(time.perf_counter() - t0)
        for rec in out:
            self.producer.produce(self.settings.topic_embeddings, key=rec.user_id.encode(), value=encode_record(rec),
                                  on_delivery=self._on_delivery)
        remaining = self.producer.flush(60)
        if remaining or self._failed:
            # no commit: these sequences are consumed again after a restart
            raise DomaintokError(f"embeddings not delivered ({remaining} pending, failures: {self._failed[:3]})")
        now = time.time()
        for rec in out:
            metrics.observe_latency(rec.source_ts_ms, now)
        if msgs:
            try:
                self.consumer.commit(asynchronous=False)
            except KafkaException as exc:
                # e.g. the broker restarting or the group rebalancing: the batch is delivered, so not committing
                # only means it is encoded again later (a duplicate), never lost
                metrics.log_kv(log, "commit_failed", error=exc.args[0].str() if exc.args else exc)
        metrics.RECORDS_OUT.labels("encode").inc(len(out))
        self.encoded += len(out)
        return len(out)

    def _update_lag(self) -> None:
        try:
            lag = 0
            for tp in self.consumer.assignment():
                low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                pos = self.consumer.position([TopicPartition(tp.topic, tp.partition)])[0].offset
                if high >= 0 and pos >= 0:
                    lag += max(0, high - pos)
            metrics.CONSUMER_LAG.labels("encode").set(lag)
        except Exception:  # lag is best effort: never stop encoding for it
            pass

    def run(self, max_idle: float | None = None) -> None:
        """Consume until stopped (SIGTERM/SIGINT) or `max_idle` seconds without records."""
        self.consumer.subscribe([self.settings.topic_sequences])
        idle_since = time.monotonic()
        metrics.log_kv(log, "start", model_version=self.version, topic=self.settings.topic_sequences,
                       group=self.config.group_id)
        try:
            while not self._stop:
                msgs = self.poll_batch()
                if msgs:
                    self.process(msgs)
                    idle_since = time.monotonic()
                    self._update_lag()
                    if self.config.throttle > 0:
                        time.sleep(self.config.throttle)
                elif max_idle is not None and time.monotonic() - idle_since > max_idle:
                    break
        finally:
            self.producer.flush(10)
            self.consumer.close()
            metrics.log_kv(log, "stop", embeddings=self.encoded)


def run_encoder(config: EncoderConfig, settings: KafkaSettings, max_idle: float | None = None) -> EncoderWorker:
    worker = EncoderWorker(config, settings)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    metrics.serve(config.metrics_port, config.metrics_host)
    worker.run(max_idle=max_idle)
    return worker


__all__ = ["ArtifactError", "EncoderConfig", "EncoderWorker", "encode_batch", "run_encoder", "select_newest"]
