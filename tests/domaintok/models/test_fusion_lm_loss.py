"""The auxiliary next-token loss of fine-tuning (`lm_loss_weight`): the task loss plus the weight times the encoder's
own language-model loss, from one decoder pass, in training only."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from domaintok.models import DomainTransformerConfig, DomainTransformerForCausalLM, DomainTransformerModel
from domaintok.models.fusion import JointFusionConfig, JointFusionModel, encode_tabular, fit_tabular_stats
from domaintok.models.padded import PaddedBatch

PAD, BOS, SEP = 0, 1, 2
SEQUENCES = [[BOS, 5, SEP], [BOS, 6, 7, SEP, 8, SEP], [BOS, 9, SEP], [BOS, 3, 3, SEP]]
LABELS = torch.tensor([0, 1, 1, 0])


def _config(**fields) -> DomainTransformerConfig:
    return DomainTransformerConfig.from_preset("tiny", vocab_size=30, pad_token_id=PAD, bos_token_id=BOS,
                                               sep_token_id=SEP, dropout=0.0, **fields)


def _model(weight: float, pooling: str = "mean", **encoder_fields):
    torch.manual_seed(0)
    encoder = DomainTransformerModel(_config(pooling=pooling, **encoder_fields))
    table = pa.table({"x": [0.5, 3.0, 10.0, 1.0]})
    stats = fit_tabular_stats(table, ["x"], [])
    model = JointFusionModel.from_encoder(encoder, task="binary", dropout=0.0, lm_loss_weight=weight, **stats)
    numeric, categorical = encode_tabular(model.config, table)
    batch = PaddedBatch.from_sequences(SEQUENCES, pad_token_id=PAD)
    return model, batch, numeric, categorical


def _lm_loss_by_hand(model: JointFusionModel, batch: PaddedBatch) -> torch.Tensor:
    """The pretraining model's own loss on the same windows, with the fused model's encoder weights."""
    lm = DomainTransformerForCausalLM(model.transformer.config)
    lm.model.load_state_dict(model.transformer.state_dict())
    lm.tie_weights()
    lm.eval()
    return lm(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids).loss


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_training_loss_is_the_task_loss_plus_the_weighted_lm_loss(pooling):
    model, batch, numeric, categorical = _model(0.5, pooling)
    model.train()  # dropout is 0: train and eval compute the same numbers
    out = model(batch.input_ids, batch.attention_mask, numeric, categorical, labels=LABELS)
    task = F.binary_cross_entropy_with_logits(out.logits.squeeze(-1), LABELS.float())
    expected_lm = _lm_loss_by_hand(model, batch)
    torch.testing.assert_close(out.lm_loss, expected_lm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, task + 0.5 * expected_lm, rtol=1e-5, atol=1e-6)
    # The embedding from the shared pass equals the one the model serves with (eval: no LM term at all).
    model.eval()
    served = model(batch.input_ids, batch.attention_mask, numeric, categorical, labels=LABELS)
    assert served.lm_loss is None
    torch.testing.assert_close(served.user_embedding, out.user_embedding, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(served.loss, task, rtol=1e-5, atol=1e-6)


def test_weight_zero_is_the_task_loss_alone_and_the_lm_term_trains_the_embeddings():
    plain, batch, numeric, categorical = _model(0.0)
    plain.train()
    out = plain(batch.input_ids, batch.attention_mask, numeric, categorical, labels=LABELS)
    assert out.lm_loss is None
    with_lm, *_ = _model(2.0)
    with_lm.train()
    out2 = with_lm(batch.input_ids, batch.attention_mask, numeric, categorical, labels=LABELS)
    torch.testing.assert_close(out2.logits, out.logits)  # same weights, same forward
    assert out2.loss > out.loss
    # Token rows that are only ever predicted (never read before the last position) get a gradient only from the LM
    # term: id 8 is the last event of one sequence, read by the LM head as a target.
    out.loss.backward()
    out2.loss.backward()
    grad_plain = plain.transformer.embed_tokens.weight.grad
    grad_lm = with_lm.transformer.embed_tokens.weight.grad
    unused = 20  # a row no sequence contains: only the LM softmax reaches it
    assert grad_plain[unused].abs().sum() == 0
    assert grad_lm[unused].abs().sum() > 0


def test_closed_sequence_branch_has_no_lm_term():
    model, batch, numeric, categorical = _model(0.5)
    model.train()
    model.sequence_open = False
    out = model(batch.input_ids, batch.attention_mask, numeric, categorical, labels=LABELS)
    assert out.lm_loss is None


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lm_loss_weight must be >= 0"):
        JointFusionConfig(lm_loss_weight=-0.1, numeric_features=["x"], numeric_mean=[0.0], numeric_std=[1.0])
    with pytest.raises(ValueError, match="needs the sequence branch"):
        JointFusionConfig(lm_loss_weight=0.5, use_sequence=False, numeric_features=["x"], numeric_mean=[0.0],
                          numeric_std=[1.0])
    with pytest.raises(ValueError, match="tied word embeddings"):
        _model(0.5, tie_word_embeddings=False)


def test_config_round_trip_keeps_the_weight(tmp_path):
    model, batch, numeric, categorical = _model(0.25)
    model.save_pretrained(tmp_path / "m")
    loaded = JointFusionModel.from_pretrained(tmp_path / "m")
    assert loaded.config.lm_loss_weight == 0.25
    loaded.train()
    model.train()
    a = model(batch.input_ids, batch.attention_mask, numeric, categorical, labels=LABELS)
    b = loaded(batch.input_ids, batch.attention_mask, numeric, categorical, labels=LABELS)
    torch.testing.assert_close(a.loss, b.loss)
