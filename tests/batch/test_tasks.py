"""TASKS.yaml parsing and its one-line errors, the population and user-hash split, and labels of every kind and
source, hand-checked on a toy event table."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.tasks import (
    assign_split,
    build_labels,
    build_population,
    load_tasks,
    open_events,
    register_split,
    tasks_from_dict,
)
from domaintok.errors import DomaintokError
from domaintok.schema import schema_from_dict

CUTOFF = dt.datetime(2024, 3, 1)

TOY_SCHEMA = {
    "name": "toy",
    "columns": [{"name": "user", "type": "string", "aliases": ["customer"]}, {"name": "ts", "type": "timestamp"},
                {"name": "amount", "type": "float"}, {"name": "qty", "type": "int"}, {"name": "cat", "type": "string"}],
    "user_id": "user",
    "event_time": "ts",
    "filter": "qty IS NOT NULL",
    "fields": [
        {"name": "amount_sign", "type": "sign", "source": "amount"},
        {"name": "amount", "type": "numerical_continuous", "source": "amount"},
        {"name": "qty", "type": "numerical_discrete", "source": "qty"},
        {"name": "date", "type": "temporal", "source": "ts"},
        {"name": "cat", "type": "categorical_fixed", "source": "cat"},
    ],
}


def toy_schema():
    return schema_from_dict(TOY_SCHEMA, "toy")


def toy_events() -> pa.Table:
    """u1: three inputs (-1, -3, -40 days), two later events (+1 day 1000, +50 days 7); u2: one input (-100 days)
    and one event exactly at the cutoff; u3: only post-cutoff events (not in the population); one row the filter
    drops (qty null) for u2 before the cutoff."""
    day = dt.timedelta(days=1)
    rows = [
        ("u1", CUTOFF - 1 * day, 10.0, 2, "a"),
        ("u1", CUTOFF - 3 * day, -4.0, 1, "b"),
        ("u1", CUTOFF - 40 * day, 6.0, 3, "a"),
        ("u1", CUTOFF + 1 * day, 1000.0, 5, "z"),
        ("u1", CUTOFF + 50 * day, 7.0, 1, "a"),
        ("u2", CUTOFF - 100 * day, 5.0, 4, "c"),
        ("u2", CUTOFF - 2 * day, 999.0, None, "c"),
        ("u2", CUTOFF, 3.0, 1, "c"),
        ("u3", CUTOFF + 2 * day, 1.0, 1, "a"),
    ]
    cols = list(zip(*rows))
    return pa.table({"customer": pa.array(cols[0]), "ts": pa.array(cols[1], pa.timestamp("us")),
                     "amount": pa.array(cols[2]), "qty": pa.array(cols[3], pa.int64()), "cat": pa.array(cols[4])})


def spec_of(tasks: list[dict], **extra):
    return tasks_from_dict({"cutoff": CUTOFF.date(), "tasks": tasks, **extra}, "toy.yaml")


@pytest.fixture()
def toy_con():
    con = open_events(toy_schema(), toy_events())
    yield con
    con.close()


def labels_of(con, spec, task_index=0) -> dict:
    users = build_population(con, spec)
    register_split(con, users, assign_split(users, spec.split))
    table = build_labels(con, spec, spec.tasks[task_index])
    return dict(zip(table.column("user_id").to_pylist(), table.column("label").to_pylist()))


def test_events_table_maps_aliases_filter_and_types(toy_con):
    rows = toy_con.execute("SELECT __user, qty, amount, __f_cat FROM ev ORDER BY __user, __ts").fetchall()
    assert len(rows) == 8  # the qty-null row is filtered out
    assert rows[0] == ("u1", 3, 6.0, "a")
    types = dict(toy_con.execute("SELECT column_name, column_type FROM (DESCRIBE ev)").fetchall())
    assert types["qty"] == "BIGINT" and types["user"] == "VARCHAR"


def test_population_is_users_with_pre_cutoff_events(toy_con):
    spec = spec_of([{"name": "t", "kind": "binary", "label": {"from": "events", "horizon_days": 30}}])
    assert build_population(toy_con, spec) == ["u1", "u2"]
    spec = spec_of([{"name": "t", "kind": "binary", "label": {"from": "events", "horizon_days": 30}}], min_events=2)
    assert build_population(toy_con, spec) == ["u1"]


def test_binary_any_count_sum_where_and_log1p_labels(toy_con):
    tasks = [
        {"name": "any30", "kind": "binary", "label": {"from": "events", "horizon_days": 30}},
        {"name": "count60", "kind": "regression", "label": {"from": "events", "horizon_days": 60, "aggregate": "count"}},
        {"name": "sum60", "kind": "regression",
         "label": {"from": "events", "horizon_days": 60, "aggregate": "sum", "expression": "amount * qty"}},
        {"name": "log30", "kind": "regression", "label": {"from": "events", "horizon_days": 30, "aggregate": "sum",
                                                            "expression": "amount", "transform": "log1p"}},
        {"name": "any30_a", "kind": "binary", "label": {"from": "events", "horizon_days": 30, "where": "cat = 'a'"}},
    ]
    spec = spec_of(tasks)
    # u2's event exactly at the cutoff is in the label window [cutoff, cutoff + N days), not an input.
    assert labels_of(toy_con, spec, 0) == {"u1": 1, "u2": 1}
    assert labels_of(toy_con, spec, 1) == {"u1": 2.0, "u2": 1.0}
    assert labels_of(toy_con, spec, 2) == {"u1": 5007.0, "u2": 3.0}
    log = labels_of(toy_con, spec, 3)
    assert log["u1"] == pytest.approx(math.log(1001.0)) and log["u2"] == pytest.approx(math.log(4.0))
    assert labels_of(toy_con, spec, 4) == {"u1": 0, "u2": 0}


def test_file_labels_binary_multiclass_regression(toy_con, tmp_path):
    pq.write_table(pa.table({"user_id": ["u1", "u2", "u9"], "segment": ["gold", "silver", "gold"],
                             "churn": [1, 0, 1], "value": [2.5, None, 1.0]}), tmp_path / "labels.parquet")
    (tmp_path / "tasks.yaml").write_text(
        "cutoff: 2024-03-01\ntasks:\n"
        "  - {name: segment, kind: multiclass, label: {from: file, path: labels.parquet, column: segment}}\n"
        "  - {name: churn, kind: binary, label: {from: file, path: labels.parquet, column: churn}}\n"
        "  - {name: value, kind: regression, label: {from: file, path: labels.parquet, column: value}}\n"
    )
    spec = load_tasks(tmp_path / "tasks.yaml")  # the path is relative to the tasks file
    assert labels_of(toy_con, spec, 0) == {"u1": "gold", "u2": "silver"}  # u9 is not in the population
    assert labels_of(toy_con, spec, 1) == {"u1": 1, "u2": 0}
    assert labels_of(toy_con, spec, 2) == {"u1": 2.5}  # a null label drops the user from that task only


def test_split_is_stable_and_folds_have_disjoint_test_sets():
    users = [f"user{i}" for i in range(3000)]
    spec = spec_of([{"name": "t", "kind": "binary", "label": {"from": "events", "horizon_days": 30}}])
    split = assign_split(users, spec.split)
    assert np.array_equal(split, assign_split(list(users), spec.split))
    shares = {s: float(np.mean(split == s)) for s in ("train", "valid", "test")}
    assert shares["test"] == pytest.approx(0.15, abs=0.03) and shares["train"] == pytest.approx(0.7, abs=0.03)
    tests = [set(np.asarray(users)[assign_split(users, spec.split, k, 5) == "test"]) for k in range(5)]
    assert all(not (tests[i] & tests[j]) for i in range(5) for j in range(i + 1, 5))
    other_seed = spec_of([{"name": "t", "kind": "binary", "label": {"from": "events", "horizon_days": 30}}],
                         split={"seed": 7})
    assert not np.array_equal(split, assign_split(users, other_seed.split))


@pytest.mark.parametrize("text, message", [
    ("cutoff: 2024-03-01\ntasks: []\n", "tasks: the list is empty"),
    ("cutoff: 2024-03-01\nsplitt: {}\ntasks: []\n", "unknown field `splitt`"),
    ("cutoff: 2024-03-01\ntasks:\n  - {name: t, kind: ordinal, label: {from: events, horizon_days: 3}}\n",
     "Invalid enum value 'ordinal' - at `$.tasks[0].kind`"),
    ("cutoff: 2024-03-01\ntasks:\n  - {name: t, kind: binary, label: {from: stream, horizon_days: 3}}\n",
     "Invalid value 'stream'"),
    ("cutoff: 2024-03-01\ntasks:\n  - {name: t, kind: regression, label: {from: events, horizon_days: 3, "
     "aggregate: sum}}\n", "aggregate sum needs an expression"),
    ("cutoff: 2024-03-01\nsplit: {train: 0.8, valid: 0.15, test: 0.15}\ntasks:\n"
     "  - {name: t, kind: binary, label: {from: events, horizon_days: 3}}\n", "must be 1"),
    ("cutoff: 2024-03-01\ntasks:\n  - {name: t, kind: multiclass, label: {from: events, horizon_days: 3}}\n",
     "gives a binary label"),
    ("cutoff: [\n", "invalid yaml"),
])
def test_tasks_file_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    with pytest.raises(DomaintokError) as info:
        load_tasks(path)
    assert message in str(info.value) and "\n" not in str(info.value) and str(info.value).startswith("tasks ")


def test_bad_label_sql_and_missing_label_file_are_one_line(toy_con, tmp_path):
    spec = spec_of([{"name": "t", "kind": "regression", "label": {"from": "events", "horizon_days": 3,
                                                                  "aggregate": "sum", "expression": "no_such_col"}}])
    with pytest.raises(DomaintokError, match="task 't': bad label SQL") as info:
        labels_of(toy_con, spec)
    assert "\n" not in str(info.value)
    spec = spec_of([{"name": "f", "kind": "binary", "label": {"from": "file", "path": str(tmp_path / "x.parquet"),
                                                              "column": "y"}}])
    with pytest.raises(DomaintokError, match="no such file"):
        labels_of(toy_con, spec)
