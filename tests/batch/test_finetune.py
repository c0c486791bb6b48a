"""The finetune job: DuckDB join and split rules, one-line errors, and the CLI end to end on real Online Retail data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.finetune import infer_feature_types, join_inputs, task_metrics, user_split
from domaintok.cli import main
from domaintok.errors import DomaintokError
from domaintok.models.fusion import JointFusionModel


def _write(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


@pytest.fixture()
def small_inputs(tmp_path):
    users = [f"u{i}" for i in range(40)]
    sequences = _write(tmp_path / "seq.parquet", pa.table({
        "user_id": users[:30],
        "input_ids": pa.array([[2, 7, 8, 4]] * 30, pa.list_(pa.int32())),
    }))
    labels = _write(tmp_path / "labels.parquet", pa.table({
        "user_id": users, "label": [i % 2 for i in range(40)],
        "label_ts": pa.array(np.arange(40) * 86_400_000_000, pa.timestamp("us")),
    }))
    features = _write(tmp_path / "features.parquet", pa.table({
        "user_id": users[5:], "recency": [float(i) for i in range(35)], "country": ["UK", "FR"] * 17 + ["UK"],
        "is_b2b": [True, False] * 17 + [False],
    }))
    return tmp_path, sequences, labels, features


def test_join_counts_users_and_infers_feature_types(small_inputs):
    _, sequences, labels, features = small_inputs
    data = join_inputs(labels, sequences, features, split="user")
    assert data.table.num_rows == 30  # 40 labelled users, 30 with a sequence
    assert data.users_without_sequence == 10
    assert data.users_without_features == 5  # u0..u4 have a sequence but no feature row
    assert data.numeric_features == ["recency", "is_b2b"] and data.categorical_features == ["country"]
    splits = dict(zip(data.table.column("user_id").to_pylist(), data.table.column("split").to_pylist()))
    assert all(splits[u] == user_split(u) for u in splits)


def test_time_split_puts_every_test_label_after_every_train_label(small_inputs):
    _, sequences, labels, _ = small_inputs
    data = join_inputs(labels, sequences, split="time", valid_fraction=0.2, test_fraction=0.2)
    order = {f"u{i}": i for i in range(40)}  # label_ts grows with i
    by_split = {}
    for user, split in zip(data.table.column("user_id").to_pylist(), data.table.column("split").to_pylist()):
        by_split.setdefault(split, []).append(order[user])
    assert max(by_split["train"]) < min(by_split["valid"]) <= max(by_split["valid"]) < min(by_split["test"])


def test_split_column_is_used_as_given(tmp_path, small_inputs):
    _, sequences, _, _ = small_inputs
    labels = _write(tmp_path / "l.parquet", pa.table({
        "user_id": ["u0", "u1", "u2"], "label": [0, 1, 0], "split": ["train", "valid", "test"],
    }))
    data = join_inputs(labels, sequences)
    assert data.table.column("split").to_pylist() == ["train", "valid", "test"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: {"labels": _write(d / "x.parquet", pa.table({"uid": ["u1"], "label": [1]}))},
         r"labels .*x.parquet: no user_id column \(columns: uid, label\)"),
        (lambda d: {"labels": _write(d / "x.parquet", pa.table({"user_id": ["u1"], "target": [1]}))},
         r"no label column 'label' \(columns: user_id, target\)"),
        (lambda d: {"labels": _write(d / "x.parquet", pa.table({"user_id": ["zz"], "label": [1]}))},
         r"no overlapping users: no user_id of labels .* has a sequence in"),
        (lambda d: {"labels": _write(d / "x.parquet", pa.table({"user_id": ["u1", "u1"], "label": [1, 0]}))},
         r"user_id 'u1' has more than one label"),
        (lambda d: {"labels": _write(d / "x.parquet",
                                     pa.table({"user_id": ["u1"], "label": pa.array([None], pa.int64())}))},
         r"1 rows have a null 'label'"),
        (lambda d: {"features": _write(d / "f.parquet", pa.table({"customer": ["u1"], "x": [1.0]}))},
         r"features .*f.parquet: no user_id column"),
        (lambda d: {"features": _write(d / "f.parquet",
                                       pa.table({"user_id": ["u1"], "when": pa.array([0], pa.timestamp("s"))}))},
         r"features column 'when' has type timestamp"),
        (lambda d: {"split": "time"}, r"--split time needs a 'label_ts' column"),
        (lambda d: {"features": _write(d / "f.parquet", pa.table({"user_id": ["u1"], "label": [1.0]}))},
         r"column 'label' clashes with a column of the join"),
    ],
)
def test_join_errors_are_one_line(small_inputs, make, message):
    directory, sequences, _, _ = small_inputs
    labels = _write(directory / "plain.parquet", pa.table({"user_id": ["u1", "u2"], "label": [0, 1]}))
    kwargs = {"labels": labels, "sequences": sequences, **make(directory)}
    with pytest.raises(DomaintokError, match=message) as info:
        join_inputs(**kwargs)
    assert "\n" not in str(info.value)


def test_identifiers_are_quoted(tmp_path, small_inputs):
    _, sequences, _, _ = small_inputs
    labels = _write(tmp_path / "l.parquet", pa.table({"user_id": ["u1", "u2"], 'my "odd" label': [0, 1]}))
    features = _write(tmp_path / "f.parquet", pa.table({"user_id": ["u1"], "select": [1.0], "a b": ["x"]}))
    data = join_inputs(labels, sequences, features, label_column='my "odd" label', split="user")
    assert data.table.column("label").to_pylist() == [0, 1]
    assert data.table.column("select").to_pylist() == [1.0, None]


def test_infer_feature_types():
    schema = pa.schema([("user_id", pa.string()), ("a", pa.int32()), ("b", pa.dictionary(pa.int8(), pa.string())),
                        ("c", pa.bool_()), ("d", pa.decimal128(10, 2))])
    assert infer_feature_types(schema) == (["a", "c", "d"], ["b"])


def test_task_metrics():
    m = task_metrics("binary", np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert m["auc"] == pytest.approx(0.75) and m["accuracy"] == pytest.approx(0.75)
    m = task_metrics("regression", np.array([1.0, 3.0]), np.array([2.0, 3.0]))
    assert m["rmse"] == pytest.approx(np.sqrt(0.5)) and m["mae"] == pytest.approx(0.5)
    m = task_metrics("multiclass", np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))
    assert m["accuracy"] == 1.0 and m["logloss"] == pytest.approx(-np.log([0.9, 0.8]).mean())


@pytest.fixture(scope="module")
def pretrained_model(retail_tokenizer, retail_sequences, tmp_path_factory):
    from batch.pretrain import PretrainSettings, pretrain

    out = tmp_path_factory.mktemp("ft_pretrained") / "model"
    pretrain(PretrainSettings(sequences=retail_sequences, tokenizer=retail_tokenizer, output=out, preset="tiny",
                              context_length=128, max_steps=3, batch_size=16, save_steps=3))
    return out


@pytest.fixture(scope="module")
def retail_labels(retail_events_slice, retail_sequences, tmp_path_factory):
    """Labels and features for the 200 customers of the slice: buys in Sep-Nov 2011, RFM features before Sep."""
    import duckdb

    out = tmp_path_factory.mktemp("ft_labels")
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE ev AS SELECT CAST(CAST(CustomerID AS BIGINT) AS VARCHAR) AS user_id, InvoiceNo, "
        "InvoiceDate, Quantity * UnitPrice AS amount, Country FROM read_parquet($p) WHERE CustomerID IS NOT NULL",
        {"p": str(retail_events_slice)},
    )
    con.sql(
        "SELECT user_id, CAST(bool_or(InvoiceDate >= TIMESTAMP '2011-09-01') AS INTEGER) AS label FROM ev "
        "GROUP BY user_id"
    ).to_parquet(str(out / "labels.parquet"))
    con.sql(
        "SELECT user_id, count(DISTINCT InvoiceNo) AS frequency, sum(amount) AS monetary, "
        "date_diff('day', max(InvoiceDate), TIMESTAMP '2011-09-01') AS recency, mode(Country) AS country "
        "FROM ev WHERE InvoiceDate < TIMESTAMP '2011-09-01' GROUP BY user_id"
    ).to_parquet(str(out / "features.parquet"))
    return out / "labels.parquet", out / "features.parquet"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("lora", [False, True])
def test_finetune_cli_end_to_end(pretrained_model, retail_sequences, retail_labels, tmp_path, lora, capsys):
    labels, features = retail_labels
    out = tmp_path / "fused"
    args = ["finetune", "--model", str(pretrained_model), "--sequences", str(retail_sequences), "--labels",
            str(labels), "--features", str(features), "--output", str(out), "--epochs", "2", "--batch-size", "16",
            "--max-length", "96"] + (["--lora", "--lora-r", "4"] if lora else [])
    assert main(args) == 0
    assert "fine-tuned binary on" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"]["train"] + metrics["rows"]["valid"] + metrics["rows"]["test"] == 200
    assert metrics["test"]["n"] == metrics["rows"]["test"] > 0
    assert 0.0 <= metrics["test"]["auc"] <= 1.0 and metrics["test"]["logloss"] > 0
    assert metrics["numeric_features"] == ["frequency", "monetary", "recency"]
    assert metrics["categorical_features"] == ["country"]
    predictions = pq.read_table(out / "predictions.parquet")
    assert predictions.num_rows == metrics["rows"]["test"]
    assert set(predictions.column("split").to_pylist()) == {"test"}
    model = JointFusionModel.from_pretrained(out)
    assert model.config.numeric_features == ["frequency", "monetary", "recency"]
    assert model.config.tokenizer_fingerprint is not None
    assert (model.config.lora is not None) == lora
    if lora:
        assert metrics["trainable_parameters"] < metrics["parameters"]


@pytest.mark.slow
@pytest.mark.integration
def test_finetune_cli_regression_and_errors(pretrained_model, retail_sequences, retail_labels, tmp_path, capsys):
    labels, _ = retail_labels
    spend = _write(tmp_path / "spend.parquet", pq.read_table(labels).append_column(
        "spend", pa.array(np.linspace(0, 5, 200))))
    out = tmp_path / "reg"
    assert main(["finetune", "--model", str(pretrained_model), "--sequences", str(retail_sequences), "--labels",
                 str(spend), "--label-column", "spend", "--task", "regression", "--output", str(out),
                 "--epochs", "1", "--max-length", "64"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["rmse"] > 0 and metrics["test"]["mae"] > 0
    # A label column that does not exist: one line, exit 2.
    capsys.readouterr()
    assert main(["finetune", "--model", str(pretrained_model), "--sequences", str(retail_sequences), "--labels",
                 str(spend), "--label-column", "churn", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("domaintok finetune: error: labels ") and "no label column 'churn'" in err
    assert err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.integration
def test_tabular_only_ablation(pretrained_model, retail_sequences, retail_labels, tmp_path):
    from batch.finetune import FinetuneSettings, finetune

    labels, features = retail_labels
    metrics = finetune(FinetuneSettings(
        model=pretrained_model, sequences=retail_sequences, labels=labels, features=features,
        output=tmp_path / "tab", use_sequence=False, epochs=2, progress=False,
    ))
    assert 0.0 <= metrics["test"]["auc"] <= 1.0
    model = JointFusionModel.from_pretrained(tmp_path / "tab")
    assert model.transformer is None and model.config.transformer_config is None
    with pytest.raises(DomaintokError, match="needs --features"):
        finetune(FinetuneSettings(model=pretrained_model, sequences=retail_sequences, labels=labels,
                                  output=tmp_path / "x", use_sequence=False, progress=False))
