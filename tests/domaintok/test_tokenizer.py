"""DomainTokenizer: fit/save/load round trips, the sequence layout and truncation, streaming across batch boundaries,
online encode == offline tokenize, timezones, error rows, and the HF AutoTokenizer view of the same ids."""

from __future__ import annotations

import datetime as dt
import json

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from domaintok.context import PreviousEvent
from domaintok.errors import ArtifactError, DomaintokError
from domaintok.schema import schema_from_dict
from domaintok.tokenizer import BOS_ID, SEP_ID, SEQUENCES_SCHEMA, SPECIAL_TOKENS, DomainTokenizer

SCHEMA = {
    "name": "toy",
    "timezone": "Europe/London",
    "columns": [
        {"name": "user", "type": "string"},
        {"name": "ts", "type": "timestamp"},
        {"name": "amount", "type": "float"},
        {"name": "qty", "type": "int", "aliases": ["quantity"]},
        {"name": "cat", "type": "string"},
        {"name": "item", "type": "string"},
        {"name": "text", "type": "string"},
    ],
    "user_id": "user",
    "event_time": "ts",
    "filter": "coalesce(cat, '') <> 'drop'",
    "fields": [
        {"name": "sign", "type": "sign", "source": "amount"},
        {"name": "amount", "type": "numerical_continuous", "source": "amount * 2", "params": {"n_bins": 8}},
        {"name": "qty", "type": "numerical_discrete", "source": "qty", "params": {"max_value": 5}},
        {"name": "cat", "type": "categorical_fixed", "source": "cat", "params": {"max_size": 3}},
        {"name": "item", "type": "categorical_entity", "source": "item", "params": {"buckets": 16, "n_tokens": 2}},
        {"name": "when", "type": "temporal", "source": "ts",
         "params": {"parts": ["month", "dow", "dom", "hour", "year"], "time_since_previous": True}},
        {"name": "text", "type": "text", "source": "text", "params": {"max_tokens": 4, "bpe_vocab_size": 300}},
    ],
}
WORDS = ["red mug", "blue mug", "lamp", "candle holder", "", None, "red lamp shade"]


def _toy_table(n=400, seed=0, users=12):
    rng = np.random.default_rng(seed)
    start = dt.datetime(2021, 3, 20)
    # whole minutes over a few weeks, with repeated times (ties) on purpose
    minutes = rng.integers(0, 60 * 24 * 20, size=n) // 7 * 7
    amount = rng.normal(0, 50, size=n)
    amount[rng.random(n) < 0.05] = 0.0
    amount = amount.astype(object)
    amount[rng.random(n) < 0.03] = None
    return pa.table({
        "user": pa.array([f"u{int(i):02d}" if i != users else None for i in rng.integers(0, users + 1, size=n)]),
        "ts": pa.array([start + dt.timedelta(minutes=int(m)) for m in minutes], pa.timestamp("us")),
        "amount": pa.array(list(amount), pa.float64()),
        "qty": pa.array(rng.integers(-3, 9, size=n), pa.int64()),
        "cat": pa.array([["a", "b", "c", "d", "drop", None][i] for i in rng.integers(0, 6, size=n)]),
        "item": pa.array([f"sku{int(i)}" for i in rng.integers(0, 40, size=n)]),
        "text": pa.array([WORDS[i] for i in rng.integers(0, len(WORDS), size=n)]),
    })


@pytest.fixture(scope="module")
def toy():
    table = _toy_table()
    return DomainTokenizer.fit(schema_from_dict(SCHEMA), table, max_length=64), table


def _rows_of(table, user):
    return [r for r in table.to_pylist() if r["user"] == user]


def test_layout_ids_and_vocab(toy):
    tok, _ = toy
    names = tok.token_names()
    assert names[:6] == SPECIAL_TOKENS and len(names) == tok.vocab_size == len(set(names))
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.sep_token_id,
            tok.mask_token_id) == (0, 1, 2, 3, 4, 5)
    assert names[6:10] == ["[SIGN_NULL]", "[SIGN_POS]", "[SIGN_NEG]", "[SIGN_ZERO]"]
    assert tok.encoders[1].base == 10 and names[10] == "[AMOUNT_NULL]"
    assert tok.bpe_base == len(tok.domain_token_names())
    assert tok.max_event_length == 1 + 1 + 1 + 1 + 1 + 2 + 6 + 4


