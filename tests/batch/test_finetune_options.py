"""Fine-tuning options on tiny real training runs: selection metric, named prediction columns, staged fusion with
the sequence gate, weight-decay and learning-rate groups, early stopping rules, and the CLI flags."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from batch.finetune import (
    FinetuneSettings,
    finetune,
    macro_auc,
    param_groups,
    resolve_metric,
    selection_score,
    task_metrics,
)
from domaintok.cli import main
from domaintok.errors import DomaintokError
from domaintok.models import DomainTransformerConfig, DomainTransformerModel
from domaintok.models.fusion import JointFusionModel

PAD, BOS, SEP = 0, 1, 2
N_USERS = 160


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny encoder saved like `domaintok pretrain` does, and 160 users whose label depends on a numeric feature
    and on one token of their sequence; fixed split 100 / 30 / 30."""
    root = tmp_path_factory.mktemp("ft_options")
    torch.manual_seed(0)
    config = DomainTransformerConfig.from_preset("tiny", vocab_size=20, pad_token_id=PAD, bos_token_id=BOS,
                                                 sep_token_id=SEP, tokenizer_fingerprint="fp-tiny", dropout=0.0)
    DomainTransformerModel(config).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=N_USERS)
    s = rng.choice([-1.0, 1.0], size=N_USERS)
    score = x + 0.8 * s + rng.normal(scale=0.7, size=N_USERS)
    users = [f"u{i:03d}" for i in range(N_USERS)]
    sequences = [[BOS, 7, int(rng.integers(8, 12)), SEP, 5 if v > 0 else 6, SEP] for v in s]
    split = ["train"] * 100 + ["valid"] * 30 + ["test"] * 30
    pq.write_table(pa.table({"user_id": users, "input_ids": pa.array(sequences, pa.list_(pa.int32()))}),
                   root / "seq.parquet")
    pq.write_table(pa.table({"user_id": users, "x": x, "shop": [["a", "b", "c"][i % 3] for i in range(N_USERS)]}),
                   root / "features.parquet")
    tercile = np.digitize(score, np.quantile(score, [1 / 3, 2 / 3]))
    pq.write_table(pa.table({
        "user_id": users, "split": split, "label": (score > 0).astype(np.int64),
        "segment": pa.array(np.array(["low", "mid", "high"])[tercile]),
    }), root / "labels.parquet")
    return root


def _settings(tiny, out, **overrides) -> FinetuneSettings:
    base = dict(model=tiny / "model", sequences=tiny / "seq.parquet", labels=tiny / "labels.parquet",
                features=tiny / "features.parquet", output=out, batch_size=16, progress=False, stage1_epochs=3,
                epochs=2)
    return FinetuneSettings(**{**base, **overrides})


def _best_of(history, metric, higher):
    values = [h["valid"][metric] for h in history]
    return history[int(np.argmax(values) if higher else np.argmin(values))]["step"]


# --- metrics --------------------------------------------------------------------------------------------------


