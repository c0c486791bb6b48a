"""`domaintok fit` / `tokenize` with `--before` and `--users` (leakage: a post-cutoff event or an excluded user never
reaches the fitted state or the sequences), and the window length each job prints."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from domaintok import cli
from domaintok.synthetic import generate_finance, write_events_parquet
from domaintok.tokenizer import ARTIFACT_FILE, DomainTokenizer

CUTOFF = dt.datetime(2024, 4, 1, tzinfo=dt.timezone.utc)
LEAK_MCC = "9999"  # a category that only post-cutoff (or excluded-user) events carry


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    """Synthetic finance events plus leak rows: after the cutoff for a kept user, and before it for an excluded one."""
    table = generate_finance(40, 3_000, seed=3)
    n = 30
    leak = pa.table({
        "user_id": pa.array(["u_leak"] * n + [table["user_id"][0].as_py()] * n),
        "timestamp": pa.array([CUTOFF - dt.timedelta(days=10)] * n + [CUTOFF + dt.timedelta(days=1)] * n,
                              table.schema.field("timestamp").type),
        "amount": pa.array([-5.0] * 2 * n),
        "description": pa.array(["leak"] * 2 * n),
        "merchant_id": pa.array(["m_leak"] * 2 * n),
        "mcc": pa.array([LEAK_MCC] * 2 * n),
        "channel": pa.array(["online"] * 2 * n),
    }).cast(table.schema)
    path = tmp_path_factory.mktemp("ev") / "events.parquet"
    write_events_parquet(pa.concat_tables([table, leak]), path)
    users = tmp_path_factory.mktemp("users") / "keep.txt"
    kept = sorted(set(table["user_id"].to_pylist()))
    users.write_text("\n".join(kept) + "\n")
    return path, users, kept


def _expected(path, kept):
    table = pq.read_table(path)
    mask = pc.and_(pc.less(table["timestamp"], pa.scalar(CUTOFF, table.schema.field("timestamp").type)),
                   pc.is_in(table["user_id"], pa.array(kept)))
    return table.filter(mask)


def test_before_and_users_keep_leaks_out_of_fit_and_tokenize(events, tmp_path, capsys):
    path, users, kept = events
    expected = _expected(path, kept)
    tok_dir, seq = tmp_path / "tok", tmp_path / "seq.parquet"
    assert cli.main(["fit", "--schema", "finance", "--input", str(path), "--output", str(tok_dir),
                     "--before", "2024-04-01", "--users", str(users), "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "window 64 tokens" in out
    metrics = json.loads((tok_dir / "fit_metrics.json").read_text())
    assert metrics["events"] == expected.num_rows and metrics["users"] == len(kept)
    assert metrics["before"] == "2024-04-01T00:00:00" and metrics["users_filter"] == len(kept)
    assert f'"{LEAK_MCC}"' not in (tok_dir / ARTIFACT_FILE).read_text()  # the fitted category vocabularies

    assert cli.main(["tokenize", "--tokenizer", str(tok_dir), "--input", str(path), "--output", str(seq),
                     "--before", "2024-04-01T00:00:00+00:00", "--users", str(users)]) == 0
    captured = capsys.readouterr()
    assert "window 64 tokens (the tokenizer's max_length)" in captured.out
    assert "is shorter than the median user's sequence" in captured.err  # ~75 events a user, 64 tokens
    table = pq.read_table(seq)
    assert sorted(table["user_id"].to_pylist()) == kept
    assert pc.sum(table["n_events"]).as_py() == expected.num_rows
    assert pc.max(table["last_event_ts"]).as_py() < CUTOFF
    seq_metrics = json.loads((tmp_path / "seq.parquet.metrics.json").read_text())
    assert seq_metrics["users_filter"] == len(kept) and seq_metrics["max_length"] == 64
    kept_events = np.array([(np.asarray(ids) == 4).sum() for ids in table["input_ids"].to_pylist()])  # [SEP] = 4
    assert seq_metrics["truncated_users"] == int((kept_events < table["n_events"].to_numpy()).sum()) > 0
    assert 0 < seq_metrics["truncated_token_fraction"] < 1


def test_without_filters_the_leak_rows_are_read(events, tmp_path):
    # the control: the same data unfiltered does carry the leak category, so the test above can fail
    path, _, kept = events
    tok = DomainTokenizer.fit("finance", [path])
    assert f'"{LEAK_MCC}"' in (tok.save_pretrained(tmp_path / "tok") / ARTIFACT_FILE).read_text()
    assert tok.fit_stats["users"] == len(kept) + 1


def test_users_parquet_and_bad_options(events, tmp_path, capsys):
    path, _, kept = events
    users = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user_id": kept[:5], "other": np.arange(5)}), users)
    tok = tmp_path / "tok"
    assert cli.main(["fit", "--schema", "finance", "--input", str(path), "--output", str(tok),
                     "--users", str(users)]) == 0
    assert json.loads((tok / "fit_metrics.json").read_text())["users"] == 5
    capsys.readouterr()
    assert cli.main(["fit", "--schema", "finance", "--input", str(path), "--output", str(tmp_path / "t2"),
                     "--before", "last tuesday"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("domaintok fit: error: --before 'last tuesday'") and err.count("\n") == 1
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"a": [1], "b": [2]}), bad)
    assert cli.main(["tokenize", "--tokenizer", str(tok), "--input", str(path), "--output", str(tmp_path / "s.parquet"),
                     "--users", str(bad)]) == 2
    assert "no user_id column" in capsys.readouterr().err
