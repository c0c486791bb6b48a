"""The Spark engine of tokenize and embed (batch/spark.py) against the single-node jobs, on Spark local[2].

One SparkSession for the module, in a session timezone far from the schema's (nothing may depend on it), with small
Arrow batches so a partition arrives in many batches and is tokenized in several user-aligned chunks. The data is the
real Online Retail slice of tests/fixtures_artifacts.py.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

pyspark = pytest.importorskip("pyspark", reason="the spark extra is not installed")

from batch.spark import embed_to_parquet, fit_on_sample, spark_session, tokenize_frame, tokenize_to_parquet  # noqa: E402
from domaintok.cli import main  # noqa: E402
from domaintok.errors import DomaintokError  # noqa: E402
from domaintok.event_sql import EventFilter  # noqa: E402


@pytest.fixture(scope="module")
def spark():
    if shutil.which("java") is None:
        pytest.skip("no java on PATH (Spark needs Java 17)")
    session = spark_session(
        "local[2]",
        app_name="domaintok-tests",
        config={
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.sql.shuffle.partitions": "2",
            "spark.default.parallelism": "2",
            "spark.sql.session.timeZone": "Asia/Tokyo",
            "spark.sql.execution.arrow.maxRecordsPerBatch": "2000",
        },
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def by_user(table: pa.Table) -> pa.Table:
    return table.sort_by("user_id")


@pytest.fixture(scope="module")
def spark_sequences(spark, retail_events_slice, retail_tokenizer, tmp_path_factory):
    """The slice tokenized on Spark (a parquet directory) with its counts: 2 tasks, chunks of about 3,000 events."""
    out = tmp_path_factory.mktemp("spark_sequences") / "sequences"
    stats = tokenize_to_parquet(spark, retail_tokenizer, [retail_events_slice], out, partitions=2, chunk_events=3000)
    return out, stats


def test_tokenize_on_spark_writes_the_single_node_rows(spark_sequences, retail_domain_tokenizer, retail_events_slice,
                                                       retail_sequences, tmp_path):
    out, stats = spark_sequences
    got, want = pq.read_table(out), pq.read_table(retail_sequences)
    assert got.schema.remove_metadata() == want.schema.remove_metadata()  # names, types, nullability
    assert by_user(got).equals(by_user(want))
    # the counts of the single-node job, summed over the tasks
    local = retail_domain_tokenizer.tokenize_to_parquet(retail_events_slice, tmp_path / "again.parquet")
    for key in ("users", "events", "sequence_tokens", "tokens_per_event", "median_user_tokens", "truncated_users",
                "truncated_token_fraction"):
        assert stats[key] == pytest.approx(local[key], rel=1e-12), key
    assert stats["input_rows"] == pq.ParquetFile(retail_events_slice).metadata.num_rows
    assert stats["partitions"] == 2


def test_inputs_with_other_spellings_ties_and_a_filter(spark, retail_events_slice, retail_domain_tokenizer, tmp_path):
    """Two inputs: the raw file, then a directory of two files in the other spelling (Invoice, Price, 'Customer ID'
    int64, InvoiceDate a string), rows reversed, overlapping the first on 1,000 rows: equal times tie across inputs
    and within invoices, and their order must be the single-node one. With a window of 64 tokens, a time cutoff and a
    user subset (broadcast)."""
    raw = pq.read_table(retail_events_slice)
    first = tmp_path / "a.parquet"
    pq.write_table(raw.slice(0, 12_000), first)
    other = raw.slice(11_000)
    other = pa.table({
        "Invoice": other["InvoiceNo"], "StockCode": other["StockCode"], "Description": other["Description"],
        "Quantity": other["Quantity"],
        "InvoiceDate": pc.strftime(other["InvoiceDate"], "%Y-%m-%d %H:%M:%S"),
        "Price": other["UnitPrice"], "Customer ID": other["CustomerID"].cast(pa.int64()), "Country": other["Country"],
    }).take(pa.array(np.arange(other.num_rows)[::-1]))
    second = tmp_path / "b"
    second.mkdir()
    half = other.num_rows // 2
    pq.write_table(other.slice(0, half), second / "part-0.parquet")
    pq.write_table(other.slice(half), second / "part-1.parquet")
    (second / "notes.txt").write_text("not parquet: neither engine reads it")
    users = pc.unique(raw["CustomerID"].drop_null()).cast(pa.int64()).cast(pa.string())
    restrict = EventFilter(before=dt.datetime(2011, 10, 1), users=users.slice(0, 150))
    inputs = [first, second]

    want = retail_domain_tokenizer.tokenize(inputs, 64, restrict=restrict)
    got = tokenize_frame(spark, retail_domain_tokenizer, inputs, 64, restrict=restrict, partitions=3).toArrow()
    assert want.num_rows == 150 and pc.sum(want["n_events"]).as_py() > 5_000
    assert by_user(got).cast(want.schema).equals(want)


def test_a_dataframe_of_events(spark, retail_events_slice, retail_domain_tokenizer, retail_sequences):
    want = pq.read_table(retail_sequences)
    events = spark.read.parquet(str(retail_events_slice))  # read from files: its order is _metadata's file and row
    got = tokenize_frame(spark, retail_domain_tokenizer, events).toArrow()
    assert by_user(got).cast(want.schema).equals(want)

    table = pq.read_table(retail_events_slice)
    table = table.append_column("position", pa.array(np.arange(table.num_rows)))
    table = table.set_column(4, "InvoiceDate", pc.strftime(table["InvoiceDate"], "%Y-%m-%d %H:%M:%S"))
    frame = spark.createDataFrame(table)
    with pytest.raises(DomaintokError, match=r"pass order=\[columns\]"):
        tokenize_frame(spark, retail_domain_tokenizer, frame)
    got = tokenize_frame(spark, retail_domain_tokenizer, frame, order=["position"]).toArrow()
    assert by_user(got).cast(want.schema).equals(want)


def test_fit_on_a_sample_of_users(spark, retail_events_slice, retail_domain_tokenizer):
    whole = fit_on_sample(spark, "online_retail", [retail_events_slice], 1.0, bpe_vocab_size=600)
    assert whole.fingerprint == retail_domain_tokenizer.fingerprint  # everything: the single-node fit
    half = fit_on_sample(spark, "online_retail", [retail_events_slice], 0.5, seed=3, bpe_vocab_size=600)
    assert half.fingerprint != whole.fingerprint
    assert half.vocab_size <= whole.vocab_size
    with pytest.raises(DomaintokError, match="fraction"):
        fit_on_sample(spark, "online_retail", [retail_events_slice], 0.0)


@pytest.fixture(scope="module")
def tiny_model(retail_domain_tokenizer, tmp_path_factory):
    """A randomly initialised tiny model over the slice's tokenizer, context 128 (shorter than many sequences)."""
    import torch

    from domaintok.models.configuration_domain_transformer import DomainTransformerConfig
    from domaintok.models.modeling_domain_transformer import DomainTransformerForCausalLM

    tok = retail_domain_tokenizer
    torch.manual_seed(0)
    config = DomainTransformerConfig.from_preset(
        "tiny", tok.vocab_size, max_position_embeddings=128, dropout=0.0, sep_token_id=tok.sep_token_id,
        bos_token_id=tok.bos_token_id, tokenizer_fingerprint=tok.fingerprint,
    )
    out = tmp_path_factory.mktemp("tiny_model") / "model"
    DomainTransformerForCausalLM(config).save_pretrained(out)
    return out


