"""The tokenizer agent's per-micro-batch logic, free of Kafka: validate, tokenize once, update user windows.

`process_batch` takes the batch's messages and a Table-like mapping (user key bytes -> msgpack UserWindow) and returns
the dead letters and the SequenceRecords to send; the Faust agent in streams/app.py only decodes, calls it and sends.
Whatever the bytes, no record raises out of `process_batch`: each bad one becomes a dead letter with its reason.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time
import typing
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import msgspec

from domaintok.artifacts import refuse_pickles
from domaintok.context import PreviousEvent
from domaintok.errors import ArtifactError, EventError
from domaintok.window import UserWindow, append_events, window_input_ids
from streams.records import (
    CONTENT_TYPE_MSGPACK,
    HEADER_FINGERPRINT,
    HEADER_FORWARDED,
    HEADER_TRUNCATED,
    STAGE_TOKENIZE,
    Headers,
    SequenceRecord,
    content_type_of,
    dead_letter_headers,
    header_value,
)
from streams.routing import format_origin, parse_origin
from streams.settings import DEAD_LETTER_MAX_BYTES

# An event time more than this ahead of the worker's clock is refused (reason class "time"): a clock or unit error
# (ms read as s, year 9999) that would otherwise stay the user's newest event, ahead of every later one, forever.
# The worker's clock, not the record's Kafka timestamp: producers may set that to anything (backfills, tests).
MAX_FUTURE_US = 24 * 3600 * 1_000_000
# Room kept for the dead-letter headers when a dead letter must be cut to fit DEAD_LETTER_MAX_BYTES.
_HEADER_ROOM = 64 * 1024
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def load_tokenizer(directory: Any) -> Any:
    """The fitted tokenizer a worker runs with, or ArtifactError (one line) saying why not.

    Loading reads JSON only and never unpickles, but a directory holding a pickle did not come from save_pretrained
    as it is (or was tampered with), so it is refused before anything is read. Then DomainTokenizer.from_pretrained
    refuses a missing file, another format_version, or content that no longer matches its fingerprint (a schema or
    fitted state edited by hand).
    """
    from pathlib import Path

    from domaintok.tokenizer import DomainTokenizer

    path = Path(directory)
    if not path.is_dir():
        raise ArtifactError(f"tokenizer dir {str(path)!r} does not exist")
    refuse_pickles(path, recursive=True, prefix=f"tokenizer dir {str(path)!r}")
    return DomainTokenizer.from_pretrained(path)


class StoredWindow(UserWindow, kw_only=True):
    """A UserWindow plus the input position (partition, offset) of the newest event folded into it.

    Why: the Table write reaches the changelog before the input offset is committed, so after a crash the replayed
    events are already in the restored window; skipping offsets <= `offset` keeps n_events exact on replay.
    """

    partition: int = -1
    offset: int = -1
    # origin partition -> the highest origin offset of the events forwarded here from it (a re-forward of an
    # event at or below it, after a crash of the worker that forwarded it, is a duplicate and skipped)
    origins: dict[int, int] = {}


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
    reason_class: str  # short label for metrics: "fingerprint", "decode", "tokenize", "key", "time"


@dataclasses.dataclass
class ForwardOut:
    """A valid event read off its user's home partition, to be produced again to the events topic at `partition`
    (its home) with its original key, value, headers and timestamp, plus the `domaintok-forwarded-from` header."""

    key: bytes
    value: bytes
    headers: Headers
    partition: int
    timestamp_ms: int


@dataclasses.dataclass
class BatchResult:
    sequences: list[tuple[bytes, SequenceRecord]]  # (key, record), one per changed user, in first-seen order
    dead_letters: list[DeadLetterOut]
    good: int
    replayed: int = 0  # events already in their user's stored window (a replay after a crash), skipped
    forwards: list[ForwardOut] = dataclasses.field(default_factory=list)  # events sent on to their home partition


def _fields_of_type(struct: type[msgspec.Struct], wanted: type) -> tuple[str, ...]:
    """Names of the struct's fields typed `wanted` or `wanted | None`."""
    out = []
    for field in msgspec.structs.fields(struct):
        if field.type is wanted or wanted in typing.get_args(field.type):
            out.append(field.name)
    return tuple(out)


