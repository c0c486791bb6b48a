"""domaintok: foundation models over domain events.

Importing the package registers the domain transformer with transformers' Auto classes (in
`domaintok.models`), so `AutoModel.from_pretrained(dir)` works after `import domaintok` without
`trust_remote_code`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from domaintok import models as _models  # noqa: E402,F401  (registers the Auto classes)