def test_sequence_layout_truncation_and_counts(toy):
    tok, table = toy
    seq = tok.tokenize(table)
    assert seq.schema == SEQUENCES_SCHEMA
    rows = seq.to_pylist()
    assert [r["user_id"] for r in rows] == sorted(r["user_id"] for r in rows)
    kept = [r for r in table.to_pylist() if r["user"] is not None and r["cat"] != "drop"]
    assert sum(r["n_events"] for r in rows) == len(kept)
    for r in rows:
        ids = r["input_ids"]
        assert ids[0] == BOS_ID and ids[-1] == SEP_ID and BOS_ID not in ids[1:] and len(ids) <= 64
        assert tok.eos_token_id not in ids
        mine = [e for e in kept if e["user"] == r["user_id"]]
        assert r["n_events"] == len(mine)
        newest = max(e["ts"] for e in mine).replace(tzinfo=dt.timezone.utc)
        # naive times are London wall-clock: BST (UTC+1) applies after 2021-03-28
        assert r["last_event_ts"] == _london_to_utc(newest)
        assert ids.count(SEP_ID) < r["n_events"]  # 400 events over 12 users never fit 64 tokens


def _london_to_utc(naive_as_utc):
    from zoneinfo import ZoneInfo

    return naive_as_utc.replace(tzinfo=ZoneInfo("Europe/London")).astimezone(dt.timezone.utc)


def test_streaming_small_batches_equal_one_batch(toy):
    tok, table = toy
    whole = tok.tokenize(table, max_length=40)
    for batch_size in (1, 7, 64):
        parts = list(tok.iter_tokenize(table, max_length=40, batch_size=batch_size))
        assert all(isinstance(p, pa.RecordBatch) for p in parts)
        assert pa.Table.from_batches(parts, schema=SEQUENCES_SCHEMA).equals(whole)


def test_user_range_chunks_equal_one_chunk(toy, tmp_path):
    tok, table = toy
    # a user id with a quote exercises the SQL literal of the range bounds
    users = pa.compute.replace_substring(table["user"], "u03", "o'u03")
    table = table.set_column(0, "user", users)
    whole = tok.tokenize(table, max_length=40)
    assert "o'u03" in whole["user_id"].to_pylist()
    pq.write_table(table, tmp_path / "events.parquet")
    for chunk_events in (1, 37, 120):  # 1: every user is its own range (one scan each)
        for data in (table, tmp_path / "events.parquet"):
            stats = {}
            got = pa.Table.from_batches(
                list(tok.iter_tokenize(data, max_length=40, chunk_events=chunk_events, batch_size=16, stats=stats)),
                schema=SEQUENCES_SCHEMA,
            )
            assert got.equals(whole), (chunk_events, data)
            assert stats["events"] == sum(whole["n_events"].to_pylist())


@pytest.mark.parametrize("max_length", [None, 20, 64, 10_000])
def test_encode_events_equals_tokenize_for_every_user(toy, max_length):
    tok, table = toy
    seq = {r["user_id"]: r["input_ids"] for r in tok.tokenize(table, max_length=max_length).to_pylist()}
    for user, ids in seq.items():
        online = tok.encode_events(_rows_of(table, user), max_length=max_length)
        assert online.dtype == np.int32 and online.tolist() == ids, user


def test_encode_event_tokens_matches_tokenize_events_and_errors(toy):
    tok, table = toy
    rows = table.to_pylist()[:60]
    et = tok.encode_event_tokens(rows)
    assert len(et) == 60 and et.offsets[0] == 0 and et.offsets[-1] == len(et.ids) and et.ids.dtype == np.int32
    for i, r in enumerate(rows):
        ev = et.event(i)
        if r["user"] is None:
            assert et.errors[i].startswith("null user id") and len(ev) == 0
        elif r["cat"] == "drop":
            assert "filter" in et.errors[i] and len(ev) == 0
        else:
            assert et.errors[i] is None and ev[-1] == SEP_ID and et.user_ids[i] == r["user"]
            assert et.event_ts[i] == int(_london_to_utc(r["ts"]).timestamp() * 1_000_000)
    # the same call with an Arrow table and with event structs gives the same ids
    assert np.array_equal(tok.encode_event_tokens(table.slice(0, 60)).ids, et.ids)
    structs = [msgspec.convert(r, tok.event_struct) for r in rows]
    assert np.array_equal(tok.encode_event_tokens(structs).ids, et.ids)


def test_bad_rows_are_errors_not_crashes(toy):
    tok, table = toy
    good = table.to_pylist()[0]
    good.update(user="u01", cat="a")
    rows = [
        good,
        {**good, "ts": None},
        {**good, "amount": "lots"},
        {**good, "colour": "red"},
        {**good, "ts": "not a time"},
        {k: v for k, v in good.items() if k != "user"},  # nullable: a missing key is null
        {**good, "quantity": 2, "qty": None} if False else {**{k: v for k, v in good.items() if k != "qty"}, "quantity": 2},
    ]
    et = tok.encode_event_tokens(rows)
    assert et.errors[0] is None and et.errors[6] is None
    assert "event time" in et.errors[1]
    assert et.errors[2].startswith("invalid event") and "amount" in et.errors[2]
    assert "colour" in et.errors[3]
    assert et.errors[4] is not None and et.errors[5].startswith("null user id")
    assert np.diff(et.offsets).tolist()[1:6] == [0] * 5


