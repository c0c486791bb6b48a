"""Tests of the domain transformer config and models: shapes, causality, padding, loss, Auto-class round trips.

Tiny configs only (hidden 32, 2 layers): the whole module runs in seconds on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import domaintok  # noqa: F401  (registers the Auto classes)
from domaintok.models import PRESETS, DomainTransformerConfig, DomainTransformerForCausalLM, DomainTransformerModel
from domaintok.models.modeling_domain_transformer import causal_padding_mask, last_token_index

VOCAB = 61


def tiny(**overrides) -> DomainTransformerConfig:
    return DomainTransformerConfig.from_preset("tiny", vocab_size=VOCAB, **{"dropout": 0.0, **overrides})


@pytest.fixture
def lm() -> DomainTransformerForCausalLM:
    torch.manual_seed(0)
    return DomainTransformerForCausalLM(tiny()).eval()


# --- config -------------------------------------------------------------------------------------------------------


def test_preset_sizes_and_overrides():
    config = DomainTransformerConfig.from_preset("24m", vocab_size=1000, tokenizer_fingerprint="fp", sep_token_id=3)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (256, 24, 16)
    assert config.intermediate_size == 1024
    assert config.tokenizer_fingerprint == "fp" and config.sep_token_id == 3
    assert DomainTransformerConfig.from_preset("330m", vocab_size=10).hidden_size == 1024
    assert set(PRESETS) == {"tiny", "small", "24m", "330m"}
    small = DomainTransformerConfig.from_preset("small", vocab_size=10, num_hidden_layers=3)
    assert small.architecture() == {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                                    "intermediate_size": 256}
    assert small.pooling == "last"  # the default user embedding
    with pytest.raises(ValueError, match="unknown preset"):
        DomainTransformerConfig.from_preset("7b", vocab_size=10)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "multiple of num_attention_heads"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"position_embedding_type": "rope"}, "position_embedding_type"),
        ({"hidden_act": "swish2"}, "hidden_act"),
        ({"pad_token_id": VOCAB}, "pad_token_id must be in"),
        ({"pooling": "max"}, "pooling must be one of"),
        ({"merged_tokens_base": 58, "merged_tokens_parts": [[1, 2]] * 4}, "merged_tokens_base must be"),
        ({"merged_tokens_base": None, "merged_tokens_parts": [[1, 2]]}, "merged_tokens_base must be"),
        ({"merged_tokens_base": 50, "merged_tokens_parts": [[1, 50]]}, r"merged_tokens_parts\[0\] must list"),
        ({"merged_tokens_base": 50, "merged_tokens_parts": [[3], []]}, r"merged_tokens_parts\[1\] must list"),
    ],
)
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny(**bad)


def test_config_forwards_unknown_kwargs_and_round_trips(tmp_path):
    config = tiny(tokenizer_fingerprint="abc123", bos_token_id=2, custom_note="kept")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "domain_transformer"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DomainTransformerConfig)
    assert loaded.tokenizer_fingerprint == "abc123" and loaded.bos_token_id == 2 and loaded.custom_note == "kept"
    assert loaded.to_diff_dict() == config.to_diff_dict()


# --- forward ------------------------------------------------------------------------------------------------------


def test_shapes_and_tied_embeddings(lm):
    input_ids = torch.randint(1, VOCAB, (3, 9))
    out = lm(input_ids, labels=input_ids, output_hidden_states=True)
    assert out.logits.shape == (3, 9, VOCAB)
    assert out.loss.ndim == 0
    assert len(out.hidden_states) == lm.config.num_hidden_layers + 1
    assert out.hidden_states[-1].shape == (3, 9, 32)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    hidden = lm.model(input_ids).last_hidden_state
    assert hidden.shape == (3, 9, 32)
    assert lm.model.embed(input_ids).shape == (3, 32)


@pytest.mark.parametrize("position_embedding_type", ["none", "learned"])
def test_changing_future_tokens_does_not_change_past_outputs(position_embedding_type):
    torch.manual_seed(1)
    model = DomainTransformerModel(tiny(position_embedding_type=position_embedding_type)).eval()
    a = torch.randint(1, VOCAB, (2, 12))
    b = a.clone()
    b[:, 7:] = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        ha, hb = model(a).last_hidden_state, model(b).last_hidden_state
    torch.testing.assert_close(ha[:, :7], hb[:, :7], rtol=0, atol=1e-6)
    assert (ha[:, 7:] - hb[:, 7:]).abs().max() > 1e-3  # the future does change the future


def test_explicit_mask_matches_causal_only_on_real_positions(lm):
    input_ids = torch.randint(1, VOCAB, (3, 10))
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0
    mask[2, 1:] = 0
    input_ids = input_ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        masked = lm.model(input_ids, attention_mask=mask).last_hidden_state
        unmasked = lm.model(input_ids).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(masked[real], unmasked[real], rtol=0, atol=1e-5)
    assert torch.isfinite(masked).all()


def test_mask_handles_left_padding_too(lm):
    seq = torch.randint(1, VOCAB, (1, 6))
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = lm.model.embed(seq)
        padded = lm.model.embed(left, mask)
    torch.testing.assert_close(alone, padded, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_hidden_layers": 1}, {"num_hidden_layers": 3, "embedding_layernorm": True},
     {"position_embedding_type": "learned", "max_position_embeddings": 32}, {"bias": False},
     {"pooling": "mean"}, {"pooling": "mean", "embedding_layernorm": True}],
)
def test_embed_runs_the_last_block_for_the_final_token_only_and_equals_the_full_forward(overrides):
    """embed() computes the last block at one query per row; it must equal user_embedding(forward()) for every
    padding layout, and right_padded=True (no mask in the earlier blocks) must too when padding is on the right."""
    torch.manual_seed(1)
    model = DomainTransformerModel(tiny(**overrides)).eval()
    lengths = [9, 1, 5, 12]
    T = max(lengths)
    right = torch.zeros(len(lengths), T, dtype=torch.long)
    left = torch.zeros_like(right)
    right_mask, left_mask = torch.zeros_like(right), torch.zeros_like(right)
    for row, n in enumerate(lengths):
        ids = torch.randint(1, VOCAB, (n,))
        right[row, :n], right_mask[row, :n] = ids, 1
        left[row, T - n :], left_mask[row, T - n :] = ids, 1
    with torch.no_grad():
        full = model.user_embedding(model(right, attention_mask=right_mask).last_hidden_state, right_mask)
        alone = torch.cat([model.user_embedding(model(right[i : i + 1, :n]).last_hidden_state,
                                                right_mask[i : i + 1, :n]) for i, n in enumerate(lengths)])
        torch.testing.assert_close(model.embed(right, right_mask), full, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.embed(right, right_mask, right_padded=True), full, rtol=0, atol=1e-5)
        torch.testing.assert_close(full, alone, rtol=0, atol=1e-5)
        if model.config.position_embedding_type == "none":  # learned positions shift with left padding
            torch.testing.assert_close(model.embed(left, left_mask), full, rtol=0, atol=1e-5)
        unpadded = right[:, :5]  # no mask given: every token is real
        torch.testing.assert_close(model.embed(unpadded), model.user_embedding(
            model(unpadded).last_hidden_state, torch.ones_like(unpadded)), rtol=0, atol=1e-5)


def test_mean_pooling_is_the_mean_of_the_real_tokens_states_and_survives_save_load(tmp_path):
    torch.manual_seed(3)
    model = DomainTransformerForCausalLM(tiny(pooling="mean")).eval()
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        states = model.model(ids[1:, :3]).last_hidden_state  # (1, 3, H): the second row alone, unpadded
        pooled = model.model.embed(ids, mask, right_padded=True)
        torch.testing.assert_close(pooled[1], states[0].mean(dim=0), rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = DomainTransformerModel.from_pretrained(tmp_path).eval()
    assert loaded.config.pooling == "mean"
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(ids, mask), pooled, rtol=0, atol=1e-6)


def test_views_ride_through_the_lm_forward():
    torch.manual_seed(4)
    lm = DomainTransformerForCausalLM(tiny()).eval()
    ids, views = torch.randint(1, VOCAB, (2, 5)), torch.randint(1, VOCAB, (4, 3))
    view_mask = torch.ones_like(views)
    with torch.no_grad():
        both = lm(ids, labels=ids, view_input_ids=views, view_attention_mask=view_mask)
        alone = lm(None, view_input_ids=views, view_attention_mask=view_mask)
        torch.testing.assert_close(both.view_embeddings, lm.model.embed(views, view_mask), rtol=0, atol=0)
        torch.testing.assert_close(alone.view_embeddings, both.view_embeddings, rtol=0, atol=0)
        assert both.loss is not None and alone.logits is None
        assert type(lm(ids, labels=ids)).__name__ == "CausalLMOutput"  # without views: unchanged
    with pytest.raises(ValueError, match="input_ids or view_input_ids"):
        lm(None)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embed_is_differentiable_like_the_full_forward(pooling):
    torch.manual_seed(2)
    model = DomainTransformerModel(tiny(attention_dropout=0.0, pooling=pooling))  # train mode, no dropout: comparable
    ids = torch.randint(1, VOCAB, (3, 7))
    model.embed(ids).sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.user_embedding(model(ids).last_hidden_state, torch.ones_like(ids)).sum().backward()
    slow = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert fast.keys() == slow.keys() and "layers.1.attn.qkv_proj.weight" in fast
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=2e-5)


def test_mask_helpers():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 0, 0]
    full = causal_padding_mask(mask)
    assert full.shape == (3, 1, 4, 4)
    assert full[0, 0].tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, True],  # a pad query still attends to itself (no empty softmax row)
    ]
    assert full.any(dim=-1).all()


def test_loss_ignores_minus_100_and_padding(lm):
    input_ids = torch.randint(1, VOCAB, (2, 8))
    mask = torch.ones_like(input_ids)
    mask[0, 5:] = 0
    labels = input_ids.clone()
    loss_masked = lm(input_ids, attention_mask=mask, labels=labels).loss
    labels_ignored = labels.clone()
    labels_ignored[0, 5:] = -100
    loss_ignored = lm(input_ids, labels=labels_ignored).loss
    torch.testing.assert_close(loss_masked, loss_ignored, rtol=0, atol=1e-6)
    # By hand: mean cross-entropy of the shifted, non-ignored targets.
    logits = lm(input_ids).logits[:, :-1]
    targets = labels_ignored[:, 1:]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss_ignored, manual, rtol=0, atol=1e-6)


def test_loss_decreases_on_toy_corpus():
    torch.manual_seed(0)
    model = DomainTransformerForCausalLM(tiny())
    # A deterministic grammar: each token is followed by (token * 3) % VOCAB; learnable by a 2-layer model.
    starts = torch.randint(1, VOCAB, (32,))
    rows = [starts]
    for _ in range(15):
        rows.append((rows[-1] * 3) % VOCAB)
    corpus = torch.stack(rows, dim=1)  # (32, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = model(corpus, labels=corpus).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DomainTransformerForCausalLM(tiny()).train()
    input_ids = torch.randint(1, VOCAB, (2, 8))
    model(input_ids, labels=input_ids).loss.backward()
    reference = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.model.layers[0].gradient_checkpointing
    model(input_ids, labels=input_ids).loss.backward()
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight.grad, reference, rtol=1e-5, atol=1e-7)


def test_embedding_layernorm_standardizes_the_user_embedding():
    torch.manual_seed(0)
    model = DomainTransformerModel(tiny(embedding_layernorm=True)).eval()
    embedding = model.embed(torch.randint(1, VOCAB, (4, 6)))
    torch.testing.assert_close(embedding.mean(-1), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(embedding.var(-1, unbiased=False), torch.ones(4), rtol=0, atol=1e-3)


# --- save / load --------------------------------------------------------------------------------------------------


def test_save_load_round_trip_through_auto_classes(lm, tmp_path):
    lm.config.tokenizer_fingerprint = "fp-1"
    lm.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", "model.safetensors"]
    input_ids = torch.randint(1, VOCAB, (2, 7))

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, DomainTransformerForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.config.tokenizer_fingerprint == "fp-1"
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids).logits, lm(input_ids).logits, rtol=0, atol=0)

    encoder = AutoModel.from_pretrained(tmp_path)
    assert isinstance(encoder, DomainTransformerModel)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.eval()(input_ids).last_hidden_state, lm.model(input_ids).last_hidden_state, rtol=0, atol=0
        )


@pytest.mark.parametrize("preset, low, high", [("24m", 23e6, 25e6), ("330m", 315e6, 335e6)])
def test_presets_have_nuformer_sizes_at_a_20k_vocabulary(preset, low, high):
    with torch.device("meta"):  # shapes only, no memory
        model = DomainTransformerForCausalLM(DomainTransformerConfig.from_preset(preset, vocab_size=20_000))
    assert low < sum(p.numel() for p in model.parameters()) < high


# --- composed embeddings of merged tokens (ActionPiece) ------------------------------------------------------------

MERGED = {"merged_tokens_base": 55, "merged_tokens_parts": [[3, 4], [3, 4, 9], [7, 8], [10, 11, 12, 13], [5, 6]]}


def test_merged_tokens_enter_as_their_row_plus_the_mean_of_their_parts(tmp_path):
    torch.manual_seed(0)
    lm = DomainTransformerForCausalLM(tiny(**MERGED)).eval()
    encoder = lm.model
    weight = encoder.embed_tokens.weight
    table = encoder.composed_embeddings()
    for r, parts in enumerate(MERGED["merged_tokens_parts"]):
        want = weight[55 + r] + weight[parts].mean(0)
        torch.testing.assert_close(table[55 + r], want)
    torch.testing.assert_close(table[:55], weight[:55], rtol=0, atol=0)  # original ids and the id after the merges
    torch.testing.assert_close(table[60:], weight[60:], rtol=0, atol=0)
    assert lm.lm_head.weight is weight  # the tied head reads the plain rows

    # the first block sees the composed row: a merged id gives what a plain model gives for that composed vector
    ids = torch.tensor([[1, 3, 56, 59, 20]])
    plain = DomainTransformerForCausalLM(tiny()).eval()
    plain.load_state_dict(lm.state_dict())
    with torch.no_grad():
        plain.model.embed_tokens.weight.copy_(table)
        torch.testing.assert_close(lm(ids).logits[..., :1], plain(ids).logits[..., :1])  # logit of id 0: same head
        torch.testing.assert_close(encoder(ids).last_hidden_state, plain.model(ids).last_hidden_state)

    # through the input (the tied head aside), a merged token trains its own row and its parts' rows, nothing else
    encoder(ids).last_hidden_state.square().sum().backward()
    used = weight.grad.abs().sum(1).gt(0)
    assert torch.equal(used.nonzero().flatten(), torch.tensor([1, 3, 4, 5, 6, 9, 20, 56, 59]))  # 56: 3+4+9, 59: 5+6
    lm.zero_grad()

    # config.json carries the parts; the loaded model composes the same table (nothing else in the weights file)
    lm.eval().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["merged_tokens_parts"] == MERGED["merged_tokens_parts"]
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.composed_embeddings(), encoder.composed_embeddings(), rtol=0, atol=0)
        torch.testing.assert_close(loaded.embed(ids), encoder.embed(ids))
