"""Training checkpoints, as pretrain and finetune keep them: a directory beside the output, refused when its state
does not match the request (a fresh run over old checkpoints, or --resume without any)."""

from __future__ import annotations

from pathlib import Path

from domaintok.errors import ArtifactError


def checked_checkpoint_dir(checkpoint_dir: Path, resume: bool, pattern: str = "checkpoint-*") -> Path:
    """`checkpoint_dir`, refusing --resume without checkpoints (entries matching `pattern`) and a fresh run over
    old ones."""
    has_checkpoints = checkpoint_dir.is_dir() and any(checkpoint_dir.glob(pattern))
    if resume and not has_checkpoints:
        raise ArtifactError(f"{checkpoint_dir}: no checkpoint to resume from")
    if not resume and has_checkpoints:
        raise ArtifactError(f"{checkpoint_dir}: checkpoints exist; pass --resume to continue or delete them")
    return checkpoint_dir


def beside(output: Path) -> Path:
    """The default checkpoint directory of a job writing `output`: `<output>.checkpoints` next to it."""
    return output.with_name(output.name + ".checkpoints")


class CheckpointDirs:
    """For a job's settings with `output` and `checkpoint_dir` (None: beside the output) fields."""

    output: Path
    checkpoint_dir: Path | None

    def resolved_checkpoint_dir(self) -> Path:
        return self.checkpoint_dir or beside(self.output)


__all__ = ["CheckpointDirs", "checked_checkpoint_dir", "beside"]
