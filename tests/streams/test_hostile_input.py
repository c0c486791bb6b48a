"""Hostile input to the tokenizer agent: a hypothesis fuzz of 100,000+ generated records through the pure per-batch
function, the same generator's sample through the real Faust worker on Apache Kafka, and the out-of-order rule.

Every generated record says what must happen to it: valid ones are counted in their user's window, invalid ones
land in dead-letter with their original key, value and headers and a reason of the expected class.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import itertools
import random
import time
import uuid

import msgspec
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domaintok.window import append_events
from streams.records import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_MSGPACK,
    HEADER_CONTENT_TYPE,
    HEADER_ERROR,
    HEADER_FINGERPRINT,
    HEADER_SOURCE,
    HEADER_STAGE,
    header_value,
)
from streams.tokenizer_agent import EventDecoders, Message, decode_window, process_batch

N_USERS = 40  # few users, many events each: windows fill, truncate and see events out of order
# A wrong type per field (an int is a valid float, so Price gets no ints).
WRONG_VALUES = {
    "Quantity": ["12", [1], {"a": 1}, True, 1.5],
    "CustomerID": ["17850", [17850], True, 1.5],
    "InvoiceDate": [12345, "not a date", "2010-13-45T99:00:00", [1], True],
    "Price": ["2.55", [1], True, {"a": 1}],
    "Description": [5, [1], {"a": 1}, True],
}
_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()


@dataclasses.dataclass
class Case:
    """One generated record and what must become of it: `expect` is None for a valid event (counted for `user`),
    else the reason classes its dead letter may have."""

    kind: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    expect: frozenset[str] | None
    user: bytes | None = None


# -- the generator ----------------------------------------------------------------------------------------------

VALID_KINDS = ("valid", "valid", "valid", "valid", "unknown_category", "extreme_amount", "long_string", "far_past",
               "near_future", "msgpack", "nulls")
INVALID_KINDS = {
    "truncated_json": {"decode"},
    "garbage_bytes": {"decode", "tokenize"},  # b"{}" decodes to an all-null event: the tokenizer refuses it
    "nan_literal": {"decode"},
    "nonfinite_msgpack": {"decode"},
    "wrong_type": {"decode"},
    "missing_user": {"tokenize"},
    "missing_time": {"tokenize"},
    "extra_field": {"decode"},
    "int_overflow": {"decode"},
    "invalid_utf8": {"decode"},
    "far_future": {"time"},
    "wrong_fingerprint": {"fingerprint"},
    "empty_key": {"key"},
    "wrong_key": {"key"},
    "null_value": {"decode"},
    "deep_nesting": {"decode"},
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """What hypothesis draws for one kind of record: field overrides and the other knobs of the defect. It is
    applied to several real events (`build`), so hypothesis explores the defects while the pool gives volume."""

    kind: str
    fields: dict
    knobs: dict


@st.composite
def hostile_spec(draw, fingerprint: str, big: int, now: dt.datetime) -> Spec:
    """One record kind (valid kinds weighted ~2/3) with its drawn values."""
    kind = draw(st.sampled_from(VALID_KINDS * 3 + tuple(INVALID_KINDS)))
    f: dict = {}
    k: dict = {}
    if kind == "unknown_category":
        f["Country"] = draw(st.text(max_size=20))
        f["StockCode"] = draw(st.text(max_size=12))
    elif kind == "extreme_amount":
        f["Price"] = draw(st.floats(allow_nan=False, allow_infinity=False))
        f["Quantity"] = draw(st.integers(-(2**63) + 1, 2**63 - 1))
    elif kind == "long_string":  # mostly short: a few 1 MB strings per 100k records keep the test fast
        size = draw(st.sampled_from([0, 1, 10, 100, 1000, 10_000] * 8 + [100_000, big]))
        f["Description"] = ("word " * (size // 5 + 1))[:size]
    elif kind == "far_past":
        f["InvoiceDate"] = draw(st.datetimes(dt.datetime(1, 1, 1), dt.datetime(1990, 1, 1)))
    elif kind == "near_future":
        f["InvoiceDate"] = now + dt.timedelta(seconds=draw(st.integers(0, 12 * 3600)))
    elif kind == "far_future":
        f["InvoiceDate"] = draw(st.datetimes(dt.datetime(2100, 1, 1), dt.datetime(9999, 12, 31)))
    elif kind == "nulls":
        names = ["Invoice", "StockCode", "Description", "Quantity", "Price", "Country"]
        f.update(dict.fromkeys(draw(st.sets(st.sampled_from(names))), None))
    elif kind == "extra_field":
        f[draw(st.sampled_from(["coupon", "customerid", "__user", "Price "]))] = draw(st.integers() | st.text(max_size=5))
    elif kind == "int_overflow":
        f[draw(st.sampled_from(["Quantity", "CustomerID"]))] = draw(
            st.integers(2**63, 2**70) | st.integers(-(2**70), -(2**63)))
    elif kind == "wrong_type":
        name = draw(st.sampled_from(sorted(WRONG_VALUES)))
        f[name] = draw(st.sampled_from(WRONG_VALUES[name]))
    elif kind == "nonfinite_msgpack":
        f["Price"] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    elif kind == "truncated_json":
        k["cut"] = draw(st.floats(0, 1, exclude_max=True))
    elif kind == "garbage_bytes":
        k["bytes"] = draw(st.binary(max_size=64))
    elif kind == "nan_literal":  # 1e999 is valid JSON but out of float range: refused too
        k["literal"] = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]))
    elif kind == "invalid_utf8":
        k["bad"] = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80abc"]))
    elif kind == "wrong_fingerprint":
        k["fp"] = draw(st.sampled_from([None, b"", b"0" * 25, b"\xff\xfe", fingerprint.encode()[:-1] + b"x"]))
    elif kind == "empty_key":
        k["key"] = draw(st.sampled_from([None, b""]))
    elif kind == "wrong_key":
        k["key_of"] = draw(st.sampled_from(["space", "zero", "ff", "utf16", "long"]))
    elif kind == "deep_nesting":
        depth = draw(st.integers(1, 100_000))
        k["bytes"] = draw(st.sampled_from([b"[" * depth, b'{"a":' * depth, b"[" * depth + b"]" * depth]))
    return Spec(kind, f, k)


def build(spec: Spec, event: msgspec.Struct, fingerprint: str) -> Case:
    """The record `spec` describes, made from one real event."""
    kind, k = spec.kind, spec.knobs
    base = {**msgspec.structs.asdict(event), **spec.fields}
    user = str(event.CustomerID).encode()
    if kind == "missing_user":
        del base["CustomerID"]
    elif kind == "missing_time":
        del base["InvoiceDate"]
    msgpack = kind in ("msgpack", "nonfinite_msgpack")
    value: bytes | None = _msgpack.encode(base) if msgpack else _json.encode(base)
    if kind == "truncated_json":
        value = value[: int(k["cut"] * len(value))]
    elif kind in ("garbage_bytes", "deep_nesting"):
        value = k["bytes"]
    elif kind == "nan_literal":
        value = _json.encode({**base, "Price": "@@P@@"}).replace(b'"@@P@@"', k["literal"])
    elif kind == "invalid_utf8":
        value = _json.encode({**base, "Description": "@@BAD@@"}).replace(b"@@BAD@@", k["bad"])
    elif kind == "null_value":
        value = None
    key = {"space": user + b" ", "zero": b"0" + user, "ff": b"\xff" + user, "utf16": user.decode().encode("utf-16"),
           "long": b"x" * 300}.get(k.get("key_of"), k.get("key", user))
    fp = k.get("fp", fingerprint.encode())
    headers = [(HEADER_CONTENT_TYPE, (CONTENT_TYPE_MSGPACK if msgpack else CONTENT_TYPE_JSON).encode())]
    if fp is not None:
        headers.append((HEADER_FINGERPRINT, fp))
    expect = None if kind in VALID_KINDS else frozenset(INVALID_KINDS[kind])
    return Case(kind, key, value, headers, expect, user if expect is None else None)


def generate(pool: list, fingerprint: str, n: int, *, big: int, per_spec: int = 10) -> list[list[Case]]:
    """At least `n` cases in batches. Hypothesis draws 10-40 specs per batch (so a failing batch is reported and
    shrunk); each spec is applied to `per_spec` real events spread over the pool."""
    now = dt.datetime.now()
    batches: list[list[Case]] = []
    stride = max(1, len(pool) // per_spec)

    @settings(max_examples=max(1, n // (25 * per_spec)), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(hostile_spec(fingerprint, big, now), st.integers(0, len(pool) - 1)), min_size=10, max_size=40))
    def collect(specs):
        batches.append([build(spec, pool[(start + j * stride) % len(pool)], fingerprint)
                        for spec, start in specs for j in range(per_spec)])

    while sum(map(len, batches)) < n:
        collect()
    return batches


def big_cases(pool: list, fingerprint: str, size: int) -> list[Case]:
    """Records with a `size`-character string, valid and invalid, so every run has some (the drawn ones are rare)."""
    text = ("word " * (size // 5 + 1))[:size]
    specs = [Spec("long_string", {"Description": text}, {})] * 3 + [
        Spec("wrong_fingerprint", {"Description": text}, {"fp": b"other"}),
        Spec("truncated_json", {"Description": text}, {"cut": 0.999}),
        Spec("wrong_key", {"Description": text}, {"key_of": "zero"}),
        Spec("far_future", {"Description": text, "InvoiceDate": dt.datetime(3000, 1, 1)}, {}),
    ]
    return [build(spec, pool[i * 7 % len(pool)], fingerprint) for i, spec in enumerate(specs)]


# -- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(retail_domain_tokenizer, retail_events_slice) -> list:
    """Real Online Retail events of N_USERS customers, as the tokenizer's event structs."""
    tok = retail_domain_tokenizer
    table = pq.read_table(retail_events_slice)
    rows = []
    for row in table.to_pylist():
        if row["CustomerID"] is None:
            continue
        row = {("Invoice" if k == "InvoiceNo" else "Price" if k == "UnitPrice" else k): v for k, v in row.items()}
        row["CustomerID"] = int(row["CustomerID"])
        rows.append(msgspec.convert(row, tok.event_struct, strict=False))
    users = sorted({r.CustomerID for r in rows})[:N_USERS]
    return [r for r in rows if r.CustomerID in set(users)]


