"""What every artifact loader refuses before reading anything: files that execute code when they are loaded.

Torch-free on purpose, so the tokenizer side (which never imports torch) and the model loaders share one list.
"""

from __future__ import annotations

from pathlib import Path

# Files that unpickle when loaded (arbitrary code execution).
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")


def pickle_files(directory: Path, *, recursive: bool = False) -> list[str]:
    """Sorted names of the files in `directory` (and below it when `recursive`) that match PICKLE_PATTERNS."""
    find = directory.rglob if recursive else directory.glob
    return sorted(p.name for pattern in PICKLE_PATTERNS for p in find(pattern))
