"""`PaddedBatch`: the one batch contract between data (offline, stream, benchmark) and the domain transformer.

Sequences of token ids are right-padded into (B, T) tensors; per-user metadata rides along, untouched by the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from domaintok.errors import DomaintokError


@dataclass(frozen=True)
class PaddedBatch:
    """B users' token sequences, right-padded to a common length T.

    Attributes:
        input_ids: LongTensor (B, T); row b holds its `lengths[b]` tokens, then `pad_token_id`.
        attention_mask: LongTensor (B, T); 1 on real tokens, 0 on padding.
        user_ids: the B user ids, in row order (empty strings when the caller had none).
        n_events: int64 (B,) every event of each user, including those truncated out of the window; or None.
        last_event_ts: int64 (B,) newest event time per user, microseconds since the epoch (UTC); or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    user_ids: list[str]
    n_events: np.ndarray | None = None
    last_event_ts: np.ndarray | None = None

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Sequence[int] | np.ndarray],
        pad_token_id: int,
        user_ids: Sequence[str] | None = None,
        n_events: Sequence[int] | np.ndarray | None = None,
        last_event_ts: Sequence[int] | np.ndarray | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> PaddedBatch:
        """Right-pad `sequences` (each a non-empty list/array of token ids) into one batch.

        `pad_to_multiple_of` rounds T up (e.g. 8 for tensor cores); metadata sequences must have one entry per
        sequence.
        """
        B = len(sequences)
        if B == 0:
            raise DomaintokError("PaddedBatch.from_sequences: no sequences given")
        arrays = [np.asarray(s, dtype=np.int64) for s in sequences]
        lengths = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=B)
        if (lengths == 0).any():
            first = int(np.flatnonzero(lengths == 0)[0])
            who = f" (user {user_ids[first]!r})" if user_ids is not None else ""
            raise DomaintokError(f"PaddedBatch.from_sequences: sequence {first}{who} is empty; every sequence starts with [BOS]")
        T = int(lengths.max())
        if pad_to_multiple_of:
            T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
        input_ids = np.full((B, T), pad_token_id, dtype=np.int64)  # (B, T)
        for row, array in enumerate(arrays):
            input_ids[row, : array.shape[0]] = array
        attention_mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)  # (B, T)
        return cls(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            user_ids=[""] * B if user_ids is None else [str(u) for u in _check_len("user_ids", user_ids, B)],
            n_events=None if n_events is None else np.asarray(_check_len("n_events", n_events, B), dtype=np.int64),
            last_event_ts=(
                None if last_event_ts is None
                else np.asarray(_check_len("last_event_ts", last_event_ts, B), dtype=np.int64)
            ),
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Real tokens per row, LongTensor (B,)."""
        return self.attention_mask.sum(dim=1)

    @property
    def padding_fraction(self) -> float:
        """Share of the (B, T) slots that are padding: compute spent on nothing."""
        return 1.0 - float(self.attention_mask.sum()) / max(self.attention_mask.numel(), 1)

    def to(self, device: torch.device | str) -> PaddedBatch:
        """The same batch with its tensors on `device` (metadata stays on the host)."""
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
        )


def _check_len(name: str, values, expected: int):
    if len(values) != expected:
        raise DomaintokError(f"PaddedBatch.from_sequences: {name} has {len(values)} entries for {expected} sequences")
    return values


__all__ = ["PaddedBatch"]
