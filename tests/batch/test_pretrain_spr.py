"""`domaintok pretrain --actionpiece-spr`: training batches (and only they) are re-segmented by random set
permutations; a tokenizer without merges is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from batch.sequence_data import is_eval_user

from domaintok.cli import main
from domaintok.set_permutation import SetPermutation
from domaintok.tokenizer import SEP_ID, DomainTokenizer
from domaintok.window import truncate_window
from tests.domaintok.test_tokenizer import _toy_table
from tests.domaintok.test_tokenizer_actionpiece import _schema


def run(*args) -> int:
    return main([str(a) for a in args])


def test_spr_reshapes_training_batches_only(tmp_path, monkeypatch, capsys):
    table = _toy_table(n=900, seed=3, users=60)
    tok = DomainTokenizer.fit(_schema(60), table, max_length=48)
    tok.save_pretrained(tmp_path / "tok")
    tok.tokenize_to_parquet(table, tmp_path / "seq.parquet")
    calls: list[list[np.ndarray]] = []
    real = SetPermutation.apply

    def spy(self, windows, rng, context_length=None, rate=1.0):
        out = real(self, windows, rng, context_length, rate)
        calls.append([np.asarray(w) for w in windows])
        assert all(len(w) <= context_length for w in out)
        return out

    monkeypatch.setattr(SetPermutation, "apply", spy)
    steps = 3
    rc = run("pretrain", "--sequences", tmp_path / "seq.parquet", "--tokenizer", tmp_path / "tok",
             "--output", tmp_path / "m", "--max-steps", steps, "--batch-size", 8, "--eval-fraction", 0.3,
             "--threads", 1, "--actionpiece-spr", 1)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["actionpiece_spr"] == 1 and np.isfinite(metrics["train_loss"])
    assert metrics["eval_loss"] is not None  # evaluated (every step here), but not through SPR:
    seqs = pq.read_table(tmp_path / "seq.parquet")
    windows = {u: tuple(truncate_window(np.asarray(ids), 48, SEP_ID).tolist())
               for u, ids in zip(seqs.column("user_id").to_pylist(), seqs.column("input_ids").to_pylist())}
    evals = {w for u, w in windows.items() if is_eval_user(u, 0.3)}
    trains = {w for u, w in windows.items() if not is_eval_user(u, 0.3)}
    assert evals and len(calls) >= steps and all(len(c) == 8 for c in calls)  # (the loader may fetch one ahead)
    seen = [tuple(w.tolist()) for c in calls for w in c]
    assert all(w in trains for w in seen) and not any(w in evals - trains for w in seen)


def test_spr_refuses_a_tokenizer_without_merges(tmp_path, capsys):
    table = _toy_table(n=200, seed=3, users=10)
    tok = DomainTokenizer.fit(_schema(None), table, max_length=48)
    tok.save_pretrained(tmp_path / "tok")
    tok.tokenize_to_parquet(table, tmp_path / "seq.parquet")
    rc = run("pretrain", "--sequences", tmp_path / "seq.parquet", "--tokenizer", tmp_path / "tok",
             "--output", tmp_path / "m", "--max-steps", 1, "--actionpiece-spr", 0.5)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "has no ActionPiece merges" in err[-1]
