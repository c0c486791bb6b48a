"""ActionPiece (Hou et al., 2025, arXiv 2502.13581): ranked merges of field tokens that co-occur in an event, learned
from weighted pair counts, and the segmentation of events (vectorized) or whole sequences with them.

Each event is a small set of per-field token ids (ints in [1, 2**31), 0 is padding, distinct within an event). Training
counts every pair of tokens inside an event with weight 2/|A| and, with `cross_event=True`, every pair across adjacent
events with weight 1/(|A|*|B|) (A, B the events' current token sets), merges the heaviest pair into a new id, updates
the counts incrementally and repeats. Merge r joins pair (a, b) into the id `base + r`; a merged id stands for the
multiset of original ids it covers (`ActionPiece.covered`).

Weights are exact: every count is an int scaled by `scale` (a common multiple of all denominators), so ties are real
ties and go to the smaller pair (a, b), and the same input gives the same merges on any machine.

    model = fit_actionpiece(events, base=vocab_size, n_merges=2000)   # EventMergeTrainer (numpy) by default
    ids, lengths = model.segment(events)                              # deterministic, within events, vectorized
    ids, lengths = model.segment_spr(events, rng)                     # randomized (SPR), for training only
    units = model.segment_sequence(events_of_one_user)                # whole sequence, cross-event merges too
    ActionPiece.from_dict(model.to_dict())                            # state: JSON builtins

This module needs numpy and the standard library only.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from domaintok.errors import DomaintokError

FORMAT = "domaintok.actionpiece/1"
MAX_ID = 1 << 31  # ids are below this, so a pair (a, b), a <= b, packs into one int64 key a << 31 | b
_SHIFT = 31
_LOW = MAX_ID - 1
_ROW_CHUNK = 1 << 14  # rows per block when all pairs of many events are listed at once
_BATCH = 1 << 12  # pairs taken in as candidates per lowering of the candidate floor
_DENSE_PAIRS = 1 << 26  # most pairs of distinct ids for which training finds the distinct pairs through a table
_DENSE_LOOKUP = 1 << 24  # largest id for which segmentation maps ids through a dense table (else searchsorted)
_DEDUPE_SAMPLE = 1 << 15  # rows sampled to decide whether segmentation deduplicates events first
_ROUNDS_PER_MERGE = 4  # segmentation takes rounds over rows (not a sweep over merges) below merges / this rows

Pair = tuple[int, int]


# --- input checks and pair keys ---------------------------------------------------------------------------------


def _id_matrix(events: Any, what: str, top: int = MAX_ID - 1) -> np.ndarray:
    """A copy of events as a 2-D integer array with ids in [0, 2**31): in its own dtype where that holds `top` (the
    largest id the caller will write, e.g. a tokenizer's uint16 matrix), else int64."""
    arr = np.asarray(events)
    if arr.ndim != 2:
        raise DomaintokError(f"{what}: expected a 2-D (n_events, width) id matrix, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise DomaintokError(f"{what}: ids must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            row = int(np.argwhere(arr < 0)[0, 0])
            raise DomaintokError(f"{what}: event {row} has a negative id ({lo}); ids are >= 1 and 0 is padding")
        if hi >= MAX_ID:
            raise DomaintokError(f"{what}: id {hi} is not below 2**31")
    keep = arr.dtype.kind in "iu" and np.iinfo(arr.dtype).max >= top
    # C order: segmentation writes through a flat view (a column slice of a matrix is often Fortran-ordered)
    return np.array(arr, dtype=arr.dtype if keep else np.int64, order="C", copy=True)


def _check_distinct(sorted_rows: np.ndarray, what: str) -> None:
    """Raise on an id that occurs twice in one event (rows sorted along axis 1): an event is a set of tokens."""
    dup = (sorted_rows[:, 1:] == sorted_rows[:, :-1]) & (sorted_rows[:, 1:] != 0)
    if dup.any():
        row, col = (int(v) for v in np.argwhere(dup)[0])
        raise DomaintokError(f"{what}: event {row} has id {int(sorted_rows[row, col + 1])} twice; "
                             "the ids of an event must be distinct")


def _check_base(base: Any, n_merges: int = 0) -> int:
    if isinstance(base, bool) or not isinstance(base, (int, np.integer)) or base < 1:
        raise DomaintokError(f"actionpiece: base must be an int >= 1 (the first merged id), got {base!r}")
    if int(base) + n_merges > MAX_ID:
        raise DomaintokError(f"actionpiece: base {base} + {n_merges} merges does not fit below 2**31")
    return int(base)


def pair_key(a: int, b: int) -> int:
    """The int64 key of the unordered pair {a, b}: min << 31 | max (smaller pairs have smaller keys)."""
    return (min(a, b) << _SHIFT) | max(a, b)


def _unkey(key: int) -> Pair:
    return key >> _SHIFT, key & _LOW


@lru_cache(maxsize=64)
def _cell_pairs(width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells i < j of all pairs of a row of `width` cells, and touch[c] = which of those pairs use cell c."""
    i, j = np.triu_indices(width, k=1)
    touch = (i[None, :] == np.arange(width)[:, None]) | (j[None, :] == np.arange(width)[:, None])
    for arr in (i, j, touch):
        arr.flags.writeable = False
    return i, j, touch


def _row_pair_keys(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys (r, P) of all cell pairs of each row, and where both cells hold a token."""
    i, j, _ = _cell_pairs(tokens.shape[1])
    left, right = tokens[:, i].astype(np.int64), tokens[:, j].astype(np.int64)
    valid = (left > 0) & (right > 0)
    return (np.minimum(left, right) << _SHIFT) | np.maximum(left, right), valid


def _scale(max_size: int, cross_event: bool) -> int:
    """A common multiple of every weight denominator: |A| <= max_size inside events, |A|*|B| across them."""
    base = math.lcm(*range(1, max(max_size, 1) + 1))
    return base * base if cross_event else base


# --- the priority queue -----------------------------------------------------------------------------------------


class _PairQueue:
    """Max-queue of pairs by exact int count, ties to the smaller key, with lazy deletion.

    Entries are (-count, key); an entry is stale when its pair's count has changed since. Invariant: every pair with
    a positive count has an entry at least its count, so a popped entry equal to its pair's current count is the
    maximum. A count that rises is pushed again; one that drops needs no push: its older, higher entry is re-pushed
    with the current count when it is popped.
    """

    def __init__(self, count_of: Callable[[int], int], entries: Iterable[tuple[int, int]]):
        self._count_of = count_of
        self._heap = [(-count, key) for count, key in entries]
        heapq.heapify(self._heap)

    def push(self, count: int, key: int) -> None:
        heapq.heappush(self._heap, (-count, key))

    def pop(self) -> tuple[int, int] | None:
        """(count, key) of the heaviest pair, or None when no pair has a positive count."""
        while self._heap:
            neg, key = heapq.heappop(self._heap)
            current = self._count_of(key)
            if current == -neg:
                return current, key
            if current > 0:
                heapq.heappush(self._heap, (-current, key))
        return None

    def priorities(self) -> list[int]:
        """The counts the entries hold (all ints: no float ever orders two pairs)."""
        return [-neg for neg, _ in self._heap]


# --- training inside events (numpy) ------------------------------------------------------------------------------


class EventMergeTrainer:
    """Merges learned from pairs inside events only (cross_event=False), vectorized over a deduplicated event matrix.

    Events are independent here, so identical events (as sets) are kept once with a multiplicity. Each distinct pair
    gets a slot (its key and exact count); each event row keeps the slot of every pair of its cells, so a merge
    updates the counts of the affected rows with scatter-adds and never re-sorts them: when (a, b) becomes c in an
    event of size k, pairs with a or b lose weight w_k, the other pairs go from w_k to w_(k-1), and pairs (c, x) get
    new slots (c is a new id, so they cannot exist yet). The rows holding a token are found from a token -> rows
    index that is filtered lazily (a row that lost the token is dropped when the list is next read).
    """

    def __init__(self, events: Any, *, base: int):
        self.base = _check_base(base)
        mat = _id_matrix(events, "actionpiece fit").astype(np.int64, copy=False)
        canon = -np.sort(-mat, axis=1)  # a row's ids in decreasing order, padding last: one form per set
        _check_distinct(canon[:, ::-1], "actionpiece fit")
        if canon.size and int(canon.max()) >= self.base:
            raise DomaintokError(f"actionpiece fit: id {int(canon.max())} is not below base {base}; new ids would "
                                 "collide with the events' ids")
        self.n_events, self._width = mat.shape
        canon = canon[:, : max(int((canon > 0).sum(axis=1).max(initial=0)), 1)]  # no all-padding columns
        self.merges: list[Pair] = []
        self.counts: list[int] = []  # the scaled count of each merge when it was made
        first, self._inverse = distinct_rows(canon)
        self._tokens, mult = canon[first], np.bincount(self._inverse, minlength=len(first))
        self._size = (self._tokens > 0).sum(axis=1)
        max_size = int(self._size.max()) if self._size.size else 1
        self.scale = _scale(max_size, cross_event=False)
        exact64 = int(mult.sum()) * 2 * self.scale < 1 << 62
        self._dtype = np.int64 if exact64 else object  # object: Python ints, exact whatever the width
        self._mult = mult.astype(self._dtype)
        self._unit = np.array([0, 0] + [2 * self.scale // k for k in range(2, max_size + 1)], dtype=self._dtype)
        self._build_slots()
        self._build_index()
        self._floor = int(self._counts[: self._n_slots].max(initial=0)) + 1  # no candidates yet
        self._candidates = np.zeros(0, np.int64)
        self._is_candidate = np.zeros(len(self._counts), bool)

    def _build_slots(self) -> None:
        """Slot of every distinct pair (numbered in key order), the per-row slot matrix (-1: no pair), exact counts."""
        n_cols = len(_cell_pairs(self._tokens.shape[1])[0])
        self._slots = np.full((len(self._tokens), n_cols), -1, np.int32)
        ids = np.unique(self._tokens[self._tokens > 0])
        keys = self._dense_pair_slots(ids) if len(ids) ** 2 <= _DENSE_PAIRS else self._sorted_pair_slots()
        self._n_slots = len(keys)
        self._keys = np.zeros(max(16, 2 * len(keys)), np.int64)
        self._keys[: len(keys)] = keys
        self._counts = np.zeros(len(self._keys), self._dtype)
        for start in range(0, len(self._tokens), _ROW_CHUNK):
            rows = np.arange(start, min(start + _ROW_CHUNK, len(self._tokens)))
            slots = self._slots[rows]
            self._bump(slots, slots >= 0, self._mult[rows] * self._unit[self._size[rows]])

    def _dense_pair_slots(self, ids: np.ndarray) -> np.ndarray:
        """Distinct pairs found through a table over pairs of distinct ids (i * n + j): no sort of all pair keys."""
        n = len(ids)
        i, j, _ = _cell_pairs(self._tokens.shape[1])
        seen = np.zeros(n * n, bool)
        for start in range(0, len(self._tokens), _ROW_CHUNK):
            tokens = self._tokens[start : start + _ROW_CHUNK]
            compact = np.searchsorted(ids, tokens)
            left, right = compact[:, i], compact[:, j]
            dense = np.where((tokens[:, i] > 0) & (tokens[:, j] > 0), np.minimum(left, right) * n
                             + np.maximum(left, right), -1)
            self._slots[start : start + _ROW_CHUNK] = dense
            seen[dense[dense >= 0]] = True
        present = np.flatnonzero(seen)
        renumber = np.full(n * n + 1, -1, np.int32)  # the extra last entry maps -1 to -1
        renumber[present] = np.arange(len(present), dtype=np.int32)
        for start in range(0, len(self._tokens), _ROW_CHUNK):
            self._slots[start : start + _ROW_CHUNK] = renumber[self._slots[start : start + _ROW_CHUNK]]
        return (ids[present // n] << _SHIFT) | ids[present % n]

    def _sorted_pair_slots(self) -> np.ndarray:
        """Distinct pairs by sorting the pair keys (when there are too many distinct ids for a table)."""
        parts = [np.unique(k[v]) for k, v in (_row_pair_keys(t) for t in self._chunks(self._tokens))]
        keys = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        for start in range(0, len(self._tokens), _ROW_CHUNK):
            k, valid = _row_pair_keys(self._tokens[start : start + _ROW_CHUNK])
            self._slots[start : start + _ROW_CHUNK] = np.where(valid, np.searchsorted(keys, k), -1)
        return keys

    @staticmethod
    def _chunks(mat: np.ndarray) -> Iterable[np.ndarray]:
        return (mat[s : s + _ROW_CHUNK] for s in range(0, len(mat), _ROW_CHUNK))

    def _build_index(self) -> None:
        flat = self._tokens.reshape(-1)
        cells = np.flatnonzero(flat)
        order = np.argsort(flat[cells], kind="stable")
        toks, rows = flat[cells][order], cells[order] // max(self._tokens.shape[1], 1)
        uniq, starts = np.unique(toks, return_index=True)
        parts = np.split(rows, starts[1:]) if uniq.size else []
        self._index: dict[int, np.ndarray] = dict(zip(uniq.tolist(), parts, strict=True))

    def _bump(self, slots: np.ndarray, mask: np.ndarray, per_row: np.ndarray) -> None:
        """counts[slot] += per_row[row] for every masked cell pair (repeated slots add up)."""
        np.add.at(self._counts, slots[mask], np.broadcast_to(per_row[:, None], slots.shape)[mask])

    def _top(self) -> tuple[int, int] | None:
        """(count, slot) of the heaviest pair (ties: the smaller key), or None when no count is positive.

        Every pair counted at least `floor` is a candidate, so a candidate at or above the floor is the maximum.
        This plays the part of a lazy-deletion heap (stale candidates are simply outweighed), but one numpy max
        over a few thousand candidates per merge costs less than pushing every raised pair: a merge raises the
        count of every other pair of each event it touches.
        """
        while True:
            if self._candidates.size:
                counts = self._counts[self._candidates]
                best = counts.max()
                if best > 0 and best >= self._floor:
                    tied = self._candidates[counts == best]
                    return int(best), int(tied[np.argmin(self._keys[tied])])
            if self._floor <= 1:
                return None
            self._lower_floor()

    def _lower_floor(self) -> None:
        """Take the next batch of heaviest pairs below the floor as candidates (all of them near the end)."""
        counts = self._counts[: self._n_slots]
        below = counts[(counts > 0) & (counts < self._floor)]
        self._floor = 1 if below.size <= _BATCH else int(np.partition(below, below.size - _BATCH)[-_BATCH])
        self._candidates = np.flatnonzero(counts >= self._floor)
        self._is_candidate[:] = False
        self._is_candidate[self._candidates] = True

    def step(self) -> Pair | None:
        """Make the next merge (the heaviest pair; ties: the smaller pair); None when no pair is left."""
        if self.base + len(self.merges) >= MAX_ID:
            raise DomaintokError("actionpiece fit: no id below 2**31 is left for another merge")
        top = self._top()
        if top is None:
            return None
        count, slot = top
        a, b = _unkey(int(self._keys[slot]))
        self._merge_rows(self._rows_with(a, b), a, b, self.base + len(self.merges))
        self.merges.append((a, b))
        self.counts.append(count)
        return a, b

    def _rows_with(self, a: int, b: int) -> np.ndarray:
        """Sorted rows holding both a and b, read from the shorter of the two index lists (pruned on the way)."""
        short, other = (a, b) if len(self._index.get(a, ())) <= len(self._index.get(b, ())) else (b, a)
        rows = self._index.get(short, np.zeros(0, np.int64))
        rows = rows[(self._tokens[rows] == short).any(axis=1)]
        self._index[short] = rows
        return rows[(self._tokens[rows] == other).any(axis=1)]

    def _merge_rows(self, rows: np.ndarray, a: int, b: int, c: int) -> None:
        """Replace a, b by c in `rows` and move the counts of their pairs accordingly."""
        tokens, slots = self._tokens[rows], self._slots[rows]
        ca, cb = np.argmax(tokens == a, axis=1), np.argmax(tokens == b, axis=1)
        w_old = self._mult[rows] * self._unit[self._size[rows]]
        w_new = self._mult[rows] * self._unit[self._size[rows] - 1]
        _, _, touch = _cell_pairs(tokens.shape[1])
        valid, ta, tb = slots >= 0, touch[ca], touch[cb]
        rest = valid & ~ta & ~tb
        self._bump(slots, rest, w_new - w_old)  # same pairs, in an event one token smaller
        self._bump(slots, valid & (ta | tb), -w_old)  # pairs with a or b are gone
        first = self._add_pairs_with(c, tokens, slots, valid & ta & ~tb, ca, w_new)
        slots[valid & tb] = -1
        arange = np.arange(len(rows))
        tokens[arange, ca], tokens[arange, cb] = c, 0
        self._tokens[rows], self._slots[rows] = tokens, slots
        self._size[rows] -= 1
        self._index[c] = rows
        self._take_raised(np.concatenate([slots[rest], np.arange(first, self._n_slots)]))

    def _add_pairs_with(self, c: int, tokens: np.ndarray, slots: np.ndarray, mask: np.ndarray, ca: np.ndarray,
                        w_new: np.ndarray) -> int:
        """New slots for the pairs (x, c) of the masked cell pairs (those with cell ca); returns the first one."""
        row, col = np.nonzero(mask)
        i, j, _ = _cell_pairs(tokens.shape[1])
        partners = tokens[row, i[col] + j[col] - ca[row]].astype(np.int64)
        uniq, inv = np.unique(partners, return_inverse=True)
        first = self._n_slots
        self._grow(first + len(uniq))
        self._keys[first : first + len(uniq)] = (uniq << _SHIFT) | c  # c is the largest id so far
        np.add.at(self._counts, first + inv, w_new[row])
        slots[row, col] = first + inv
        self._n_slots = first + len(uniq)
        return first

    def _grow(self, size: int) -> None:
        if size > len(self._keys):
            extra = max(size, 2 * len(self._keys)) - len(self._keys)
            self._keys = np.concatenate([self._keys, np.zeros(extra, np.int64)])
            self._counts = np.concatenate([self._counts, np.zeros(extra, self._dtype)])
            self._is_candidate = np.concatenate([self._is_candidate, np.zeros(extra, bool)])

    def _take_raised(self, slots: np.ndarray) -> None:
        """Make candidates of the pairs whose count just rose to the floor or above (keeps `_top`'s invariant)."""
        slots = slots[self._counts[slots] >= self._floor]
        slots = np.unique(slots[~self._is_candidate[slots]])
        self._is_candidate[slots] = True
        self._candidates = np.concatenate([self._candidates, slots])
        if self._candidates.size > 8 * _BATCH:  # drop the ones that fell below the floor
            keep = self._counts[self._candidates] >= self._floor
            self._is_candidate[self._candidates[~keep]] = False
            self._candidates = self._candidates[keep]

    def train(self, n_merges: int) -> ActionPiece:
        """Merge until `n_merges` merges exist (fewer when pairs run out); the model so far."""
        while len(self.merges) < n_merges and self.step() is not None:
            pass
        return self.result()

    def result(self) -> ActionPiece:
        return ActionPiece(self.merges, base=self.base, cross_event=False)

    def pair_counts(self) -> dict[Pair, int]:
        """The incrementally maintained count of every pair with a positive count (scaled by `scale`)."""
        live = np.flatnonzero(self._counts[: self._n_slots] != 0)
        return {_unkey(k): int(c) for k, c in zip(self._keys[live].tolist(), self._counts[live].tolist(),
                                                   strict=True)}

    def recount(self) -> dict[Pair, int]:
        """The same counts recomputed from scratch over the current events, plainly (O(corpus), for checks)."""
        out: Counter[Pair] = Counter()
        for row, mult in zip(self._tokens.tolist(), self._mult.tolist(), strict=True):
            ids = sorted(t for t in row if t)
            for n, x in enumerate(ids):
                for y in ids[n + 1 :]:
                    out[(x, y)] += mult * 2 * self.scale // len(ids)
        return dict(out)

    def segmented(self) -> tuple[np.ndarray, np.ndarray]:
        """The training events as the merges made so far left them (input order), laid out as `ActionPiece.segment`
        lays them out."""
        out = np.zeros((len(self._inverse), self._width), np.int64)
        out[:, : self._tokens.shape[1]] = np.sort(self._tokens[self._inverse], axis=1)[:, ::-1]
        return out, (out != 0).sum(axis=1)


# --- sequences with context slots (plain Python; cross-event merges) ---------------------------------------------


class _Sequence:
    """Events (sets of ids) in time order and the context slot between each two (0: empty, else one merged id).

    A cross-event merge puts its new id into the slot between the two events (as in the paper); the slot's id then
    pairs with both neighbours (weight 1/|A|), which no longer pair with each other. An event left empty takes the
    token of an adjacent slot (the earlier one first), or is removed when both slots are empty.
    """

    def __init__(self, events: list[set[int]]):
        self.events = [e for e in events if e]
        self.slots = [0] * max(len(self.events) - 1, 0)

    def pair_counts(self, scale: int, cross_event: bool) -> dict[int, int]:
        """Scaled weight of each pair key: 2/|A| inside events; 1/(|A||B|) or 1/|A| (via a slot) across them."""
        out: Counter[int] = Counter()
        for event in self.events:
            ids, w = sorted(event), 2 * scale // len(event)
            for n, x in enumerate(ids):
                for y in ids[n + 1 :]:
                    out[pair_key(x, y)] += w
        if cross_event:
            for left, slot, right in zip(self.events, self.slots, self.events[1:], strict=False):
                if slot:
                    for side in (left, right):
                        for x in side:
                            out[pair_key(x, slot)] += scale // len(side)
                else:
                    w = scale // (len(left) * len(right))
                    for x in left:
                        for y in right:
                            out[pair_key(x, y)] += w
        return dict(out)

    def merge(self, a: int, b: int, c: int, cross_event: bool) -> None:
        """Join every occurrence of (a, b) into c, left to right, until none is left (removing an emptied event can
        make two events adjacent and form the pair again)."""
        while self._sweep(a, b, c, cross_event):
            self._fill_empty()

    def _sweep(self, a: int, b: int, c: int, cross_event: bool) -> bool:
        changed = False
        for n, event in enumerate(self.events):
            if a != b and a in event and b in event:
                event -= {a, b}
                event.add(c)
                changed = True
            if not cross_event or n == len(self.slots):
                continue
            right, slot = self.events[n + 1], self.slots[n]
            if slot:
                for side in (event, right):
                    for mine, theirs in ((a, b), (b, a)):
                        if slot == mine and theirs in side:
                            side.discard(theirs)
                            slot, changed = c, True
                self.slots[n] = slot
            else:
                for x, y in ((a, b), (b, a)):
                    if x in event and y in right:
                        event.discard(x)
                        right.discard(y)
                        self.slots[n], changed = c, True
                        break
        return changed

    def _fill_empty(self) -> None:
        n = 0
        while n < len(self.events):
            if self.events[n]:
                n += 1
            elif n > 0 and self.slots[n - 1]:
                self.events[n], self.slots[n - 1] = {self.slots[n - 1]}, 0
            elif n < len(self.slots) and self.slots[n]:
                self.events[n], self.slots[n] = {self.slots[n]}, 0
            else:  # both neighbouring slots empty: drop the event and one of them
                del self.events[n]
                if self.slots:
                    del self.slots[min(n, len(self.slots) - 1)]

    def units(self) -> list[list[int]]:
        """Events and filled slots in order, each as sorted ids."""
        out = [sorted(self.events[0])] if self.events else []
        for slot, event in zip(self.slots, self.events[1:], strict=True):
            out += [[slot]] if slot else []
            out.append(sorted(event))
        return out


def _sequence_bounds(sequence_lengths: Any, n_events: int, what: str) -> list[int]:
    """Start of each sequence and the end: sequences are consecutive runs of rows."""
    lengths = np.asarray(sequence_lengths if sequence_lengths is not None else [n_events])
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or (lengths < 0).any() or int(lengths.sum()) != n_events:
        raise DomaintokError(f"{what}: sequence_lengths must be ints >= 0 that sum to the {n_events} events")
    return np.concatenate([[0], np.cumsum(lengths)]).tolist()


def _split_sequences(events: Any, sequence_lengths: Any, what: str) -> list[_Sequence]:
    mat = _id_matrix(events, what).astype(np.int64, copy=False)
    _check_distinct(np.sort(mat, axis=1), what)
    bounds = _sequence_bounds(sequence_lengths, len(mat), what)
    rows = [{t for t in row if t} for row in mat.tolist()]
    return [_Sequence(rows[s:e]) for s, e in itertools.pairwise(bounds)]


class SequenceMergeTrainer:
    """Merges over whole sequences, counting cross-event pairs when `cross_event` (the paper's counting).

    Plain Python: after a merge, each sequence holding the pair is re-counted and its difference applied to the
    totals, the pair -> sequences index and the queue (as the reference implementation does). Slower than
    `EventMergeTrainer`; with cross_event=False both learn the same merges.
    """

    def __init__(self, events: Any, sequence_lengths: Any = None, *, base: int, cross_event: bool = True):
        self._seqs = _split_sequences(events, sequence_lengths, "actionpiece fit")
        self.base, self.cross_event = _check_base(base), bool(cross_event)
        top_id = max((max(e) for s in self._seqs for e in s.events), default=0)
        if top_id >= self.base:
            raise DomaintokError(f"actionpiece fit: id {top_id} is not below base {base}; new ids would collide")
        max_size = max((len(e) for s in self._seqs for e in s.events), default=1)
        self.scale = _scale(max_size, self.cross_event)
        self.merges: list[Pair] = []
        self.counts: list[int] = []
        self._seq_counts = [s.pair_counts(self.scale, self.cross_event) for s in self._seqs]
        self._totals: dict[int, int] = {}
        self._where: dict[int, set[int]] = {}
        for n, counts in enumerate(self._seq_counts):
            for key, w in counts.items():
                self._totals[key] = self._totals.get(key, 0) + w
                self._where.setdefault(key, set()).add(n)
        self._queue = _PairQueue(lambda key: self._totals.get(key, 0), ((w, k) for k, w in self._totals.items()))

    def step(self) -> Pair | None:
        """Make the next merge (the heaviest pair; ties: the smaller pair); None when no pair is left."""
        if self.base + len(self.merges) >= MAX_ID:
            raise DomaintokError("actionpiece fit: no id below 2**31 is left for another merge")
        top = self._queue.pop()
        if top is None:
            return None
        count, key = top
        a, b = _unkey(key)
        c = self.base + len(self.merges)
        delta: Counter[int] = Counter()
        for n in sorted(self._where.get(key, ())):
            self._seqs[n].merge(a, b, c, self.cross_event)
            new = self._seqs[n].pair_counts(self.scale, self.cross_event)
            old = self._seq_counts[n]
            for k in old.keys() | new.keys():
                delta[k] += new.get(k, 0) - old.get(k, 0)
                if k not in new:
                    self._where[k].discard(n)
                elif k not in old:
                    self._where.setdefault(k, set()).add(n)
            self._seq_counts[n] = new
        self._apply(delta)
        self.merges.append((a, b))
        self.counts.append(count)
        return a, b

    def _apply(self, delta: Counter[int]) -> None:
        for key, d in sorted(delta.items()):
            total = self._totals.get(key, 0) + d
            if total:
                self._totals[key] = total
            else:
                self._totals.pop(key, None)
                self._where.pop(key, None)
            if d > 0:
                self._queue.push(total, key)

    def train(self, n_merges: int) -> ActionPiece:
        """Merge until `n_merges` merges exist (fewer when pairs run out); the model so far."""
        while len(self.merges) < n_merges and self.step() is not None:
            pass
        return self.result()

    def result(self) -> ActionPiece:
        return ActionPiece(self.merges, base=self.base, cross_event=self.cross_event)

    def pair_counts(self) -> dict[Pair, int]:
        """The incrementally maintained count of every pair with a positive count (scaled by `scale`)."""
        return {_unkey(k): w for k, w in self._totals.items()}

    def recount(self) -> dict[Pair, int]:
        """The same counts recomputed from scratch over the current sequences (O(corpus), for checks)."""
        out: Counter[Pair] = Counter()
        for seq in self._seqs:
            for key, w in seq.pair_counts(self.scale, self.cross_event).items():
                out[_unkey(key)] += w
        return dict(out)

    def queue_priorities(self) -> list[int]:
        return self._queue.priorities()

    def segmented(self) -> list[list[list[int]]]:
        """Each training sequence as the merges made so far left it (as `ActionPiece.segment_sequence` gives)."""
        return [seq.units() for seq in self._seqs]


def fit_actionpiece(events: Any, *, base: int, n_merges: int | None = None, vocab_size: int | None = None,
                    cross_event: bool = False, sequence_lengths: Any = None) -> ActionPiece:
    """Learn ActionPiece merges from events (n_events, width) of per-field ids (0: padding), in time order.

    base: the first merged id (above every id of the events; the tokenizer passes its vocabulary size).
    n_merges / vocab_size: how many merges to learn (give one); vocab_size counts ids below it: base + n_merges.
        Training stops earlier when no pair is left.
    cross_event: also count pairs across adjacent events (the paper); needs `sequence_lengths` (consecutive runs
        of rows). Merges learned across events are applied only by `ActionPiece.segment_sequence`.
    """
    if (n_merges is None) == (vocab_size is None):
        raise DomaintokError("actionpiece fit: give exactly one of n_merges and vocab_size")
    target = n_merges if n_merges is not None else (vocab_size or 0) - _check_base(base)
    if target < 0:
        raise DomaintokError(f"actionpiece fit: vocab_size {vocab_size} is below base {base}")
    _check_base(base, target)
    if cross_event:
        if sequence_lengths is None:
            raise DomaintokError("actionpiece fit: cross_event=True needs sequence_lengths (events per sequence)")
        return SequenceMergeTrainer(events, sequence_lengths, base=base, cross_event=True).train(target)
    trainer = EventMergeTrainer(events, base=base)
    if sequence_lengths is not None:  # not needed inside events, but a wrong split is still an error
        _sequence_bounds(sequence_lengths, trainer.n_events, "actionpiece fit")
    return trainer.train(target)


# --- the learned merges and segmentation ------------------------------------------------------------------------


def distinct_rows(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, inverse): the index of the first occurrence of each distinct row of a 2-D integer matrix (in order of
    first occurrence), and for every row the position of its distinct row, so `mat[first][inverse]` equals `mat`.

    Exact and vectorized: each row's bytes are one fixed-size binary value, hashed by Arrow's dictionary encoding
    (linear time; it numbers values in order of first occurrence, which is checked, with the sorting method below
    as the fallback)."""
    n = len(mat)
    if n and mat.shape[1]:
        rows = np.ascontiguousarray(mat)
        width = rows.shape[1] * rows.itemsize
        values = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(rows)])
        inverse = values.dictionary_encode().indices.to_numpy().astype(np.int64)
        newest = np.maximum.accumulate(inverse)
        step = np.diff(newest, prepend=-1)
        if step.max() <= 1:  # each new code is the next number: code c first occurs where the running max reaches c
            return np.flatnonzero(step), inverse
    return _distinct_rows_sorted(mat)


def _distinct_rows_sorted(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """distinct_rows by sorting: each column is densified to codes 0..k-1 (a bincount over its values), the codes are
    packed into one int64 key per row (mixed radix; when the next column would overflow 62 bits, the key so far is
    densified the same way first), and the keys are sorted once."""
    n = len(mat)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    key, span = np.zeros(n, np.int64), 1
    for j in range(mat.shape[1]):
        codes, card = _dense_codes(mat[:, j])
        if span * card >= 1 << 62:
            key, span = _dense_codes(key)
        key, span = key * card + codes, span * card
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # distinct rows in order of first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse.reshape(-1)]


def _few_repeats(mat: np.ndarray) -> bool:
    """Whether at least 90% of the rows of an evenly strided sample (2**15 rows) are distinct. A matrix repeats its
    rows at least as often as such a sample of it does, so where this is False deduplication pays off."""
    if len(mat) <= _DEDUPE_SAMPLE:
        return False
    sample = mat[:: len(mat) // _DEDUPE_SAMPLE]
    return len(distinct_rows(sample)[0]) >= 0.9 * len(sample)


def _dense_codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Codes 0..k-1 of a column's distinct values, in value order, and k."""
    values = values.astype(np.int64, copy=False)
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < 1 << 22:  # a small range: a table over it
        shifted = values - lo
        present = np.bincount(shifted, minlength=hi - lo + 1) > 0
        table = np.cumsum(present) - 1
        return table[shifted], int(present.sum())
    distinct, codes = np.unique(values, return_inverse=True)
    return codes.reshape(-1), len(distinct)


def _compact(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids moved to the front of each row (their order kept), zeros after; and the row lengths."""
    present = (mat != 0).reshape(-1)
    lengths = present.reshape(mat.shape).sum(axis=1)
    out = np.zeros_like(mat)
    if mat.size:
        # one running count over the flat matrix (a cumsum along short rows is slow), minus the rows before
        seen = np.cumsum(present)
        cells = np.flatnonzero(present)
        rows = cells // mat.shape[1]
        before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        out.reshape(-1)[rows * mat.shape[1] + seen[cells] - 1 - before[rows]] = mat.reshape(-1)[cells]
    return out, lengths


class ActionPiece:
    """Learned merges in rank order: merge r joins the pair (a, b) into the id `base + r`.

    A merge's operands are original ids (below base) or earlier merged ids. State is plain JSON builtins
    (`to_dict` / `from_dict`). Segmentation is deterministic (`segment`, vectorized, within events; or
    `segment_sequence`, one whole sequence, also applying cross-event merges) or randomized for training-time
    augmentation (`segment_spr`).
    """

    def __init__(self, merges: Iterable[Sequence[int]], *, base: int, cross_event: bool = False):
        pairs = [tuple(int(v) for v in m) for m in merges]
        self.base, self.cross_event = _check_base(base, len(pairs)), bool(cross_event)
        self.merges: tuple[Pair, ...] = tuple(self._checked(pairs))  # type: ignore[arg-type]
        self.end = self.base + len(self.merges)
        self._rank = {m: r for r, m in enumerate(self.merges)}
        self._covered: list[tuple[int, ...]] = []
        for a, b in self.merges:
            self._covered.append(tuple(sorted(self.covered(a) + self.covered(b))))
        keys = np.array([pair_key(a, b) for a, b in self.merges if a != b], np.int64)
        ranks = np.array([r for r, (a, b) in enumerate(self.merges) if a != b], np.int64)
        order = np.argsort(keys)
        self._sorted_keys, self._sorted_ranks = keys[order], ranks[order]
        operands = np.array([v for a, b in self.merges if a != b for v in (a, b)], np.int64)
        self._originals = np.unique(operands[operands < self.base])
        self._reused = np.zeros(len(self.merges), bool)
        self._reused[operands[operands >= self.base] - self.base] = True
        self._lookup: np.ndarray | None = None

    def _checked(self, pairs: list[tuple[int, ...]]) -> Iterable[Pair]:
        seen: set[Pair] = set()
        for r, pair in enumerate(pairs):
            if len(pair) != 2:
                raise DomaintokError(f"actionpiece: merge {r} must be a pair of ids, got {list(pair)}")
            a, b = pair
            if not 1 <= a <= b < self.base + r or (a == b and not self.cross_event) or pair in seen:
                raise DomaintokError(f"actionpiece: merge {r} {list(pair)} is invalid: need 1 <= a < b < base + {r} "
                                     "(a == b only with cross_event), and no repeated merge")
            seen.add((a, b))
            yield a, b

    @property
    def n_merges(self) -> int:
        return len(self.merges)

    @property
    def merged_parts(self) -> list[tuple[int, ...]]:
        """For each merged id in rank order (`base + r`), the original ids it stands for, sorted."""
        return list(self._covered)

    def covered(self, token: int) -> tuple[int, ...]:
        """The original ids a token stands for, sorted (itself for an original id)."""
        if not 1 <= token < self.end:
            raise DomaintokError(f"actionpiece: id {token} is neither an original id (1..{self.base - 1}) nor a "
                                 f"merged one ({self.base}..{self.end - 1})")
        return (token,) if token < self.base else self._covered[token - self.base]

    def decode(self, ids: Iterable[int]) -> tuple[int, ...]:
        """The multiset of original ids that `ids` stand for, as a sorted tuple (0 = padding is skipped)."""
        return tuple(sorted(t for i in ids if i for t in self.covered(int(i))))

    def prefix(self, n_merges: int) -> ActionPiece:
        """The model with only its first `n_merges` merges (what training to that size gives)."""
        return ActionPiece(self.merges[: max(0, n_merges)], base=self.base, cross_event=self.cross_event)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "base": self.base, "cross_event": self.cross_event,
                "merges": [[a, b] for a, b in self.merges]}

    @classmethod
    def from_dict(cls, state: Any) -> ActionPiece:
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise DomaintokError(f"actionpiece: not a {FORMAT} state")
        merges = state.get("merges")
        if not isinstance(merges, list) or not all(isinstance(m, list) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in m) for m in merges):
            raise DomaintokError("actionpiece: state 'merges' must be a list of [a, b] int pairs")
        return cls(merges, base=state.get("base"), cross_event=bool(state.get("cross_event", False)))

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): the same merges give the same bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def _input(self, events: Any, what: str) -> np.ndarray:
        mat = _id_matrix(events, what, top=self.end - 1)
        if self.n_merges and mat.size and int(mat.max()) >= self.base and ((mat >= self.base) & (mat < self.end)).any():
            raise DomaintokError(f"{what}: the events hold merged ids ({self.base}..{self.end - 1}); segment the "
                                 "original ids")
        return mat

    # segmentation inside events, vectorized

    def segment(self, events: Any) -> tuple[np.ndarray, np.ndarray]:
        """Deterministic segmentation of each row (an event's ids, any order, 0: empty) with the within-event merges.

        Returns the segmented ids (same shape; same dtype where it holds the merged ids, else int64; each row's ids
        in decreasing order, zeros after) and the row lengths.
        Per row this is "apply the lowest-ranked merge whose pair is present, repeat": a merge can only enable
        later ones (its new id is newer than every earlier merge), so it equals applying the merges once each in
        rank order, which is done for all rows at once: each merge reads the rows holding its rarer operand from a
        token -> cells index and looks its other operand up in that row, so the work follows the merges that apply.
        """
        rows = mat = self._input(events, "actionpiece segment")
        first = inverse = None
        if self.n_merges and mat.size:
            # a row's segmentation depends on its ids alone, and events repeat (one basket's lines share the date
            # and country tokens, the same product recurs): segment each distinct row once (finding them costs
            # about a quarter of a sweep over all rows, so not where nearly all rows are distinct)
            if not _few_repeats(mat):
                first, inverse = distinct_rows(mat)
                rows = mat[first]
            if len(rows) * _ROUNDS_PER_MERGE < self.n_merges:
                self._segment_rounds(rows)
            else:
                self._segment_sweep(rows, origin=first)
        rows = np.sort(rows, axis=1)[:, ::-1]  # ids decreasing (merged first), zeros last
        lengths = (rows != 0).sum(axis=1)
        if inverse is None:
            return np.ascontiguousarray(rows), lengths
        return rows[inverse], lengths[inverse]

    def _segment_sweep(self, mat: np.ndarray, origin: np.ndarray | None = None) -> None:
        """Every merge once, in rank order, over all rows (in place): the cost follows the rows each merge touches,
        plus a few microseconds per merge. `origin`: the event number of each row, for errors.

        Field encoders put a field's tokens in fixed cells, so an id usually sits in one column of every row that
        holds it (its home); a merge of two such ids finds the partner of each of its rarer operand's cells at a
        fixed offset in the same row. A merge with an id seen in several columns looks the partner up by binary
        search in the other operand's cell list instead."""
        flat, width = mat.reshape(-1), mat.shape[1]
        cells, home = self._operand_cells(flat, width, origin)
        for r, (a, b) in enumerate(self.merges):
            if a == b:
                continue
            c, keep_new = self.base + r, bool(self._reused[r])
            ha, hb = home.get(a), home.get(b)
            offset = hb - ha if ha is not None and hb is not None else None
            _sweep_merge(flat, width, cells, (a, b, c), keep_new, offset)
            if keep_new and ha is not None:
                home[c] = ha  # c only ever takes a's cells

    def _segment_rounds(self, mat: np.ndarray) -> None:
        """Rounds over all rows at once (in place): each row applies its present merge of lowest rank, looked up
        among all its cell pairs; at most width - 1 rounds. Independent of the number of merges, so it serves
        small batches (the online path), where a sweep over thousands of merges would cost more."""
        i, j, _ = _cell_pairs(mat.shape[1])
        active = np.arange(len(mat))
        while active.size:
            rows = mat[active]
            ranks = self._ranks_of(rows[:, i], rows[:, j])
            at = ranks.argmin(axis=1)
            best = ranks[np.arange(len(rows)), at]
            keep = best < self.n_merges
            active, rows, at, best = active[keep], rows[keep], at[keep], best[keep]
            picked = np.arange(len(rows))
            rows[picked, i[at]], rows[picked, j[at]] = self.base + best, 0
            mat[active] = rows

    def _operand_cells(self, flat: np.ndarray, width: int, origin: np.ndarray | None = None
                       ) -> tuple[dict[int, np.ndarray], dict[int, int]]:
        """For each original id that some merge uses: its cells (flat indices, ascending) in the matrix; and for
        those of them found in one column only, that column (its home)."""
        index = self._operand_index(flat).reshape(-1, width)
        n_ops = len(self._originals)
        cell_type = np.int32 if flat.size < MAX_ID else np.int64
        pieces: dict[int, list[tuple[int, np.ndarray]]] = {}
        for k in range(width):
            column = index[:, k]
            counts = np.bincount(column, minlength=n_ops + 1)[:n_ops]
            present = np.flatnonzero(counts)
            if not present.size:
                continue
            # the argsort of the column's rows by operand (ids no merge uses sort last) is the grouping itself:
            # stable, so rows stay ascending within an operand, and 16-bit keys get numpy's radix sort
            rows = np.argsort(column, kind="stable")[: int(counts.sum())]
            cells = rows.astype(cell_type) * width + k
            bounds = np.concatenate([[0], np.cumsum(counts[present])]).tolist()
            for t, lo, hi in zip(self._originals[present].tolist(), bounds, bounds[1:], strict=False):
                pieces.setdefault(t, []).append((k, cells[lo:hi]))
        cells_of: dict[int, np.ndarray] = {}
        home: dict[int, int] = {}
        for t, parts in pieces.items():
            if len(parts) == 1:  # in one column: a row holds it at most once
                home[t], cells_of[t] = parts[0]
                continue
            cells_of[t] = both = np.sort(np.concatenate([cells for _, cells in parts]))
            rows = both // width
            same = np.flatnonzero(rows[1:] == rows[:-1])
            if same.size:
                row = int(rows[same[0]])
                event = row if origin is None else int(origin[row])
                raise DomaintokError(f"actionpiece segment: event {event} has id {t} twice; "
                                     "the ids of an event must be distinct")
        return cells_of, home

    def _operand_index(self, flat: np.ndarray) -> np.ndarray:
        """Position of each id among the original operand ids; len(originals) for ids no merge uses."""
        n_ops = len(self._originals)
        dtype = np.uint16 if n_ops < 1 << 16 else np.int64
        top = int(self._originals[-1]) if n_ops else 0
        if top < _DENSE_LOOKUP:
            if self._lookup is None:
                self._lookup = np.full(top + 2, n_ops, dtype)
                self._lookup[self._originals] = np.arange(n_ops, dtype=dtype)
            return self._lookup[flat if top + 1 > np.iinfo(flat.dtype).max else np.minimum(flat, top + 1)]
        pos = np.minimum(np.searchsorted(self._originals, flat), n_ops - 1)
        return np.where(self._originals[pos] == flat, pos, n_ops).astype(dtype)

    def segment_ordered(self, events: Any) -> tuple[np.ndarray, np.ndarray]:
        """BPE-style segmentation of each row read in its cell order: repeatedly merge the adjacent pair of lowest
        rank (leftmost first). Order matters here; `segment_spr` feeds it random orders."""
        mat, lengths = _compact(self._input(events, "actionpiece segment"))
        width = mat.shape[1]
        if not self.n_merges or width < 2:
            return mat, lengths
        cols = np.arange(width)
        active = np.flatnonzero(lengths >= 2)
        while active.size:
            rows = mat[active]
            ranks = self._ranks_of(rows[:, :-1], rows[:, 1:])
            at = ranks.argmin(axis=1)
            best = ranks[np.arange(len(rows)), at]
            keep = best < self.n_merges
            active, rows, at, best = active[keep], rows[keep], at[keep], best[keep]
            rows[np.arange(len(rows)), at] = self.base + best
            # drop cell at+1 by shifting the rest of the row left
            rows = np.take_along_axis(rows, np.minimum(cols + (cols > at[:, None]), width - 1), axis=1)
            rows[:, -1] = 0
            mat[active] = rows
            active = active[rows[:, 1] != 0]
        return mat, (mat != 0).sum(axis=1)

    def _ranks_of(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Rank of the merge of each (left, right) pair; n_merges where there is none."""
        if not self._sorted_keys.size:
            return np.full(left.shape, self.n_merges, np.int64)
        left, right = left.astype(np.int64), right.astype(np.int64)
        keys = (np.minimum(left, right) << _SHIFT) | np.maximum(left, right)
        pos = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self._sorted_keys) - 1)
        found = (left > 0) & (right > 0) & (self._sorted_keys[pos] == keys)
        return np.where(found, self._sorted_ranks[pos], self.n_merges)

    def segment_spr(self, events: Any, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Set-permutation regularization (the paper's SPR) for training-time augmentation: each row's ids in a
        random order (from `rng`), then `segment_ordered`. Different draws give different, equally valid
        segmentations of the same event; `segment` stays the deterministic default."""
        mat, _ = _compact(self._input(events, "actionpiece segment"))
        noise = rng.random(mat.shape)
        noise[mat == 0] = 2.0  # padding stays last
        return self.segment_ordered(np.take_along_axis(mat, np.argsort(noise, axis=1), axis=1))

    # segmentation of one whole sequence (plain Python)

    def segment_sequence(self, events: Iterable[Iterable[int]]) -> list[list[int]]:
        """Deterministic segmentation of one sequence of events (time order), cross-event merges included when the
        model was trained with cross_event. Returns the units in order: events and, between them, context slots
        holding one cross-event merged id, each as sorted ids. Merges are replayed once each in rank order, exactly
        as training transformed its own sequences."""
        seq = _Sequence(self._event_sets(events))
        scale = _scale(max((len(e) for e in seq.events), default=1), self.cross_event)
        last = -1
        while True:
            ranks = [r for r in (self._rank.get(_unkey(k), -1) for k in seq.pair_counts(scale, self.cross_event))
                     if r > last]
            if not ranks:
                return seq.units()
            last = min(ranks)
            a, b = self.merges[last]
            seq.merge(a, b, self.base + last, self.cross_event)

    def _event_sets(self, events: Iterable[Iterable[int]]) -> list[set[int]]:
        out = []
        for n, event in enumerate(events):
            ids = [int(i) for i in event if int(i) != 0]
            bad = [i for i in ids if not 0 < i < MAX_ID or self.base <= i < self.end]
            if bad:
                raise DomaintokError(f"actionpiece segment: event {n} has id {bad[0]}, not an original id in "
                                     f"[1, 2**31) outside the merged ids {self.base}..{self.end - 1}")
            if len(set(ids)) != len(ids):
                raise DomaintokError(f"actionpiece segment: event {n} repeats an id; the ids of an event must be "
                                     "distinct")
            out.append(set(ids))
        return out


def _sweep_merge(flat: np.ndarray, width: int, cells: dict[int, np.ndarray], merge: tuple[int, int, int],
                 keep_new: bool, offset: int | None = None) -> None:
    """Apply merge (a, b) -> c in every row of the flat matrix holding both, in place (c takes a's cell).

    The cell lists may hold stale cells (their id was merged away since): the rarer operand's list is pruned, and
    each of its rows finds the other operand, so the cost follows the rarer operand. Where both ids keep to one
    column each, b's cell is a's cell + `offset` in every row and is read directly; otherwise it is looked up in
    the other operand's list by binary search.
    """
    a, b, c = merge
    la, lb = cells.get(a), cells.get(b)
    if la is None or lb is None:
        return
    swap = len(la) > len(lb)  # b is the rarer operand
    (short, s_id), (long, l_id) = ((lb, b), (la, a)) if swap else ((la, a), (lb, b))
    short = short[flat[short] == s_id]  # drop the stale cells
    cells[s_id] = short
    if not short.size or not long.size:
        return
    if offset is not None:
        partner = short + (-offset if swap else offset)
        hit = flat[partner] == l_id
    else:
        start = short - short % width
        partner = long[np.minimum(np.searchsorted(long, start), len(long) - 1)]
        hit = (partner >= start) & (partner < start + width) & (flat[partner] == l_id)
    cells[s_id] = short[~hit]  # and the ones merged now
    a_cells, b_cells = (partner[hit], short[hit]) if swap else (short[hit], partner[hit])
    flat[a_cells] = c
    flat[b_cells] = 0
    if keep_new:
        cells[c] = a_cells
