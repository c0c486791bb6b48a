"""domaintok: foundation models over domain events.

Importing the package arranges for the domain transformer to be registered with transformers' Auto classes
(`domaintok._autoregister`), so `AutoModel.from_pretrained(dir)` works after `import domaintok` without
`trust_remote_code`; torch is imported only by code that uses a model.
"""

from __future__ import annotations

__version__ = "0.1.0"

from domaintok import _autoregister

_autoregister.install()
