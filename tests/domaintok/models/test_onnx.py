"""Tests of the ONNX export of the user encoder: onnxruntime parity, dynamic axes, padding handled in the graph.

Tiny configs; each export takes a few seconds on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from domaintok.models import DomainTransformerConfig, DomainTransformerModel
from domaintok.models.onnx_export import INPUT_NAMES, OUTPUT_NAME, example_batch, export_encoder, onnx_parity

ort = pytest.importorskip("onnxruntime")
VOCAB = 53


@pytest.mark.parametrize(
    "overrides", [{}, {"position_embedding_type": "learned", "max_position_embeddings": 64, "embedding_layernorm": True},
                  {"merged_tokens_base": 48, "merged_tokens_parts": [[1, 2], [3, 4, 5], [6, 7], [8, 9], [2, 10]]}],
)
def test_onnx_matches_torch_on_unseen_shapes(tmp_path, overrides):
    torch.manual_seed(0)
    model = DomainTransformerModel(DomainTransformerConfig.from_preset("tiny", vocab_size=VOCAB, **overrides)).eval()
    path = export_encoder(model, tmp_path / "encoder.onnx")
    # Batches of 1..8 rows and 1..39 tokens, none the export example's shape.
    assert onnx_parity(model, path, batches=4) < 1e-4

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(INPUT_NAMES)
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    assert session.get_outputs()[0].shape[1] == model.config.hidden_size
    assert all(isinstance(d, str) for d in session.get_inputs()[0].shape)  # both axes dynamic


def test_onnx_graph_applies_the_padding_mask(tmp_path):
    torch.manual_seed(0)
    model = DomainTransformerModel(DomainTransformerConfig.from_preset("tiny", vocab_size=VOCAB)).eval()
    session = ort.InferenceSession(str(export_encoder(model, tmp_path / "encoder.onnx")))
    sequence = example_batch(0, VOCAB, lengths=(6,)).input_ids  # (1, 6)
    with torch.no_grad():
        expected = model.embed(sequence).numpy()
    ids = sequence.numpy()
    pad, ones = np.zeros((1, 4), np.int64), np.ones((1, 6), np.int64)
    layouts = {
        "unpadded": (ids, ones),
        "right-padded": (np.concatenate([ids, pad], axis=1), np.concatenate([ones, pad], axis=1)),
        "left-padded": (np.concatenate([pad, ids], axis=1), np.concatenate([pad, ones], axis=1)),
    }
    for name, (input_ids, attention_mask) in layouts.items():
        (actual,) = session.run([OUTPUT_NAME], {"input_ids": input_ids, "attention_mask": attention_mask})
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5, err_msg=name)