def _messages(cases: list[Case], offsets, topic: str = "events") -> list[Message]:
    now_ms = int(time.time() * 1000)
    return [Message(c.key, c.value, c.headers, topic, 0, next(offsets), now_ms) for c in cases]


# -- the fuzz through the pure function -------------------------------------------------------------------------


def test_fuzz_100k_records_every_one_accounted_for(retail_domain_tokenizer, pool):
    tok = retail_domain_tokenizer
    decoders = EventDecoders(tok.event_struct)
    table: dict[bytes, bytes] = {}
    offsets = itertools.count()
    kinds: collections.Counter[str] = collections.Counter()
    started = time.perf_counter()
    batches = generate(pool, tok.fingerprint, 100_000, big=1_000_000)
    batches[0] += big_cases(pool, tok.fingerprint, 1_000_000)
    generated = time.perf_counter() - started
    for cases in batches:
        msgs = _messages(cases, offsets)
        before = {c.user: _n_events(table, c.user) for c in cases if c.expect is None}
        result = process_batch(tok, decoders, msgs, table, tok.max_length)  # must not raise, whatever the bytes
        by_offset = {int(header_value(d.headers, HEADER_SOURCE).rsplit("/", 1)[1]): d for d in result.dead_letters}
        valid_per_user = collections.Counter(c.user for c in cases if c.expect is None)
        for msg, case in zip(msgs, cases):
            kinds[case.kind] += 1
            dead = by_offset.get(msg.offset)
            if case.expect is None:
                assert dead is None, f"valid {case.kind} event dead-lettered: {header_value(dead.headers, HEADER_ERROR)}"
                continue
            assert dead is not None, f"invalid {case.kind} record not dead-lettered"
            assert dead.reason_class in case.expect, (case.kind, dead.reason_class, header_value(dead.headers, HEADER_ERROR))
            assert (dead.key, dead.value) == (case.key, case.value)  # the original bytes
            assert header_value(dead.headers, HEADER_ERROR) and header_value(dead.headers, HEADER_STAGE) == "tokenize"
            assert [h for h in dead.headers if h[0] in (HEADER_CONTENT_TYPE, HEADER_FINGERPRINT)] == case.headers
        assert len(result.dead_letters) == sum(c.expect is not None for c in cases)
        assert result.good == sum(valid_per_user.values()) and result.replayed == 0
        for user, n in valid_per_user.items():
            assert _n_events(table, user) == before[user] + n
        for _, record in result.sequences:  # the emitted window is the stored one
            assert record.n_events == _n_events(table, record.user_id.encode())
    total = sum(kinds.values())
    print(f"fuzz: {total:,} records ({sum(kinds[k] for k in set(VALID_KINDS)):,} valid) in "
          f"{time.perf_counter() - started:.1f} s (generation {generated:.1f} s); kinds: {dict(sorted(kinds.items()))}")
    assert total >= 100_000
    assert set(kinds) == set(VALID_KINDS) | set(INVALID_KINDS)


