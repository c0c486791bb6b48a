"""Tests of the pretrain / embed / export-onnx jobs and of the streaming sequence dataset behind pretraining.

Unit tests use small synthetic parquet files; end-to-end tests run the CLI on a real Online Retail slice
(fixtures in tests/fixtures_artifacts.py) with the tiny preset and a handful of steps.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.sequence_data import (
    CausalLMCollator,
    SequenceDataset,
    count_sequences,
    event_windows,
    is_eval_user,
)
from domaintok.window import truncate_window
from domaintok.cli import main

BOS, SEP, PAD = 2, 4, 0


def write_sequences(path, n_users: int = 120, seed: int = 0):
    """Sequences laid out as the tokenizer does: [BOS] (a b [SEP])*, 1 to 15 events per user."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_users):
        ids = [BOS]
        for _ in range(int(rng.integers(1, 16))):
            ids += [int(rng.integers(6, 40)), int(rng.integers(6, 40)), SEP]
        rows.append(ids)
    table = pa.table(
        {
            "user_id": [f"user-{i}" for i in range(n_users)],
            "input_ids": pa.array(rows, pa.list_(pa.int32())),
            "n_events": pa.array([(len(r) - 1) // 3 for r in rows], pa.int64()),
            "last_event_ts": pa.array(np.arange(n_users) * 1_000_000, pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(table, path, row_group_size=40)
    return rows


# --- sequence data ---------------------------------------------------------------------------------------------------


def test_truncation_keeps_bos_and_the_newest_whole_events():
    ids = np.array([BOS, 10, 11, SEP, 12, SEP, 13, 14, 15, SEP])
    assert truncate_window(ids, 20, SEP).tolist() == ids.tolist()
    assert truncate_window(ids, 6, SEP).tolist() == [BOS, 13, 14, 15, SEP]
    assert truncate_window(ids, 7, SEP).tolist() == [BOS, 12, SEP, 13, 14, 15, SEP]
    # One event longer than the context: the tokenizer's rule keeps [BOS] alone (one rule, domaintok/window.py).
    assert truncate_window(ids, 3, SEP).tolist() == [BOS]


def test_event_windows_cover_the_history_newest_first():
    ids = np.array([BOS, 10, 11, SEP, 12, SEP, 13, 14, 15, SEP, 16, SEP])
    assert [w.tolist() for w in event_windows(ids, 20, SEP)] == [ids.tolist()]
    windows = event_windows(ids, 6, SEP)
    assert [w.tolist() for w in windows] == [[BOS, 16, SEP], [BOS, 13, 14, 15, SEP], [BOS, 10, 11, SEP, 12, SEP]]
    for context in (3, 4, 5, 6, 7, 9):
        windows = event_windows(ids, context, SEP)
        assert windows[0].tolist() == truncate_window(ids, context, SEP).tolist()  # what embed sees comes first
        assert all(w[0] == BOS and len(w) <= context for w in windows)
        # every token of the history exactly once, in order
        assert np.concatenate([w[1:] for w in reversed(windows)]).tolist() == ids[1:].tolist()
    # whole events whenever an event fits a window
    assert all(w[-1] == SEP for w in event_windows(ids, 5, SEP))


def test_all_windows_dataset_reads_every_event(tmp_path):
    path = tmp_path / "seq.parquet"
    rows = write_sequences(path)
    kwargs = dict(path=path, batch_size=8, context_length=10, sep_token_id=SEP, eval_fraction=0.2, shuffle=False)
    newest = list(SequenceDataset(split="all", **kwargs))
    every = list(SequenceDataset(split="all", windows="all", **kwargs))
    assert len(newest) == 120 and len(every) == sum(len(event_windows(np.array(r), 10, SEP)) for r in rows)
    assert sum(len(x["input_ids"]) - 1 for x in every) == sum(len(r) - 1 for r in rows)  # no event dropped
    assert all(len(x["input_ids"]) <= 10 for x in every)
    for split in ("train", "eval"):
        items = list(SequenceDataset(split=split, windows="all", **kwargs))
        assert count_sequences(path, split, 0.2, windows="all", context_length=10, sep_token_id=SEP) == len(items)


def test_split_is_by_user_disjoint_and_complete(tmp_path):
    path = tmp_path / "seq.parquet"
    write_sequences(path)
    kwargs = dict(path=path, batch_size=8, context_length=64, sep_token_id=SEP, eval_fraction=0.2, shuffle=False)
    train = [tuple(x["input_ids"]) for x in SequenceDataset(split="train", **kwargs)]
    evals = [tuple(x["input_ids"]) for x in SequenceDataset(split="eval", **kwargs)]
    everything = [tuple(x["input_ids"]) for x in SequenceDataset(split="all", **kwargs)]
    assert len(train) + len(evals) == len(everything) == 120
    assert sorted(train + evals) == sorted(everything)
    assert 5 < len(evals) < 45  # ~20% of 120 users
    assert count_sequences(path, "train", 0.2) == len(train)
    assert count_sequences(path, "eval", 0.2) == len(evals)
    assert sum(is_eval_user(f"user-{i}", 0.2) for i in range(120)) == len(evals)


def test_bucketing_cuts_padding_and_shuffles_by_epoch(tmp_path):
    path = tmp_path / "seq.parquet"
    rows = write_sequences(path, n_users=400)
    dataset = SequenceDataset(path=path, batch_size=16, context_length=64, split="all", bucket_batches=8, seed=1)
    first = [x["input_ids"] for x in dataset]
    collate = CausalLMCollator(pad_token_id=PAD)
    batches = [collate([{"input_ids": s} for s in first[i : i + 16]]) for i in range(0, len(first), 16)]
    slots = sum(b["input_ids"].numel() for b in batches)
    real = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert dataset.stats.tokens == real == sum(len(r) for r in rows)
    assert dataset.stats.padded_slots == slots
    # Against the same batches in file order (no bucketing): far less padding.
    unbucketed = sum(max(len(r) for r in rows[i : i + 16]) * len(rows[i : i + 16]) for i in range(0, 400, 16))
    naive_padding = 1 - real / unbucketed
    assert dataset.stats.padding_fraction < 0.15 and naive_padding > 0.35, (dataset.stats, naive_padding)
    dataset.set_epoch(1)
    second = [x["input_ids"].tolist() for x in dataset]
    assert sorted(map(tuple, second)) == sorted(tuple(s.tolist()) for s in first)
    assert second != [s.tolist() for s in first]


def test_collator_masks_padding_out_of_the_labels():
    batch = CausalLMCollator(pad_token_id=PAD)([{"input_ids": np.array([2, 7, 8])}, {"input_ids": np.array([2, 9])}])
    assert batch["input_ids"].tolist() == [[2, 7, 8], [2, 9, PAD]]
    assert batch["labels"].tolist() == [[2, 7, 8], [2, 9, -100]]
    assert "attention_mask" not in batch  # right padding: real positions need no mask (see CausalLMCollator)


# --- jobs end to end on real data ------------------------------------------------------------------------------------


def run(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.mark.integration
@pytest.mark.slow
def test_pretrain_then_embed_then_export_on_real_data(retail_tokenizer, retail_sequences, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintok.models.embedding import embed_sequences, load_encoder
    from domaintok.tokenizer import DomainTokenizer

    model_dir = tmp_path / "model"
    rc = run(
        "pretrain", "--sequences", retail_sequences, "--tokenizer", retail_tokenizer, "--output", model_dir,
        "--preset", "tiny", "--context-length", "128", "--max-steps", "12", "--batch-size", "8",
        "--eval-fraction", "0.2",
    )
    assert rc == 0, capsys.readouterr().err
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "metrics.json", "loss_curve.png", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)

    tokenizer = DomainTokenizer.from_pretrained(model_dir)  # the model dir alone serves the workers
    assert tokenizer.fingerprint == DomainTokenizer.from_pretrained(retail_tokenizer).fingerprint
    assert len(AutoTokenizer.from_pretrained(model_dir)) == tokenizer.vocab_size
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.tokenizer_fingerprint == tokenizer.fingerprint
    assert model.config.vocab_size == tokenizer.vocab_size and model.config.sep_token_id == tokenizer.sep_token_id

    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert metrics["eval_loss"] is not None and np.isfinite(metrics["train_loss"])
    assert metrics["train_loss"] < np.log(tokenizer.vocab_size)  # below a uniform guess after 12 steps
    assert metrics["tokens_per_second"] > 0 and 0 <= metrics["padding_fraction"] < 0.5
    assert metrics["train_sequences"] + metrics["eval_sequences"] == 200

    out = tmp_path / "emb.parquet"
    assert run("embed", "--model", model_dir, "--sequences", retail_sequences, "--output", out,
               "--batch-size", "16", "--device", "cpu") == 0
    table = pq.read_table(out)
    assert table.column_names == ["user_id", "embedding", "n_events", "last_event_ts", "model_version"]
    sequences = pq.read_table(retail_sequences)
    assert table.column("user_id").to_pylist() == sequences.column("user_id").to_pylist()
    assert table.column("n_events").to_pylist() == sequences.column("n_events").to_pylist()
    assert str(table.schema.field("embedding").type) == "list<element: float>"
    assert len(set(table.column("model_version").to_pylist())) == 1
    embeddings = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert embeddings.shape == (200, model.config.hidden_size) and np.isfinite(embeddings).all()
    encoder = load_encoder(model_dir, device="cpu", expected_fingerprint=tokenizer.fingerprint)
    # embed cuts sequences longer than the model's context (128) as tokenize does: [BOS] + newest whole events
    lengths = np.array([len(x) for x in sequences.column("input_ids").to_pylist()])
    assert (lengths > 128).sum() > 3
    rows = np.argsort(-lengths)[:5]
    some = [truncate_window(np.asarray(sequences.column("input_ids")[int(i)].as_py()), 128, 4) for i in rows]
    assert max(len(x) for x in some) <= 128
    np.testing.assert_allclose(embeddings[rows], embed_sequences(encoder, some, batch_size=1), rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "emb.parquet.metrics.json").read_text())["truncated_users"] == int((lengths > 128).sum())
    assert not list(tmp_path.glob(".emb.parquet*"))  # the temp file was renamed, not left behind

    onnx_path = tmp_path / "model.onnx"
    assert run("export-onnx", "--model", model_dir, "--output", onnx_path) == 0
    assert onnx_path.is_file()
    assert "max abs diff" in capsys.readouterr().out


@pytest.mark.integration
@pytest.mark.slow
def test_pretrain_resumes_from_the_last_checkpoint(retail_tokenizer, retail_sequences, tmp_path, capsys):
    model_dir = tmp_path / "model"
    common = ("pretrain", "--sequences", retail_sequences, "--tokenizer", retail_tokenizer, "--output", model_dir,
              "--context-length", "64", "--batch-size", "8", "--save-steps", "3")
    assert run(*common, "--max-steps", "6") == 0
    checkpoints = tmp_path / "model.checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    first = json.loads((model_dir / "metrics.json").read_text())

    capsys.readouterr()
    assert run(*common, "--max-steps", "8") == 2  # refuses to silently restart over existing checkpoints
    assert "pass --resume" in capsys.readouterr().err

    assert run(*common, "--max-steps", "9", "--resume") == 0
    second = json.loads((model_dir / "metrics.json").read_text())
    assert second["resumed"] and second["steps"] == 9
    # The log carries on from step 6: the earlier steps' losses come back from the checkpoint unchanged.
    before = [e for e in first["log_history"] if "loss" in e and e["step"] <= 6]
    after = [e for e in second["log_history"] if "loss" in e and e["step"] <= 6]
    assert [(e["step"], e["loss"]) for e in after] == [(e["step"], e["loss"]) for e in before]
    assert max(e["step"] for e in second["log_history"] if "loss" in e) == 9
    assert "checkpoint-9" in {p.name for p in checkpoints.iterdir()}


def test_pretrain_reports_bad_input_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"user_id": ["a"]}), bad)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    rc = run("pretrain", "--sequences", bad, "--tokenizer", tokenizer_dir, "--output", tmp_path / "m")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "not a tokenizer directory" in err


def test_pretrain_presets_overrides_and_context_warning(retail_tokenizer, tmp_path, capsys):
    from batch.pretrain import PRESET_NAMES
    from domaintok.models import PRESETS

    assert PRESET_NAMES == tuple(PRESETS)
    sequences = tmp_path / "seq.parquet"
    rows = write_sequences(sequences, n_users=40)
    model_dir = tmp_path / "model"
    rc = run("pretrain", "--sequences", sequences, "--tokenizer", retail_tokenizer, "--output", model_dir,
             "--preset", "small", "--layers", "1", "--heads", "2", "--context-length", "16", "--max-steps", "2",
             "--batch-size", "8", "--eval-fraction", "0", "--threads", "1")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "pretrain: context 16 tokens (--context-length)" in captured.err
    median = float(np.median([len(r) for r in rows]))
    assert f"shorter than the median user's sequence ({median:,.0f} tokens)" in captured.err
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["preset"] == "small" and metrics["objective"] == "clm" and metrics["pooling"] == "last"
    assert metrics["cpu_threads"] == 1
    assert metrics["architecture"] == {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                       "intermediate_size": 256}
    assert metrics["users_truncated_fraction"] == pytest.approx(np.mean([len(r) > 16 for r in rows]))
    assert "small (1 x 64, clm, context 16)" in captured.out

    rc = run("pretrain", "--sequences", sequences, "--tokenizer", retail_tokenizer, "--output", tmp_path / "w",
             "--context-length", "16", "--windows", "all", "--max-steps", "2", "--batch-size", "8", "--threads", "1")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert metrics["windows"] == "all" and metrics["train_items"] > 40 * 0.9
    assert "training windows" in captured.err and "shorter than the median" not in captured.err
    rc = run("pretrain", "--sequences", sequences, "--tokenizer", retail_tokenizer, "--output", tmp_path / "c",
             "--windows", "all", "--objective", "clm+coles")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "false negatives" in err[-1]

    rc = run("pretrain", "--sequences", sequences, "--tokenizer", retail_tokenizer, "--output", tmp_path / "m2",
             "--hidden-size", "30", "--heads", "4")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("domaintok pretrain: error: model size:") and "multiple of" in err[-1]
