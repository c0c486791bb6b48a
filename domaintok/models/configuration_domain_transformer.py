"""Configuration of the domain transformer: every hyperparameter of the NoPE GPT encoder over domain tokens.

Presets follow nuFormer's sizes (24 layers, 16 heads; hidden 256 ~ 24M and hidden 1024 ~ 330M parameters).
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

# Sizes only; vocabulary and special ids come from the fitted tokenizer. The parameter counts in the names hold
# for a vocabulary of ~20k tokens (the embedding is tied, so it is counted once).
PRESETS: dict[str, dict[str, Any]] = {
    # For tests and CPU smoke runs: a forward pass takes microseconds.
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
    # The README's CPU evaluation size.
    "small": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
    "24m": {"hidden_size": 256, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 1024},
    "330m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}

POSITION_EMBEDDING_TYPES = ("none", "learned")
POOLINGS = ("last", "mean")
# The architecture a preset fixes; the CLI's overrides and metrics.json's `architecture` use these names.
ARCHITECTURE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
HIDDEN_ACTS = ("gelu", "gelu_tanh", "relu", "silu")


class DomainTransformerConfig(PretrainedConfig):
    """Hyperparameters of `DomainTransformerModel` / `DomainTransformerForCausalLM`.

    Args:
        vocab_size: number of domain tokens (the tokenizer's `vocab_size`).
        hidden_size: width H of every hidden state (and of the user embedding).
        num_hidden_layers: number of pre-norm decoder blocks.
        num_attention_heads: heads per block; must divide `hidden_size`.
        intermediate_size: width of the MLP inside each block (default 4 * hidden_size).
        hidden_act: MLP activation, one of gelu, gelu_tanh, relu, silu.
        max_position_embeddings: longest sequence the model is meant for, in tokens (the pretraining context
            length); only learned positions are bounded by it, NoPE reads any length.
        position_embedding_type: "none" (NoPE: causal attention alone orders the tokens) or "learned".
        dropout: dropout on the embeddings and on both residual branches.
        attention_dropout: dropout on the attention probabilities.
        bias: whether the linear layers carry biases.
        layer_norm_eps: epsilon of every LayerNorm.
        initializer_range: std of the normal init; residual projections get it / sqrt(2 * num_hidden_layers).
        embedding_layernorm: whether the user embedding (the final non-pad token's last hidden state) is
            standardized by a parameter-free LayerNorm, as nuFormer does before its heads.
        pooling: how the user embedding reads the last hidden states: "last" (the final real token's state) or
            "mean" (the average over every real token).
        tokenizer_fingerprint: fingerprint of the tokenizer the model was trained with; loaders refuse another.
        merged_tokens_base, merged_tokens_parts: composed embeddings of merged tokens (ActionPiece): the token
            `merged_tokens_base + r` enters the model as its own embedding plus the mean of the embeddings of
            `merged_tokens_parts[r]` (the original ids it stands for), so a rare merged token shares what its
            parts learn. None: every token is its own embedding only.
        pad_token_id, bos_token_id, eos_token_id, sep_token_id: the tokenizer's special ids.
        tie_word_embeddings: whether the LM head shares the token embedding matrix.
    """

    model_type: ClassVar[str] = "domain_transformer"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    vocab_size: int = 1024
    hidden_size: int = 256
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    position_embedding_type: str = "none"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    embedding_layernorm: bool = False
    pooling: str = "last"
    tokenizer_fingerprint: str | None = None
    merged_tokens_base: int | None = None
    merged_tokens_parts: list[list[int]] | None = None
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    sep_token_id: int | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = False

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        _check_hyperparameters(self)
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides: Any) -> DomainTransformerConfig:
        """Build a config from a named size (a key of PRESETS), the tokenizer's vocabulary and overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "vocab_size": vocab_size, **overrides})

    def architecture(self) -> dict[str, int]:
        """The size actually built (preset plus overrides), as recorded in metrics.json."""
        return {key: getattr(self, key) for key in ARCHITECTURE_KEYS}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _check_hyperparameters(config: DomainTransformerConfig) -> None:
    positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings")
    for name in positive:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) must be a multiple of num_attention_heads "
            f"({config.num_attention_heads})"
        )
    for name in ("dropout", "attention_dropout"):
        value = getattr(config, name)
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if config.position_embedding_type not in POSITION_EMBEDDING_TYPES:
        raise ValueError(
            f"position_embedding_type must be one of {POSITION_EMBEDDING_TYPES}, got {config.position_embedding_type!r}"
        )
    if config.pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {config.pooling!r}")
    if config.hidden_act not in HIDDEN_ACTS:
        raise ValueError(f"hidden_act must be one of {HIDDEN_ACTS}, got {config.hidden_act!r}")
    if not config.layer_norm_eps > 0 or not config.initializer_range > 0:
        raise ValueError("layer_norm_eps and initializer_range must be positive")
    parts = config.merged_tokens_parts
    if parts is not None:
        base = config.merged_tokens_base
        if not isinstance(base, int) or isinstance(base, bool) or not 0 < base or base + len(parts) > config.vocab_size:
            raise ValueError(f"merged_tokens_base must be an id with base + {len(parts)} merged tokens <= vocab_size="
                             f"{config.vocab_size}, got {base!r}")
        for r, ids in enumerate(parts):
            if not ids or any(not isinstance(i, int) or not 0 < i < base for i in ids):
                raise ValueError(f"merged_tokens_parts[{r}] must list original ids in [1, {base}), got {ids!r}")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id"):
        value = getattr(config, name)
        if value is not None and not 0 <= value < config.vocab_size:
            raise ValueError(f"{name} must be in [0, vocab_size={config.vocab_size}), got {value!r}")


__all__ = ["ARCHITECTURE_KEYS", "DomainTransformerConfig", "POOLINGS", "PRESETS"]