def test_embed_on_spark_equals_the_single_node_embeddings(spark, spark_sequences, retail_sequences, tiny_model, tmp_path):
    from batch.embed import embed_parquet

    local = embed_parquet(tiny_model, retail_sequences, tmp_path / "emb.parquet", batch_size=16, device="cpu",
                          progress=False)
    stats = embed_to_parquet(spark, tiny_model, spark_sequences[0], tmp_path / "emb", batch_size=16)
    want, got = pq.read_table(tmp_path / "emb.parquet"), by_user(pq.read_table(tmp_path / "emb"))
    assert got.schema.remove_metadata() == want.schema.remove_metadata()
    assert got.drop_columns(["embedding"]).equals(want.drop_columns(["embedding"]))  # users, counts, times, version
    diff = np.abs(np.array(got["embedding"].to_pylist()) - np.array(want["embedding"].to_pylist())).max()
    assert diff < 1e-5, diff
    for key in ("users", "tokens", "truncated_users", "context_length", "model_version", "hidden_size"):
        assert stats[key] == local[key], key
    assert local["truncated_users"] > 10 and stats["device"] == "cpu"


def test_the_single_node_jobs_read_the_spark_output(spark_sequences, retail_sequences, retail_tokenizer, tiny_model,
                                                   tmp_path):
    """`tokenize --engine spark` writes a directory of parquet files; pretrain and the single-node embed take it as is."""
    from batch.embed import embed_parquet

    parts = spark_sequences[0]
    assert len(list(parts.glob("*.parquet"))) > 1
    embed_parquet(tiny_model, retail_sequences, tmp_path / "a.parquet", batch_size=16, device="cpu", progress=False)
    embed_parquet(tiny_model, parts, tmp_path / "b.parquet", batch_size=16, device="cpu", progress=False)
    want, got = pq.read_table(tmp_path / "a.parquet"), by_user(pq.read_table(tmp_path / "b.parquet"))
    assert got.drop_columns(["embedding"]).equals(want.drop_columns(["embedding"]))
    diff = np.abs(np.array(got["embedding"].to_pylist()) - np.array(want["embedding"].to_pylist())).max()
    assert diff < 1e-5, diff
    assert main(["pretrain", "--sequences", str(parts), "--tokenizer", str(retail_tokenizer), "--output",
                 str(tmp_path / "model"), "--max-steps", "2", "--batch-size", "8", "--context-length", "64"]) == 0
    assert json.loads((tmp_path / "model" / "metrics.json").read_text())["train_sequences"] > 100


