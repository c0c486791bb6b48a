"""The tokenizer agent's pure per-batch logic without Kafka: windows in a plain dict stand in for the Faust Table,
and the emitted sequences must equal the offline tokenize() of the same events; bad records go to dead-letter."""

from __future__ import annotations

import msgspec
import pyarrow.parquet as pq
import pytest

from streams.records import HEADER_ERROR, HEADER_SOURCE, HEADER_STAGE, event_headers, header_value
from streams.tokenizer_agent import EventDecoders, Message, decode_window, process_batch


@pytest.fixture(scope="module")
def retail_rows(retail_domain_tokenizer, retail_events_slice):
    tok = retail_domain_tokenizer
    table = pq.read_table(retail_events_slice)
    table = table.filter(table.column("CustomerID").is_valid()).slice(0, 3000)
    struct = tok.event_struct
    rows = []
    for row in table.to_pylist():
        row = {("Invoice" if k == "InvoiceNo" else "Price" if k == "UnitPrice" else k): v for k, v in row.items()}
        row["CustomerID"] = int(row["CustomerID"])
        rows.append(msgspec.convert(row, struct, strict=False))
    return table, rows


def _messages(tok, rows, start=0):
    enc = msgspec.json.Encoder()
    headers = event_headers(tok.fingerprint)
    return [
        Message(str(r.CustomerID).encode(), enc.encode(r), headers, "events", 0, start + i, 1_000 + i)
        for i, r in enumerate(rows)
    ]


@pytest.fixture(scope="module")
def change_only_tokenizer(retail_events_slice):
    """The online_retail schema with calendar tokens only where they change (domaintok/context.py)."""
    from domaintok.schema import load_schema, schema_from_dict
    from domaintok.tokenizer import DomainTokenizer

    raw = msgspec.to_builtins(load_schema("online_retail"))
    for field in raw["fields"]:
        if field["type"] == "temporal":
            field["params"] = {**field.get("params", {}), "only_changes": True}
    return DomainTokenizer.fit(schema_from_dict(raw), retail_events_slice, bpe_vocab_size=600)


@pytest.fixture(scope="module")
def compact_tokenizer(retail_events_slice):
    """online_retail_compact.yaml: only_changes calendar tokens and semantic-ID stock codes, no description BPE."""
    from domaintok.tokenizer import DomainTokenizer

    return DomainTokenizer.fit("online_retail_compact", retail_events_slice)


@pytest.fixture(scope="module")
def actionpiece_tokenizer(retail_events_slice):
    """online_retail_compact.yaml plus 300 ActionPiece merges of the fields' tokens."""
    from domaintok.schema import load_schema, schema_from_dict
    from domaintok.tokenizer import DomainTokenizer

    raw = msgspec.to_builtins(load_schema("online_retail_compact"))
    raw["actionpiece"] = {"merges": 300}
    return DomainTokenizer.fit(schema_from_dict(raw), retail_events_slice)


@pytest.mark.parametrize("schema", ["online_retail", "only_changes", "online_retail_compact", "actionpiece"])
def test_batches_match_offline_tokenize(schema, retail_domain_tokenizer, change_only_tokenizer, compact_tokenizer,
                                        actionpiece_tokenizer, retail_rows):
    tok = {"online_retail": retail_domain_tokenizer, "only_changes": change_only_tokenizer,
           "online_retail_compact": compact_tokenizer, "actionpiece": actionpiece_tokenizer}[schema]
    table, rows = retail_rows
    decoders = EventDecoders(tok.event_struct)
    state: dict[bytes, bytes] = {}
    latest = {}
    msgs = _messages(tok, rows)
    for start in range(0, len(msgs), 700):  # several micro-batches: windows carry over through the mapping
        res = process_batch(tok, decoders, msgs[start : start + 700], state, tok.max_length)
        assert res.dead_letters == []
        assert len({k for k, _ in res.sequences}) == len(res.sequences)  # one record per changed user
        for key, rec in res.sequences:
            latest[rec.user_id] = rec
    offline = tok.tokenize(table).to_pylist()
    assert len(offline) == len(latest) > 10
    for row in offline:
        rec = latest[row["user_id"]]
        assert rec.n_events == row["n_events"]
        assert rec.input_ids == list(row["input_ids"])
        assert rec.fingerprint == tok.fingerprint
        window = decode_window(state[row["user_id"].encode()])
        assert window.n_events == row["n_events"]


def test_bad_records_dead_lettered_good_ones_flow(retail_domain_tokenizer, retail_rows):
    tok = retail_domain_tokenizer
    _, rows = retail_rows
    good = _messages(tok, rows[:5])
    wrong_fp = Message(b"1", good[0].value, event_headers("other-fingerprint"), "events", 1, 7, 0)
    garbage = Message(b"2", b"{not json", event_headers(tok.fingerprint), "events", 2, 8, 0)
    unknown = Message(b"3", b'{"nope": 1}', event_headers(tok.fingerprint), "events", 3, 9, 0)
    msgs = [wrong_fp, *good, garbage, unknown]
    res = process_batch(tok, EventDecoders(tok.event_struct), msgs, {}, tok.max_length)
    assert res.good == 5
    assert [d.reason_class for d in res.dead_letters] == ["fingerprint", "decode", "decode"]
    first = res.dead_letters[0]
    assert first.value == good[0].value and first.key == b"1"
    assert header_value(first.headers, HEADER_SOURCE) == "events/1/7"
    assert header_value(first.headers, HEADER_STAGE) == "tokenize"
    assert "fingerprint" in header_value(first.headers, HEADER_ERROR)
    assert sum(rec.n_events for _, rec in res.sequences) == 5


