"""Generic aggregate features, hand-checked on the toy table of test_tasks (post-cutoff events never count)."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute below
import pyarrow.parquet as pq
import pytest

from batch.aggregates import aggregate_features, join_extra_features
from batch.tasks import assign_split, build_population, open_events, register_split
from domaintok.errors import DomaintokError
from tests.batch.test_tasks import CUTOFF, spec_of, toy_events, toy_schema


@pytest.fixture(scope="module")
def features() -> dict[str, dict]:
    schema = toy_schema()
    # u2 gets a second event at the same instant as its only input: two events, one visit.
    events = toy_events()
    same = events.filter(pa.compute.equal(events.column("amount"), 5.0))
    con = open_events(schema, pa.concat_tables([events, same]))
    spec = spec_of([{"name": "t", "kind": "binary", "label": {"from": "events", "horizon_days": 30}}])
    users = build_population(con, spec)
    register_split(con, users, assign_split(users, spec.split))
    table = aggregate_features(con, schema, CUTOFF, windows=(30, 90))
    return {row["user_id"]: row for row in table.to_pylist()}


def test_activity_features(features):
    u1, u2 = features["u1"], features["u2"]
    assert set(features) == {"u1", "u2"}
    assert u1["event_count"] == 3 and u2["event_count"] == 2  # u2's filtered and at-cutoff rows do not count
    assert u1["visit_count"] == 3 and u2["visit_count"] == 1  # events at one instant are one visit
    assert (u1["visit_count_30d"], u1["visit_count_90d"]) == (2, 3)
    assert u1["recency_days"] == pytest.approx(1.0) and u1["tenure_days"] == pytest.approx(40.0)
    assert u1["active_days"] == 3 and u1["active_months"] == 2  # 2024-01-21, 2024-02-27, 2024-02-29
    assert u1["mean_gap_days"] == pytest.approx(19.5)
    assert u2["mean_gap_days"] is None and u2["recency_days"] == pytest.approx(100.0)  # one visit: no gap
    assert (u1["event_count_30d"], u1["event_count_90d"]) == (2, 3)
    assert (u2["event_count_30d"], u2["event_count_90d"]) == (0, 0)


def test_numeric_field_features(features):
    u1, u2 = features["u1"], features["u2"]
    assert (u1["amount_sum"], u1["amount_mean"], u1["amount_min"], u1["amount_max"]) == (12.0, 4.0, -4.0, 10.0)
    assert u1["amount_std"] == pytest.approx(math.sqrt(52.0))
    assert u1["amount_last"] == 10.0  # the newest event's value
    assert (u1["amount_sum_30d"], u1["amount_sum_90d"]) == (6.0, 12.0)
    assert (u2["amount_sum_30d"], u2["amount_sum_90d"], u2["amount_std"], u2["amount_sum"]) == (0.0, 0.0, 0.0, 10.0)
    assert u1["qty_sum"] == 6.0 and u1["qty_last"] == 2.0
    # The sign field repeats amount's source: only the share of negative values.
    assert u1["amount_sign_negative_share"] == pytest.approx(1 / 3)
    assert "amount_sign_sum" not in u1


def test_categorical_field_features(features):
    u1, u2 = features["u1"], features["u2"]
    assert (u1["cat_distinct"], u1["cat_top"], u1["cat_top_share"]) == (2, "a", pytest.approx(2 / 3))
    assert (u2["cat_distinct"], u2["cat_top"], u2["cat_top_share"]) == (1, "c", 1.0)
    # Nothing of the post-cutoff events (amount 1000, category z) reaches any feature.
    assert all(v != 1000.0 and v != "z" for row in features.values() for v in row.values())


def test_extra_features_join_and_errors(tmp_path):
    base = pa.table({"user_id": ["u1", "u2"], "event_count": [3.0, 1.0]})
    pq.write_table(pa.table({"user_id": ["u2", "u7"], "income": [5.5, 1.0]}), tmp_path / "extra.parquet")
    joined = join_extra_features(base, tmp_path / "extra.parquet")
    assert joined.to_pylist() == [{"user_id": "u1", "event_count": 3.0, "income": None},
                                  {"user_id": "u2", "event_count": 1.0, "income": 5.5}]
    pq.write_table(pa.table({"user_id": ["u1"], "event_count": [1.0]}), tmp_path / "clash.parquet")
    with pytest.raises(DomaintokError, match="clashes with an aggregate feature"):
        join_extra_features(base, tmp_path / "clash.parquet")


def test_entity_aggregates_count_values_whatever_the_id_scheme():
    """A semantic-ID entity read with its text (a struct of value and text) counts its values, as a hashed one does:
    u1's item 'a' comes with two different texts and still counts once."""
    from tests.batch.test_tasks import TOY_SCHEMA
    from domaintok.schema import schema_from_dict

    rows = {}
    for ids in ("hashed", "semantic"):
        params = {"ids": "semantic", "content": "'text ' || CAST(amount AS VARCHAR)"} if ids == "semantic" else {}
        fields = [*TOY_SCHEMA["fields"], {"name": "item", "type": "categorical_entity", "source": "cat", "params": params}]
        schema = schema_from_dict({**TOY_SCHEMA, "fields": fields}, "toy")
        con = open_events(schema, toy_events())
        spec = spec_of([{"name": "t", "kind": "binary", "label": {"from": "events", "horizon_days": 30}}])
        users = build_population(con, spec)
        register_split(con, users, assign_split(users, spec.split))
        table = aggregate_features(con, schema, CUTOFF, windows=(30,))
        rows[ids] = {r["user_id"]: (r["item_distinct"], r["item_top_share"]) for r in table.to_pylist()}
    assert rows["semantic"] == rows["hashed"] == {"u1": (2, pytest.approx(2 / 3)), "u2": (1, 1.0)}
