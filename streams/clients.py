"""Python clients for the pipeline's topics: `EventProducer` (raw events in), `EmbeddingConsumer` (embeddings
out, with the per-user dedupe rule) and `DeadLetterReader` (what the workers could not process), on confluent-kafka.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import msgspec
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from domaintok.errors import DomaintokError
from streams.records import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_MSGPACK,
    CONTENT_TYPES,
    DeadLetter,
    EmbeddingRecord,
    content_type_of,
    dead_letter_from_message,
    decode_embedding,
    event_headers,
    json_encoder,
    msgpack_encoder,
)
from streams.settings import EVENT_MAX_BYTES, KafkaSettings

T = TypeVar("T")


class DeliveryError(DomaintokError):
    """Some records were not acknowledged by the broker."""


def wait_for_metadata(client: Any, settings: KafkaSettings, topic: str | None = None, timeout: float = 30.0) -> Any:
    """Cluster metadata from `client` (Producer, Consumer or AdminClient made from `settings`), failing fast.

    Why: librdkafka answers a refused login only with "Broker transport failure" from list_topics and retries
    forever; polling serves the settings' error_cb, which raises KafkaAuthError (one line, no retry) on bad
    credentials or a failed TLS handshake. No answer within `timeout` is a one-line DomaintokError.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.list_topics(topic, timeout=min(1.0, max(0.1, deadline - time.monotonic())))
        except KafkaException as exc:
            last = exc.args[0]
        client.poll(0)  # serves error_cb: KafkaAuthError propagates from here
        if time.monotonic() > deadline:
            raise DomaintokError(
                f"no answer from Kafka for {settings.describe_auth()} within {timeout:.0f} s: {last.str()}"
            )


def check_connection(settings: KafkaSettings, timeout: float = 30.0) -> None:
    """Connect and authenticate once with `settings`, or raise one line (KafkaAuthError / DomaintokError).

    For commands that hand the connection to another client (the Faust worker, whose aiokafka login failure is a
    traceback): checking first turns a wrong password or CA into the same one-line error the other commands give.
    """
    producer = Producer(settings.confluent_producer())
    wait_for_metadata(producer, settings, timeout=timeout)