def _n_events(table, user: bytes) -> int:
    window = decode_window(table.get(user))
    return 0 if window is None else window.n_events


# -- the same generator through the real Faust worker on Apache Kafka --------------------------------------------

HEADER_CASE = "test-case"  # our own header: dead letters keep the original headers, so it names the case
REASON_TEXT = {  # reason class -> what its domaintok-error header says
    "fingerprint": ("fingerprint",),
    "key": ("record has no key", "is not the event's user id"),
    "decode": ("invalid event", "empty value"),
    "tokenize": ("null user id", "null or unparseable event time", "excluded by the schema filter", "cannot tokenize"),
    "time": ("in the future",),
}


def _sequence_counts(settings, expected: dict[str, int], timeout: float) -> dict[str, int]:
    """Per user, the largest n_events on the sequences topic, read until it reaches `expected` or `timeout`."""
    from streams.clients import _TopicReader
    from streams.records import decode_sequence

    class SequenceReader(_TopicReader):
        def _decode(self, msg):
            return decode_sequence(msg.value())

    best: dict[str, int] = {}
    with SequenceReader(settings, settings.topic_sequences) as reader:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(best.get(u, 0) < n for u, n in expected.items()):
            for rec in reader.poll_batch(5000, timeout=0.5):
                best[rec.user_id] = max(best.get(rec.user_id, 0), rec.n_events)
    return best