def test_replayed_offsets_are_not_counted_twice(retail_domain_tokenizer, retail_rows):
    # A crash after the Table write but before the offset commit replays the batch: n_events must stay exact.
    tok = retail_domain_tokenizer
    _, rows = retail_rows
    msgs = _messages(tok, rows[:400])
    decoders = EventDecoders(tok.event_struct)
    state: dict[bytes, bytes] = {}
    first = process_batch(tok, decoders, msgs[:300], state, tok.max_length)
    again = process_batch(tok, decoders, msgs[200:400], state, tok.max_length)
    assert again.replayed == 100 and again.good == 100
    once: dict[bytes, bytes] = {}
    process_batch(tok, decoders, msgs, once, tok.max_length)
    assert {k: decode_window(v).n_events for k, v in state.items()} == {k: decode_window(v).n_events for k, v in once.items()}
    assert first.good == 300


def test_a_replay_sends_the_stored_window_again(retail_domain_tokenizer, retail_rows):
    # The Table write of a batch can reach the changelog while its sequence sends never do (a crash between the
    # two, a send the broker refuses): a replay must send each replayed user's stored window again.
    tok = retail_domain_tokenizer
    _, rows = retail_rows
    msgs = _messages(tok, rows[:300])
    decoders = EventDecoders(tok.event_struct)
    state: dict[bytes, bytes] = {}
    first = dict(process_batch(tok, decoders, msgs, state, tok.max_length).sequences)
    again = process_batch(tok, decoders, msgs, state, tok.max_length)
    assert again.replayed == 300 and again.good == 0
    assert dict(again.sequences).keys() == first.keys()
    for key, rec in again.sequences:
        assert (rec.n_events, rec.input_ids) == (first[key].n_events, first[key].input_ids)
    # the same when the worker's position guard screened the replays out before process_batch
    screened = process_batch(tok, decoders, [], state, tok.max_length, replays=msgs)
    assert screened.replayed == 0 and dict(screened.sequences).keys() == first.keys()


@pytest.fixture(scope="module")
def ecommerce():
    """Synthetic e-commerce events (distinct times per user, no time-since-previous tokens: the window does not
    depend on arrival order) and a tokenizer fitted on them."""
    from domaintok.synthetic import generate_events
    from domaintok.tokenizer import DomainTokenizer

    table = generate_events("ecommerce", 40, 2500, seed=3)
    tok = DomainTokenizer.fit("ecommerce", table, max_length=96)
    rows = [msgspec.convert(r, tok.event_struct, strict=False) for r in table.to_pylist()]
    return tok, table, rows


def test_events_off_their_home_partition_are_forwarded_and_counted_once(ecommerce):
    """Two producers disagree on partitions (murmur2 and CRC32): every event is folded on its user's home partition
    once, also when the forwarding batch is replayed (a crash before its ack re-forwards the same events)."""
    import zlib

    from streams.routing import HomePartitions

    tok, table, rows = ecommerce
    decoders = EventDecoders(tok.event_struct)
    partitions = 4
    home = HomePartitions(partitions)
    enc = msgspec.json.Encoder()
    headers = event_headers(tok.fingerprint)
    logs: list[list[Message]] = [[] for _ in range(partitions)]
    for i, r in enumerate(rows):
        key = r.user_id.encode()
        p = home(key) if i % 2 else zlib.crc32(key) % partitions  # librdkafka's consistent partitioner is CRC32
        logs[p].append(Message(key, enc.encode(r), headers, "events", p, len(logs[p]), 1_000 + i))
    state: dict[bytes, bytes] = {}
    read = [0] * partitions
    latest: dict[str, object] = {}
    forwarded = duplicates = 0
    for round_ in range(100):
        progressed = False
        for p in range(partitions):
            batch = logs[p][read[p] : read[p] + 150]
            if not batch:
                continue
            progressed = True
            res = process_batch(tok, decoders, batch, state, tok.max_length, home=home)
            assert res.dead_letters == []
            repeats = 2 if round_ % 3 == 0 else 1  # every third round the forwarder "crashes" and forwards again
            for f in res.forwards * repeats:
                assert f.partition == home(f.key) != p
                logs[f.partition].append(
                    Message(f.key, f.value, f.headers, "events", f.partition, len(logs[f.partition]), f.timestamp_ms))
            forwarded += len(res.forwards)
            duplicates += len(res.forwards) * (repeats - 1)
            for _, rec in res.sequences:
                latest[rec.user_id] = rec
            read[p] += len(batch)
        if not progressed:
            break
    assert forwarded > 300 and duplicates > 50
    offline = tok.tokenize(table).to_pylist()
    assert len(offline) == len(latest)
    for row in offline:
        rec = latest[row["user_id"]]
        assert (rec.n_events, rec.input_ids) == (row["n_events"], list(row["input_ids"])), row["user_id"]
        window = decode_window(state[row["user_id"].encode()])
        assert window.partition == home(row["user_id"].encode())


def test_a_malformed_forwarded_from_header_is_dead_lettered(retail_domain_tokenizer, retail_rows):
    from streams.records import HEADER_FORWARDED

    tok = retail_domain_tokenizer
    _, rows = retail_rows
    [msg] = _messages(tok, rows[:1])
    msg.headers = [*msg.headers, (HEADER_FORWARDED, b"three/4")]
    res = process_batch(tok, EventDecoders(tok.event_struct), [msg], {}, tok.max_length)
    [dead] = res.dead_letters
    assert dead.reason_class == "decode"
    assert "domaintok-forwarded-from" in header_value(dead.headers, HEADER_ERROR)
