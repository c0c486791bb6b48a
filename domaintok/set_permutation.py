"""ActionPiece's set-permutation regularization (SPR; Hou et al., 2025) for training windows of a tokenizer with
merges: every event of a window gets a random segmentation of its own field tokens instead of the deterministic one.

The tokenizer segments each event deterministically (`ActionPiece.segment`). SPR shows a model other, equally valid
segmentations of the same events: each event's merged tokens are decoded back to the field tokens they cover, those
are put in a random order and merged BPE-style (`ActionPiece.segment_spr`). Text pieces, [BOS] and [SEP] are kept;
the event is laid out as the tokenizer lays out its own (merged ids first, then field ids, decreasing; the text
pieces after the first `lead` of them, `lead` the field cells before the first text field). A window that grows past
the context keeps its newest whole events (`truncate_window`). Pretraining applies it to training batches only
(`domaintok pretrain --actionpiece-spr`); evaluation, fine-tuning, embedding and serving use the deterministic ids.

    spr = SetPermutation.from_tokenizer(tok)          # None without merges
    windows = spr.apply([ids, ...], rng, context_length, rate=0.5)   # rate: the share of windows re-segmented

With several text fields the merged ids the tokenizer puts between them come after the last one here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from domaintok.errors import DomaintokError
from domaintok.window import truncate_window


class SetPermutation:
    """Random re-segmentation of the events of token windows (see the module docstring)."""

    def __init__(self, merges, *, text_ranges: Sequence[tuple[int, int]], n_special: int, sep_token_id: int,
                 lead: int, width: int):
        self.merges = merges
        self.text_ranges = [(int(lo), int(hi)) for lo, hi in text_ranges]
        self.n_special, self.sep, self.lead, self.width = int(n_special), int(sep_token_id), int(lead), int(width)
        # merged id - base -> the original ids it covers (0-padded), for a vectorized decode
        covered = merges.merged_parts
        self._cover = np.zeros((merges.n_merges, max((len(c) for c in covered), default=1)), np.int64)
        for r, ids in enumerate(covered):
            self._cover[r, : len(ids)] = ids

    @classmethod
    def from_tokenizer(cls, tok) -> SetPermutation | None:
        """For a `DomainTokenizer`; None when it has no ActionPiece merges."""
        from domaintok.fields import TextEncoder
        from domaintok.vocab import SPECIAL_TOKENS

        if tok.merges is None:
            return None
        enc = tok.encoding
        text = [e for e in tok.encoders if isinstance(e, TextEncoder)]
        ranges = [(e.base, e.base + e.n_tokens) for e in text]
        if text:
            ranges.append((tok.layout.bpe_base, tok.layout.merges_base))
        # the cells ActionPiece merges (ascending) that come before the first one it leaves out, a text field's
        merged = enc.merge_columns
        lead = int((merged == np.arange(len(merged))).sum())
        return cls(tok.merges, text_ranges=ranges, n_special=len(SPECIAL_TOKENS), sep_token_id=tok.sep_token_id,
                   lead=lead, width=len(merged))

    def _is_text(self, ids: np.ndarray) -> np.ndarray:
        out = np.zeros(ids.shape, bool)
        for lo, hi in self.text_ranges:
            out |= (ids >= lo) & (ids < hi)
        return out

    def apply(self, windows: Sequence[np.ndarray], rng: np.random.Generator, context_length: int | None = None,
              rate: float = 1.0) -> list[np.ndarray]:
        """Each window ([BOS] or other special tokens, then events each ending in [SEP]) with its events'
        field tokens segmented by a random set permutation; cut to `context_length` at whole events. With `rate`
        below 1, each window is re-segmented with that probability and otherwise kept as it is."""
        if rate >= 1.0:
            return self._permute(windows, rng, context_length)
        chosen = np.flatnonzero(rng.random(len(windows)) < rate).tolist()
        out = [np.asarray(w) for w in windows]
        if chosen:
            for i, window in zip(chosen, self._permute([windows[i] for i in chosen], rng, context_length)):
                out[i] = window
        return out

    def _permute(self, windows: Sequence[np.ndarray], rng: np.random.Generator, context_length: int | None
                 ) -> list[np.ndarray]:
        windows = [np.asarray(w, np.int64) for w in windows]
        if not windows:
            return []
        if any(len(w) == 0 for w in windows):
            raise DomaintokError("actionpiece SPR: an empty window (a window starts with [BOS])")
        flat = np.concatenate(windows)
        if flat.min() < 0 or flat.max() >= self.merges.end:
            raise DomaintokError(f"actionpiece SPR: ids must be in 0..{self.merges.end - 1} (this tokenizer's "
                                 f"vocabulary), got {int(flat.min())}..{int(flat.max())}")
        starts = np.cumsum([0, *map(len, windows)])
        # event number of every token: a new event starts after each [SEP] and at each window's start
        new_event = np.zeros(len(flat), bool)
        new_event[1:] = flat[:-1] == self.sep
        new_event[starts[:-1]] = True
        event = np.cumsum(new_event) - 1
        n_events = int(event[-1]) + 1
        field = (flat >= self.n_special) & ~self._is_text(flat)
        # the field ids of each event, merged ids decoded to the ids they cover
        merged = field & (flat >= self.merges.base)
        ids = np.where(merged, 0, flat)[field]
        owner = event[field]
        if merged.any():
            cover = self._cover[flat[merged] - self.merges.base]
            keep = cover != 0
            ids = np.concatenate([ids[~merged[field]], cover[keep]])
            owner = np.concatenate([owner[~merged[field]], np.repeat(event[merged], keep.sum(axis=1))])
        order = np.argsort(owner, kind="stable")
        ids, owner = ids[order], owner[order]
        counts = np.bincount(owner, minlength=n_events)
        if counts.max(initial=0) > self.width:
            raise DomaintokError(f"actionpiece SPR: an event holds {int(counts.max())} field ids, more than the "
                                 f"tokenizer's {self.width} field cells (not this tokenizer's ids?)")
        matrix = np.zeros((n_events, max(self.width, 1)), np.int64)
        slot = np.arange(len(ids)) - np.repeat(np.cumsum(counts) - counts, counts)
        matrix[owner, slot] = ids
        segmented, lengths = self.merges.segment_spr(matrix, rng)
        segmented = -np.sort(-segmented, axis=1)  # merged first, then field ids, decreasing (the tokenizer's order)
        # rebuild every event in the tokenizer's layout: its leading specials ([BOS]), the first `lead` segment ids,
        # the text pieces, the other segment ids, [SEP]; one sort by (event, part, position)
        kept = ~field
        kept_ids, kept_event = flat[kept], event[kept]
        part = np.where(kept_ids == self.sep, 4, np.where(kept_ids < self.n_special, 0, 2))
        slots = np.arange(segmented.shape[1])
        present = slots[None, :] < lengths[:, None]
        seg_event = np.broadcast_to(np.arange(n_events)[:, None], segmented.shape)[present]
        seg_slot = np.broadcast_to(slots[None, :], segmented.shape)[present]
        tokens = np.concatenate([kept_ids, segmented[present]])
        events = np.concatenate([kept_event, seg_event])
        parts = np.concatenate([part, np.where(seg_slot < self.lead, 1, 3)])
        position = np.concatenate([np.flatnonzero(kept), seg_slot])
        tokens = tokens[np.lexsort((position, parts, events))]
        per_window = event[starts[1:] - 1] - event[starts[:-1]] + 1  # a window's events are numbered in a row
        sizes = np.bincount(np.repeat(np.arange(len(windows)), per_window)[events], minlength=len(windows))
        out = np.split(tokens, np.cumsum(sizes)[:-1])
        if context_length is not None:
            out = [truncate_window(w, context_length, self.sep) for w in out]
        return out


__all__ = ["SetPermutation"]