def test_event_struct_is_strict_wire_type(toy):
    tok, _ = toy
    S = tok.event_struct
    assert S is tok.event_struct and S.__struct_config__.forbid_unknown_fields
    with pytest.raises(TypeError):
        S("u1", dt.datetime(2021, 1, 1))  # kw_only
    assert set(S.__struct_fields__) == {c["name"] for c in SCHEMA["columns"]}
    ev = msgspec.json.decode(b'{"user": "u1", "ts": "2021-03-28T01:30:00", "amount": -3.5}', type=S)
    assert ev.qty is None and tok.encode_event_tokens([ev]).errors == [None]
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"user": "u1", "ts": "2021-03-28T01:30:00", "bogus": 1}', type=S)


def test_timezone_aware_and_naive_inputs_agree(toy):
    tok, _ = toy
    from zoneinfo import ZoneInfo

    london = ZoneInfo("Europe/London")
    base = {"user": "u1", "amount": 5.0, "qty": 1, "cat": "a", "item": "x", "text": "lamp"}
    naive = [dt.datetime(2021, 3, 28, 0, 30), dt.datetime(2021, 3, 28, 3, 30), dt.datetime(2021, 10, 31, 0, 30)]
    aware_utc = [t.replace(tzinfo=london).astimezone(dt.timezone.utc) for t in naive]
    aware_ny = [t.astimezone(ZoneInfo("America/New_York")) for t in aware_utc]
    a = tok.encode_event_tokens([{**base, "ts": t} for t in naive])
    b = tok.encode_event_tokens([{**base, "ts": t} for t in aware_utc])
    c = tok.encode_event_tokens(pa.table({**{k: [v] * 3 for k, v in base.items()},
                                          "ts": pa.array(aware_ny, pa.timestamp("us", tz="America/New_York"))}))
    mixed = tok.encode_event_tokens([{**base, "ts": t} for t in [naive[0], aware_utc[1], aware_ny[2]]])
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.ids, c.ids) and np.array_equal(a.ids, mixed.ids)
    assert a.event_ts.tolist() == b.event_ts.tolist() == [int(t.timestamp() * 1e6) for t in aware_utc]
    hours = [n for n in tok.decode_tokens(a.ids) if n.startswith("[WHEN_HOUR")]
    assert hours == ["[WHEN_HOUR_00]", "[WHEN_HOUR_03]", "[WHEN_HOUR_00]"]  # wall-clock hours in London


def test_dst_gap_and_ambiguous_wall_clock_times(toy):
    tok, _ = toy
    base = {"user": "u1", "amount": 5.0, "qty": 1, "cat": "a", "item": "x", "text": "lamp"}
    # 01:30 on 2021-03-28 does not exist in London (shifted forward to 02:30 BST = 01:30 UTC);
    # 01:30 on 2021-10-31 happens twice (read as the GMT one, 01:30 UTC)
    et = tok.encode_event_tokens([{**base, "ts": dt.datetime(2021, 3, 28, 1, 30)},
                                  {**base, "ts": dt.datetime(2021, 10, 31, 1, 30)}])
    utc = [dt.datetime.fromtimestamp(t / 1e6, dt.timezone.utc) for t in et.event_ts]
    assert utc == [dt.datetime(2021, 3, 28, 1, 30, tzinfo=dt.timezone.utc),
                   dt.datetime(2021, 10, 31, 1, 30, tzinfo=dt.timezone.utc)]
    hours = [n for n in tok.decode_tokens(et.ids) if n.startswith("[WHEN_HOUR")]
    assert hours == ["[WHEN_HOUR_02]", "[WHEN_HOUR_01]"]


def test_save_load_roundtrip_is_exact(toy, tmp_path):
    tok, table = toy
    tok.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "domaintok_tokenizer.json" in files and "tokenizer.json" in files
    assert all(name.endswith(".json") for name in files)
    again = DomainTokenizer.from_pretrained(tmp_path)
    assert again.fingerprint == tok.fingerprint and again.vocab_size == tok.vocab_size
    assert again.max_length == 64 and again.token_names() == tok.token_names()
    assert [e.state for e in again.encoders] == [e.state for e in tok.encoders]
    assert again.tokenize(table).equals(tok.tokenize(table))
    # a tampered state no longer matches its fingerprint
    state = json.loads((tmp_path / "domaintok_tokenizer.json").read_text())
    state["fields"]["amount"]["edges"][0] += 1.0
    (tmp_path / "domaintok_tokenizer.json").write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match="fingerprint"):
        DomainTokenizer.from_pretrained(tmp_path)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ArtifactError, match="not a fitted domaintok tokenizer"):
        DomainTokenizer.from_pretrained(tmp_path)


