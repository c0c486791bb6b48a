"""The tokenizer agent's per-micro-batch logic, free of Kafka: validate, tokenize once, update user windows.

`process_batch` takes the batch's messages and a Table-like mapping (user key bytes -> msgpack UserWindow) and returns
the dead letters and the SequenceRecords to send; the Faust agent in streams/app.py only decodes, calls it and sends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping, Sequence
from typing import Any

import msgspec

from domaintok.window import UserWindow, append_events, window_input_ids
from streams.records import (
    HEADER_FINGERPRINT,
    STAGE_TOKENIZE,
    Headers,
    SequenceRecord,
    content_type_of,
    dead_letter_headers,
    header_value,
    CONTENT_TYPE_MSGPACK,
)


class StoredWindow(UserWindow, kw_only=True):
    """A UserWindow plus the input position (partition, offset) of the newest event folded into it.

    Why: the Table write reaches the changelog before the input offset is committed, so after a crash the replayed
    events are already in the restored window; skipping offsets <= `offset` keeps n_events exact on replay.
    """

    partition: int = -1
    offset: int = -1


# Table values: the window as msgpack (compact; the changelog stores exactly these bytes).
_window_encoder = msgspec.msgpack.Encoder()
_window_decoder = msgspec.msgpack.Decoder(StoredWindow)


def encode_window(window: UserWindow) -> bytes:
    return _window_encoder.encode(window)


def decode_window(value: bytes | None) -> StoredWindow | None:
    return None if value is None else _window_decoder.decode(value)


@dataclasses.dataclass
class Message:
    """One consumed event record, as any client gives it."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclasses.dataclass
class DeadLetterOut:
    """A record for the dead-letter topic: the original key/value, original headers plus the domaintok ones."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    reason_class: str  # short label for metrics: "fingerprint", "decode", "tokenize"


@dataclasses.dataclass
class BatchResult:
    sequences: list[tuple[bytes, SequenceRecord]]  # (key, record), one per changed user, in first-seen order
    dead_letters: list[DeadLetterOut]
    good: int
    replayed: int = 0  # events already in their user's stored window (a replay after a crash), skipped


class EventDecoders:
    """The per-tokenizer decoders of raw event bytes (JSON and msgpack), built once."""

    def __init__(self, event_struct: type[msgspec.Struct]) -> None:
        self.json = msgspec.json.Decoder(event_struct)
        self.msgpack = msgspec.msgpack.Decoder(event_struct)

    def decode(self, value: bytes, headers: Headers) -> Any:
        if content_type_of(headers) == CONTENT_TYPE_MSGPACK:
            return self.msgpack.decode(value)
        return self.json.decode(value)


def _dead(msg: Message, reason: str, reason_class: str) -> DeadLetterOut:
    headers = dead_letter_headers(
        msg.headers, error=reason, topic=msg.topic, partition=msg.partition, offset=msg.offset, stage=STAGE_TOKENIZE
    )
    return DeadLetterOut(msg.key, msg.value, headers, reason_class)


def process_batch(
    tok: Any,
    decoders: EventDecoders,
    messages: Sequence[Message],
    table: MutableMapping[bytes, bytes],
    max_length: int,
) -> BatchResult:
    """Validate, tokenize (ONE encode_event_tokens call) and fold `messages` into the per-user windows of `table`.

    Each changed user's window is read once and assigned back once (a Faust Table only persists assignments).
    The table key is the record's Kafka key (so the changelog stays co-partitioned with the input), falling back
    to the tokenizer's user id when a record has no key.
    """
    fingerprint = tok.fingerprint
    dead: list[DeadLetterOut] = []
    events: list[Any] = []
    kept: list[Message] = []
    for msg in messages:
        got = header_value(msg.headers, HEADER_FINGERPRINT)
        if got != fingerprint:
            why = "missing domaintok-fingerprint header" if got is None else f"fingerprint {got!r} != tokenizer {fingerprint!r}"
            dead.append(_dead(msg, why, "fingerprint"))
            continue
        if msg.value is None:
            dead.append(_dead(msg, "empty value", "decode"))
            continue
        try:
            events.append(decoders.decode(msg.value, msg.headers))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            dead.append(_dead(msg, f"invalid event: {exc}", "decode"))
            continue
        kept.append(msg)
    if not events:
        return BatchResult([], dead, 0)

    # previous_ts: time_since_previous fields need each user's last event time from earlier batches
    # (user ids come from the schema's expression; the record key is the same id by the producers' contract).
    previous: dict[str, int] = {}
    windows: dict[bytes, UserWindow | None] = {}
    for msg in kept:
        if msg.key is not None and msg.key not in windows:
            w = windows[msg.key] = decode_window(table.get(msg.key))
            if w is not None and w.n_events:
                previous[msg.key.decode("utf-8", "replace")] = w.last_event_ts
    et = tok.encode_event_tokens(events, previous_ts=previous)

    # group good events per user key, arrival order kept
    per_user: dict[bytes, tuple[str, list, list, list[int], list[Message]]] = {}
    replayed = 0
    for i, msg in enumerate(kept):
        reason = et.errors[i]
        if reason is not None:
            dead.append(_dead(msg, reason, "tokenize"))
            continue
        user = et.user_ids[i]
        key = msg.key if msg.key is not None else user.encode("utf-8")
        stored = windows[key] if key in windows else windows.setdefault(key, decode_window(table.get(key)))
        if stored is not None and stored.partition == msg.partition and msg.offset <= stored.offset:
            replayed += 1
            continue
        slot = per_user.get(key)
        if slot is None:
            slot = per_user[key] = (user, [], [], [], [])
        slot[1].append(et.ids[et.offsets[i] : et.offsets[i + 1]])
        slot[2].append(int(et.event_ts[i]))
        slot[3].append(msg.timestamp_ms)
        slot[4].append(msg)

    out: list[tuple[bytes, SequenceRecord]] = []
    good = 0
    for key, (user, ids, ts, kafka_ts, msgs) in per_user.items():
        window = append_events(windows[key], ids, ts, max_length)
        last = msgs[-1]
        window = StoredWindow(**msgspec.structs.asdict(window), partition=last.partition, offset=last.offset)
        table[key] = encode_window(window)
        good += len(ids)
        out.append(
            (
                user.encode("utf-8"),
                SequenceRecord(
                    user_id=user,
                    input_ids=window_input_ids(window, tok.bos_token_id).tolist(),
                    n_events=window.n_events,
                    last_event_ts=window.last_event_ts,
                    source_ts_ms=max(kafka_ts),
                    fingerprint=fingerprint,
                ),
            )
        )
    return BatchResult(out, dead, good, replayed)
