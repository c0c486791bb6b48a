"""The tokens of an event that depend on the user's previous event, computed in one step once events are in order.

Field encoders see one event at a time, so a temporal field leaves two things to this step: the time-since-previous
cell (the log-binned gap to the user's previous event) and, with `only_changes`, which calendar parts are emitted at
all. Both paths call `EventContext.apply` on a token matrix whose rows are in time order: the offline tokenizer after
sorting a chunk (the predecessor is the row above, within the same user), the online encoder after sorting a
micro-batch (the predecessor is the row above, or the user's newest stored event: its time and `state_cells`).

The `only_changes` rule is hierarchical: calendar parts are compared coarse to fine (year, quarter, month, dom, dow,
hour) and every part from the coarsest one that changed on is emitted, so a new day repeats its hour and a new month
its day, while the line items of one basket emit no calendar token and no gap token (their gap is zero).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from domaintok.fields import FieldEncoder, TemporalEncoder

# coarse to fine: a change of a part re-emits every finer part
_COARSENESS = {"year": 0, "quarter": 1, "month": 2, "dom": 3, "dow": 4, "hour": 5}
NO_PREVIOUS = np.iinfo(np.int64).min  # prev_ts of a user's first event
UNKNOWN_CELL = -1  # a previous event whose calendar cells are not known: every part counts as changed


@dataclass(frozen=True)
class PreviousEvent:
    """A user's newest event before an online micro-batch: its time (us) and its state cells (EventTokens.context;
    empty when not known, e.g. a window stored before the schema asked for them: every part then counts as changed)."""

    ts: int
    state: Sequence[int] = ()


@dataclass(frozen=True)
class _TemporalColumns:
    """Where one temporal field sits in the token matrix, and what this step does to it."""

    null_id: int  # the field's [F_NULL]: a null time gets neither calendar nor gap tokens
    first: int  # column of its first cell
    n_parts: int
    coarse_order: np.ndarray  # its part columns (relative to `first`), coarse to fine
    gap_col: int | None  # absolute column of the gap cell
    gap_first_id: int
    only_changes: bool
    state: slice  # its part cells within the state cells (only_changes fields only)


class EventContext:
    """The previous-event step of a tokenizer's fields; `active` is False when no field needs it."""

    def __init__(self, encoders: list[FieldEncoder]):
        fields: list[_TemporalColumns] = []
        col = n_state = 0
        for enc in encoders:
            p = enc.params
            if isinstance(enc, TemporalEncoder) and (p.time_since_previous or p.only_changes):
                n = len(p.parts)
                order = np.array(sorted(range(n), key=lambda j: _COARSENESS[p.parts[j]]), np.int64)
                state = slice(n_state, n_state + n) if p.only_changes else slice(n_state, n_state)
                n_state = state.stop
                fields.append(_TemporalColumns(
                    null_id=enc.base, first=col, n_parts=n, coarse_order=order,
                    gap_col=col + n if p.time_since_previous else None, gap_first_id=enc.gap_first_id,
                    only_changes=bool(p.only_changes), state=state,
                ))
            col += enc.width
        self._fields = fields
        self.n_state = n_state

    @property
    def active(self) -> bool:
        return bool(self._fields)

    def state_cells(self, matrix: np.ndarray) -> np.ndarray:
        """(n, n_state) int64: what a later event needs of each row (its calendar cells), read before `apply`."""
        out = np.empty((len(matrix), self.n_state), np.int64)
        for f in self._fields:
            out[:, f.state] = matrix[:, f.first : f.first + (f.state.stop - f.state.start)]
        return out

    def apply(self, matrix: np.ndarray, ts: np.ndarray, prev_ts: np.ndarray, prev_state: np.ndarray) -> None:
        """Fill the gap cells and drop unchanged calendar cells of `matrix` (n, width), in place.

        ts: int64[n] event times (us); prev_ts: int64[n] the time of each row's previous event of the same user
        (NO_PREVIOUS for a first event); prev_state: (n, n_state) that event's `state_cells` (UNKNOWN_CELL where
        not known). The rows need not be sorted: each row's predecessor is given.
        """
        self._apply(matrix, ts, prev_ts, lambda f, j: prev_state[:, f.state.start + j])

    def apply_sorted(self, matrix: np.ndarray, ts: np.ndarray, starts: np.ndarray) -> None:
        """`apply` to rows already in (user, time) order, each user's rows starting at `starts`: a row's predecessor
        is the row above (a user's first row emits every part, so what lies above it is never read)."""
        prev_ts = np.empty(len(ts), np.int64)
        prev_ts[1:] = ts[:-1]
        prev_ts[starts] = NO_PREVIOUS

        def above(f: _TemporalColumns, j: int) -> np.ndarray:
            col = matrix[:, f.first + j]
            return np.concatenate([col[:1], col[:-1]])

        self._apply(matrix, ts, prev_ts, above)

    def _apply(self, matrix: np.ndarray, ts: np.ndarray, prev_ts: np.ndarray,
               previous: Callable[[_TemporalColumns, int], np.ndarray]) -> None:
        """`previous(f, j)`: the previous event's cell of part j of field f, for every row (read before the part's
        cells change). Column by column: an accumulate along rows of a few cells is slower than a loop over them."""
        first = prev_ts == NO_PREVIOUS
        gap = np.where(first, -1, ts - np.where(first, 0, prev_ts))
        bins = None
        for f in self._fields:
            null = matrix[:, f.first] == f.null_id
            if f.only_changes and f.n_parts:
                emit = first | null  # null: a null time stays its single [F_NULL]
                for j in f.coarse_order.tolist():  # a part emits once it or a coarser part changed
                    col = matrix[:, f.first + j]
                    emit |= col != previous(f, j)
                    np.copyto(col, 0, where=~emit)
            if f.gap_col is not None:
                bins = TemporalEncoder.gap_bins(gap) if bins is None else bins
                cell = (bins + f.gap_first_id).astype(matrix.dtype)
                silent = null | (f.only_changes & (gap == 0))
                matrix[:, f.gap_col] = np.where(silent, 0, cell)