class EventProducer:
    """Produces raw events to the events topic: key = user id, murmur2 partitioning, fingerprint header.

    `send_many` takes dicts or msgspec Structs; with `event_struct` (a tokenizer's `event_struct`) dicts are
    validated and converted first, so a malformed event fails here, not in the stream worker. Delivery
    failures are collected (librdkafka reports only errors: no per-message callback on the hot path) and
    raised by `flush()`. A record over `message.max.bytes` (EVENT_MAX_BYTES unless configured) is refused by
    the client before it is sent: it is skipped and counted in `too_large`, the rest still flows, and `flush()`
    reports it. Bad credentials raise KafkaAuthError from send/flush instead of retrying forever.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        topic: str | None = None,
        fingerprint: str | None = None,
        content_type: str = CONTENT_TYPE_JSON,
        event_struct: type[msgspec.Struct] | None = None,
        key_field: str = "user_id",
        **config: Any,
    ) -> None:
        if content_type not in CONTENT_TYPES:
            raise DomaintokError(f"unknown content type {content_type!r} (expected one of {', '.join(CONTENT_TYPES)})")
        self.topic = topic or settings.topic_events
        self.key_field = key_field
        self.event_struct = event_struct
        self._encode = json_encoder.encode if content_type == CONTENT_TYPE_JSON else msgpack_encoder.encode
        self._headers = event_headers(fingerprint, content_type)
        self._producer = Producer(
            settings.confluent_producer(
                **{"delivery.report.only.error": True, "on_delivery": self._on_delivery,
                   "message.max.bytes": EVENT_MAX_BYTES, **config}
            )
        )
        self.max_bytes = int(config.get("message.max.bytes", EVENT_MAX_BYTES))
        self.sent = 0
        self.failed = 0
        self.too_large = 0  # records refused by the client for their size (never sent)
        self.errors: list[str] = []  # the first few delivery errors, for the report

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self.failed += 1
            if len(self.errors) < 5:
                self.errors.append(f"{msg.topic()}: {err.str()}")

    def _key(self, event: Any) -> bytes | None:
        value = event.get(self.key_field) if isinstance(event, Mapping) else getattr(event, self.key_field, None)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 17850.0 from a float column is user "17850", as the tokenizer casts it
        return str(value).encode("utf-8")

    def send(self, value: bytes, key: bytes | None, headers: list | None = None) -> None:
        """Produce one already-encoded record (headers default to the events topic's)."""
        if self._produce(value, key, self._headers if headers is None else headers):
            self.sent += 1

    def _produce(self, value: bytes, key: bytes | None, headers: list) -> bool:
        """Queue one record; False when the client refused it for its size (counted in `too_large`)."""
        try:
            self._producer.produce(self.topic, value=value, key=key, headers=headers)
            return True
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            self.too_large += 1
            if len(self.errors) < 5:
                self.errors.append(
                    f"{self.topic}: a {len(value or b'')}-byte record (key {key!r:.40}) is over message.max.bytes "
                    f"({self.max_bytes})"
                )
            return False
        except BufferError:
            # Local queue full: serve delivery reports until there is room, then retry this record.
            while True:
                self._producer.poll(0.05)
                try:
                    self._producer.produce(self.topic, value=value, key=key, headers=headers)
                    return True
                except BufferError:
                    continue

    def send_many(
        self, events: Iterable[Mapping[str, Any] | msgspec.Struct], keys: Iterable[str | None] | None = None
    ) -> int:
        """Encode and produce `events` (dicts or Structs); returns how many were queued.

        Keys default to each event's `key_field`; pass `keys` (user ids, one per event) when the user id is
        computed rather than a field.
        """
        struct, encode, headers, produce = self.event_struct, self._encode, self._headers, self._produce
        key_iter = iter(keys) if keys is not None else None
        n = 0
        for event in events:
            if struct is not None and not isinstance(event, msgspec.Struct):
                try:
                    event = msgspec.convert(event, struct, strict=False)
                except msgspec.ValidationError as exc:
                    raise DomaintokError(f"event {self.sent + n + 1} does not match the tokenizer's schema: {exc}") from None
            if key_iter is None:
                key = self._key(event)
            else:
                user = next(key_iter)
                key = None if user is None else str(user).encode("utf-8")
            n += produce(encode(event), key, headers)
        self._producer.poll(0)
        self.sent += n
        return n

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for every queued record; raise DeliveryError if any failed, was refused as too large, or did not
        finish in `timeout` (KafkaAuthError at once on refused credentials)."""
        deadline = time.monotonic() + timeout
        remaining = len(self._producer)
        while remaining and time.monotonic() < deadline:
            # short steps: an authentication failure surfaces (error_cb) within a step, not after `timeout`
            remaining = self._producer.flush(min(0.5, max(0.0, deadline - time.monotonic())))
        if remaining:
            raise DeliveryError(f"{remaining} records still undelivered after {timeout:.0f} s (is the broker up?)")
        if self.failed or self.too_large:
            raise DeliveryError(
                f"{self.failed} of {self.sent} records failed delivery, {self.too_large} refused as larger than "
                f"message.max.bytes ({self.max_bytes}): {self.errors[0]}"
            )

    @property
    def delivered(self) -> int:
        return self.sent - self.failed - len(self._producer)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.flush()
        else:
            self._producer.flush(5)


class _TopicReader(Generic[T]):
    """Reads one topic. Without `group_id` it assigns every partition itself (no group join: fast, nothing
    committed); with `group_id` it subscribes and `commit()` stores the group's progress."""

    def __init__(
        self,
        settings: KafkaSettings,
        topic: str,
        *,
        group_id: str | None = None,
        from_beginning: bool = True,
        **config: Any,
    ) -> None:
        self.topic = topic
        self.group_id = group_id
        self.undecodable = 0
        reset = "earliest" if from_beginning else "latest"
        self._consumer = Consumer(
            settings.confluent_consumer(
                group_id or f"domaintok-reader-{uuid.uuid4().hex[:12]}", **{"auto.offset.reset": reset, **config}
            )
        )
        try:
            metadata = wait_for_metadata(self._consumer, settings, topic, timeout=30)
        except BaseException:
            self._consumer.close()
            raise
        if group_id:
            self._consumer.subscribe([topic])
        else:
            meta = metadata.topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                self._consumer.close()
                raise DomaintokError(f"topic {topic!r} does not exist on {settings.bootstrap_servers}")
            start = OFFSET_BEGINNING if from_beginning else OFFSET_END
            self._consumer.assign([TopicPartition(topic, p, start) for p in sorted(meta.partitions)])

    def _decode(self, msg) -> T:
        raise NotImplementedError

    def poll_batch(self, max_records: int = 1000, timeout: float = 1.0) -> list[T]:
        """Up to `max_records` decoded records, waiting at most `timeout` seconds for the first."""
        out: list[T] = []
        for msg in self._consumer.consume(max_records, timeout):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise DomaintokError(f"reading {self.topic}: {err.str()}")
            try:
                out.append(self._decode(msg))
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.undecodable += 1
        return out

    def records(self, max_records: int | None = None, idle_timeout: float | None = None) -> Iterator[T]:
        """Records as they come; stops after `max_records`, or when none arrived for `idle_timeout` seconds."""
        seen = 0
        last = time.monotonic()
        while max_records is None or seen < max_records:
            want = 1000 if max_records is None else min(1000, max_records - seen)
            batch = self.poll_batch(want, timeout=0.5)
            if batch:
                last = time.monotonic()
            elif idle_timeout is not None and time.monotonic() - last >= idle_timeout:
                return
            for record in batch:
                seen += 1
                yield record

    def commit(self) -> None:
        if self.group_id:
            self._consumer.commit(asynchronous=False)

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EmbeddingConsumer(_TopicReader[EmbeddingRecord]):
    """Reads `EmbeddingRecord`s from the embeddings topic (see `latest_per_user` for the dedupe rule)."""

    def __init__(self, settings: KafkaSettings, *, topic: str | None = None, **kwargs: Any) -> None:
        super().__init__(settings, topic or settings.topic_embeddings, **kwargs)

    def _decode(self, msg) -> EmbeddingRecord:
        headers = msg.headers()
        return decode_embedding(msg.value(), content_type_of(headers) if headers else None)


class DeadLetterReader(_TopicReader[DeadLetter]):
    """Reads the dead-letter topic: original key/value/headers plus the reason, source and stage."""

    def __init__(self, settings: KafkaSettings, *, topic: str | None = None, **kwargs: Any) -> None:
        super().__init__(settings, topic or settings.topic_dead_letter, **kwargs)

    def _decode(self, msg) -> DeadLetter:
        _, timestamp_ms = msg.timestamp()
        return dead_letter_from_message(msg.key(), msg.value(), msg.headers(), timestamp_ms)


def latest_per_user(records: Iterable[EmbeddingRecord], into: dict[str, EmbeddingRecord] | None = None) -> dict[str, EmbeddingRecord]:
    """Per user, the record with the largest n_events (ties: the later produced_at): at-least-once delivery
    may repeat or reorder records, and a window with more events is always the newer one."""
    best = {} if into is None else into
    for record in records:
        current = best.get(record.user_id)
        if current is None or (record.n_events, record.produced_at) > (current.n_events, current.produced_at):
            best[record.user_id] = record
    return best


__all__ = [
    "CONTENT_TYPE_JSON",
    "CONTENT_TYPE_MSGPACK",
    "DeadLetterReader",
    "DeliveryError",
    "EmbeddingConsumer",
    "EventProducer",
    "latest_per_user",
]
