"""Configuration of the joint fusion model: a `PretrainedConfig` (config.json), Auto-registered like the encoder's.

It carries everything needed to rebuild the model and its inputs: feature names, numeric normalization stats,
categorical vocabularies, the transformer's config and the tokenizer fingerprint. Kept apart from the model module so
that registering it with `AutoConfig` imports no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, ClassVar

from transformers import PretrainedConfig

MODEL_TYPE = "domaintok_joint_fusion"
TASKS = ("binary", "multiclass", "regression")
SEQUENCE_GATES = ("none", "zero", "scalar")


class JointFusionConfig(PretrainedConfig):
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
        lm_loss_weight: weight of an auxiliary next-token loss on the input sequence while fine-tuning (the task
            loss plus this times the language model's mean cross-entropy over the real tokens, through the
            encoder's tied embedding matrix: the objective the encoder was pretrained on keeps training beside the
            task, as GPT-1 fine-tuned with lambda 0.5); 0 disables it. Training only; needs the sequence branch and
            an encoder with tied word embeddings.
        embedding_layernorm: standardize the user embedding with a parameter-free LayerNorm before fusion.
        transformer_config: `DomainTransformerConfig.to_dict()` of the encoder (None when use_sequence is False).
        tokenizer_fingerprint: the fingerprint of the tokenizer that made the input sequences.
        lora: None, or {"r", "alpha", "dropout", "target_modules"} when the encoder carries LoRA adapters.
        max_length: longest token window fed to the encoder (older whole events are dropped).
    """

    model_type: ClassVar[str] = MODEL_TYPE

    task: str = "binary"
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
    dcn_structure: str = "stacked"
    dropout: float = 0.1
    head_hidden: int = 64
    use_sequence: bool = True
    sequence_gate: str = "none"
    sequence_dropout: float = 0.0
    lm_loss_weight: float = 0.0
    embedding_layernorm: bool = True
    transformer_config: dict[str, Any] | None = None
    tokenizer_fingerprint: str | None = None
    lora: dict[str, Any] | None = None
    max_length: int | None = None

    def __post_init__(self, **kwargs):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "multiclass" and len(self.class_names) < 2:
            raise ValueError("a multiclass task needs at least 2 class_names")
        if not (len(self.numeric_features) == len(self.numeric_mean) == len(self.numeric_std)):
            raise ValueError("numeric_features, numeric_mean and numeric_std must have the same length")
        if len(self.categorical_features) != len(self.categorical_vocabularies):
            raise ValueError("categorical_features and categorical_vocabularies must have the same length")
        if not self.use_sequence and not self.has_tabular:
            raise ValueError("a model with neither a sequence nor tabular features has no input")
        if self.sequence_gate not in SEQUENCE_GATES:
            raise ValueError(f"sequence_gate must be one of {SEQUENCE_GATES}, got {self.sequence_gate!r}")
        if self.sequence_gate == "zero" and self.use_sequence and not self.has_tabular:
            raise ValueError('sequence_gate "zero" needs tabular features (it starts the model as its tabular path)')
        if not 0.0 <= self.sequence_dropout < 1.0:
            raise ValueError(f"sequence_dropout must be in [0, 1), got {self.sequence_dropout}")
        if not self.lm_loss_weight >= 0.0:
            raise ValueError(f"lm_loss_weight must be >= 0, got {self.lm_loss_weight}")
        if self.lm_loss_weight and not self.use_sequence:
            raise ValueError("lm_loss_weight needs the sequence branch (use_sequence)")
        super().__post_init__(**kwargs)

    @property
    def has_tabular(self) -> bool:
        return bool(self.numeric_features or self.categorical_features)

    @property
    def num_outputs(self) -> int:
        """C, the width of the head's output."""
        return len(self.class_names) if self.task == "multiclass" else 1

    @classmethod
    def from_legacy(cls, data: dict[str, Any]) -> JointFusionConfig:
        """A config as models saved before config.json wrote it (fusion_config.json: the fields + model_type)."""
        from domaintok.errors import ArtifactError

        data = dict(data)
        if data.pop("model_type", None) != MODEL_TYPE:
            raise ArtifactError(f"not a joint fusion config (model_type must be {MODEL_TYPE!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            raise ArtifactError(f"joint fusion config has unknown keys {unknown}")
        return cls(**data)


__all__ = ["JointFusionConfig", "MODEL_TYPE", "SEQUENCE_GATES", "TASKS"]
