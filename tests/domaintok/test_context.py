"""The previous-event step (domaintok/context.py): time since previous and change-only calendar tokens, the same
offline (tokenize) and online (encode_event_tokens in micro-batches with the user's previous event carried over)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from domaintok.context import NO_PREVIOUS, UNKNOWN_CELL, EventContext, PreviousEvent
from domaintok.fields import make_encoder
from domaintok.schema import FieldSpec, schema_from_dict
from domaintok.tokenizer import DomainTokenizer
from tests.domaintok.online_replay import assert_online_equals_offline
from tests.domaintok.test_tokenizer import SCHEMA, _toy_table

H = 3_600_000_000  # one hour in us


def _temporal(only_changes: bool, parts=("year", "month", "dom", "hour")):
    spec = FieldSpec(name="when", type="temporal", source="ts",
                     params={"parts": list(parts), "time_since_previous": True, "only_changes": only_changes})
    enc = make_encoder(spec, {"year_min": 2020, "year_max": 2022})
    enc.base = 100
    return enc


def _names(enc, row):
    return [enc.token_names()[i - enc.base] for i in row if i]


def _run(enc, times, users=None, event_times=None):
    """Encode + context on events given in (user, time) order; the token names of each event. The field's times
    are the event times unless `event_times` are given (a temporal field may read another, nullable, column)."""
    arr = pa.array(times, pa.timestamp("us", tz="UTC"))
    matrix = enc.encode_padded(arr)
    ts = np.array([int(t.timestamp() * 1e6) for t in (event_times or times)], np.int64)
    users = np.zeros(len(times), np.int64) if users is None else np.asarray(users)
    starts = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]]))
    EventContext([enc]).apply_sorted(matrix, ts, starts)
    return [_names(enc, row) for row in matrix]


def test_only_changes_emits_from_the_coarsest_changed_part_and_no_zero_gap():
    t0 = dt.datetime(2021, 3, 5, 10, tzinfo=dt.timezone.utc)
    times = [t0, t0, t0 + dt.timedelta(hours=2), t0 + dt.timedelta(days=31), dt.datetime(2022, 4, 5, 12, tzinfo=dt.timezone.utc)]
    got = _run(_temporal(True), times)
    assert got[0] == ["[WHEN_YEAR_2021]", "[WHEN_MON_03]", "[WHEN_DOM_05]", "[WHEN_HOUR_10]", "[WHEN_GAP_FIRST]"]
    assert got[1] == []  # same basket: no calendar token, no gap token
    assert got[2] == ["[WHEN_HOUR_12]", "[WHEN_GAP_03]"]  # 2 h: the bin of gaps in [1 h, 6 h)
    # 5 Mar -> 5 Apr: the month changed, so the day (equal) and the hour (equal) are emitted again
    assert got[3] == ["[WHEN_MON_04]", "[WHEN_DOM_05]", "[WHEN_HOUR_10]", "[WHEN_GAP_08]"]
    assert got[4][0] == "[WHEN_YEAR_2022]" and len(got[4]) == 5
    full = _run(_temporal(False), times)
    assert all(len(r) == 5 for r in full) and full[1][-1] == "[WHEN_GAP_00]"


def test_first_event_of_each_user_and_null_times():
    t0 = dt.datetime(2021, 3, 5, 10, tzinfo=dt.timezone.utc)
    got = _run(_temporal(True), [t0, t0, None, t0], users=[1, 2, 2, 2], event_times=[t0] * 4)
    assert got[1][-1] == "[WHEN_GAP_FIRST]" and len(got[1]) == 5  # user 2 starts again with every part
    assert got[2] == ["[WHEN_NULL]"]  # a null time: its NULL token only
    assert len(got[3]) == 4  # after a null: every part again (the gap is 0, not emitted)


def test_apply_takes_the_predecessor_of_each_row_in_any_row_order():
    enc = _temporal(True)
    t0 = dt.datetime(2021, 3, 5, 10, tzinfo=dt.timezone.utc)
    times = [t0 + dt.timedelta(hours=h) for h in (0, 0, 5, 30)]
    ctx = EventContext([enc])
    sorted_m = enc.encode_padded(pa.array(times, pa.timestamp("us", tz="UTC")))
    state = ctx.state_cells(sorted_m)
    ts = np.array([int(t.timestamp() * 1e6) for t in times])
    expected = sorted_m.copy()
    ctx.apply_sorted(expected, ts, np.array([0]))
    perm = np.array([2, 0, 3, 1])
    shuffled = sorted_m[perm].copy()
    prev = np.array([NO_PREVIOUS, *ts[:-1]])[perm]
    prev_state = np.vstack([np.full(ctx.n_state, UNKNOWN_CELL), state[:-1]])[perm]
    ctx.apply(shuffled, ts[perm], prev, prev_state)
    assert np.array_equal(shuffled, expected[perm])


def _change_only_tokenizer(table, only_changes=True):
    raw = {**SCHEMA, "fields": [dict(f) for f in SCHEMA["fields"]]}
    for f in raw["fields"]:
        if f["type"] == "temporal":
            f["params"] = {**f["params"], "only_changes": only_changes}
    return DomainTokenizer.fit(schema_from_dict(raw), table, max_length=10_000)


@pytest.fixture(scope="module")
def baskets():
    """Toy events in baskets: several events per user share one time (the line items of an invoice)."""
    table = _toy_table(n=300, seed=3, users=6)
    ts = table.column("ts").to_pylist()
    basket = [t.replace(minute=0) for t in ts]  # many events of a user fall in the same hour
    return table.set_column(1, "ts", pa.array(basket, pa.timestamp("us")))


def test_change_only_offline_equals_online_micro_batches(baskets):
    assert_online_equals_offline(_change_only_tokenizer(baskets), baskets, batches=10)


def test_change_only_saves_tokens_and_round_trips(baskets, tmp_path):
    on, off = _change_only_tokenizer(baskets), _change_only_tokenizer(baskets, only_changes=False)
    n_on = sum(len(x) for x in on.tokenize(baskets).column("input_ids").to_pylist())
    n_off = sum(len(x) for x in off.tokenize(baskets).column("input_ids").to_pylist())
    assert n_on < 0.9 * n_off
    assert on.fingerprint != off.fingerprint
    on.save_pretrained(tmp_path)
    again = DomainTokenizer.from_pretrained(tmp_path)
    assert again.tokenize(baskets).equals(on.tokenize(baskets))
    assert on.fit_stats["tokens_per_event"] < off.fit_stats["tokens_per_event"]


def test_a_window_stored_without_context_cells_emits_every_part(baskets):
    tok = _change_only_tokenizer(baskets)
    row = next(r for r in baskets.to_pylist() if r["user"] is not None and r["cat"] != "drop")
    ts = int(row["ts"].replace(tzinfo=dt.timezone.utc).timestamp() * 1e6)
    known = tok.encode_event_tokens([row], {row["user"]: PreviousEvent(ts, tok.encode_event_tokens([row]).context[0])})
    unknown = tok.encode_event_tokens([row], {row["user"]: PreviousEvent(ts)})
    assert len(unknown.ids) > len(known.ids)
