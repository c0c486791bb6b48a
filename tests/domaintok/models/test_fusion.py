"""Joint fusion: forward/backward per task, the user embedding comes from hidden states, LoRA, save/load."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from domaintok.errors import ArtifactError, DomaintokError
from domaintok.models import DomainTransformerConfig, DomainTransformerModel
from domaintok.models.fusion import (
    JointFusionConfig,
    JointFusionModel,
    encode_tabular,
    fit_tabular_stats,
)
from domaintok.models.padded import PaddedBatch
from domaintok.window import truncate_window

VOCAB = 40
PAD, BOS, SEP = 0, 1, 2


def _encoder(fingerprint: str = "fp-test") -> DomainTransformerModel:
    torch.manual_seed(0)
    config = DomainTransformerConfig.from_preset(
        "tiny", vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, sep_token_id=SEP,
        tokenizer_fingerprint=fingerprint, dropout=0.0,
    )
    return DomainTransformerModel(config)


def _table() -> pa.Table:
    return pa.table({
        "recency": [1.0, 30.0, None, 400.0],
        "frequency": pa.array([3, 1, 7, 0], pa.int64()),
        "country": ["UK", "France", None, "Peru"],
    })


def _batch() -> PaddedBatch:
    sequences = [[BOS, 5, 6, SEP, 7, SEP], [BOS, 9, SEP], [BOS, 5, 5, 5, SEP, 8, 8, SEP], [BOS, 3, SEP]]
    return PaddedBatch.from_sequences(sequences, pad_token_id=PAD)


def _model(task: str, **fields) -> tuple[JointFusionModel, torch.Tensor, torch.Tensor]:
    stats = fit_tabular_stats(_table(), ["recency", "frequency"], ["country"])
    extra = {"class_names": ["a", "b", "c"]} if task == "multiclass" else {}
    model = JointFusionModel.from_encoder(_encoder(), task=task, dropout=0.0, **stats, **extra, **fields)
    numeric, categorical = encode_tabular(model.config, _table())
    return model, numeric, categorical


@pytest.mark.parametrize(
    ("task", "labels", "width"),
    [
        ("binary", torch.tensor([0, 1, 1, 0]), 1),
        ("multiclass", torch.tensor([0, 2, 1, 2]), 3),
        ("regression", torch.tensor([0.5, 10.0, -3.0, 2.0]), 1),
    ],
)
def test_forward_backward_per_task(task, labels, width):
    model, numeric, categorical = _model(task)
    batch = _batch()
    out = model(batch.input_ids, batch.attention_mask, numeric, categorical, labels=labels)
    assert out.logits.shape == (4, width)
    assert out.user_embedding.shape == (4, 32)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    # End to end: the encoder, PLR, the categorical embeddings and the head all get gradients.
    for name in ("transformer.layers.0.attn.qkv_proj.weight", "plr.frequencies", "categorical_embeddings.0.weight",
                 "head.0.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_losses_match_torch_definitions():
    logits = torch.tensor([[0.3], [-1.0]])
    model, _, _ = _model("binary")
    torch.testing.assert_close(
        model.loss(logits, torch.tensor([1, 0])),
        torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([0.3, -1.0]), torch.tensor([1.0, 0.0])),
    )
    model, _, _ = _model("regression", target_mean=2.0, target_std=4.0)
    torch.testing.assert_close(model.loss(logits, torch.tensor([3.2, -2.0])), torch.tensor(0.0))
    torch.testing.assert_close(model.predict(logits), torch.tensor([3.2, -2.0]))


def test_user_embedding_is_the_last_real_tokens_hidden_state():
    model, _, _ = _model("binary", embedding_layernorm=False)
    model.eval()
    batch = _batch()
    with torch.no_grad():
        got = model.user_embedding(batch.input_ids, batch.attention_mask)
        for row in range(len(batch)):
            n = int(batch.lengths[row])
            alone = model.transformer(batch.input_ids[row : row + 1, :n]).last_hidden_state[0, -1]  # (H,)
            torch.testing.assert_close(got[row], alone, atol=1e-5, rtol=1e-5)


def test_sequence_only_and_tabular_only_models():
    seq_only = JointFusionModel.from_encoder(_encoder(), task="binary")
    assert seq_only.dcn is None
    batch = _batch()
    assert seq_only(batch.input_ids, batch.attention_mask).logits.shape == (4, 1)
    stats = fit_tabular_stats(_table(), ["recency"], ["country"])
    tab_only = JointFusionModel(JointFusionConfig(task="binary", use_sequence=False, **stats))
    assert tab_only.transformer is None
    numeric, categorical = encode_tabular(tab_only.config, _table())
    assert tab_only(numeric=numeric, categorical=categorical).logits.shape == (4, 1)


def test_tabular_encoding_standardizes_and_maps_unknowns():
    stats = fit_tabular_stats(_table(), ["recency", "frequency"], ["country"])
    config = JointFusionConfig(use_sequence=False, **stats)
    numeric, categorical = encode_tabular(config, _table())
    assert numeric.dtype == torch.float32 and numeric.shape == (4, 2)
    assert numeric[2, 0] == 0.0  # null -> the mean
    assert abs(float(numeric[[0, 1, 3], 0].mean())) < 1e-5
    vocabulary = config.categorical_vocabularies[0]
    assert sorted(vocabulary) == ["France", "Peru", "UK"]
    test = pa.table({"recency": [1.0], "frequency": [1], "country": ["Atlantis"]})
    assert encode_tabular(config, test)[1].tolist() == [[0]]  # unseen -> index 0
    assert encode_tabular(config, _table())[1][:, 0].tolist() == [vocabulary.index("UK") + 1,
                                                                  vocabulary.index("France") + 1, 0,
                                                                  vocabulary.index("Peru") + 1]
    with pytest.raises(DomaintokError, match="missing column"):
        encode_tabular(config, pa.table({"recency": [1.0]}))


def test_lora_trains_only_adapters_and_the_fusion_layers():
    model, numeric, categorical = _model("binary", lora={"r": 4, "alpha": 8})
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    encoder_trainable = {n for n in trainable if n.startswith("transformer.")}
    assert encoder_trainable and all("lora_" in n for n in encoder_trainable)
    assert {"qkv_proj", "out_proj", "up_proj", "down_proj"} <= {n.split(".")[-4] for n in encoder_trainable}
    assert not any(n.startswith("transformer.") and "lora_" not in n for n in trainable)
    assert any(n.startswith("head.") for n in trainable) and any(n.startswith("plr.") for n in trainable)
    batch = _batch()
    before = model.transformer.embed_tokens.weight.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(batch.input_ids, batch.attention_mask, numeric, categorical, labels=torch.tensor([0, 1, 1, 0]))
    out.loss.backward()
    optimizer.step()
    torch.testing.assert_close(model.transformer.embed_tokens.weight, before)


@pytest.mark.parametrize("lora", [None, {"r": 2, "alpha": 4}])
def test_save_load_round_trip(tmp_path, lora):
    model, numeric, categorical = _model("multiclass", lora=lora)
    # Move the LoRA B matrices off zero so the round trip checks adapter weights too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.eval()
    batch = _batch()
    with torch.no_grad():
        expected = model(batch.input_ids, batch.attention_mask, numeric, categorical).logits
    model.save_pretrained(tmp_path / "fused")
    saved = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert saved["model_type"] == "domaintok_joint_fusion"
    assert saved["numeric_features"] == ["recency", "frequency"]
    assert saved["categorical_vocabularies"][0] and saved["tokenizer_fingerprint"] == "fp-test"
    assert saved["transformer_config"]["hidden_size"] == 32
    loaded = JointFusionModel.from_pretrained(tmp_path / "fused")
    numeric2, categorical2 = encode_tabular(loaded.config, _table())
    with torch.no_grad():
        got = loaded(batch.input_ids, batch.attention_mask, numeric2, categorical2).logits
    torch.testing.assert_close(got, expected)
    with pytest.raises(ArtifactError, match="fingerprint"):
        JointFusionModel.from_pretrained(tmp_path / "fused", expected_fingerprint="other")
    # a PreTrainedModel: transformers' own Auto loader reads the directory too (no trust_remote_code)
    from transformers import AutoConfig, AutoModel

    assert type(AutoConfig.from_pretrained(tmp_path / "fused")).__name__ == "JointFusionConfig"
    auto = AutoModel.from_pretrained(tmp_path / "fused").eval()
    assert isinstance(auto, JointFusionModel)
    with torch.no_grad():
        torch.testing.assert_close(auto(batch.input_ids, batch.attention_mask, numeric2, categorical2).logits, expected)


def test_load_refuses_pickle_and_missing_dirs(tmp_path):
    with pytest.raises(ArtifactError, match="fusion_config.json"):
        JointFusionModel.from_pretrained(tmp_path)
    model, _, _ = _model("binary")
    model.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ArtifactError, match="pickle"):
        JointFusionModel.from_pretrained(tmp_path)


def test_truncate_window_keeps_bos_and_whole_recent_events():
    ids = np.array([BOS, 5, 6, SEP, 7, 8, SEP, 9, SEP])
    assert truncate_window(ids, 20, SEP).tolist() == ids.tolist()
    assert truncate_window(ids, 6, SEP).tolist() == [BOS, 7, 8, SEP, 9, SEP]
    assert truncate_window(ids, 5, SEP).tolist() == [BOS, 9, SEP]
    # A cut landing on an event boundary keeps the event after it (it used to drop one event too many).
    assert truncate_window(np.array([BOS, 5, SEP, 6, SEP, 7, SEP]), 5, SEP).tolist() == [BOS, 6, SEP, 7, SEP]
    # Even the newest event does not fit: [BOS] alone, as the tokenizer writes it.
    assert truncate_window(np.array([BOS, 5, 6, 7, SEP]), 3, SEP).tolist() == [BOS]
    assert truncate_window(np.array([BOS, 5, 6, 7, 8]), 3, None).tolist() == [BOS, 7, 8]


def _reference_window(events: list[list[int]], max_length: int) -> list[int]:
    """The rule spelled out: walk back from the newest event while [BOS] + the kept events fit."""
    kept: list[list[int]] = []
    used = 1
    for event in reversed(events):
        if used + len(event) > max_length:
            break
        kept.insert(0, event)
        used += len(event)
    return [BOS] + [t for event in kept for t in event]


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=12),
    max_length=st.integers(min_value=1, max_value=40),
)
def test_truncate_window_matches_the_rule_for_random_event_lengths(lengths, max_length):
    # Event i is (length - 1) content tokens 10 + i then [SEP].
    events = [[10 + i] * (n - 1) + [SEP] for i, n in enumerate(lengths)]
    ids = np.array([BOS] + [t for event in events for t in event])
    assert truncate_window(ids, max_length, SEP).tolist() == _reference_window(events, max_length)
