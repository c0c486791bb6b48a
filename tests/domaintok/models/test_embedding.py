"""Tests of PaddedBatch and of user embeddings: safe loading, batching invariance, order, model versions.

Tiny configs only; each test runs in well under a second on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from domaintok.errors import ArtifactError, DomaintokError
from domaintok.models import DomainTransformerConfig, DomainTransformerForCausalLM
from domaintok.models.embedding import embed_sequences, load_encoder, model_version
from domaintok.models.padded import PaddedBatch

VOCAB = 61
PAD = 0


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    config = DomainTransformerConfig.from_preset(
        "tiny", vocab_size=VOCAB, pad_token_id=PAD, tokenizer_fingerprint="fp-good"
    )
    DomainTransformerForCausalLM(config).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def random_sequences(n: int, seed: int = 0, max_len: int = 24) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=int(rng.integers(1, max_len)), dtype=np.int32) for _ in range(n)]


# --- PaddedBatch ----------------------------------------------------------------------------------------------------


def test_padded_batch_right_pads_and_keeps_metadata():
    batch = PaddedBatch.from_sequences(
        [[5, 6, 7], np.array([8], dtype=np.int32)], pad_token_id=PAD, user_ids=["u1", "u2"],
        n_events=[4, 1], last_event_ts=[10, 20],
    )
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch.input_ids.dtype == torch.long
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.lengths.tolist() == [3, 1]
    assert batch.user_ids == ["u1", "u2"] and len(batch) == 2
    assert batch.n_events.tolist() == [4, 1] and batch.last_event_ts.dtype == np.int64
    assert batch.padding_fraction == pytest.approx(2 / 6)
    assert PaddedBatch.from_sequences([[1, 2, 3]], PAD, pad_to_multiple_of=8).input_ids.shape == (1, 8)


def test_padded_batch_rejects_empty_and_mismatched_inputs():
    with pytest.raises(DomaintokError, match="sequence 1 \\(user 'b'\\) is empty"):
        PaddedBatch.from_sequences([[1], []], PAD, user_ids=["a", "b"])
    with pytest.raises(DomaintokError, match="user_ids has 1 entries for 2 sequences"):
        PaddedBatch.from_sequences([[1], [2]], PAD, user_ids=["a"])
    with pytest.raises(DomaintokError, match="no sequences"):
        PaddedBatch.from_sequences([], PAD)


# --- loading ------------------------------------------------------------------------------------------------------


def test_load_encoder_returns_eval_decoder_on_cpu(model_dir):
    encoder = load_encoder(model_dir, device="cpu", expected_fingerprint="fp-good")
    assert type(encoder).__name__ == "DomainTransformerModel"
    assert not encoder.training
    assert next(encoder.parameters()).device.type == "cpu"


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "optimizer.pt", "state.pkl"])
def test_load_encoder_refuses_pickle_weights(model_dir, pickle_name):
    (model_dir / pickle_name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ArtifactError, match=f"refusing pickle weights {pickle_name}"):
        load_encoder(model_dir)


def test_load_encoder_refuses_fingerprint_mismatch_in_one_line(model_dir):
    with pytest.raises(ArtifactError) as excinfo:
        load_encoder(model_dir, expected_fingerprint="fp-other")
    message = str(excinfo.value)
    assert "\n" not in message
    assert "'fp-good'" in message and "'fp-other'" in message


def test_load_encoder_refuses_missing_or_foreign_dirs(tmp_path, model_dir):
    with pytest.raises(ArtifactError, match="no config.json"):
        load_encoder(tmp_path / "nowhere")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="no model.safetensors"):
        load_encoder(model_dir)
    save_file({"w": torch.zeros(1)}, model_dir / "model.safetensors")
    (model_dir / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ArtifactError, match="model_type is 'gpt2'"):
        load_encoder(model_dir)


# --- embeddings -----------------------------------------------------------------------------------------------------


def test_embeddings_keep_input_order_and_ignore_batch_composition(model_dir):
    encoder = load_encoder(model_dir, device="cpu")
    sequences = random_sequences(29)
    batched = embed_sequences(encoder, sequences, batch_size=8)
    assert batched.shape == (29, 32) and batched.dtype == np.float32
    one_by_one = np.stack([embed_sequences(encoder, [s], batch_size=1)[0] for s in sequences])
    np.testing.assert_allclose(batched, one_by_one, rtol=0, atol=1e-5)
    # Another batch composition (reversed input, other batch size) gives the same per-user rows.
    reversed_rows = embed_sequences(encoder, sequences[::-1], batch_size=5)[::-1]
    np.testing.assert_allclose(batched, reversed_rows, rtol=0, atol=1e-5)


def test_right_padding_does_not_change_a_users_embedding(model_dir):
    encoder = load_encoder(model_dir, device="cpu")
    sequence = random_sequences(1, seed=3)[0]
    alone = PaddedBatch.from_sequences([sequence], PAD)
    padded = PaddedBatch.from_sequences([sequence, np.ones(len(sequence) + 17, dtype=np.int32)], PAD)
    with torch.no_grad():
        for mask in (True, False):
            e_alone = encoder.user_embedding(
                encoder(alone.input_ids, attention_mask=alone.attention_mask if mask else None).last_hidden_state,
                alone.attention_mask,
            )
            e_padded = encoder.user_embedding(
                encoder(padded.input_ids, attention_mask=padded.attention_mask if mask else None).last_hidden_state,
                padded.attention_mask,
            )
            torch.testing.assert_close(e_padded[0], e_alone[0], rtol=0, atol=1e-5)


def test_embedding_is_the_last_real_tokens_hidden_state_not_logits(model_dir):
    encoder = load_encoder(model_dir, device="cpu")
    sequence = [3, 9, 4, 7]
    embedding = embed_sequences(encoder, [sequence])[0]
    with torch.no_grad():
        hidden = encoder(torch.tensor([sequence])).last_hidden_state[0, -1]
    np.testing.assert_allclose(embedding, hidden.numpy(), rtol=0, atol=1e-6)
    assert embedding.shape == (encoder.config.hidden_size,)


def test_model_version_is_stable_and_tracks_weights(model_dir):
    version = model_version(model_dir)
    assert version == model_version(model_dir)
    assert version.startswith("model-") and len(version) == len("model-") + 12
    torch.manual_seed(1)
    DomainTransformerForCausalLM(DomainTransformerConfig.from_preset("tiny", vocab_size=VOCAB)).save_pretrained(
        model_dir
    )
    assert model_version(model_dir) != version
