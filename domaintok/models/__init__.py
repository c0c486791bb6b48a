"""Models: the NoPE GPT encoder, PLR and DCNv2 tabular layers, joint fusion.

Names are imported on first use (PEP 562), so `import domaintok.models` costs nothing until a class is touched;
the Auto-class registration lives in `domaintok._autoregister` and happens when transformers' Auto modules load.
"""

from __future__ import annotations

from domaintok._lazy import lazy_attributes

_WHERE = {
    "PRESETS": "configuration_domain_transformer",
    "DomainTransformerConfig": "configuration_domain_transformer",
    "DomainTransformerPreTrainedModel": "modeling_domain_transformer",
    "DomainTransformerModel": "modeling_domain_transformer",
    "DomainTransformerForCausalLM": "modeling_domain_transformer",
    "PeriodicEmbeddings": "tabular",
    "CrossLayer": "tabular",
    "DCNv2": "tabular",
    "JointFusionConfig": "configuration_fusion",
    "JointFusionModel": "fusion",
}

__all__ = list(_WHERE)


__getattr__, __dir__ = lazy_attributes(globals(), {name: f".{module}" for name, module in _WHERE.items()})