@pytest.mark.integration
@pytest.mark.requires_apache("dead-letter and Table guarantees are tested on Apache Kafka")
def test_real_worker_survives_hostile_sample(kafka_settings, retail_tokenizer, retail_domain_tokenizer, pool, tmp_path):
    from streams.clients import DeadLetterReader, DeliveryError, EventProducer
    from localkafka.demo import start_tokenizer, stop_process, wait_ready

    tok = retail_domain_tokenizer
    # ~900 kB strings: the largest that fit the producer's message.max.bytes (1,000,000) with the event around them
    cases = [c for batch in generate(pool, tok.fingerprint, 12_000, big=900_000) for c in batch]
    cases += big_cases(pool, tok.fingerprint, 900_000)
    n_big = sum(c.value is not None and len(c.value) > 800_000 for c in cases)
    log = tmp_path / "tokenizer.log"
    app_id = f"hostile-{uuid.uuid4().hex[:8]}"
    proc = start_tokenizer(kafka_settings, retail_tokenizer, app_id, log)
    try:
        wait_ready(proc, log)
        producer = EventProducer(kafka_settings)
        for i, case in enumerate(cases):
            producer.send(case.value, case.key, [*case.headers, (HEADER_CASE, str(i).encode())])
        # over the producer's message.max.bytes: refused by the client, counted, reported; the rest still flows
        oversized = b'{"Description": "' + b"x" * 1_100_000 + b'"}'
        producer.send(oversized, b"12345", [(HEADER_FINGERPRINT, tok.fingerprint.encode())])
        with pytest.raises(DeliveryError, match=r"1 refused as larger than message.max.bytes \(1000000\)"):
            producer.flush()
        assert producer.too_large == 1 and producer.sent == len(cases)
        # near the events topic's own limit (1 MiB, random bytes: lz4 cannot shrink them) with a long bad
        # fingerprint: its dead letter (value + reason) is over 1 MiB, which only the dead-letter topic's larger
        # max.message.bytes lets through (with the default limit the agent crashes on MessageSizeTooLargeError)
        edge = Case("edge_of_topic_limit", b"12345", random.Random(0).randbytes(1_047_300),
                    [(HEADER_FINGERPRINT, b"f" * 900)], frozenset({"fingerprint"}))
        cases.append(edge)
        with EventProducer(kafka_settings, **{"message.max.bytes": 1_048_576}) as wide:
            wide.send(edge.value, edge.key, [*edge.headers, (HEADER_CASE, str(len(cases) - 1).encode())])

        expected = collections.Counter(c.user.decode() for c in cases if c.expect is None)
        counts = _sequence_counts(kafka_settings, expected, timeout=180)
        invalid = {i: c for i, c in enumerate(cases) if c.expect is not None}
        with DeadLetterReader(kafka_settings) as reader:
            dead = list(reader.records(max_records=len(invalid) + 10, idle_timeout=10))
        assert proc.poll() is None, "the worker died"
    finally:
        stop_process(proc)
    text = log.read_text(errors="replace")
    # an agent that crashes leaves the process alive: its log is what shows it
    assert "Traceback" not in text and "Crashed" not in text and text.count("[^Worker]: Ready") == 1

    assert counts == dict(expected)  # every valid event counted exactly once in its user's window
    seen = collections.Counter()
    for d in dead:
        i = int(header_value(d.headers, HEADER_CASE))
        case = invalid[i]  # KeyError: a valid event was dead-lettered
        seen[i] += 1
        assert (d.key, d.value) == (case.key, case.value), case.kind
        assert d.stage == "tokenize" and d.source.startswith(kafka_settings.topic_events + "/")
        assert any(t in d.error for cls in case.expect for t in REASON_TEXT[cls]), (case.kind, d.error)
    assert set(seen) == set(invalid) and max(seen.values()) == 1  # each invalid record exactly once
    print(f"worker: {len(cases):,} records ({len(invalid):,} invalid, {n_big} of ~900 kB) -> "
          f"{sum(expected.values()):,} events counted for {len(expected)} users, {len(dead):,} dead letters")


