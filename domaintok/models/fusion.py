"""nuFormer joint fusion: the domain transformer's user embedding and a PLR/DCNv2 tabular branch feed one MLP head.

`JointFusionModel` is a `PreTrainedModel` and `JointFusionConfig` (configuration_fusion.py) its `PretrainedConfig`:
config.json carries everything needed to rebuild the model and its inputs (feature names, numeric normalization
stats, categorical vocabularies, transformer config, tokenizer fingerprint), next to model.safetensors, never
pickle; both are registered with transformers' Auto classes. Shape legend: B = batch, T = tokens, H = hidden, Fn / Fc = numeric /
categorical features, D = per-feature embedding width, C = outputs of the head.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from domaintok.artifacts import check_fingerprint, refuse_pickles
from domaintok.errors import ArtifactError, DomaintokError
from domaintok.models.configuration_domain_transformer import DomainTransformerConfig
from domaintok.models.configuration_fusion import JointFusionConfig
from domaintok.models.modeling_domain_transformer import DomainTransformerModel
from domaintok.models.tabular import DCNv2, PeriodicEmbeddings

CONFIG_NAME = "config.json"
LEGACY_CONFIG_NAME = "fusion_config.json"  # what models saved before the PreTrainedModel form wrote
WEIGHTS_NAME = "model.safetensors"
# The attention and MLP projections of DomainTransformerBlock; LoRA adapts these by name.
LORA_TARGET_MODULES = ("qkv_proj", "out_proj", "up_proj", "down_proj")
# Categorical index 0 is shared by nulls and values unseen at fit time.
UNKNOWN_INDEX = 0


@dataclass
class JointFusionOutput(ModelOutput):
    """loss (scalar, when labels are given), logits (B, C), user_embedding (B, H) or None, lm_loss (scalar: the
    auxiliary next-token loss already weighted into `loss`, when `lm_loss_weight` is on in training)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    user_embedding: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None


# --- tabular inputs: fitting stats and encoding Arrow columns ------------------------------------------------------


def signed_log1p(x: np.ndarray) -> np.ndarray:
    # Counts and money are heavy-tailed; the log keeps one customer's huge spend from dominating the z-score.
    return np.sign(x) * np.log1p(np.abs(x))


def _numeric_column(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.int8())
    return column.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN


def fit_tabular_stats(
    table: pa.Table,
    numeric_features: Sequence[str],
    categorical_features: Sequence[str],
    max_categories: int = 256,
    min_frequency: int = 1,
) -> dict[str, Any]:
    """Normalization stats and vocabularies (as `JointFusionConfig` fields) fitted on `table` (the train split).

    Categorical vocabularies keep the `max_categories` most frequent values seen at least `min_frequency` times
    (ties by value, so fitting is deterministic).
    """
    means, stds = [], []
    for name in numeric_features:
        values = signed_log1p(_numeric_column(table, name))
        finite = values[np.isfinite(values)]
        mean = float(finite.mean()) if finite.size else 0.0
        std = float(finite.std()) if finite.size else 1.0
        means.append(mean)
        stds.append(std if std > 1e-12 else 1.0)
    vocabularies = []
    for name in categorical_features:
        counts = pc.value_counts(pc.cast(table.column(name), pa.string())).to_pylist()
        pairs = sorted(
            ((c["values"], c["counts"]) for c in counts if c["values"] is not None and c["counts"] >= min_frequency),
            key=lambda vc: (-vc[1], vc[0]),
        )
        vocabularies.append([value for value, _ in pairs[:max_categories]])
    return {
        "numeric_features": list(numeric_features),
        "numeric_mean": means,
        "numeric_std": stds,
        "categorical_features": list(categorical_features),
        "categorical_vocabularies": vocabularies,
    }


