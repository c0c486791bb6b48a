"""domaintok: foundation models over domain events.

The public API is importable from the package itself (`from domaintok import DomainTokenizer, load_schema`). Each
name is imported on first use (PEP 562), so `import domaintok` stays cheap and torch is imported only by code that
touches a model class.

Importing the package arranges for the domain transformer to be registered with transformers' Auto classes
(`domaintok._autoregister`), so `AutoModel.from_pretrained(dir)` works after `import domaintok` without
`trust_remote_code`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from domaintok import _autoregister
from domaintok._lazy import lazy_attributes

_autoregister.install()

# Public name -> the module that defines it (the model classes through `domaintok.models`, itself lazy).
_EXPORTS = {
    "DomainTokenizer": "domaintok.tokenizer",
    "DomainSchema": "domaintok.schema",
    "load_schema": "domaintok.schema",
    "schema_from_dict": "domaintok.schema",
    "DomaintokError": "domaintok.errors",
    "SchemaError": "domaintok.errors",
    "ArtifactError": "domaintok.errors",
    "EventError": "domaintok.errors",
    "DomainTransformerConfig": "domaintok.models",
    "DomainTransformerModel": "domaintok.models",
    "DomainTransformerForCausalLM": "domaintok.models",
    "JointFusionConfig": "domaintok.models",
    "JointFusionModel": "domaintok.models",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS)