def test_the_cli_runs_both_jobs_on_spark(spark, retail_events_slice, retail_tokenizer, tiny_model, tmp_path, capsys):
    seq = tmp_path / "seq"
    assert main(["tokenize", "--engine", "spark", "--tokenizer", str(retail_tokenizer), "--input",
                 str(retail_events_slice), "--output", str(seq), "--max-length", "100", "--partitions", "2"]) == 0
    metrics = json.loads((tmp_path / "seq.metrics.json").read_text())
    assert metrics["engine"] == "spark" and metrics["users"] == 200 and metrics["max_length"] == 100
    assert metrics["input_rows"] == pq.ParquetFile(retail_events_slice).metadata.num_rows
    assert max(len(x) for x in pq.read_table(seq)["input_ids"].to_pylist()) <= 100
    # a rerun replaces the directory
    assert main(["tokenize", "--engine", "spark", "--tokenizer", str(retail_tokenizer), "--input",
                 str(retail_events_slice), "--output", str(seq)]) == 0
    assert pq.read_table(seq).num_rows == 200

    emb = tmp_path / "emb"
    assert main(["embed", "--engine", "spark", "--model", str(tiny_model), "--sequences", str(seq), "--output",
                 str(emb)]) == 0
    assert "embedded 200 users" in capsys.readouterr().out
    assert json.loads((tmp_path / "emb.metrics.json").read_text())["users"] == 200

    # errors a user can act on: one line, exit 2, also when raised inside a Spark task
    capsys.readouterr()
    bad = tmp_path / "bad.parquet"
    table = pq.read_table(seq)
    pq.write_table(table.set_column(1, "input_ids", pa.array([[2, 99_999, 4]] * table.num_rows, pa.list_(pa.int32()))), bad)
    assert main(["embed", "--engine", "spark", "--model", str(tiny_model), "--sequences", str(bad), "--output",
                 str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("domaintok embed: error: ") and "token id 99999 >= the model's vocab_size" in err[-1]
    assert main(["tokenize", "--tokenizer", str(retail_tokenizer), "--input", "hdfs://cluster/events",
                 "--output", str(tmp_path / "s.parquet")]) == 2
    assert "a URI is read and written by --engine spark only" in capsys.readouterr().err
    assert main(["tokenize", "--engine", "spark", "--tokenizer", str(retail_tokenizer), "--input", str(seq),
                 "--output", str(tmp_path / "s")]) == 2
    assert "column 'Invoice / InvoiceNo' of schema online_retail is missing" in capsys.readouterr().err
    assert main(["tokenize", "--engine", "spark", "--tokenizer", str(retail_tokenizer), "--input",
                 f"file://{tmp_path}/absent", "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("domaintok tokenize: error: input 'file://") and "PATH_NOT_FOUND" in err[-1]