class EventDecoders:
    """The per-tokenizer decoders of raw event bytes (JSON and msgspec), built once, plus the value checks the
    types alone do not make: floats must be finite (msgpack carries NaN/inf) and ints must fit int64 (msgspec
    accepts up to 2**64-1; Arrow and DuckDB do not)."""

    def __init__(self, event_struct: type[msgspec.Struct]) -> None:
        self.json = msgspec.json.Decoder(event_struct)
        self.msgpack = msgspec.msgpack.Decoder(event_struct)
        self.float_fields = _fields_of_type(event_struct, float)
        self.int_fields = _fields_of_type(event_struct, int)

    def decode(self, value: bytes, headers: Headers) -> Any:
        """The event, or an exception (msgspec errors, UnicodeDecodeError, EventError) saying why not."""
        if content_type_of(headers) == CONTENT_TYPE_MSGPACK:
            event = self.msgpack.decode(value)
        else:
            event = self.json.decode(value)
        for name in self.float_fields:
            v = getattr(event, name)
            if v is not None and not math.isfinite(v):
                raise EventError(f"{name} is {v} (not a finite number)")
        for name in self.int_fields:
            v = getattr(event, name)
            # -2**63 is out too: abs() of it overflows in DuckDB
            if v is not None and not _INT64_MIN < v <= _INT64_MAX:
                raise EventError(f"{name} = {v} does not fit a 64-bit integer")
        return event


def _dead(msg: Message, reason: str, reason_class: str) -> DeadLetterOut:
    """The dead letter of `msg`: its own key, value and headers plus the reason. A record too large to carry whole
    on the dead-letter topic (only possible when the events topic allows more than DEAD_LETTER_MAX_BYTES) keeps
    the first bytes of its value and says the original size in a `domaintok-truncated` header."""
    headers = dead_letter_headers(
        msg.headers, error=reason, topic=msg.topic, partition=msg.partition, offset=msg.offset, stage=STAGE_TOKENIZE
    )
    value = msg.value
    other = len(msg.key or b"") + sum(len(k) + len(v or b"") for k, v in headers)
    if value is not None and len(value) + other > DEAD_LETTER_MAX_BYTES - _HEADER_ROOM:
        headers.append((HEADER_TRUNCATED, str(len(value)).encode()))
        value = value[: max(0, DEAD_LETTER_MAX_BYTES - _HEADER_ROOM - other)]
    return DeadLetterOut(msg.key, value, headers, reason_class)


def _decode_reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"invalid event: not UTF-8 ({exc.reason} at byte {exc.start})"
    return f"invalid event: {exc}"


def _iso_us(us: int) -> str:
    try:
        return (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(us))).isoformat()
    except OverflowError:
        return f"{us} us"


def _crashing_events(tok: Any, events: list[Any], previous: dict[str, Any]) -> dict[int, str]:
    """Index -> reason for the events on which tok.encode_event_tokens raises, found by bisection.

    Why: the tokenizer reports bad rows in EventTokens.errors, but a value it did not foresee may still raise; then
    the halves are tokenized again until each raising event is alone (log2(n) rounds, only on this failure path).
    """
    try:
        tok.encode_event_tokens(events, previous)
        return {}
    except Exception as exc:  # noqa: BLE001 - one bad event must not stop the stream: it is isolated below
        if len(events) == 1:
            return {0: f"cannot tokenize: {type(exc).__name__}: {' '.join(str(exc).split())}"}
    half = len(events) // 2
    found = _crashing_events(tok, events[:half], previous)
    found.update({half + i: why for i, why in _crashing_events(tok, events[half:], previous).items()})
    return found


