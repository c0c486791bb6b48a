"""The torch.distributed pieces both training jobs use under torchrun / accelerate launch (gloo on CPU, NCCL on GPU);
each is a no-op, or the single-process answer, when no process group was joined."""

from __future__ import annotations

import atexit
import os


def all_gather(value) -> list:
    """`value` from every rank, in rank order (any picklable object)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def leave_process_group() -> None:
    """End this process's part in the torchrun / accelerate process group, if it joined one, when the process exits.

    Not at once: a second job run in the same process (pretrain then finetune from one launcher) reuses the joined
    group. Destroying it and joining again would reuse the launcher store's keys, where a peer can still read the
    first group's (closed) addresses and fail with "connection refused"."""
    global _leave_registered
    import torch.distributed as dist

    if _leave_registered or not (dist.is_available() and dist.is_initialized()):
        return
    _leave_registered = True
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


_leave_registered = False


def is_rank_zero() -> bool:
    """True on the process that reports (rank 0, or the only process): the launcher sets RANK for the others."""
    return int(os.environ.get("RANK", "0")) == 0