def test_autotokenizer_holds_every_token(toy, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok, table = toy
    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(hf, PreTrainedTokenizerFast) and len(hf) == tok.vocab_size
    assert (hf.pad_token, hf.unk_token, hf.bos_token, hf.eos_token, hf.sep_token, hf.mask_token) == (
        "[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]", "[MASK]")
    assert (hf.pad_token_id, hf.bos_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 2, 4, 5)
    names = tok.token_names()
    assert hf.convert_tokens_to_ids(names) == list(range(tok.vocab_size))
    domain = set(tok.domain_token_names())
    assert domain <= set(hf.all_special_tokens) | set(hf.get_added_vocab())
    # domain token strings of a real sequence, joined by spaces, encode back to the same ids
    ids = [i for i in tok.tokenize(table).column("input_ids")[0].as_py() if i < tok.bpe_base]
    assert hf(" ".join(tok.decode_tokens(ids)), add_special_tokens=False)["input_ids"] == ids
    # and raw text encodes to the same BPE pieces as the text field (before its max_tokens cut)
    event = {"user": "u1", "ts": dt.datetime(2021, 5, 1), "amount": 1.0, "qty": 1, "cat": "a", "item": "x",
             "text": "red mug"}
    pieces = [i for i in tok.encode_event_tokens([event]).ids.tolist() if i >= tok.bpe_base]
    assert hf("red mug", add_special_tokens=False)["input_ids"] == pieces
    assert hf.decode(pieces).strip() == "red mug"
    assert hf("[BOS] [SIGN_POS] red mug", add_special_tokens=False)["input_ids"][:2] == [BOS_ID, names.index("[SIGN_POS]")]


def test_missing_column_names_column_file_and_available(toy, tmp_path):
    tok, table = toy
    path = tmp_path / "events.parquet"
    pq.write_table(table.drop_columns(["cat"]), path)
    with pytest.raises(DomaintokError) as err:
        tok.tokenize(path)
    msg = str(err.value)
    assert "'cat'" in msg and str(path) in msg and "available: user, ts, amount, qty, item, text" in msg


def test_several_inputs_with_different_spellings(toy, tmp_path):
    tok, table = toy
    a, b = table.slice(0, 150), table.slice(150)
    pq.write_table(a, tmp_path / "a.parquet")
    pq.write_table(b.rename_columns(["quantity" if c == "qty" else c for c in b.column_names]), tmp_path / "b.parquet")
    got = tok.tokenize([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert got.equals(tok.tokenize(table))  # same input order: (input, row) breaks ties the same way
    out = tmp_path / "seq.parquet"
    stats = tok.tokenize_to_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], out)
    assert pq.read_table(out).equals(got) and pq.read_schema(out).equals(SEQUENCES_SCHEMA)
    assert stats["users"] == got.num_rows and stats["tokens_per_event"] > 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_time_since_previous_parity_with_previous_ts(toy):
    tok, table = toy
    seq = tok.tokenize(table, max_length=10_000)
    user = seq.column("user_id")[0].as_py()
    rows = sorted(_rows_of(table, user), key=lambda r: r["ts"])
    rows = [r for r in rows if r["cat"] != "drop"]
    first = tok.encode_event_tokens(rows[:5])
    last_ts = int(max(first.event_ts))
    rest = tok.encode_event_tokens(rows[5:], {user: PreviousEvent(last_ts)})
    online = np.concatenate([[BOS_ID], first.ids, rest.ids])
    assert online.tolist() == seq.column("input_ids")[0].as_py()


def test_max_length_validation(toy):
    tok, table = toy
    with pytest.raises(DomaintokError, match="max_length"):
        tok.tokenize(table, max_length=1)
    with pytest.raises(DomaintokError, match="one user"):
        tok.encode_events(table.to_pylist()[:50])


def test_fit_without_text_fields_gives_wordlevel_hf(tmp_path):
    raw = {k: v for k, v in SCHEMA.items()}
    raw["fields"] = [f for f in SCHEMA["fields"] if f["type"] != "text"]
    tok = DomainTokenizer.fit(schema_from_dict(raw), _toy_table(100))
    assert tok.bpe is None and tok.vocab_size == len(tok.domain_token_names())
    tok.save_pretrained(tmp_path)
    again = DomainTokenizer.from_pretrained(tmp_path)
    assert again.fingerprint == tok.fingerprint


def test_no_rows_left_gives_empty_sequences_and_early_stop_is_clean(toy):
    tok, table = toy
    empty = tok.tokenize(table.filter(pa.compute.equal(table["cat"], "drop")))
    assert empty.num_rows == 0 and empty.schema == SEQUENCES_SCHEMA
    it = tok.iter_tokenize(table, batch_size=16)
    first = next(it)
    it.close()  # stops the encode thread and the DuckDB query
    assert first.num_rows >= 1
