"""The synthetic event generators: declared columns matching the schemas, determinism by seed, realistic shares,
and per-user habits strong enough to be learned."""

from __future__ import annotations

import datetime as dt

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domaintok.errors import DomaintokError
from domaintok.schema import load_schema
from domaintok.synthetic import DOMAINS, DEFAULT_START, generate_events, write_events_parquet


@pytest.fixture(scope="module", params=DOMAINS)
def generated(request):
    return request.param, generate_events(request.param, 300, 30_000, seed=11)


def test_columns_are_the_schemas_raw_columns(generated):
    domain, table = generated
    schema = load_schema(domain)
    assert table.column_names == [c.name for c in schema.columns]
    arrow_kind = {"string": pa.types.is_string, "timestamp": pa.types.is_timestamp, "float": pa.types.is_floating,
                  "int": pa.types.is_integer}
    for col in schema.columns:
        assert arrow_kind[col.type](table.schema.field(col.name).type), col.name
        assert table.column(col.name).null_count == 0, col.name
    assert table.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")


def test_shape_order_and_time_range(generated):
    _, table = generated
    assert table.num_rows == 30_000
    users = table.column("user_id")
    assert len(pa.compute.unique(users)) == 300  # every user has at least one event
    ts = table.column("timestamp").cast(pa.int64()).to_numpy()
    assert np.all(np.diff(ts) >= 0)  # delivered in time order, as a stream would be
    start = int(DEFAULT_START.timestamp() * 1e6)
    assert ts.min() >= start and ts.max() < start + 180 * 86400 * 1_000_000


@pytest.mark.parametrize("domain", DOMAINS)
def test_deterministic_by_seed(domain):
    a = generate_events(domain, 50, 2000, seed=1)
    assert a.equals(generate_events(domain, 50, 2000, seed=1))
    assert not a.equals(generate_events(domain, 50, 2000, seed=2))


def test_finance_amounts_and_habits():
    table = generate_events("finance", 400, 60_000, seed=4)
    con = duckdb.connect()
    con.register("t", table)
    credit_share, median_debit = con.execute(
        "SELECT avg((amount > 0)::INT), median(-amount) FILTER (WHERE amount < 0) FROM t").fetchone()
    assert 0.08 < credit_share < 0.12
    assert 5 < median_debit < 200
    channels = {row[0] for row in con.execute("SELECT DISTINCT channel FROM t").fetchall()}
    assert channels == {"card_present", "contactless", "online", "atm", "transfer"}
    # Habits: a user's top merchant takes far more of their debits than it does of everyone's.
    own_share, global_share = con.execute("""
        WITH d AS (SELECT * FROM t WHERE amount < 0 AND merchant_id <> 'atm'),
        everyone AS (SELECT merchant_id, count(*) / (SELECT count(*) FROM d) global_share FROM d GROUP BY 1),
        per AS (SELECT user_id, merchant_id, count(*) c FROM d GROUP BY ALL),
        top AS (SELECT user_id, arg_max(merchant_id, c) m, max(c) / sum(c) AS top_share FROM per GROUP BY user_id
                HAVING sum(c) >= 50)
        SELECT avg(top_share), avg(global_share) FROM top JOIN everyone ON everyone.merchant_id = top.m""").fetchone()
    assert own_share > 3 * global_share
    # Time of day: users keep to their hours (per-user spread well below the population's).
    per_user_sd, overall_sd = con.execute("""
        SELECT avg(sd), (SELECT stddev(hour(timestamp)) FROM t) FROM
        (SELECT stddev(hour(timestamp)) sd FROM t GROUP BY user_id HAVING count(*) >= 50)""").fetchone()
    assert per_user_sd < 0.85 * overall_sd


def test_ecommerce_funnel_and_taste():
    table = generate_events("ecommerce", 400, 60_000, seed=5)
    con = duckdb.connect()
    con.register("t", table)
    shares = dict(con.execute("SELECT event_type, count(*) / (SELECT count(*) FROM t) FROM t GROUP BY 1").fetchall())
    assert set(shares) == {"view", "cart", "remove_from_cart", "purchase", "wishlist"}
    assert shares["view"] > shares["cart"] > shares["remove_from_cart"]
    assert 0.03 < shares["purchase"] < 0.2
    assert con.execute("SELECT max(quantity) FROM t WHERE event_type = 'view'").fetchone()[0] == 1
    # Taste: a user's favourite top-level category holds a large share of their events (12 categories exist).
    top_share = con.execute("""
        SELECT avg(top_share) FROM (SELECT user_id, max(c) / sum(c) AS top_share FROM
        (SELECT user_id, category_l1, count(*) c FROM t GROUP BY ALL) GROUP BY user_id HAVING sum(c) >= 50)""").fetchone()[0]
    assert top_share > 0.3
    # Buyers and browsers differ: conversion rates spread across users.
    rates = [r[0] for r in con.execute("""SELECT avg((event_type = 'purchase')::INT) FROM t GROUP BY user_id
                                      HAVING count(*) >= 100""").fetchall()]
    assert np.percentile(rates, 90) > 2 * np.percentile(rates, 10)


def test_write_parquet_round_trip(tmp_path):
    table = generate_events("ecommerce", 10, 100, seed=0, start=dt.datetime(2023, 6, 1, tzinfo=dt.timezone.utc), days=3)
    path = tmp_path / "events.parquet"
    write_events_parquet(table, path)
    assert pq.read_table(path).equals(table)
    assert [p.name for p in tmp_path.iterdir()] == ["events.parquet"]  # no temp file left behind


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(DomaintokError, match="unknown synthetic domain 'insurance'"):
        generate_events("insurance", 1, 1)
    with pytest.raises(DomaintokError, match=r"--events \(5\) must be at least --users \(10\)"):
        generate_events("finance", 10, 5)


def test_tokenizer_fits_and_tokenizes_generated_events(tmp_path):
    from domaintok.tokenizer import DomainTokenizer

    path = tmp_path / "finance.parquet"
    write_events_parquet(generate_events("finance", 30, 1500, seed=9), path)
    tok = DomainTokenizer.fit("finance", path, bpe_vocab_size=300)
    sequences = tok.tokenize(path)
    assert sequences.num_rows == 30
    assert sum(sequences.column("n_events").to_pylist()) == 1500
