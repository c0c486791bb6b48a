"""The Online Retail evaluation: task labels and features without leakage, the text baseline, the AUC bootstrap,
and `evaluate --quick` end to end."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from batch.evaluate import METHODS, bootstrap_delta, fast_auc
from batch.retail_tasks import NUMERIC_FEATURES, build_retail_tasks
from batch.text_baseline import serialize_events, text_sequences, train_text_tokenizer
from domaintok.cli import main


@pytest.fixture(scope="module")
def retail_tasks(shared_data_dir):
    return build_retail_tasks(shared_data_dir / "online_retail", max_users=300)


def test_tasks_use_only_pre_cutoff_events(retail_tasks, shared_data_dir):
    import duckdb

    ts = retail_tasks.events.column("InvoiceDate").to_numpy().astype("datetime64[us]")
    assert ts.max() < np.datetime64(retail_tasks.cutoff)
    assert ts.min() < np.datetime64("2010-12-01")  # the 2009-2010 file is read too
    assert retail_tasks.events.column("CustomerID").null_count == 0
    # The overlap 2010-12-01..09 comes once, from the 2010-2011 file: same row count for these customers.
    con = duckdb.connect()
    con.register("events", retail_tasks.events)
    ours = con.execute(
        "SELECT count(*) FROM events WHERE \"InvoiceDate\" >= TIMESTAMP '2010-12-01' "
        "AND \"InvoiceDate\" < TIMESTAMP '2010-12-10'"
    ).fetchall()[0][0]
    raw = con.execute(
        "SELECT count(*) FROM read_parquet($p) WHERE CAST(CustomerID AS BIGINT) IN (SELECT \"CustomerID\" FROM events) "
        "AND InvoiceDate >= TIMESTAMP '2010-12-01' AND InvoiceDate < TIMESTAMP '2010-12-10'",
        {"p": str(shared_data_dir / "online_retail" / "online_retail_I_2010-2011.parquet")},
    ).fetchall()[0][0]
    assert ours == raw > 0


def test_labels_splits_and_features(retail_tasks):
    labels = retail_tasks.labels
    assert labels.num_rows == 300 == retail_tasks.features.num_rows
    assert set(labels.column("split").to_pylist()) == {"train", "valid", "test"}
    assert set(labels.column("label").to_pylist()) == {0, 1}
    assert set(retail_tasks.features.column_names) >= {"user_id", "country", *NUMERIC_FEATURES}
    # Every user has events before the cutoff, so recency and tenure are defined and non-negative.
    tenure = retail_tasks.features.column("tenure_days").to_numpy()
    assert (tenure >= 0).all()
    # A spend above zero needs a purchase in the horizon (cancellations alone never make a positive label).
    spend = labels.column("spend").to_numpy()
    assert (labels.column("label").to_numpy()[spend > 0] == 1).all()
    summary = retail_tasks.summary()
    assert summary["users_train"] + summary["users_valid"] + summary["users_test"] == 300


def test_a_customer_label_matches_the_raw_data(shared_data_dir):
    import duckdb

    tasks = build_retail_tasks(shared_data_dir / "online_retail", cutoff=dt.datetime(2011, 6, 1), horizon_days=30,
                               max_users=50)
    con = duckdb.connect()
    path = str(shared_data_dir / "online_retail" / "online_retail_I_2010-2011.parquet")
    for user, label in zip(tasks.labels.column("user_id").to_pylist()[:10], tasks.labels.column("label").to_pylist()):
        bought = con.execute(
            "SELECT count(*) FROM read_parquet($p) WHERE CAST(CAST(CustomerID AS BIGINT) AS VARCHAR) = $u "
            "AND InvoiceDate >= TIMESTAMP '2011-06-01' AND InvoiceDate < TIMESTAMP '2011-07-01' "
            "AND NOT starts_with(InvoiceNo, 'C')",
            {"p": path, "u": user},
        ).fetchall()[0][0]
        assert label == int(bought > 0), user


def test_text_serialization_and_bpe(retail_tasks):
    serialized = serialize_events(retail_tasks.events.slice(0, 500), max_events_per_user=20)
    text = serialized.column("text").to_pylist()[0]
    date, country, description, qty, amount = text.split(" | ")
    assert len(date) == 16 and qty.startswith("qty ") and float(amount) == pytest.approx(float(amount))
    tokenizer = train_text_tokenizer(serialized.column("text").to_pylist(), vocab_size=400, context_length=64)
    assert tokenizer.convert_ids_to_tokens([0, 2, 4]) == ["[PAD]", "[BOS]", "[SEP]"]
    sequences = text_sequences(tokenizer, serialized, context_length=64)
    for ids in sequences.column("input_ids").to_pylist():
        assert ids[0] == 2 and ids[-1] == 4 and len(ids) <= 64
    # Round trip: the newest event's text decodes back from the end of the window.
    first_user = serialized.column("user_id").to_pylist()[0]
    newest = [t for u, t in zip(serialized.column("user_id").to_pylist(), serialized.column("text").to_pylist())
              if u == first_user][-1]
    ids = sequences.column("input_ids").to_pylist()[0]
    start = max(i for i, t in enumerate(ids[:-1]) if t in (2, 4)) + 1  # after the previous [SEP] or the [BOS]
    last_event = ids[start:-1]
    assert tokenizer.decode(last_event) == newest


def test_fast_auc_matches_sklearn_and_bootstrap_sign():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(y * 0.3 + rng.random(300), 1)  # ties on purpose
    assert fast_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    better = y + rng.random(300) * 0.5
    ci = bootstrap_delta(y, p, better, "purchase", 200, 0)
    assert 0 < ci["low"] <= ci["high"] and ci["p_better"] == 1.0


@pytest.mark.slow
@pytest.mark.integration
def test_evaluate_quick_end_to_end(shared_data_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--quick", "--data-dir", str(shared_data_dir / "online_retail"), "--output", str(out),
                 "--task", "purchase"]) == 0
    assert "purchase: lightgbm" in capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    purchase = report["results"]["purchase"]
    assert set(purchase) == set(METHODS)
    for method in METHODS:
        test = purchase[method]["test"]
        assert 0.0 <= test["auc"] <= 1.0 and test["logloss"] > 0, method
        assert test["n"] == report["summary"]["users_test"]
        assert "relative_auc_vs_lightgbm" in test
    assert purchase["lightgbm"]["test"]["relative_auc_vs_lightgbm"] == 0.0
    # Both transformers have the same non-embedding size and the same pretraining budget.
    pre = report["pretrain"]
    assert pre["domain"]["non_embedding_parameters"] == pre["text_bpe"]["non_embedding_parameters"]
    assert pre["domain"]["steps"] == pre["text_bpe"]["steps"]
    markdown = (out / "results.md").read_text()
    assert "| LightGBM on RFM features |" in markdown and "Domain tokens + joint fusion" in markdown
