"""CoLES as a pretraining objective: view sampling, the loss, and training on a toy corpus (the loss falls, and views of
one user end up closer than views of different users), alone and beside causal LM, with last and mean pooling."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from batch.contrastive import ColesCollator, ColesSettings, coles_loss, sample_views
from batch.pretrain import PretrainSettings, pretrain

BOS, SEP, PAD = 2, 4, 0


def test_views_are_runs_of_whole_events_prefixed_with_bos():
    events = [[10 + i, 50 + i, SEP] for i in range(20)]
    ids = np.array([BOS] + [t for e in events for t in e])
    rng = np.random.default_rng(0)
    settings = ColesSettings(views=3, min_fraction=0.25, max_fraction=0.5)
    seen = set()
    for _ in range(50):
        views = sample_views(ids, SEP, settings, rng)
        assert len(views) == 3
        for view in views:
            assert view[0] == BOS and view[-1] == SEP
            n = int((view == SEP).sum())
            assert 5 <= n <= 10  # a quarter to a half of 20 events
            first = (int(view[1]) - 10)  # events are distinct: the first token names the event
            assert view[1:].tolist() == [t for e in events[first : first + n] for t in e]
            seen.add(first)
    assert len(seen) > 8  # starts vary
    assert [v.tolist() for v in sample_views(np.array([BOS, 7, 8]), SEP, settings, rng)] == [[BOS, 7, 8]] * 3


def test_coles_loss_is_nt_xent_and_prefers_separated_users():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    loss = coles_loss(z, views=2, temperature=0.5)
    # NT-Xent by hand: row i's positive is its pair partner i ^ 1
    n = F.normalize(z, dim=-1)
    sim = n @ n.T / 0.5
    sim.fill_diagonal_(float("-inf"))
    expected = -torch.stack([sim[i].log_softmax(0)[i ^ 1] for i in range(8)]).mean()
    torch.testing.assert_close(loss, expected)
    users = torch.eye(4).repeat_interleave(2, dim=0)  # two identical views per user, users orthogonal
    assert coles_loss(users, 2, 0.1) < 0.01 < coles_loss(torch.ones(8, 4), 2, 0.1)


def test_collator_adds_views_and_keeps_lm_labels_only_with_clm():
    items = [{"input_ids": np.array([BOS, 7, SEP, 8, SEP, 9, SEP])}, {"input_ids": np.array([BOS, 11, SEP])}]
    both = ColesCollator(PAD, SEP, ColesSettings(), clm=True)(items)
    assert both["view_input_ids"].shape[0] == 4 and "labels" in both
    assert (both["view_input_ids"][:, 0] == BOS).all()
    assert both["view_input_ids"][2:, :3].tolist() == [[BOS, 11, SEP]] * 2
    alone = ColesCollator(PAD, SEP, ColesSettings(), clm=False)(items)
    assert "labels" not in alone and alone["input_ids"].shape == both["input_ids"].shape


def write_toy_corpus(path, n_users: int = 96, seed: int = 0):
    """Each user draws its events from 4 tokens of its own (out of 60): a user is recognisable from any run of its
    events, which is what CoLES learns."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_users):
        own = rng.choice(np.arange(10, 70), size=4, replace=False)
        ids = [BOS]
        for _ in range(int(rng.integers(16, 30))):
            ids += [int(rng.choice(own)), int(rng.choice(own)), SEP]
        rows.append(ids)
    pq.write_table(pa.table({
        "user_id": [f"u{i}" for i in range(n_users)],
        "input_ids": pa.array(rows, pa.list_(pa.int32())),
        "n_events": pa.array([(len(r) - 1) // 3 for r in rows], pa.int64()),
        "last_event_ts": pa.array(np.arange(n_users) * 1_000_000, pa.timestamp("us", tz="UTC")),
    }), path, row_group_size=32)
    return rows


def view_similarity(model_dir, rows, seed: int = 1) -> tuple[float, float]:
    """Mean cosine similarity of two random views of the same user, and of views of different users."""
    from domaintok.models.embedding import embed_sequences, load_encoder

    encoder = load_encoder(model_dir, device="cpu")
    rng = np.random.default_rng(seed)
    settings = ColesSettings(views=2)
    views = [v for r in rows for v in sample_views(np.array(r), SEP, settings, rng)]
    z = F.normalize(torch.from_numpy(embed_sequences(encoder, views, batch_size=64)), dim=-1)
    sim = (z @ z.T).numpy()
    user = np.arange(len(views)) // 2
    same = (user[:, None] == user[None, :]) & ~np.eye(len(views), dtype=bool)
    other = user[:, None] != user[None, :]
    return float(sim[same].mean()), float(sim[other].mean())


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "seq.parquet"
    return path, write_toy_corpus(path)


def _settings(toy, retail_tokenizer, output, **kwargs):
    path, _ = toy
    base = dict(sequences=path, tokenizer=retail_tokenizer, output=output, preset="tiny", context_length=128,
                max_steps=40, batch_size=16, lr=3e-3, eval_fraction=0.0, seed=0, logging_steps=1)
    return PretrainSettings(**{**base, **kwargs})


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_coles_training_pulls_a_users_views_together(toy, retail_tokenizer, tmp_path, pooling):
    torch.set_num_threads(1)
    _, rows = toy
    untrained = _settings(toy, retail_tokenizer, tmp_path / "m0", objective="coles", pooling=pooling, max_steps=1,
                          lr=1e-9)
    pretrain(untrained)
    before_same, before_other = view_similarity(tmp_path / "m0", rows)
    metrics = pretrain(_settings(toy, retail_tokenizer, tmp_path / "m", objective="coles", pooling=pooling))
    losses = [e["coles_loss"] for e in metrics["log_history"] if "coles_loss" in e]
    assert len(losses) == 40
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)
    same, other = view_similarity(tmp_path / "m", rows)
    print(f"pooling {pooling}: coles loss {first:.3f} -> {last:.3f}; cosine same/other user "
          f"{before_same:.3f}/{before_other:.3f} untrained -> {same:.3f}/{other:.3f}")
    # mean pooling of an untrained model is already a bag of tokens, which tells these users apart somewhat
    assert same - other > 0.6 and same - other > (before_same - before_other) + 0.2, (same, other, before_same, before_other)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["pooling"] == pooling and metrics["pooling"] == pooling and metrics["objective"] == "coles"


@pytest.mark.slow
def test_clm_plus_coles_logs_both_parts_and_resumes(toy, retail_tokenizer, tmp_path):
    torch.set_num_threads(1)
    common = dict(objective="clm+coles", coles_weight=0.5, max_steps=6, save_steps=3, eval_fraction=0.2,
                  logging_steps=None)
    first = pretrain(_settings(toy, retail_tokenizer, tmp_path / "m", **common))
    assert first["train_clm_loss"] > 0 and first["train_coles_loss"] > 0
    assert first["eval_coles_loss"] > 0 and first["eval_clm_loss"] > 0
    assert first["eval_loss"] == pytest.approx(first["eval_clm_loss"] + 0.5 * first["eval_coles_loss"], rel=1e-4)
    resumed = pretrain(_settings(toy, retail_tokenizer, tmp_path / "m", resume=True, **{**common, "max_steps": 9}))
    assert resumed["steps"] == 9 and resumed["resumed"]