def encode_tabular(config: JointFusionConfig, table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw feature columns of `table` -> (numeric FloatTensor (N, Fn) standardized, categorical LongTensor (N, Fc))."""
    missing = [c for c in (*config.numeric_features, *config.categorical_features) if c not in table.column_names]
    if missing:
        raise DomaintokError(f"features are missing column(s) {', '.join(missing)} the model was trained with")
    N = table.num_rows
    numeric = np.zeros((N, len(config.numeric_features)), dtype=np.float32)  # (N, Fn)
    for j, name in enumerate(config.numeric_features):
        z = (signed_log1p(_numeric_column(table, name)) - config.numeric_mean[j]) / config.numeric_std[j]
        numeric[:, j] = np.where(np.isfinite(z), z, 0.0)
    categorical = np.zeros((N, len(config.categorical_features)), dtype=np.int64)  # (N, Fc)
    for j, (name, vocabulary) in enumerate(zip(config.categorical_features, config.categorical_vocabularies)):
        values = pc.cast(table.column(name), pa.string())
        # index_in gives the position in the vocabulary or null (unseen / null) -> +1, null -> UNKNOWN_INDEX.
        index = pc.index_in(values, value_set=pa.array(vocabulary, pa.string()))
        categorical[:, j] = pc.fill_null(pc.add(index, 1), UNKNOWN_INDEX).to_numpy(zero_copy_only=False)
    return torch.from_numpy(numeric), torch.from_numpy(categorical)


# --- the model --------------------------------------------------------------------------------------------------


class JointFusionModel(PreTrainedModel):
    """Transformer user embedding (B, H) ++ DCNv2(PLR(numeric) ++ Embedding(categorical)) -> MLP head -> (B, C).

    The user embedding is the final real token's last hidden state of `DomainTransformerModel` (never logits),
    LayerNorm'd without parameters when `embedding_layernorm`, then gated as `sequence_gate` says (see the
    config). The whole model trains end to end; with `lora` in the config the encoder's
    attention/MLP Linear layers carry PEFT LoRA adapters and its base weights are frozen.

    `sequence_open` (not saved) switches the sequence branch off: the encoder does not run and the user embedding
    is zeros, so the model is its tabular path (staged training's first stage, where the gate stays closed).
    """

    config_class = JointFusionConfig
    base_model_prefix = "fusion"
    _supports_sdpa = True

    def __init__(self, config: JointFusionConfig, transformer: DomainTransformerModel | None = None):
        super().__init__(config)
        width = 0
        self.transformer: DomainTransformerModel | None = None
        if config.use_sequence:
            if transformer is None and config.transformer_config is None:
                # checked here, not by the config: transformers builds a default config (no encoder) when it saves
                raise ValueError("use_sequence needs a transformer_config")
            if transformer is None:
                transformer = DomainTransformerModel(DomainTransformerConfig.from_dict(config.transformer_config))
            self.transformer = transformer
            if config.lora is not None:
                self._inject_lora(config.lora)
            if config.sequence_gate != "zero":
                width += transformer.config.hidden_size
            if config.lm_loss_weight and not transformer.config.tie_word_embeddings:
                raise ValueError("lm_loss_weight needs an encoder with tied word embeddings (its LM head)")
        scalar = config.use_sequence and config.sequence_gate == "scalar"
        self.sequence_gate = nn.Parameter(torch.zeros(())) if scalar else None
        self.sequence_open = True
        n_num, n_cat = len(config.numeric_features), len(config.categorical_features)
        self.plr = (
            PeriodicEmbeddings(
                n_num,
                d_embedding=config.plr_d_embedding,
                n_frequencies=config.plr_n_frequencies,
                frequency_init_scale=config.plr_frequency_init_scale,
                lite=config.plr_lite,
            )
            if n_num
            else None
        )
        self.categorical_embeddings = nn.ModuleList(
            nn.Embedding(len(vocabulary) + 1, config.categorical_d_embedding)
            for vocabulary in config.categorical_vocabularies
        )
        self.dcn = None
        if config.has_tabular:
            d_tab = n_num * config.plr_d_embedding + n_cat * config.categorical_d_embedding
            self.dcn = DCNv2(
                d_tab,
                n_cross_layers=config.dcn_cross_layers,
                deep_layers=config.dcn_deep_layers,
                rank=config.dcn_rank,
                structure=config.dcn_structure,
                dropout=config.dropout,
            )
            width += self.dcn.output_dim
        self.head = nn.Sequential(
            nn.Linear(width, config.head_hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.head_hidden, config.num_outputs),
        )
        self.sequence_proj = None
        if config.use_sequence and config.sequence_gate == "zero":
            # (H -> head_hidden), added to the head's first layer over the tabular vector; starts at zero.
            self.sequence_proj = nn.Linear(self.transformer.config.hidden_size, config.head_hidden, bias=False)
            nn.init.zeros_(self.sequence_proj.weight)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: every layer is initialized where it is built (PLR, DCNv2 and the head by their own rules, the
        encoder by its own model or its checkpoint), so wrapping changes no weight and draws no random number."""

    def sequence_weight(self) -> float:
        """How far the sequence branch is open: the scalar gate, or the norm of the weights that carry the user
        embedding into the head (0 for "zero" and "scalar" until training moves them: the tabular path)."""
        if self.sequence_gate is not None:
            return float(self.sequence_gate.detach())
        if self.sequence_proj is not None:
            return float(self.sequence_proj.weight.detach().norm())
        hidden = self.transformer.config.hidden_size if self.transformer is not None else 0
        return float(self.head[0].weight[:, :hidden].detach().norm())

    def close_sequence(self) -> None:
        """Zero the weights that carry the user embedding into the head (gate, projection, or the head's columns
        on it): the model becomes its tabular path, whether or not the encoder runs."""
        with torch.no_grad():
            if self.sequence_gate is not None:
                self.sequence_gate.zero_()
            elif self.sequence_proj is not None:
                self.sequence_proj.weight.zero_()
            elif self.transformer is not None:
                self.head[0].weight[:, : self.transformer.config.hidden_size].zero_()

    def tabular_parameter(self, name: str) -> bool:
        """Whether a parameter (by name) belongs to the tabular path: PLR, categorical embeddings, DCNv2 and
        the head, but not the encoder, the gate or the sequence projection."""
        return not name.startswith(("transformer.", "sequence_proj.")) and name != "sequence_gate"

    @classmethod
    def from_encoder(cls, transformer: DomainTransformerModel, **config_fields: Any) -> JointFusionModel:
        """Wrap a pretrained encoder; the config takes its transformer config and tokenizer fingerprint."""
        config = JointFusionConfig(
            transformer_config=json.loads(transformer.config.to_json_string(use_diff=False)),
            tokenizer_fingerprint=transformer.config.tokenizer_fingerprint,
            **config_fields,
        )
        return cls(config, transformer)

    def _inject_lora(self, lora: dict[str, Any]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        peft_config = LoraConfig(
            r=int(lora.get("r", 8)),
            lora_alpha=int(lora.get("alpha", 16)),
            lora_dropout=float(lora.get("dropout", 0.0)),
            target_modules=list(lora.get("target_modules", LORA_TARGET_MODULES)),
        )
        self.transformer = inject_adapter_in_model(peft_config, self.transformer)
        # Only the adapters train inside the encoder; the head and the tabular branch stay trainable.
        for name, parameter in self.transformer.named_parameters():
            parameter.requires_grad = "lora_" in name

    def user_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Right-padded token ids (B, T) and mask -> user embeddings (B, H) from the last hidden states."""
        # Right padding: a causal query never sees a later pad key, so no padding mask is needed for the final
        # real token, and SDPA keeps its fused causal kernel; the last block runs for that token only.
        return self._standardized(self.transformer.embed(input_ids, attention_mask, right_padded=True))  # (B, H)

    def _standardized(self, embedding: torch.Tensor) -> torch.Tensor:
        """The encoder's user embeddings (B, H), LayerNorm'd without parameters when `embedding_layernorm` asks for
        it and the encoder does not already do it."""
        if self.config.embedding_layernorm and not self.transformer.config.embedding_layernorm:
            embedding = F.layer_norm(embedding, (embedding.shape[-1],))
        return embedding

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        numeric: torch.Tensor | None = None,
        categorical: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> JointFusionOutput:
        """Logits (B, C) (standardized prediction for regression); the task's loss when `labels` (B,) are given."""
        parts = []
        embedding = sequence = lm_loss = None
        if self.transformer is not None:
            if input_ids is None:
                raise ValueError("this model reads token sequences: input_ids is required")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            if self.sequence_open:
                if self.training and self.config.lm_loss_weight and labels is not None:
                    embedding, lm_loss = self._embedding_and_lm_loss(input_ids, attention_mask)
                else:
                    embedding = self.user_embedding(input_ids, attention_mask)  # (B, H)
                sequence = self.gated(embedding)
            else:
                hidden = self.transformer.config.hidden_size
                sequence = input_ids.new_zeros((input_ids.shape[0], hidden), dtype=self.head[0].weight.dtype)
            if self.sequence_proj is None:
                parts.append(sequence)
        if self.dcn is not None:
            tabular = []
            if self.plr is not None:
                tabular.append(self.plr(numeric).flatten(1))  # (B, Fn, D) -> (B, Fn * D)
            for j, table in enumerate(self.categorical_embeddings):
                tabular.append(table(categorical[:, j]))  # (B, Dc)
            parts.append(self.dcn(torch.cat(tabular, dim=-1)))  # (B, X) -> (B, dcn.output_dim)
        if self.sequence_proj is None:
            logits = self.head(torch.cat(parts, dim=-1))  # (B, C)
        else:
            hidden = self.head[0](torch.cat(parts, dim=-1)) + self.sequence_proj(sequence)  # (B, head_hidden)
            logits = self.head[1:](hidden)  # (B, C)
        loss = None if labels is None else self.loss(logits, labels)
        if lm_loss is not None:
            loss = loss + self.config.lm_loss_weight * lm_loss
        return JointFusionOutput(loss=loss, logits=logits, user_embedding=embedding, lm_loss=lm_loss)

    def _embedding_and_lm_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Right-padded ids (B, T) -> the user embedding (B, H), as `user_embedding` gives it, and the mean
        next-token cross-entropy over the real tokens through the tied embedding matrix, from one decoder pass."""
        # Right padding: no mask needed for the real positions; the pad positions are read by neither term.
        states = self.transformer(input_ids, return_dict=True).last_hidden_state  # (B, T, H)
        embedding = self._standardized(self.transformer.user_embedding(states, attention_mask))  # (B, H)
        logits = states[:, :-1] @ self.transformer.embed_tokens.weight.T  # (B, T-1, V): the tied LM head
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (B, T-1)
        if not bool((targets != -100).any()):  # one-token sequences only: nothing to predict
            return embedding, logits.sum() * 0.0
        lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return embedding, lm_loss

    def gated(self, embedding: torch.Tensor) -> torch.Tensor:
        """User embeddings (B, H) as the head sees them: times the gate, and row-wise sequence dropout in training."""
        if self.sequence_gate is not None:
            embedding = embedding * self.sequence_gate
        if self.training and self.config.sequence_dropout > 0:
            keep = torch.ones_like(embedding[:, :1])  # (B, 1): one draw per row drops the whole embedding
            embedding = embedding * F.dropout(keep, self.config.sequence_dropout, training=True)
        return embedding

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BCE-with-logits (binary, labels 0/1), cross-entropy (multiclass, class indices), MSE (regression,
        raw targets, standardized here)."""
        if self.config.task == "binary":
            return F.binary_cross_entropy_with_logits(logits.squeeze(-1), labels.float())
        if self.config.task == "multiclass":
            return F.cross_entropy(logits, labels.long())
        target = (labels.float() - self.config.target_mean) / self.config.target_std
        return F.mse_loss(logits.squeeze(-1), target)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) -> P(y=1) (B,) for binary, class probabilities (B, C) for multiclass, values (B,) for
        regression."""
        if self.config.task == "binary":
            return torch.sigmoid(logits.squeeze(-1))
        if self.config.task == "multiclass":
            return torch.softmax(logits, dim=-1)
        return logits.squeeze(-1) * self.config.target_std + self.config.target_mean

    # --- persistence: safetensors + config.json (a PreTrainedModel), no pickle ----------------------------------

    def save_pretrained(self, output_dir: str | Path, **kwargs: Any) -> Path:
        """Write config.json and model.safetensors (LoRA adapters included, unmerged) to `output_dir`."""
        super().save_pretrained(str(output_dir), safe_serialization=True, **kwargs)
        return Path(output_dir)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *args: Any,
        device: torch.device | str | None = None,
        expected_fingerprint: str | None = None,
        **hub_kwargs: Any,
    ) -> JointFusionModel:
        """Load a saved fusion model in eval mode; refuses pickle files, a tokenizer fingerprint mismatch and weights
        that do not match the config (missing or unexpected tensors). Reads directories saved before config.json
        (fusion_config.json) too. Called by `AutoModel.from_pretrained(dir, ...)`, it takes `dtype` and a device
        name as `device_map`; a local directory is the only source (the Hub's other options do not apply)."""
        dtype = hub_kwargs.get("dtype") or hub_kwargs.get("torch_dtype")
        if device is None and isinstance(hub_kwargs.get("device_map"), (str, torch.device)):
            device = hub_kwargs["device_map"]
        path = Path(model_dir)
        legacy = not (path / CONFIG_NAME).is_file() and (path / LEGACY_CONFIG_NAME).is_file()
        if not legacy and not (path / CONFIG_NAME).is_file():
            raise ArtifactError(f"{path}: not a joint fusion model directory (no {CONFIG_NAME} or {LEGACY_CONFIG_NAME})")
        refuse_pickles(path)
        if not (path / WEIGHTS_NAME).is_file():
            raise ArtifactError(f"{path}: no {WEIGHTS_NAME} in the model directory")
        if legacy:
            config = JointFusionConfig.from_legacy(json.loads((path / LEGACY_CONFIG_NAME).read_text()))
        else:
            saved = json.loads((path / CONFIG_NAME).read_text())
            if saved.get("model_type") != JointFusionConfig.model_type:
                raise ArtifactError(f"{path}: not a joint fusion model (model_type {saved.get('model_type')!r})")
            config = JointFusionConfig.from_dict(saved)
        check_fingerprint(path, config.tokenizer_fingerprint, expected_fingerprint)
        # Built here and filled with load_state_dict(strict=True): the same weights the Hub loader would read, with
        # a missing or unexpected tensor an error rather than a warning.
        model = cls(config)
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=True)
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        if device is not None:
            model = model.to(torch.device(device))
        return model.eval()


__all__ = [
    "JointFusionConfig",
    "JointFusionModel",
    "JointFusionOutput",
    "fit_tabular_stats",
    "encode_tabular",
    "signed_log1p",
    "LORA_TARGET_MODULES",
]

from domaintok._autoregister import fusion_loaded  # noqa: E402  (last: the module is complete)

fusion_loaded()
