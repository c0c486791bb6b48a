"""`domaintok pretrain`'s ActionPiece options: with `--actionpiece-spr` training batches (and only they) are
re-segmented by random set permutations; with `--actionpiece-compose` merged tokens are embedded with their parts,
through embedding too; a tokenizer without merges is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from batch.sequence_data import is_eval_user

from domaintok.cli import main
from domaintok.models.embedding import embed_sequences, load_encoder
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


@pytest.mark.parametrize("option", [("--actionpiece-spr", 0.5), ("--actionpiece-compose",)])
def test_actionpiece_options_refuse_a_tokenizer_without_merges(tmp_path, capsys, option):
    table = _toy_table(n=200, seed=3, users=10)
    tok = DomainTokenizer.fit(_schema(None), table, max_length=48)
    tok.save_pretrained(tmp_path / "tok")
    tok.tokenize_to_parquet(table, tmp_path / "seq.parquet")
    rc = run("pretrain", "--sequences", tmp_path / "seq.parquet", "--tokenizer", tmp_path / "tok",
             "--output", tmp_path / "m", "--max-steps", 1, *option)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and f"{option[0]}: tokenizer" in err[-1] and "has no ActionPiece merges" in err[-1]


@pytest.mark.parametrize("flag, composed", [(None, False), ("--actionpiece-compose", True)])
def test_compose_puts_the_merges_parts_in_the_config_and_embedding_reads_them(tmp_path, capsys, flag, composed):
    table = _toy_table(n=900, seed=3, users=60)
    tok = DomainTokenizer.fit(_schema(60), table, max_length=48)
    tok.save_pretrained(tmp_path / "tok")
    tok.tokenize_to_parquet(table, tmp_path / "seq.parquet")
    rc = run("pretrain", "--sequences", tmp_path / "seq.parquet", "--tokenizer", tmp_path / "tok",
             "--output", tmp_path / "m", "--max-steps", 3, "--batch-size", 8, "--threads", 1,
             "--actionpiece-spr", 1, *([flag] if flag else []))
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["actionpiece_compose"] is composed and np.isfinite(metrics["train_loss"])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    if not composed:
        assert config.get("merged_tokens_parts") is None
        return
    ap = tok.merges
    assert config["merged_tokens_base"] == ap.base == tok.vocab_size - ap.n_merges
    assert config["merged_tokens_parts"] == [list(ap.covered(ap.base + r)) for r in range(ap.n_merges)]
    assert all(len(parts) >= 2 for parts in config["merged_tokens_parts"])

    # the embedding job's encoder composes: equal to a plain encoder whose table holds the composed rows
    encoder = load_encoder(tmp_path / "m", device="cpu", expected_fingerprint=tok.fingerprint)
    ids = pq.read_table(tmp_path / "seq.parquet").column("input_ids").to_pylist()
    windows = [truncate_window(np.asarray(x), 48, SEP_ID) for x in ids[:6]]
    assert any((w >= ap.base).any() for w in windows)
    got = embed_sequences(encoder, windows, batch_size=3)
    with torch.no_grad():
        table = encoder.composed_embeddings().clone()
        encoder.config.merged_tokens_parts = None
        encoder.embed_tokens.weight.copy_(table)
    np.testing.assert_allclose(got, embed_sequences(encoder, windows, batch_size=3), rtol=0, atol=1e-5)
