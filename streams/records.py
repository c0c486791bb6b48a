"""Wire formats of the pipeline's Kafka topics: msgspec Structs, their encoders/decoders, and header names.

Every value is JSON (msgspec) unless a `content-type` header says msgpack; every key is the user id (UTF-8).
Dead-letter records carry the original bytes, key and headers plus three `domaintok-*` headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

# Header names (bytes-free constants: confluent-kafka and aiokafka both take str names).
HEADER_CONTENT_TYPE = "content-type"
HEADER_FINGERPRINT = "domaintok-fingerprint"
HEADER_ERROR = "domaintok-error"
HEADER_SOURCE = "domaintok-source"
HEADER_STAGE = "domaintok-stage"
HEADER_TRUNCATED = "domaintok-truncated"  # dead letter whose value was cut to fit: the original size in bytes
HEADER_FORWARDED = "domaintok-forwarded-from"  # an event forwarded to its home partition: "<partition>/<offset>"

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_MSGPACK = "application/msgpack"
CONTENT_TYPES = (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK)

STAGE_TOKENIZE = "tokenize"
STAGE_ENCODE = "encode"
STAGES = (STAGE_TOKENIZE, STAGE_ENCODE)

# Headers as the clients give them: a list of (name, value) pairs, value bytes or None.
Headers = list[tuple[str, bytes | None]]


class Record(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every value on the pipeline's topics: keyword-only, unknown fields rejected (a wrong topic or an
    incompatible producer fails loudly instead of decoding half a record)."""


class SequenceRecord(Record):
    """topic sequences: one user's current token window, emitted when it changes."""

    user_id: str
    input_ids: list[int]
    n_events: int  # every event ever seen for the user, including those dropped from the window
    last_event_ts: int  # microseconds since epoch, UTC
    source_ts_ms: int  # Kafka timestamp (ms) of the newest event that produced this window
    fingerprint: str  # tokenizer fingerprint


class EmbeddingRecord(Record):
    """topic embeddings: one user's embedding; per user, the record with the largest n_events wins."""

    user_id: str
    embedding: list[float]  # float32 values
    n_events: int
    last_event_ts: int  # microseconds since epoch, UTC
    model_version: str
    produced_at: int  # microseconds since epoch, UTC
    source_ts_ms: int


# Built once: msgspec encoders/decoders are reusable and much faster than per-call construction.
json_encoder = msgspec.json.Encoder()
msgpack_encoder = msgspec.msgpack.Encoder()
sequence_decoder = msgspec.json.Decoder(SequenceRecord)
embedding_decoder = msgspec.json.Decoder(EmbeddingRecord)
_sequence_msgpack_decoder = msgspec.msgpack.Decoder(SequenceRecord)
_embedding_msgpack_decoder = msgspec.msgpack.Decoder(EmbeddingRecord)


def encode_record(record: msgspec.Struct, content_type: str = CONTENT_TYPE_JSON) -> bytes:
    """The value bytes of `record` in `content_type` (JSON by default)."""
    if content_type == CONTENT_TYPE_JSON:
        return json_encoder.encode(record)
    if content_type == CONTENT_TYPE_MSGPACK:
        return msgpack_encoder.encode(record)
    raise ValueError(f"unknown content type {content_type!r} (expected one of {', '.join(CONTENT_TYPES)})")


def decode_sequence(value: bytes, content_type: str | None = None) -> SequenceRecord:
    if content_type == CONTENT_TYPE_MSGPACK:
        return _sequence_msgpack_decoder.decode(value)
    return sequence_decoder.decode(value)


def decode_embedding(value: bytes, content_type: str | None = None) -> EmbeddingRecord:
    if content_type == CONTENT_TYPE_MSGPACK:
        return _embedding_msgpack_decoder.decode(value)
    return embedding_decoder.decode(value)


def header_value(headers: Iterable[tuple[str, bytes | str | None]] | None, name: str) -> str | None:
    """The last value of header `name` as text, or None when absent."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return found


def content_type_of(headers: Iterable[tuple[str, bytes | str | None]] | None) -> str:
    """The value's content type from its headers; JSON when the header is absent."""
    return header_value(headers, HEADER_CONTENT_TYPE) or CONTENT_TYPE_JSON


def event_headers(fingerprint: str | None, content_type: str = CONTENT_TYPE_JSON) -> Headers:
    """Headers of one record on the events topic."""
    headers: Headers = [(HEADER_CONTENT_TYPE, content_type.encode())]
    if fingerprint:
        headers.append((HEADER_FINGERPRINT, fingerprint.encode()))
    return headers


def dead_letter_headers(
    original: Sequence[tuple[str, bytes | str | None]] | None,
    *,
    error: str,
    topic: str,
    partition: int,
    offset: int,
    stage: str,
) -> Headers:
    """The original headers (kept, minus earlier domaintok-* dead-letter headers) plus error, source and stage.

    `error` is cut to one line of at most 1000 characters: a header is for a reason, not a traceback.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (expected one of {', '.join(STAGES)})")
    reason = " ".join(str(error).split())[:1000]
    ours = (HEADER_ERROR, HEADER_SOURCE, HEADER_STAGE, HEADER_TRUNCATED)
    headers: Headers = [
        (k, v.encode() if isinstance(v, str) else v) for k, v in (original or ()) if k not in ours
    ]
    headers += [
        (HEADER_ERROR, reason.encode("utf-8")),
        (HEADER_SOURCE, dead_letter_source(topic, partition, offset).encode()),
        (HEADER_STAGE, stage.encode()),
    ]
    return headers


def dead_letter_source(topic: str, partition: int, offset: int) -> str:
    return f"{topic}/{partition}/{offset}"


def parse_dead_letter_source(source: str) -> tuple[str, int, int]:
    """"topic/partition/offset" -> (topic, partition, offset); topic names may not contain '/'."""
    topic, partition, offset = source.rsplit("/", 2)
    return topic, int(partition), int(offset)


class DeadLetter(msgspec.Struct, kw_only=True):
    """One dead-letter record as a reader sees it."""

    key: bytes | None
    value: bytes | None
    error: str | None
    source: str | None
    stage: str | None
    headers: Headers
    timestamp_ms: int | None = None


def dead_letter_from_message(key, value, headers, timestamp_ms=None) -> DeadLetter:
    """A DeadLetter from a consumed message's key, value and headers (any client)."""
    headers = [(k, v.encode() if isinstance(v, str) else v) for k, v in (headers or ())]
    return DeadLetter(
        key=key,
        value=value,
        error=header_value(headers, HEADER_ERROR),
        source=header_value(headers, HEADER_SOURCE),
        stage=header_value(headers, HEADER_STAGE),
        headers=headers,
        timestamp_ms=timestamp_ms,
    )
