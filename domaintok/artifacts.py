"""The artifact rules, each written once: what every loader refuses before reading anything (files that execute
code when loaded, a model trained with another tokenizer), and how every job writes its outputs (aside, then
renamed into place, so a crash or a rerun never leaves half a file or half a directory).

Torch-free on purpose, so the tokenizer side (which never imports torch) and the model loaders share them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from domaintok.errors import ArtifactError

# The offline embeddings table (`domaintok embed`), declared once; writers enforce it, and the stream's
# table (`domaintok consume`) extends it.
EMBEDDINGS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
        pa.field("n_events", pa.int64(), nullable=False),
        pa.field("last_event_ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)

# Files that unpickle when loaded (arbitrary code execution).
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")


def pickle_files(directory: Path, *, recursive: bool = False) -> list[str]:
    """Sorted names of the files in `directory` (and below it when `recursive`) that match PICKLE_PATTERNS."""
    find = directory.rglob if recursive else directory.glob
    return sorted(p.name for pattern in PICKLE_PATTERNS for p in find(pattern))


def refuse_pickles(directory: Path, *, recursive: bool = False, kind: str = "files", prefix: str | None = None) -> None:
    """ArtifactError naming the pickle files in `directory`: loaders read safetensors and JSON only, and a directory
    holding a pickle did not come from our save_pretrained as it is. `kind` names them ("weights" in a model
    directory); `prefix` replaces the directory at the start of the message."""
    pickled = pickle_files(directory, recursive=recursive)
    if pickled:
        where = prefix if prefix is not None else str(directory)
        raise ArtifactError(f"{where}: refusing pickle {kind} {', '.join(pickled)} (safetensors and JSON only)")


def check_fingerprint(where: Path | str, trained_with: str | None, in_use: str | None) -> None:
    """ArtifactError when a model trained with tokenizer `trained_with` is about to read ids of tokenizer `in_use`
    (None: nothing to check)."""
    if in_use is not None and trained_with != in_use:
        raise ArtifactError(
            f"{where}: model was trained with tokenizer fingerprint {trained_with!r}, "
            f"but the tokenizer in use has {in_use!r}"
        )


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on any error it is removed."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; outputs get the usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty directory beside `path`; on success it replaces `path` (an earlier one is removed first),
    on any error it is removed."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a model dir is read by workers running as other users
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
