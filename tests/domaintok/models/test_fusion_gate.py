"""The sequence gates and sequence dropout of joint fusion: an untrained gated model is its tabular path."""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pytest
import torch

from domaintok.models import DomainTransformerConfig, DomainTransformerModel
from domaintok.models.fusion import JointFusionConfig, JointFusionModel, encode_tabular, fit_tabular_stats
from domaintok.models.padded import PaddedBatch

PAD, BOS, SEP = 0, 1, 2


FIELDS = {f.name for f in dataclasses.fields(JointFusionConfig)}

def _model(**fields) -> tuple[JointFusionModel, PaddedBatch, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    encoder = DomainTransformerModel(DomainTransformerConfig.from_preset(
        "tiny", vocab_size=30, pad_token_id=PAD, bos_token_id=BOS, sep_token_id=SEP, dropout=0.0))
    table = pa.table({"x": [0.5, 3.0, 10.0, 1.0], "c": ["a", "b", "a", None]})
    stats = fit_tabular_stats(table, ["x"], ["c"])
    model = JointFusionModel.from_encoder(encoder, task="binary", dropout=0.0, **stats, **fields)
    numeric, categorical = encode_tabular(model.config, table)
    batch = PaddedBatch.from_sequences([[BOS, 5, SEP], [BOS, 6, 7, SEP, 8, SEP], [BOS, 9, SEP], [BOS, 3, 3, SEP]],
                                       pad_token_id=PAD)
    return model, batch, numeric, categorical


def _open(model: JointFusionModel) -> None:
    with torch.no_grad():
        if model.sequence_gate is not None:
            model.sequence_gate.fill_(1.0)
        else:
            torch.nn.init.normal_(model.sequence_proj.weight, std=0.3)


@pytest.mark.parametrize("gate", ["zero", "scalar"])
def test_an_untrained_gated_model_outputs_its_tabular_path(gate):
    model, batch, numeric, categorical = _model(sequence_gate=gate)
    model.eval()
    assert model.sequence_weight() == 0.0
    fused = model(batch.input_ids, batch.attention_mask, numeric, categorical).logits
    model.sequence_open = False  # the encoder does not run, the embedding is zeros
    tabular = model(batch.input_ids, batch.attention_mask, numeric, categorical).logits
    torch.testing.assert_close(fused, tabular, rtol=0, atol=1e-7)
    # Once the gate opens, the sequence changes the output.
    model.sequence_open = True
    _open(model)
    assert model.sequence_weight() > 0
    opened = model(batch.input_ids, batch.attention_mask, numeric, categorical).logits
    assert (opened - tabular).abs().max() > 1e-3


def test_an_ungated_model_is_not_its_tabular_path():
    model, batch, numeric, categorical = _model(sequence_gate="none")
    model.eval()
    fused = model(batch.input_ids, batch.attention_mask, numeric, categorical).logits
    model.sequence_open = False
    assert (fused - model(batch.input_ids, batch.attention_mask, numeric, categorical).logits).abs().max() > 1e-3


@pytest.mark.parametrize("gate", ["zero", "scalar"])
def test_a_closed_gate_learns_while_the_encoder_waits_for_it(gate):
    model, batch, numeric, categorical = _model(sequence_gate=gate)
    out = model(batch.input_ids, batch.attention_mask, numeric, categorical, labels=torch.tensor([0, 1, 1, 0]))
    out.loss.backward()
    if gate == "scalar":
        assert model.sequence_gate.grad.abs() > 0
    else:  # the zero-initialized projection of the embedding gets a gradient at once
        assert model.sequence_proj.weight.grad.abs().sum() > 0
    encoder_grad = sum(p.grad.abs().sum() for p in model.transformer.parameters() if p.grad is not None)
    assert encoder_grad == 0  # nothing flows into the encoder until the gate moves


def test_closed_sequence_branch_ignores_the_tokens():
    model, batch, numeric, categorical = _model()
    model.eval()
    model.sequence_open = False
    other = torch.full_like(batch.input_ids, 7)
    a = model(batch.input_ids, batch.attention_mask, numeric, categorical).logits
    b = model(other, batch.attention_mask, numeric, categorical).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sequence_dropout_drops_whole_rows_in_training_only():
    model, *_ = _model(sequence_dropout=0.5)
    embedding = torch.ones(2000, 8)
    model.train()
    torch.manual_seed(1)
    dropped = model.gated(embedding)
    rows = dropped[:, 0]
    assert torch.all((dropped == rows[:, None]))  # a row is all kept or all zero
    assert set(rows.unique().tolist()) == {0.0, 2.0}  # kept rows are rescaled by 1 / (1 - p)
    assert 0.4 < (rows == 0).float().mean() < 0.6
    model.eval()
    torch.testing.assert_close(model.gated(embedding), embedding)


def test_gated_model_round_trips_and_old_configs_still_load(tmp_path):
    model, batch, numeric, categorical = _model(sequence_gate="scalar", sequence_dropout=0.1)
    with torch.no_grad():
        model.sequence_gate.fill_(0.3)
    model.save_pretrained(tmp_path / "gated")
    loaded = JointFusionModel.from_pretrained(tmp_path / "gated")
    assert loaded.config.sequence_gate == "scalar" and loaded.config.sequence_dropout == 0.1
    assert loaded.sequence_gate.item() == torch.tensor(0.3).item()
    model.eval()
    torch.testing.assert_close(loaded(batch.input_ids, batch.attention_mask, numeric, categorical).logits,
                               model(batch.input_ids, batch.attention_mask, numeric, categorical).logits)
    # A directory saved before config.json (fusion_config.json: the fields and model_type) and before the gate
    # existed (neither gate key): it loads as an ungated model.
    plain, *_ = _model()
    plain.save_pretrained(tmp_path / "plain")
    saved = json.loads((tmp_path / "plain" / "config.json").read_text())
    config = {k: saved[k] for k in plain.config.to_diff_dict() if k in FIELDS} | {"model_type": saved["model_type"]}
    config.update({k: saved[k] for k in ("transformer_config", "tokenizer_fingerprint", "numeric_features",
                                         "numeric_mean", "numeric_std", "categorical_features",
                                         "categorical_vocabularies") if k in saved})
    for key in ("sequence_gate", "sequence_dropout"):
        config.pop(key, None)
    (tmp_path / "plain" / "config.json").unlink()
    (tmp_path / "plain" / "fusion_config.json").write_text(json.dumps(config))
    assert JointFusionModel.from_pretrained(tmp_path / "plain").sequence_gate is None
    assert JointFusionConfig.from_legacy(config).sequence_gate == "none"
    assert JointFusionConfig.from_legacy(config).sequence_dropout == 0.0
    with pytest.raises(ValueError, match="sequence_gate must be one of"):
        JointFusionConfig.from_legacy({**config, "sequence_gate": "half"})


@pytest.mark.parametrize("gate", ["none", "zero", "scalar"])
def test_close_sequence_makes_any_model_its_tabular_path(gate):
    model, batch, numeric, categorical = _model(sequence_gate=gate)
    model.eval()
    if gate != "none":
        _open(model)
    model.close_sequence()
    assert model.sequence_weight() == 0.0
    fused = model(batch.input_ids, batch.attention_mask, numeric, categorical).logits
    model.sequence_open = False
    torch.testing.assert_close(fused, model(batch.input_ids, batch.attention_mask, numeric, categorical).logits,
                               rtol=0, atol=1e-7)
