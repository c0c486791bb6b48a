"""Models: the NoPE GPT encoder, PLR and DCNv2 tabular layers, joint fusion; Auto-class registration.

This is the one module that registers the domain transformer with transformers' Auto classes.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from domaintok.models.configuration_domain_transformer import PRESETS, DomainTransformerConfig
from domaintok.models.modeling_domain_transformer import (
    DomainTransformerForCausalLM,
    DomainTransformerModel,
    DomainTransformerPreTrainedModel,
)
from domaintok.models.fusion import JointFusionConfig, JointFusionModel
from domaintok.models.tabular import DCNv2, CrossLayer, PeriodicEmbeddings

AutoConfig.register(DomainTransformerConfig.model_type, DomainTransformerConfig, exist_ok=True)
AutoModel.register(DomainTransformerConfig, DomainTransformerModel, exist_ok=True)
AutoModelForCausalLM.register(DomainTransformerConfig, DomainTransformerForCausalLM, exist_ok=True)

__all__ = [
    "PRESETS",
    "DomainTransformerConfig",
    "DomainTransformerPreTrainedModel",
    "DomainTransformerModel",
    "DomainTransformerForCausalLM",
    "PeriodicEmbeddings",
    "CrossLayer",
    "DCNv2",
    "JointFusionConfig",
    "JointFusionModel",
]