def test_dead_letter_too_large_for_its_topic_is_cut_and_says_so(retail_domain_tokenizer):
    from streams.records import HEADER_TRUNCATED
    from streams.settings import DEAD_LETTER_MAX_BYTES

    tok = retail_domain_tokenizer
    huge = b"{" + b" " * (DEAD_LETTER_MAX_BYTES + 10) + b"}"  # only an events topic configured above 2 MiB has it
    msg = Message(b"1", huge, [(HEADER_FINGERPRINT, tok.fingerprint.encode())], "events", 0, 0, 0)
    [dead] = process_batch(tok, EventDecoders(tok.event_struct), [msg], {}, tok.max_length).dead_letters
    size = len(dead.key) + len(dead.value) + sum(len(k) + len(v) for k, v in dead.headers)
    assert size <= DEAD_LETTER_MAX_BYTES and huge.startswith(dead.value)
    assert header_value(dead.headers, HEADER_TRUNCATED) == str(len(huge))
    small = Message(b"1", b"{", msg.headers, "events", 0, 1, 0)
    [dead] = process_batch(tok, EventDecoders(tok.event_struct), [small], {}, tok.max_length).dead_letters
    assert dead.value == b"{" and header_value(dead.headers, HEADER_TRUNCATED) is None


# -- out-of-order events within a user ---------------------------------------------------------------------------


