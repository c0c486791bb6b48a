"""Models: the NoPE GPT encoder, PLR and DCNv2 tabular layers, joint fusion.

Names are imported on first use (PEP 562), so `import domaintok.models` costs nothing until a class is touched;
the Auto-class registration lives in `domaintok._autoregister` and happens when transformers' Auto modules load.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "PRESETS": "configuration_domain_transformer",
    "DomainTransformerConfig": "configuration_domain_transformer",
    "DomainTransformerPreTrainedModel": "modeling_domain_transformer",
    "DomainTransformerModel": "modeling_domain_transformer",
    "DomainTransformerForCausalLM": "modeling_domain_transformer",
    "PeriodicEmbeddings": "tabular",
    "CrossLayer": "tabular",
    "DCNv2": "tabular",
    "JointFusionConfig": "fusion",
    "JointFusionModel": "fusion",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