def process_batch(
    tok: Any,
    decoders: EventDecoders,
    messages: Sequence[Message],
    table: MutableMapping[bytes, bytes],
    max_length: int,
    max_future_us: int | None = MAX_FUTURE_US,
    now_us: int | None = None,
    replays: Sequence[Message] = (),
    home: Callable[[bytes], int] | None = None,
) -> BatchResult:
    """Validate, tokenize (ONE encode_event_tokens call) and fold `messages` into the per-user windows of `table`.

    Each changed user's window is read once and assigned back once (a Faust Table only persists assignments).
    The table key is the record's Kafka key, which must be the event's user id (UTF-8): that keeps the changelog
    co-partitioned with the input, so a record without a key or with another user's key is dead-lettered (reason
    class "key") instead of updating a window its worker may not own. Dead-lettered too: a wrong or missing
    fingerprint header, a null value, bytes that do not decode to the tokenizer's event struct (malformed JSON,
    invalid UTF-8, wrong types, missing required or unknown fields, non-finite floats, ints beyond int64), events
    the tokenizer rejects (null user id or time, schema filter) and event times more than `max_future_us` ahead of
    `now_us` (default: the clock now; max_future_us=None: no limit). Event times in the past are all accepted.

    `replays`: messages the caller already screened out as replays (the worker's position guard). They are not folded
    again, but, like the replays found here, they re-send their users' stored windows (see stored_sequences).

    `home`: key -> the user's home partition (streams/routing.py). A valid event read on another partition is not
    folded here but returned in `forwards`, to be produced to its home partition, where it arrives with the
    `domaintok-forwarded-from` header and is folded once: a forward whose origin offset is at or below the highest
    one the user's window already holds from that origin partition is a duplicate (a re-forward after a crash) and
    skipped. Events are validated (and dead-lettered) where they are first read, so a bad one is dead-lettered once.
    Forwarded events are never forwarded again: one that is still off its home partition (the partition count
    changed in between) is folded where it is. None: no forwarding (every event is folded where it is read).
    """
    dead: list[DeadLetterOut] = []
    screened = _screen(messages, tok.fingerprint, decoders, dead)
    if not screened.events:
        return BatchResult(stored_sequences(tok, table, replays), dead, 0)
    windows, previous = _stored_windows(screened.kept, table)
    et = _tokenize(tok, screened, previous, dead)
    if et is None:
        return BatchResult(stored_sequences(tok, table, replays), dead, 0)
    latest_ok = _INT64_MAX if max_future_us is None else (
        (now_us if now_us is not None else time.time_ns() // 1000) + max_future_us
    )
    routed = _route(screened, et, windows, dead, list(replays), max_future_us, latest_ok, home)
    out = _fold(tok, routed, windows, table, max_length)
    good = sum(len(slot.ids) for slot in routed.per_user.values())
    # the stored windows of replayed users go out again (ours and the caller's replays)
    out += stored_sequences(tok, table, routed.replays, skip_keys={key for key, _ in out})
    return BatchResult(out, dead, good, routed.replayed, routed.forwards)


@dataclasses.dataclass
class _Screened:
    """The records of a batch that decoded to events, with where a forwarded one was first read."""

    events: list[Any] = dataclasses.field(default_factory=list)
    kept: list[Message] = dataclasses.field(default_factory=list)
    origins: list[tuple[int, int] | None] = dataclasses.field(default_factory=list)


def _screen(messages: Sequence[Message], fingerprint: str, decoders: EventDecoders, dead: list[DeadLetterOut]) -> _Screened:
    """Step 1: the fingerprint header, the key, the value's bytes; the rest is dead-lettered."""
    out = _Screened()
    for msg in messages:
        got = header_value(msg.headers, HEADER_FINGERPRINT)
        if got != fingerprint:
            why = "missing domaintok-fingerprint header" if got is None else f"fingerprint {got!r} != tokenizer {fingerprint!r}"
            dead.append(_dead(msg, why, "fingerprint"))
            continue
        if not msg.key:
            dead.append(_dead(msg, "record has no key (the key must be the event's user id)", "key"))
            continue
        if msg.value is None:
            dead.append(_dead(msg, "empty value", "decode"))
            continue
        try:
            origin = _origin(msg.headers)
            out.events.append(decoders.decode(msg.value, msg.headers))
        except Exception as exc:  # noqa: BLE001 - whatever the bytes raise, the record goes to dead-letter
            dead.append(_dead(msg, _decode_reason(exc), "decode"))
            continue
        out.kept.append(msg)
        out.origins.append(origin)
    return out


def _stored_windows(
    kept: list[Message], table: Mapping[bytes, bytes]
) -> tuple[dict[bytes, StoredWindow | None], dict[str, PreviousEvent]]:
    """Step 2: each user's stored window, read once, and its newest event for the tokens that depend on the previous
    one (user ids come from the schema's expression; the record key is the same id, checked in _route)."""
    windows: dict[bytes, StoredWindow | None] = {}
    previous: dict[str, PreviousEvent] = {}
    for msg in kept:
        if msg.key not in windows:
            w = windows[msg.key] = decode_window(table.get(msg.key))
            if w is not None and w.n_events:
                previous[msg.key.decode("utf-8", "replace")] = PreviousEvent(w.last_event_ts, w.context)
    return windows, previous


def _tokenize(tok: Any, screened: _Screened, previous: dict[str, PreviousEvent], dead: list[DeadLetterOut]):
    """Step 3: ONE encode_event_tokens call; if the tokenizer raises, the events that make it raise are isolated,
    dead-lettered and dropped from `screened`, and the rest tokenized again. None when no event is left."""
    try:
        return tok.encode_event_tokens(screened.events, previous)
    except Exception:  # noqa: BLE001 - isolate the events that make the tokenizer raise, then go on without them
        crashed = _crashing_events(tok, screened.events, previous)
    dead += [_dead(screened.kept[i], why, "tokenize") for i, why in sorted(crashed.items())]
    screened.kept = [m for i, m in enumerate(screened.kept) if i not in crashed]
    screened.origins = [o for i, o in enumerate(screened.origins) if i not in crashed]
    screened.events = [e for i, e in enumerate(screened.events) if i not in crashed]
    return tok.encode_event_tokens(screened.events, previous) if screened.events else None


@dataclasses.dataclass
class _UserEvents:
    """One user's good events of the batch, in arrival order."""

    user: str
    ids: list = dataclasses.field(default_factory=list)
    ts: list[int] = dataclasses.field(default_factory=list)
    kafka_ts: list[int] = dataclasses.field(default_factory=list)
    msgs: list[Message] = dataclasses.field(default_factory=list)
    context: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Routed:
    per_user: dict[bytes, _UserEvents]
    forwards: list[ForwardOut]
    replays: list[Message]
    replayed: int
    seen_origins: dict[bytes, dict[int, int]]  # per user: the stored origins, advanced by this batch


def _route(screened: _Screened, et: Any, windows: dict[bytes, StoredWindow | None], dead: list[DeadLetterOut],
           replays: list[Message], max_future_us: int | None, latest_ok: int, home) -> _Routed:
    """Step 4: each tokenized event is dead-lettered (tokenizer reason, key, future time), forwarded to its home
    partition, skipped as a replay, or grouped under its user for folding."""
    routed = _Routed({}, [], replays, 0, {})
    for i, msg in enumerate(screened.kept):
        reason = et.errors[i]
        if reason is not None:
            dead.append(_dead(msg, reason, "tokenize"))
            continue
        user, key = et.user_ids[i], msg.key
        if key != user.encode("utf-8"):
            dead.append(_dead(msg, f"record key {key[:100]!r} is not the event's user id {user[:100]!r}", "key"))
            continue
        if et.event_ts[i] > latest_ok:
            why = f"event time {_iso_us(et.event_ts[i])} is more than {max_future_us / 3.6e9:g} h in the future"
            dead.append(_dead(msg, why, "time"))
            continue
        origin = screened.origins[i]
        if origin is None and home is not None and home(key) != msg.partition:
            routed.forwards.append(_forward(msg, home(key)))
            continue
        if _is_replay(msg, origin, windows[key], routed):
            continue
        slot = routed.per_user.get(key)
        if slot is None:
            slot = routed.per_user[key] = _UserEvents(user)
        slot.ids.append(et.ids[et.offsets[i] : et.offsets[i + 1]])
        slot.ts.append(int(et.event_ts[i]))
        slot.kafka_ts.append(msg.timestamp_ms)
        slot.msgs.append(msg)
        slot.context.append(et.context[i])
    return routed


def _is_replay(msg: Message, origin: tuple[int, int] | None, stored: StoredWindow | None, routed: _Routed) -> bool:
    """True for an event the user's window already holds: at or below its stored input position, or a forward at or
    below the highest origin offset seen from that origin partition (a re-forward after a crash)."""
    if stored is not None and stored.partition == msg.partition and msg.offset <= stored.offset:
        routed.replayed += 1
        routed.replays.append(msg)
        return True
    if origin is not None:
        seen = routed.seen_origins.get(msg.key)
        if seen is None:
            seen = routed.seen_origins[msg.key] = dict(stored.origins) if stored is not None else {}
        if origin[1] <= seen.get(origin[0], -1):
            routed.replayed += 1  # the same event forwarded again (its forwarder replayed it after a crash)
            return True
        seen[origin[0]] = origin[1]
    return False


def _fold(tok: Any, routed: _Routed, windows: dict[bytes, StoredWindow | None], table: MutableMapping[bytes, bytes],
          max_length: int) -> list[tuple[bytes, SequenceRecord]]:
    """Step 5: each user's events into their window (read once, assigned back once: a Faust Table only persists
    assignments), and the user's new sequence record."""
    out: list[tuple[bytes, SequenceRecord]] = []
    for key, slot in routed.per_user.items():
        stored = windows[key]
        window = append_events(stored, slot.ids, slot.ts, max_length, slot.context)
        last = slot.msgs[-1]
        origins_now = routed.seen_origins.get(key, stored.origins if stored is not None else {})
        window = StoredWindow(**msgspec.structs.asdict(window), partition=last.partition, offset=last.offset,
                              origins=origins_now)
        table[key] = encode_window(window)
        out.append((
            slot.user.encode("utf-8"),
            SequenceRecord(
                user_id=slot.user,
                input_ids=window_input_ids(window, tok.bos_token_id).tolist(),
                n_events=window.n_events,
                last_event_ts=window.last_event_ts,
                source_ts_ms=max(slot.kafka_ts),
                fingerprint=tok.fingerprint,
            ),
        ))
    return out


def _origin(headers: Headers) -> tuple[int, int] | None:
    """Where a forwarded event was first read (its `domaintok-forwarded-from` header); None for a producer's own.
    A malformed header raises ValueError (the record is dead-lettered as undecodable)."""
    value = header_value(headers, HEADER_FORWARDED)
    return None if value is None else parse_origin(value)


def _forward(msg: Message, partition: int) -> ForwardOut:
    headers = [*msg.headers, (HEADER_FORWARDED, format_origin(msg.partition, msg.offset))]
    return ForwardOut(msg.key, msg.value, headers, partition, msg.timestamp_ms)


def stored_sequences(
    tok: Any, table: Mapping[bytes, bytes], replays: Sequence[Message], skip_keys: set[bytes] | frozenset = frozenset()
) -> list[tuple[bytes, SequenceRecord]]:
    """The stored window of each user with a replayed event (first-seen order, users in `skip_keys` left out), to be
    sent again.

    Why: a replay means the batch that first folded the event was never acknowledged. Its Table writes can have
    reached the changelog while its sequence sends did not (a crash between the two, or a send the broker refused),
    so skipping the replay in silence would leave the user's newest window unsent until their next event. Sent
    again, it is at worst a duplicate: the same window with the same n_events.

    Only the replay of the event the stored window ends with re-sends it: that event is in every replay of the
    unacknowledged batch, and the check keeps a window read at any other moment (mid-rebalance it can be behind)
    from going out as a record whose n_events goes backwards.
    """
    out: list[tuple[bytes, SequenceRecord]] = []
    seen = set(skip_keys)
    for msg in replays:
        key = msg.key
        if not key or key in seen:
            continue
        window = decode_window(table.get(key))
        if window is None or (window.partition, window.offset) != (msg.partition, msg.offset):
            continue  # only the replay of the window's newest event re-sends it (see below)
        seen.add(key)
        out.append((key, SequenceRecord(
            user_id=key.decode("utf-8"),
            input_ids=window_input_ids(window, tok.bos_token_id).tolist(),
            n_events=window.n_events,
            last_event_ts=window.last_event_ts,
            source_ts_ms=msg.timestamp_ms,
            fingerprint=tok.fingerprint,
        )))
    return out