def test_out_of_order_rule_on_windows():
    """Insert by event time (ties after equal times), count every event, and never insert one older than an event
    the window already dropped: it could not be among the newest events that fit."""
    two = [[1, 2]]
    w = None
    for ts in (10, 30, 20):
        w = append_events(w, two, [ts], max_length=1 + 6)  # room for three 2-token events
    assert (w.event_ts, w.n_events, w.last_event_ts, w.dropped_ts) == ([10, 20, 30], 3, 30, None)
    w = append_events(w, [[7, 7]], [20], max_length=7)  # a tie goes after the events already there: drops 10
    assert (w.event_ts, w.ids[-4:-2], w.dropped_ts) == ([20, 20, 30], [7, 7], 10)
    w = append_events(w, [[5, 5]], [5], max_length=7)  # older than the dropped 10: counted, not inserted
    assert (w.event_ts, w.n_events, w.last_event_ts) == ([20, 20, 30], 5, 30)
    w = append_events(w, [[25, 25]], [25], max_length=7)  # late but newer than what was dropped: inserted
    assert (w.event_ts, w.n_events, w.last_event_ts, w.dropped_ts) == ([20, 25, 30], 6, 30, 20)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_arrival_order_gives_the_offline_window(retail_domain_tokenizer, pool, data):
    """Whatever order a user's events arrive in (and however they are split into batches), the final window holds
    the same events, in the same order, as the offline tokenize() of the same events, and n_events counts them all.
    Only time-since-previous tokens may differ: online they are computed when the event arrives, against the newest
    earlier event of its user (GAP_FIRST when it is older than that one), and are not recomputed later."""
    tok = retail_domain_tokenizer
    by_user = collections.defaultdict(list)
    for event in pool:
        by_user[event.CustomerID].append(event)
    user = data.draw(st.sampled_from(sorted(u for u, evs in by_user.items() if len(evs) >= 20)))
    events = data.draw(st.permutations(by_user[user][:60]))
    max_length = data.draw(st.sampled_from([24, 64, 200]))  # small windows: truncation and late events meet
    cuts = sorted(data.draw(st.sets(st.integers(1, len(events) - 1), max_size=5)))
    decoders = EventDecoders(tok.event_struct)
    table: dict[bytes, bytes] = {}
    key = str(user).encode()
    headers = [(HEADER_CONTENT_TYPE, b"application/json"), (HEADER_FINGERPRINT, tok.fingerprint.encode())]
    msgs = [Message(key, _json.encode(e), headers, "events", 0, i, 0) for i, e in enumerate(events)]
    record = None
    for start, end in zip([0, *cuts], [*cuts, len(msgs)]):
        result = process_batch(tok, decoders, msgs[start:end], table, max_length)
        assert result.dead_letters == []
        record = result.sequences[-1][1]
    assert record.n_events == len(events)
    offline = tok.encode_events(list(events), max_length=max_length).tolist()
    names = tok.token_names()
    assert len(record.input_ids) == len(offline)
    assert [i if "_GAP_" not in names[i] else "gap" for i in record.input_ids] == [
        i if "_GAP_" not in names[i] else "gap" for i in offline]
