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
# Not "embedding": the exporter names the token-embedding lookup's output that, and ONNX names must be unique.
OUTPUT_NAME = "user_embedding"
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
    B, T = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad(), warnings.catch_warnings():
        # The exporter warns that the two inputs share their axis names, which is the intent.
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        torch.onnx.export(
            wrapper,
            (batch.input_ids, batch.attention_mask),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: B, 1: T}, {0: B, 1: T}),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
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
