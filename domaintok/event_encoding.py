"""Events to token ids, the same for tokenize and the online encoder: every field's encoder side by side into a
padded token matrix, the previous-event step once rows are in time order, then the ragged ids each event keeps.

    matrix = encoding.encode_matrix(columns, n)      # per event, no context: any row order
    encoding.context.apply(...) / apply_sorted(...)  # needs the user's previous event (domaintok/context.py)
    matrix = encoding.merge(matrix)                   # ActionPiece merges of the fields' tokens, when fitted
    lengths, flat = compact(matrix)                   # nonzero cells in order, then [SEP]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from domaintok.context import EventContext
from domaintok.fields import FieldEncoder, TextEncoder
from domaintok.vocab import SEP_ID


class EventEncoding:
    """The placed field encoders of a tokenizer and the previous-event step over their matrix columns."""

    def __init__(self, encoders: Sequence[FieldEncoder], vocab_size: int, merges: Any | None = None):
        self.encoders = list(encoders)
        self.widths = [enc.width for enc in self.encoders]
        self.context = EventContext(self.encoders)
        self.merges = merges  # domaintok.actionpiece.ActionPiece or None
        # the cells ActionPiece treats as an event's set of tokens: every field's but the text pieces (a sequence)
        starts = np.cumsum([0, *self.widths])
        self.merge_columns = np.concatenate([
            np.arange(starts[k], starts[k + 1]) for k, enc in enumerate(self.encoders) if not isinstance(enc, TextEncoder)
        ] or [np.zeros(0, np.int64)])
        # cell type of the token matrix: 2 bytes while every id fits (the matrix is what a chunk holds in memory)
        self.token_dtype = np.uint16 if vocab_size <= 65536 else np.int32
        self.max_event_length = 1 + sum(enc.max_tokens_per_event for enc in self.encoders)  # + [SEP]

    def encode_matrix(self, columns: Sequence, n: int) -> np.ndarray:
        """Every field of n events side by side: (n, sum of field widths), 0 in unused cells, no [SEP]."""
        out = np.empty((n, sum(self.widths)), self.token_dtype)
        col = 0
        for enc, column, w in zip(self.encoders, columns, self.widths):
            out[:, col : col + w] = enc.encode_padded(column)
            col += w
        return out

    def merge(self, matrix: np.ndarray) -> np.ndarray:
        """The events with their field tokens segmented by the ActionPiece merges (deterministic; merged tokens first,
        then the rest, in decreasing id order), text pieces untouched in their cells; in place (both paths own the
        matrix they pass). Without merges: `matrix` as it is."""
        if self.merges is not None and len(matrix):
            matrix[:, self.merge_columns], _ = self.merges.segment(matrix[:, self.merge_columns])
        return matrix


def compact(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token matrix -> (event lengths int64[n] incl. [SEP], flat ids int32): nonzero cells in order, then [SEP]."""
    full = np.empty((len(matrix), matrix.shape[1] + 1), np.int32)
    full[:, :-1] = matrix
    full[:, -1] = SEP_ID
    nonzero = full != 0
    return nonzero.sum(axis=1).astype(np.int64), full[nonzero]
