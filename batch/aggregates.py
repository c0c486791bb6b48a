"""Generic per-user aggregate features from a schema's fields over the events before a cutoff: the hand-made
baseline every data set gets (LightGBM's input and fusion's tabular branch), computed in DuckDB.

Columns (days are fractional; windows count events with time >= cutoff - W days):
- activity: event_count, visit_count (distinct event times: events at one instant are one visit, e.g. a basket),
  recency_days, tenure_days, active_days, active_months, mean_gap_days (between visits), event_count_<W>d and
  visit_count_<W>d per window;
- per numeric field (numerical_continuous, numerical_discrete, sign): <f>_sum, _mean, _std, _min, _max, _last,
  <f>_sum_<W>d; a sign field whose source repeats a numeric field's gets only <f>_negative_share;
- per categorical field (categorical_fixed, categorical_entity, text): <f>_distinct, <f>_top_share, and for
  categorical_fixed <f>_top (the most frequent value, a string column LightGBM reads as a category).
Temporal fields other than the event time get no aggregates.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pyarrow as pa

from batch.tasks import EVENTS_TABLE, FIELD_PREFIX, POPULATION_TABLE, TS, USER
from domaintok.errors import DomaintokError
from domaintok.event_sql import field_value_sql
from domaintok.schema import DomainSchema

DEFAULT_WINDOWS = (30, 90, 365)
NUMERIC_TYPES = ("numerical_continuous", "numerical_discrete", "sign")
CATEGORICAL_TYPES = ("categorical_fixed", "categorical_entity", "text")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _numeric_fields(schema: DomainSchema) -> tuple[list[str], list[str]]:
    """(fields with full numeric statistics, sign fields that repeat another numeric field's source)."""
    sources = {f.source.strip() for f in schema.fields if f.type in ("numerical_continuous", "numerical_discrete")}
    full = [f.name for f in schema.fields if f.type in NUMERIC_TYPES and not (f.type == "sign" and f.source.strip() in sources)]
    signs = [f.name for f in schema.fields if f.type == "sign" and f.source.strip() in sources]
    return full, signs


def aggregate_features(
    con: duckdb.DuckDBPyConnection,
    schema: DomainSchema,
    cutoff: dt.datetime,
    windows: tuple[int, ...] = DEFAULT_WINDOWS,
) -> pa.Table:
    """One row per user of the `population` table (user_id + features), from events of `ev` strictly before
    `cutoff`; every user of the population has at least one such event."""
    if any(w < 1 for w in windows):
        raise DomaintokError(f"aggregate windows must be >= 1 day, got {list(windows)}")
    full, signs = _numeric_fields(schema)
    categorical = [f for f in schema.fields if f.type in CATEGORICAL_TYPES]
    col = lambda f: _q(FIELD_PREFIX + f)  # noqa: E731 - the events table's column of field f
    select = [
        "CAST(count(*) AS DOUBLE) AS event_count",
        "min(__age) AS recency_days",
        "max(__age) AS tenure_days",
        f"CAST(count(DISTINCT CAST({TS} AS DATE)) AS DOUBLE) AS active_days",
        f"CAST(count(DISTINCT date_trunc('month', {TS})) AS DOUBLE) AS active_months",
        f"(max(__age) - min(__age)) / nullif(count(DISTINCT {TS}) - 1, 0) AS mean_gap_days",
    ]
    # Events at the same instant form one visit (a basket, a session): its counts carry the purchase frequency.
    select.append(f"CAST(count(DISTINCT {TS}) AS DOUBLE) AS visit_count")
    for w in windows:
        select.append(f"CAST(count(*) FILTER (WHERE __age <= {int(w)}) AS DOUBLE) AS event_count_{int(w)}d")
        select.append(f"CAST(count(DISTINCT {TS}) FILTER (WHERE __age <= {int(w)}) AS DOUBLE) AS visit_count_{int(w)}d")
    for f in full:
        c = col(f)
        select += [f"sum({c}) AS {_q(f + '_sum')}", f"avg({c}) AS {_q(f + '_mean')}",
                   f"stddev_samp({c}) AS {_q(f + '_std')}", f"min({c}) AS {_q(f + '_min')}",
                   f"max({c}) AS {_q(f + '_max')}", f"last({c} ORDER BY {TS}, {c}) AS {_q(f + '_last')}"]
        select += [f"coalesce(sum({c}) FILTER (WHERE __age <= {int(w)}), 0) AS {_q(f'{f}_sum_{int(w)}d')}" for w in windows]
    for f in signs:
        select.append(f"avg(CAST({col(f)} < 0 AS DOUBLE)) AS {_q(f + '_negative_share')}")
    for f in categorical:
        # An entity read with its text (semantic ids) counts its values, not (value, text) pairs.
        select.append(f"CAST(count(DISTINCT {field_value_sql(f, col(f.name))}) AS DOUBLE) AS {_q(f.name + '_distinct')}")
        if f.type == "categorical_fixed":
            select.append(f"mode({col(f.name)} ORDER BY {col(f.name)}) AS {_q(f.name + '_top')}")
    past = (
        f"SELECT e.*, epoch(CAST($cutoff AS TIMESTAMPTZ) - e.{TS}) / 86400.0 AS __age FROM {EVENTS_TABLE} e "
        f"JOIN {POPULATION_TABLE} p USING ({USER}) WHERE e.{TS} < $cutoff"
    )
    # One DuckDB thread here: parallel float sums differ in their last bits from run to run, enough to move
    # LightGBM's histogram bins (the spend RMSE moved by 0.002 between identical runs).
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    con.execute("SET threads = 1")
    try:
        return _aggregate(con, select, categorical, col, past, cutoff)
    finally:
        con.execute(f"SET threads = {int(threads)}")


def _aggregate(con, select: list[str], categorical: list, col, past: str, cutoff: dt.datetime) -> pa.Table:
    con.execute(f"CREATE OR REPLACE TEMP TABLE __past AS {past}", {"cutoff": cutoff})
    con.execute(f"CREATE OR REPLACE TEMP TABLE __agg AS SELECT {USER}, {', '.join(select)} FROM __past GROUP BY {USER}")
    joins, shares = [], []
    for i, f in enumerate(categorical):
        # Share of the user's events (with a value) that hold their most frequent value.
        c = field_value_sql(f, col(f.name))
        joins.append(
            f"LEFT JOIN (SELECT {USER}, max(n) / sum(n) AS share FROM (SELECT {USER}, {c}, count(*) AS n FROM __past "
            f"WHERE {c} IS NOT NULL GROUP BY ALL) GROUP BY {USER}) t{i} USING ({USER})"
        )
        shares.append(f"CAST(t{i}.share AS DOUBLE) AS {_q(f.name + '_top_share')}")
    table = con.sql(
        f"SELECT {USER} AS user_id, a.* EXCLUDE ({USER}){''.join(', ' + s for s in shares)} FROM __agg a "
        f"{' '.join(joins)} ORDER BY 1"
    ).to_arrow_table()
    con.execute("DROP TABLE __past")
    con.execute("DROP TABLE __agg")
    return table


def join_extra_features(features: pa.Table, extra: Path) -> pa.Table:
    """The user's own feature file (user_id + numeric/string columns) joined on user_id; users it lacks get nulls."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(extra)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DomaintokError(f"features {extra}: cannot read as parquet ({' '.join(str(exc).split())})") from None
    if "user_id" not in table.column_names:
        raise DomaintokError(f"features {extra}: no user_id column (columns: {', '.join(table.column_names)})")
    clash = sorted(set(table.column_names) & set(features.column_names) - {"user_id"})
    if clash:
        raise DomaintokError(f"features {extra}: column {clash[0]!r} clashes with an aggregate feature; rename it")
    table = table.set_column(table.column_names.index("user_id"), "user_id", table.column("user_id").cast(pa.string()))
    if len(set(table.column("user_id").to_pylist())) != table.num_rows:
        raise DomaintokError(f"features {extra}: a user_id has more than one row")
    return features.join(table, "user_id", join_type="left outer").sort_by("user_id")


__all__ = ["aggregate_features", "join_extra_features", "DEFAULT_WINDOWS"]
