"""nuFormer joint fusion: the domain transformer's user embedding and a PLR/DCNv2 tabular branch feed one MLP head.

`JointFusionConfig` carries everything needed to rebuild the model and its inputs (feature names, numeric
normalization stats, categorical vocabularies, transformer config, tokenizer fingerprint); saved as JSON next to
safetensors weights, never pickle. Shape legend: B = batch, T = tokens, H = hidden, Fn / Fc = numeric /
categorical features, D = per-feature embedding width, C = outputs of the head.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from domaintok.artifacts import check_fingerprint, refuse_pickles
from domaintok.errors import ArtifactError, DomaintokError
from domaintok.models.configuration_domain_transformer import DomainTransformerConfig
from domaintok.models.modeling_domain_transformer import DomainTransformerModel
from domaintok.models.tabular import DCNv2, PeriodicEmbeddings

MODEL_TYPE = "domaintok_joint_fusion"
CONFIG_NAME = "fusion_config.json"
WEIGHTS_NAME = "model.safetensors"
TASKS = ("binary", "multiclass", "regression")
SEQUENCE_GATES = ("none", "zero", "scalar")
# The attention and MLP projections of DomainTransformerBlock; LoRA adapts these by name.
LORA_TARGET_MODULES = ("qkv_proj", "out_proj", "up_proj", "down_proj")
# Categorical index 0 is shared by nulls and values unseen at fit time.
UNKNOWN_INDEX = 0


@dataclass
class JointFusionConfig:
    """Hyperparameters and fitted input state of `JointFusionModel`; round-trips through JSON.

    Args:
        task: "binary" (one logit, BCE), "multiclass" (C logits, cross-entropy) or "regression" (one output, MSE
            on the standardized target).
        class_names: multiclass label values in logit order (C >= 2); binary and regression leave it empty.
        target_mean, target_std: regression target standardization (predictions are de-standardized).
        numeric_features: numeric column names, in PLR feature order.
        numeric_mean, numeric_std: stats of signed_log1p(x) on the training split; inputs are standardized
            with them, nulls become 0 (the mean).
        categorical_features: categorical column names, in embedding order.
        categorical_vocabularies: per categorical feature, the known values; value i maps to index i + 1,
            index 0 is null or unseen.
        plr_d_embedding, plr_n_frequencies, plr_frequency_init_scale, plr_lite: PLR hyperparameters.
        categorical_d_embedding: width of each categorical embedding.
        dcn_cross_layers, dcn_deep_layers, dcn_rank, dcn_structure, dropout: DCNv2 hyperparameters.
        head_hidden: width of the joint head's hidden layer.
        use_sequence: whether the transformer branch is used (False: the tabular branch alone).
        sequence_gate: how the sequence branch enters the head. "none": as is (random init like every input);
            "zero": the user embedding enters the head's hidden layer through its own projection, initialized
            at zero (it learns from the first step; needs tabular features); "scalar": the embedding is multiplied
            by a learned scalar that starts at 0. With "zero" or "scalar" an untrained fused model computes exactly
            what its tabular path computes, and the sequence only contributes as far as training moves them.
        sequence_dropout: probability of zeroing a row's whole user embedding in training (the head learns to
            predict from the tabular branch alone too); 0 disables it.
        embedding_layernorm: standardize the user embedding with a parameter-free LayerNorm before fusion.
        transformer_config: `DomainTransformerConfig.to_dict()` of the encoder (None when use_sequence is False).
        tokenizer_fingerprint: the fingerprint of the tokenizer that made the input sequences.
        lora: None, or {"r", "alpha", "dropout", "target_modules"} when the encoder carries LoRA adapters.
        max_length: longest token window fed to the encoder (older whole events are dropped).
    """

    task: Literal["binary", "multiclass", "regression"] = "binary"
    class_names: list[str] = field(default_factory=list)
    target_mean: float = 0.0
    target_std: float = 1.0
    numeric_features: list[str] = field(default_factory=list)
    numeric_mean: list[float] = field(default_factory=list)
    numeric_std: list[float] = field(default_factory=list)
    categorical_features: list[str] = field(default_factory=list)
    categorical_vocabularies: list[list[str]] = field(default_factory=list)
    plr_d_embedding: int = 16
    plr_n_frequencies: int = 16
    plr_frequency_init_scale: float = 0.05
    plr_lite: bool = False
    categorical_d_embedding: int = 16
    dcn_cross_layers: int = 2
    dcn_deep_layers: list[int] = field(default_factory=lambda: [128, 64])
    dcn_rank: int | None = None
    dcn_structure: Literal["stacked", "parallel"] = "stacked"
    dropout: float = 0.1
    head_hidden: int = 64
    use_sequence: bool = True
    sequence_gate: Literal["none", "zero", "scalar"] = "none"
    sequence_dropout: float = 0.0
    embedding_layernorm: bool = True
    transformer_config: dict[str, Any] | None = None
    tokenizer_fingerprint: str | None = None
    lora: dict[str, Any] | None = None
    max_length: int | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "multiclass" and len(self.class_names) < 2:
            raise ValueError("a multiclass task needs at least 2 class_names")
        if not (len(self.numeric_features) == len(self.numeric_mean) == len(self.numeric_std)):
            raise ValueError("numeric_features, numeric_mean and numeric_std must have the same length")
        if len(self.categorical_features) != len(self.categorical_vocabularies):
            raise ValueError("categorical_features and categorical_vocabularies must have the same length")
        if self.use_sequence and self.transformer_config is None:
            raise ValueError("use_sequence needs a transformer_config")
        if not self.use_sequence and not self.has_tabular:
            raise ValueError("a model with neither a sequence nor tabular features has no input")
        if self.sequence_gate not in SEQUENCE_GATES:
            raise ValueError(f"sequence_gate must be one of {SEQUENCE_GATES}, got {self.sequence_gate!r}")
        if self.sequence_gate == "zero" and self.use_sequence and not self.has_tabular:
            raise ValueError('sequence_gate "zero" needs tabular features (it starts the model as its tabular path)')
        if not 0.0 <= self.sequence_dropout < 1.0:
            raise ValueError(f"sequence_dropout must be in [0, 1), got {self.sequence_dropout}")

    @property
    def has_tabular(self) -> bool:
        return bool(self.numeric_features or self.categorical_features)

    @property
    def num_outputs(self) -> int:
        """C, the width of the head's output."""
        return len(self.class_names) if self.task == "multiclass" else 1

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JointFusionConfig:
        data = dict(data)
        if data.pop("model_type", None) != MODEL_TYPE:
            raise ArtifactError(f"not a joint fusion config (model_type must be {MODEL_TYPE!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError(f"joint fusion config has unknown keys {unknown}")
        return cls(**data)


@dataclass
class JointFusionOutput(ModelOutput):
    """loss (scalar, when labels are given), logits (B, C), user_embedding (B, H) or None."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    user_embedding: torch.Tensor | None = None


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


class JointFusionModel(nn.Module):
    """Transformer user embedding (B, H) ++ DCNv2(PLR(numeric) ++ Embedding(categorical)) -> MLP head -> (B, C).

    The user embedding is the final real token's last hidden state of `DomainTransformerModel` (never logits),
    LayerNorm'd without parameters when `embedding_layernorm`, then gated as `sequence_gate` says (see the
    config). The whole model trains end to end; with `lora` in the config the encoder's
    attention/MLP Linear layers carry PEFT LoRA adapters and its base weights are frozen.

    `sequence_open` (not saved) switches the sequence branch off: the encoder does not run and the user embedding
    is zeros, so the model is its tabular path (staged training's first stage, where the gate stays closed).
    """

    def __init__(self, config: JointFusionConfig, transformer: DomainTransformerModel | None = None):
        super().__init__()
        self.config = config
        width = 0
        self.transformer: DomainTransformerModel | None = None
        if config.use_sequence:
            if transformer is None:
                transformer = DomainTransformerModel(DomainTransformerConfig.from_dict(config.transformer_config))
            self.transformer = transformer
            if config.lora is not None:
                self._inject_lora(config.lora)
            if config.sequence_gate != "zero":
                width += transformer.config.hidden_size
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
        embedding = self.transformer.embed(input_ids, attention_mask, right_padded=True)  # (B, H)
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
        embedding = sequence = None
        if self.transformer is not None:
            if input_ids is None:
                raise ValueError("this model reads token sequences: input_ids is required")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            if self.sequence_open:
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
        return JointFusionOutput(loss=loss, logits=logits, user_embedding=embedding)

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

    # --- persistence: safetensors + JSON, no pickle ------------------------------------------------------------

    def save_pretrained(self, output_dir: str | Path) -> Path:
        """Write fusion_config.json and model.safetensors (LoRA adapters included, unmerged) to `output_dir`."""
        path = Path(output_dir)
        path.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt", "model_type": MODEL_TYPE})
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: torch.device | str | None = None,
        expected_fingerprint: str | None = None,
    ) -> JointFusionModel:
        """Load a saved fusion model in eval mode; refuses pickle files and a tokenizer fingerprint mismatch."""
        path = Path(model_dir)
        if not (path / CONFIG_NAME).is_file():
            raise ArtifactError(f"{path}: not a joint fusion model directory (no {CONFIG_NAME})")
        refuse_pickles(path)
        if not (path / WEIGHTS_NAME).is_file():
            raise ArtifactError(f"{path}: no {WEIGHTS_NAME} in the model directory")
        config = JointFusionConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        check_fingerprint(path, config.tokenizer_fingerprint, expected_fingerprint)
        model = cls(config)
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=True)
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
