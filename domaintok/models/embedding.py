"""User embeddings from a pretrained domain transformer: safe loading, batched inference, model versions.

Shared by the offline `embed` job, the stream encoder worker and the benchmarks, so online == offline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from domaintok.artifacts import EMBEDDINGS_SCHEMA, check_fingerprint, refuse_pickles
from domaintok.errors import ArtifactError
from domaintok.models.configuration_domain_transformer import DomainTransformerConfig
from domaintok.models.modeling_domain_transformer import DomainTransformerModel
from domaintok.models.padded import PaddedBatch

WEIGHTS_NAME = "model.safetensors"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_model_dir(model_dir: str | Path) -> Path:
    """The model directory as a Path, after refusing a missing, pickled or non-domain-transformer one."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{path}: not a model directory (no config.json)")
    refuse_pickles(path, kind="weights")
    if not any(path.glob("model*.safetensors")):
        raise ArtifactError(f"{path}: no {WEIGHTS_NAME} in the model directory")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != DomainTransformerConfig.model_type:
        raise ArtifactError(
            f"{path}/config.json: model_type is {model_type!r}, expected {DomainTransformerConfig.model_type!r}"
        )
    return path


def load_encoder(
    model_dir: str | Path,
    device: torch.device | str | None = None,
    expected_fingerprint: str | None = None,
) -> DomainTransformerModel:
    """Load the bare decoder (no LM head) from a pretrained model directory, in eval mode on `device`.

    Refuses pickle weights and, when `expected_fingerprint` is given, a model trained with another tokenizer.
    `device` defaults to CUDA when present, else CPU.
    """
    path = check_model_dir(model_dir)
    config = DomainTransformerConfig.from_pretrained(path)
    check_fingerprint(path, config.tokenizer_fingerprint, expected_fingerprint)
    model = DomainTransformerModel.from_pretrained(path, config=config, use_safetensors=True)
    return model.to(torch.device(device) if device is not None else default_device()).eval()


def embed_batch(model: DomainTransformerModel, batch: PaddedBatch) -> torch.Tensor:
    """User embeddings (B, H) for one right-padded batch, on the model's device, without gradients."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    with torch.inference_mode():
        # Right padding: a causal query never sees a later pad key, so the real positions need no padding mask,
        # and leaving it out lets SDPA use its fused causal kernel. The last block runs for the final token only.
        return model.embed(batch.input_ids, batch.attention_mask, right_padded=True)  # (B, H)


def embed_sequences(
    model: DomainTransformerModel,
    sequences: Sequence[Sequence[int] | np.ndarray],
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Embed token sequences -> float32 array (N, H) in input order.

    Sequences are sorted by length so each batch pads to a similar length, then the order is restored.
    `device` moves the model first if given; otherwise the model's own device is used.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is not None:
        model = model.to(torch.device(device))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    N = len(sequences)
    out = np.empty((N, model.config.hidden_size), dtype=np.float32)  # (N, H)
    if N == 0:
        return out
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=N)
    # Longest first: the largest batch runs first, so running out of memory shows at once, not at the end.
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, N, batch_size):
        rows = order[start : start + batch_size]
        batch = PaddedBatch.from_sequences([sequences[i] for i in rows], pad_token_id=pad)
        out[rows] = embed_batch(model, batch).float().cpu().numpy()
    return out


def model_version(model_dir: str | Path) -> str:
    """Short stable id of a model: directory name + the first 12 hex digits of the weights' sha256."""
    path = Path(model_dir)
    digest = hashlib.sha256()
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        raise ArtifactError(f"{path}: no {WEIGHTS_NAME} to version")
    for file in weights:
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return f"{path.resolve().name}-{digest.hexdigest()[:12]}"


__all__ = ["EMBEDDINGS_SCHEMA", "load_encoder", "embed_sequences", "embed_batch", "model_version", "check_model_dir", "default_device"]
