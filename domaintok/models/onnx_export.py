"""ONNX export of the user encoder (input_ids, attention_mask -> user embedding) and its onnxruntime parity check.

Batch and sequence axes are dynamic; the exported graph applies the causal + key-padding mask itself.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from domaintok.models.modeling_domain_transformer import DomainTransformerModel
from domaintok.models.padded import PaddedBatch

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 18


class EncoderForExport(nn.Module):
    """(input_ids (B, T) int64, attention_mask (B, T) int64) -> user embedding (B, H) float32."""

    def __init__(self, model: DomainTransformerModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The mask goes into attention too: an ONNX consumer may pad on either side.
        hidden = self.model(input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state  # (B, T, H)
        return self.model.user_embedding(hidden, attention_mask)  # (B, H)


def example_batch(pad_token_id: int, vocab_size: int, lengths=(7, 3, 5), seed: int = 0) -> PaddedBatch:
    """A right-padded batch of random real tokens (ids avoid the pad id)."""
    rng = np.random.default_rng(seed)
    low = 1 if pad_token_id == 0 else 0
    sequences = []
    for n in lengths:
        ids = rng.integers(low, vocab_size, size=n)
        ids[ids == pad_token_id] = (pad_token_id + 1) % vocab_size
        sequences.append(ids)
    return PaddedBatch.from_sequences(sequences, pad_token_id)


def export_encoder(model: DomainTransformerModel, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write the encoder as ONNX at `path` with dynamic batch and sequence axes; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = EncoderForExport(model.eval().float().cpu()).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batch = example_batch(pad, model.config.vocab_size)
    # The TorchScript exporter: the dynamo one (torch 2.15) wrote an invalid graph for this model (a duplicated
    # output name) in our tests.
    with torch.no_grad(), warnings.catch_warnings():
        # The gather of the last real token uses argmax indices, which are never negative.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            wrapper,
            (batch.input_ids, batch.attention_mask),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                OUTPUT_NAME: {0: "batch"},
            },
            opset_version=opset,
            dynamo=False,
        )
    return path


def onnx_parity(model: DomainTransformerModel, path: str | Path, batches: int = 4, seed: int = 0) -> float:
    """Max |torch - onnxruntime| over the user embeddings of a few random right-padded batches."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = EncoderForExport(model.eval().float().cpu()).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    rng = np.random.default_rng(seed)
    worst = 0.0
    for i in range(batches):
        # Shapes unlike the export example, so the dynamic axes are exercised.
        lengths = rng.integers(1, 40, size=int(rng.integers(1, 9)))
        batch = example_batch(pad, model.config.vocab_size, lengths=tuple(int(n) for n in lengths), seed=seed + i)
        with torch.no_grad():
            expected = wrapper(batch.input_ids, batch.attention_mask).numpy()
        (actual,) = session.run(
            [OUTPUT_NAME], {"input_ids": batch.input_ids.numpy(), "attention_mask": batch.attention_mask.numpy()}
        )
        worst = max(worst, float(np.abs(actual - expected).max()))
    return worst


__all__ = ["EncoderForExport", "export_encoder", "onnx_parity", "example_batch"]
