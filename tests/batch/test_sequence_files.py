"""A `tokenize` output read as one table whether it is one parquet file or a directory of them (what
`tokenize --engine spark` writes): pretraining items, counts, embed and the fine-tuning join see the same rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.sequence_data import SequenceDataset, count_sequences, length_summary, open_sequences
from batch.sequence_files import SequenceFiles, parquet_files
from domaintok.errors import DomaintokError

SEP, BOS = 3, 2


def sequences_table(n: int = 60, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        events = [list(rng.integers(10, 40, size=int(rng.integers(1, 5)))) + [SEP] for _ in range(int(rng.integers(1, 9)))]
        rows.append([BOS] + [t for e in events for t in e])
    return pa.table({
        "user_id": pa.array([f"u{i:03d}" for i in range(n)]),
        "input_ids": pa.array(rows, pa.list_(pa.int32())),
        "n_events": pa.array([r.count(SEP) for r in rows], pa.int32()),
    })


@pytest.fixture
def file_and_directory(tmp_path):
    """The same rows as one file (row groups of 7) and as a directory of three files in name order, with what
    Spark writes beside them (_SUCCESS, hidden .crc files)."""
    table = sequences_table()
    one = tmp_path / "sequences.parquet"
    pq.write_table(table, one, row_group_size=7)
    parts = tmp_path / "sequences"
    parts.mkdir()
    for i, (lo, hi) in enumerate([(0, 25), (25, 26), (26, 60)]):
        pq.write_table(table.slice(lo, hi - lo), parts / f"part-{i:05d}-abc.zstd.parquet", row_group_size=7)
        (parts / f".part-{i:05d}-abc.zstd.parquet.crc").write_bytes(b"crc")
    (parts / "_SUCCESS").write_bytes(b"")
    return one, parts, table


def test_a_directory_reads_as_its_files_in_name_order(file_and_directory):
    one, parts, table = file_and_directory
    files = SequenceFiles(parts)
    assert [p.name for p in parquet_files(parts)] == [f"part-{i:05d}-abc.zstd.parquet" for i in range(3)]
    assert files.num_rows == 60 and files.num_row_groups == 4 + 1 + 5
    assert [files.row_group_rows(g) for g in range(files.num_row_groups)] == [7, 7, 7, 4, 1, 7, 7, 7, 7, 6]
    read = pa.Table.from_batches(list(files.iter_batches(columns=["user_id", "input_ids"])))
    assert read.equals(table.select(["user_id", "input_ids"]))
    # row groups are numbered across files: group 4 is the second file's only one
    (batch,) = files.iter_batches(row_groups=[4], columns=["user_id"])
    assert batch.column(0).to_pylist() == ["u025"]


@pytest.mark.parametrize("split, windows", [("train", "newest"), ("eval", "newest"), ("all", "all")])
def test_training_items_and_counts_are_those_of_the_single_file(file_and_directory, split, windows):
    one, parts, _ = file_and_directory
    common = dict(batch_size=4, context_length=12, sep_token_id=SEP, split=split, eval_fraction=0.3, shuffle=False,
                  windows=windows)
    from_file = [x["input_ids"].tolist() for x in SequenceDataset(path=one, **common)]
    from_dir = [x["input_ids"].tolist() for x in SequenceDataset(path=parts, **common)]
    assert from_dir == from_file and from_file
    counting = dict(windows=windows, context_length=12, sep_token_id=SEP)
    assert count_sequences(parts, split, 0.3, **counting) == count_sequences(one, split, 0.3, **counting) == len(from_file)
    assert length_summary(parts, 12) == length_summary(one, 12)
    # the ranks' shards of a directory cover every item once, as for a file
    shards = [[x["input_ids"].tolist() for x in SequenceDataset(path=parts, num_shards=3, shard_index=i, **common)]
              for i in range(3)]
    assert sorted(x for shard in shards for x in shard) == sorted(from_file)


def test_the_finetuning_join_reads_a_directory(file_and_directory, tmp_path):
    from batch.finetune import join_inputs

    one, parts, table = file_and_directory
    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"user_id": table["user_id"], "label": pa.array(np.arange(60) % 2)}), labels)
    a, b = join_inputs(labels, one).table, join_inputs(labels, parts).table
    assert a.num_rows == 60 and a.equals(b)


def test_errors_name_the_file_and_the_problem(file_and_directory, tmp_path):
    one, parts, table = file_and_directory
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "_SUCCESS").write_bytes(b"")
    with pytest.raises(DomaintokError, match="input '.*empty': directory holds no .parquet files"):
        open_sequences(empty)
    pq.write_table(table.drop_columns(["input_ids"]), parts / "part-00009-bad.parquet")
    with pytest.raises(DomaintokError, match="part-00009-bad.parquet: missing column\\(s\\) input_ids"):
        open_sequences(parts)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DomaintokError, match="junk.parquet: cannot read as parquet"):
        open_sequences(tmp_path / "junk.parquet")
    with pytest.raises(DomaintokError, match="input '.*missing.parquet': no such file"):
        open_sequences(tmp_path / "missing.parquet")


def test_a_partitioned_directory_reads_every_level_but_what_spark_hides(file_and_directory):
    """Hive-style partitions (`day=.../part-*.parquet`) are read at any depth, in path order; what Spark and
    Hadoop hide (`_temporary/` attempts, names starting with "_" or ".") is not. The same rule for every job:
    `produce` takes its files from it too."""
    from domaintok.event_sql import input_files, input_rows

    _, parts, table = file_and_directory
    nested = parts.parent / "nested"
    for i, (lo, hi) in enumerate([(0, 25), (25, 60)]):
        (nested / f"day=2024-01-0{i + 1}").mkdir(parents=True)
        pq.write_table(table.slice(lo, hi - lo), nested / f"day=2024-01-0{i + 1}" / "part-0.parquet")
    (nested / "_temporary" / "0").mkdir(parents=True)
    pq.write_table(table, nested / "_temporary" / "0" / "part-9.parquet")
    pq.write_table(table, nested / ".hidden.parquet")
    assert [p.relative_to(nested).as_posix() for p in input_files([nested])] == [
        "day=2024-01-01/part-0.parquet", "day=2024-01-02/part-0.parquet"]
    assert input_rows(nested) == 60 and SequenceFiles(nested).num_rows == 60