def test_multiclass_metrics_include_macro_one_vs_rest_auc():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.3, 0.4, 0.3], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8],
                  [0.2, 0.2, 0.6]])
    m = task_metrics("multiclass", y, p)
    # class 0 vs rest: 7 of 8 pairs (0.3 loses to 0.5); class 1: 7/8 (0.3 loses to 0.4); class 2: 8/8.
    assert m["macro_auc"] == pytest.approx((7 / 8 + 7 / 8 + 1) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # A class absent from y is left out of the mean rather than failing.
    assert macro_auc(np.array([0, 0, 1, 1]), p[:4]) == pytest.approx((task_metrics(
        "binary", np.array([1, 1, 0, 0]), p[:4, 0])["auc"] + task_metrics("binary", np.array([0, 0, 1, 1]),
                                                                         p[:4, 1])["auc"]) / 2)


def test_selection_metric_defaults_and_direction():
    assert [resolve_metric(t, None) for t in ("binary", "multiclass", "regression")] == ["auc", "macro_auc", "rmse"]
    with pytest.raises(DomaintokError, match="metric 'rmse' does not apply to a binary task"):
        resolve_metric("binary", "rmse")
    metrics = {"auc": 0.7, "logloss": 0.5, "accuracy": 0.6}
    assert selection_score("binary", metrics, "logloss") == -0.5
    assert selection_score("binary", metrics, "accuracy") == 0.6
    assert selection_score("binary", {"auc": None, "logloss": 0.4}) == -0.4


# --- optimizer groups -----------------------------------------------------------------------------------------


def test_weight_decay_skips_biases_and_norms_and_lrs_split_encoder_from_head(tiny):
    from domaintok.models.embedding import load_encoder
    from domaintok.models.fusion import fit_tabular_stats

    table = pq.read_table(tiny / "features.parquet")
    model = JointFusionModel.from_encoder(load_encoder(tiny / "model", device="cpu"), sequence_gate="scalar",
                                          **fit_tabular_stats(table, ["x"], ["shop"]))
    groups = {g["name"]: g for g in param_groups(model, encoder_lr=1e-4, head_lr=2e-3, weight_decay=0.05)}
    assert set(groups) == {"encoder_decay", "encoder_no_decay", "head_decay", "head_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert groups["encoder_decay"]["lr"] == groups["encoder_no_decay"]["lr"] == 1e-4
    assert groups["head_decay"]["lr"] == groups["head_no_decay"]["lr"] == 2e-3
    assert groups["encoder_decay"]["weight_decay"] == groups["head_decay"]["weight_decay"] == 0.05
    assert groups["encoder_no_decay"]["weight_decay"] == groups["head_no_decay"]["weight_decay"] == 0.0
    assert "transformer.layers.0.attn.qkv_proj.weight" in members["encoder_decay"]
    assert {"transformer.layers.0.attn.qkv_proj.bias", "transformer.layers.0.attn_norm.weight",
            "transformer.norm.weight"} <= members["encoder_no_decay"]
    assert {"head.0.weight", "dcn.cross.0.weight.weight", "categorical_embeddings.0.weight"} <= members["head_decay"]
    assert {"head.0.bias", "plr.bias", "sequence_gate"} <= members["head_no_decay"]
    every = set().union(*members.values())
    assert every == set(names.values())  # each trainable parameter sits in exactly one group
    assert sum(len(m) for m in members.values()) == len(every)
    for name in every:
        assert ("bias" in name or "norm" in name or name == "sequence_gate") == (
            name in members["encoder_no_decay"] | members["head_no_decay"]), name


def test_stages_choose_which_parameters_train(tiny):
    from batch.finetune import _set_stage
    from domaintok.models.embedding import load_encoder
    from domaintok.models.fusion import fit_tabular_stats

    table = pq.read_table(tiny / "features.parquet")
    model = JointFusionModel.from_encoder(load_encoder(tiny / "model", device="cpu"), sequence_gate="zero",
                                          **fit_tabular_stats(table, ["x"], ["shop"]))
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    trainable["transformer.layers.0.attn.qkv_proj.weight"] = False  # e.g. frozen by LoRA: no stage unfreezes it

    def training():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    _set_stage(model, "tabular", trainable)
    assert not model.sequence_open
    assert training() == {n for n in trainable if not n.startswith(("transformer.", "sequence_proj."))}
    _set_stage(model, "sequence", trainable)
    assert model.sequence_open
    assert training() == {n for n, t in trainable.items() if t and n.startswith(("transformer.", "sequence_proj."))}
    _set_stage(model, "all", trainable)
    assert training() == {n for n, t in trainable.items() if t}


# --- real training runs ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_metric_choice_picks_its_own_best_step(tiny, tmp_path):
    runs = {}
    for metric in ("auc", "logloss"):
        runs[metric] = finetune(_settings(
            tiny, tmp_path / metric, use_sequence=False, metric=metric, epochs=8, evals_per_epoch=2,
            patience=100, head_lr=0.05, dropout=0.0, weight_decay=0.0))
    history = runs["auc"]["history"]
    assert [h["valid"] for h in history] == [h["valid"] for h in runs["logloss"]["history"]]  # same trajectory
    assert runs["auc"]["best_step"] == _best_of(history, "auc", higher=True)
    assert runs["logloss"]["best_step"] == _best_of(history, "logloss", higher=False)
    assert runs["auc"]["best_step"] != runs["logloss"]["best_step"]
    # The saved model and reported metrics are those of the selected evaluation.
    for metric, m in runs.items():
        chosen = next(h for h in m["history"] if h["step"] == m["best_step"])
        assert m["valid"] == pytest.approx(chosen["valid"])
        assert m["metric"] == metric


@pytest.mark.slow
def test_multiclass_predictions_have_named_columns(tiny, tmp_path):
    m = finetune(_settings(tiny, tmp_path / "mc", task="multiclass", label_column="segment", staged=False))
    assert m["metric"] == "macro_auc" and 0.0 <= m["test"]["macro_auc"] <= 1.0
    predictions = pq.read_table(tmp_path / "mc" / "predictions.parquet")
    assert predictions.column_names == ["user_id", "split", "label", "prediction", "prob_high", "prob_low",
                                        "prob_mid"]
    probs = np.column_stack([predictions.column(c).to_numpy() for c in ("prob_high", "prob_low", "prob_mid")])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    names = np.array(["high", "low", "mid"])
    assert predictions.column("prediction").to_pylist() == names[probs.argmax(axis=1)].tolist()
    assert set(predictions.column("label").to_pylist()) <= set(names)


@pytest.mark.slow
@pytest.mark.parametrize(("gate", "start"), [("zero", "stage1"), ("none", "scratch")])
def test_staged_fusion_is_never_worse_on_valid_than_its_tabular_stage(tiny, tmp_path, gate, start):
    settings = dict(sequence_gate=gate, stage2_from=start, evals_per_epoch=2, encoder_lr=1e-3)
    m = finetune(_settings(tiny, tmp_path / "staged", staged=True, **settings))
    assert m["stages"] == (["tabular", "fusion"] if start == "stage1" else ["fusion", "tabular"])
    chosen = next(h for h in m["history"] if h["step"] == m["best_step"])
    assert m["valid"] == pytest.approx(chosen["valid"])  # the restored model predicts as it did when selected
    tabular = [h["score"] for h in m["history"] if h["stage"] == "tabular"]
    fusion = [h["score"] for h in m["history"] if h["stage"] == "fusion"]
    assert tabular and fusion
    assert m["valid"]["auc"] >= max(tabular) - 1e-12
    assert m["best_stage"] == ("fusion" if max(fusion) > max(tabular) else "tabular")
    model = JointFusionModel.from_pretrained(tmp_path / "staged")
    assert model.config.sequence_gate == gate
    if m["best_stage"] == "tabular":
        assert model.sequence_weight() == 0.0  # the tabular stage never opens the sequence branch
    assert m["sequence_weight"] == pytest.approx(model.sequence_weight())
    if start == "scratch":  # the fusion stage is the unstaged joint run, step for step
        joint = finetune(_settings(tiny, tmp_path / "joint", staged=False, **settings))
        assert [h["valid"] for h in joint["history"]] == [h["valid"] for h in m["history"] if h["stage"] == "fusion"]
        assert m["valid"]["auc"] >= joint["valid"]["auc"]


@pytest.mark.slow
def test_fusion_without_features_has_no_stages_and_no_gate(tiny, tmp_path):
    m = finetune(_settings(tiny, tmp_path / "seq_only", features=None, epochs=1))
    assert m["stages"] == ["fusion"] and m["sequence_weight"] > 0
    assert JointFusionModel.from_pretrained(tmp_path / "seq_only").config.sequence_gate == "none"


@pytest.mark.slow
def test_early_stopping_waits_for_min_epochs(tiny, tmp_path):
    # patience 0 would stop at the second evaluation without min_epochs; 100 rows / 16 = 7 steps an epoch.
    m = finetune(_settings(tiny, tmp_path / "min", use_sequence=False, epochs=6, evals_per_epoch=7, patience=0,
                           min_epochs=3, min_delta=1.0))
    assert m["stopped_early"] and m["steps"] == 3 * 7  # the first evaluation allowed to stop
    m = finetune(_settings(tiny, tmp_path / "min0", use_sequence=False, epochs=6, evals_per_epoch=7, patience=0,
                           min_epochs=0, min_delta=1.0))
    assert m["stopped_early"] and m["steps"] == 2


@pytest.mark.slow
def test_cli_takes_the_new_options(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["finetune", "--model", str(tiny / "model"), "--sequences", str(tiny / "seq.parquet"), "--labels",
            str(tiny / "labels.parquet"), "--features", str(tiny / "features.parquet"), "--output", str(out),
            "--batch-size", "16", "--epochs", "1", "--stage1-epochs", "1", "--encoder-lr", "1e-4", "--head-lr",
            "2e-3", "--weight-decay", "0.1", "--warmup-steps", "2", "--dropout", "0.2", "--sequence-dropout", "0.1",
            "--sequence-gate", "scalar", "--stage2-from", "stage1", "--stage2", "sequence", "--metric", "logloss",
            "--evals-per-epoch", "2", "--min-epochs", "0.5", "--min-delta", "0.001"]
    assert main(args) == 0
    assert "best logloss at step" in capsys.readouterr().out
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["encoder_lr"] == 1e-4 and settings["warmup_steps"] == 2 and settings["sequence_dropout"] == 0.1
    assert settings["staged"] and settings["sequence_gate"] == "scalar" and settings["metric"] == "logloss"
    assert settings["stage2_from"] == "stage1" and settings["stage2"] == "sequence"
    capsys.readouterr()
    assert main(args[:-6] + ["--metric", "rmse", "--output", str(tmp_path / "x")]) == 2
    assert "metric 'rmse' does not apply to a binary task" in capsys.readouterr().err


def test_lm_weight_trains_with_the_auxiliary_loss_and_is_recorded(tiny, tmp_path, capsys):
    out = tmp_path / "lm"
    args = ["finetune", "--model", str(tiny / "model"), "--sequences", str(tiny / "seq.parquet"), "--labels",
            str(tiny / "labels.parquet"), "--features", str(tiny / "features.parquet"), "--output", str(out),
            "--batch-size", "16", "--epochs", "1", "--stage1-epochs", "1", "--lm-weight", "0.5"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["lm_weight"] == 0.5
    assert json.loads((out / "config.json").read_text())["lm_loss_weight"] == 0.5
    # the task loss alone from the same start is lower than task + 0.5 x LM (the LM loss of a random encoder
    # over 20 tokens is about ln 20)
    plain = finetune(_settings(tiny, tmp_path / "plain", epochs=1, stage1_epochs=1))
    lm = finetune(_settings(tiny, tmp_path / "lm2", epochs=1, stage1_epochs=1, lm_weight=0.5))
    first = {name: [h for h in m["history"] if h["stage"] == "fusion"][0]["train_loss"] for name, m in
             (("plain", plain), ("lm", lm))}
    assert first["lm"] > first["plain"] + 0.5


def test_lm_weight_is_refused_without_a_sequence_or_a_tied_head(tiny, tmp_path):
    with pytest.raises(DomaintokError, match="--lm-weight: a tabular-only model"):
        finetune(_settings(tiny, tmp_path / "t", use_sequence=False, lm_weight=0.5))
    config = DomainTransformerConfig.from_preset("tiny", vocab_size=20, pad_token_id=PAD, bos_token_id=BOS,
                                                 sep_token_id=SEP, tie_word_embeddings=False)
    DomainTransformerModel(config).save_pretrained(tmp_path / "untied")
    with pytest.raises(DomaintokError, match="no tied LM head"):
        finetune(_settings(tiny, tmp_path / "u", model=tmp_path / "untied", lm_weight=0.5))
