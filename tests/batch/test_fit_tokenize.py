"""`domaintok fit` / `domaintok tokenize` through the CLI (exit codes, outputs, one-line errors) and end to end on
the real Online Retail data (both files, both column spellings)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from domaintok import cli
from domaintok.tokenizer import SEQUENCES_SCHEMA, DomainTokenizer
from tests.fixtures_artifacts import RETAIL_2009_2010, RETAIL_2010_2011


def test_cli_fit_then_tokenize(retail_events_slice, tmp_path, capsys):
    tok_dir, seq = tmp_path / "tok", tmp_path / "out" / "seq.parquet"
    code = cli.main(["fit", "--schema", "online_retail", "--input", str(retail_events_slice), "--output", str(tok_dir),
                     "--bpe-vocab-size", "500", "--max-length", "256"])
    assert code == 0
    fit_metrics = json.loads((tok_dir / "fit_metrics.json").read_text())
    assert fit_metrics["users"] == 200 and fit_metrics["events"] > 1000 and fit_metrics["max_length"] == 256
    assert fit_metrics["vocab_size"] == DomainTokenizer.from_pretrained(tok_dir).vocab_size
    assert "tokens/event" in capsys.readouterr().out

    code = cli.main(["tokenize", "--tokenizer", str(tok_dir), "--input", str(retail_events_slice), "--output", str(seq)])
    assert code == 0
    table = pq.read_table(seq)
    assert table.schema.equals(SEQUENCES_SCHEMA) and table.num_rows == 200
    assert pc.max(pc.list_value_length(table["input_ids"])).as_py() <= 256
    metrics = json.loads((seq.parent / "seq.parquet.metrics.json").read_text())
    assert metrics["users"] == 200 and metrics["events"] == fit_metrics["events"]
    assert metrics["events"] == pc.sum(table["n_events"]).as_py()


def _one_error_line(capsys, prefix):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(prefix), err
    return err


def test_cli_errors_are_one_line_exit_2(retail_events_slice, retail_tokenizer, tmp_path, capsys):
    assert cli.main(["fit", "--schema", "online_retail", "--input", str(tmp_path / "nope.parquet"),
                     "--output", str(tmp_path / "t")]) == 2
    _one_error_line(capsys, "domaintok fit: error:")

    assert cli.main(["fit", "--schema", "no_such_schema", "--input", str(retail_events_slice),
                     "--output", str(tmp_path / "t")]) == 2
    assert "no_such_schema" in _one_error_line(capsys, "domaintok fit: error:")

    # a declared column missing from the input: the message names the column, the file and what is there
    bad = tmp_path / "no_country.parquet"
    pq.write_table(pq.read_table(retail_events_slice).drop_columns(["Country"]), bad)
    assert cli.main(["tokenize", "--tokenizer", str(retail_tokenizer), "--input", str(bad),
                     "--output", str(tmp_path / "s.parquet")]) == 2
    err = _one_error_line(capsys, "domaintok tokenize: error:")
    assert "'Country'" in err and str(bad) in err and "available:" in err and "InvoiceNo" in err
    assert not (tmp_path / "s.parquet").exists()

    assert cli.main(["tokenize", "--tokenizer", str(tmp_path), "--input", str(retail_events_slice),
                     "--output", str(tmp_path / "s.parquet")]) == 2
    assert "not a fitted domaintok tokenizer" in _one_error_line(capsys, "domaintok tokenize: error:")


def test_fixtures_are_consistent(retail_sequences, retail_domain_tokenizer, retail_events_slice):
    table = pq.read_table(retail_sequences)
    assert table.num_rows == 200 and table.schema.equals(SEQUENCES_SCHEMA)
    events = pq.read_table(retail_events_slice)
    assert pc.sum(table["n_events"]).as_py() == events.num_rows - 300  # the 300 rows without a customer are filtered
    assert retail_domain_tokenizer.vocab_size > 300


def test_real_online_retail_end_to_end(shared_data_dir, tmp_path):
    files = [shared_data_dir / RETAIL_2009_2010, shared_data_dir / RETAIL_2010_2011]
    tok = DomainTokenizer.fit("online_retail", files)
    stats = tok.fit_stats
    with_customer = sum(pq.read_table(f).num_rows - pq.read_table(f).column(c).null_count
                        for f, c in zip(files, ["Customer ID", "CustomerID"]))
    # every line item with a customer, from both spellings (the 22,523 overlapping rows are counted twice here)
    assert stats["users"] == 5942 and stats["events"] == with_customer
    assert 10 < stats["tokens_per_event"] < 20
    amount_edges = tok.encoders[1].state["edges"]
    assert len(amount_edges) == 20 and amount_edges == sorted(amount_edges)
    assert "United Kingdom" in tok.encoders[4].state["values"] and len(tok.encoders[4].state["values"]) >= 40

    out = tmp_path / "seq.parquet"
    run = tok.tokenize_to_parquet(files, out)
    seq = pq.read_table(out)
    assert seq.num_rows == 5942 and run["events"] == stats["events"]
    assert pc.sum(seq["n_events"]).as_py() == stats["events"]
    assert pc.max(pc.list_value_length(seq["input_ids"])).as_py() <= tok.max_length
    # online == offline on real customers, their raw rows given in both spellings at once
    for user in (12346, 18102):
        row = seq.filter(pc.equal(seq["user_id"], str(user))).to_pylist()[0]
        events = pq.read_table(files[0], filters=[("Customer ID", "=", user)]).to_pylist()
        events += pq.read_table(files[1], filters=[("CustomerID", "=", float(user))]).to_pylist()
        assert len(events) == row["n_events"]
        online = tok.encode_events(events)
        assert np.array_equal(online, np.asarray(row["input_ids"], np.int32))
