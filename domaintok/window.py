"""The window rule, in one place: a user's input is [BOS] + the newest whole events whose tokens fit max_length.

Every path applies it from here: the tokenizer (`keep_newest_events`, vectorized over users), the stream's rolling
per-user window in a Faust Table (`append_events`), and ids already tokenized (`truncate_window`: pretraining,
fine-tuning and `embed` when a model's context is shorter than the sequences). Pure numpy + msgspec.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import msgspec
import numpy as np


class UserWindow(msgspec.Struct, kw_only=True):
    """One user's most recent events as flat token ids (oldest first, no BOS), with per-event lengths and times.

    `dropped_ts` is the event time of the newest event ever dropped by truncation (None while nothing was dropped).
    An event older than it arrives too late to be part of the window: it is counted but not inserted, exactly as the
    offline tokenize(), which keeps the newest whole events of the fully sorted history, would leave it out.
    `context` is what the user's next event needs of the newest one (EventTokens.context: its calendar cells where
    the schema emits only changes; empty otherwise).
    """

    ids: list[int] = []
    event_lengths: list[int] = []
    event_ts: list[int] = []
    n_events: int = 0
    last_event_ts: int = -(2**63)
    dropped_ts: int | None = None
    context: list[int] = []


def append_events(
    window: UserWindow | None,
    event_ids: Sequence[Sequence[int] | np.ndarray],
    event_ts: Sequence[int],
    max_length: int,
    event_context: Sequence[Sequence[int] | np.ndarray] | None = None,
) -> UserWindow:
    """Insert events (arrival order) by event time, ties after equal times; drop oldest whole events until
    1 + len(ids) <= max_length. `event_context`: each event's context cells; the newest event's become the
    window's `context`. Returns a new window; the given one is not modified."""
    if len(event_ids) != len(event_ts) or (event_context is not None and len(event_context) != len(event_ts)):
        raise ValueError(f"{len(event_ids)} events but {len(event_ts)} event times")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if window is None:
        window = UserWindow()
    # per-event token lists, so insertion and dropping move whole events
    events = _split(window.ids, window.event_lengths)
    times = list(window.event_ts)
    total = len(window.ids)
    n_events = window.n_events
    last_ts = window.last_event_ts
    dropped_ts = window.dropped_ts
    context = window.context
    for k, (ids, ts) in enumerate(zip(event_ids, event_ts)):
        ts = int(ts)
        n_events += 1
        if ts >= last_ts:  # the newest event so far (a tie: the later arrival, as the offline order)
            last_ts = ts
            context = [int(c) for c in event_context[k]] if event_context is not None else []
        if dropped_ts is not None and ts < dropped_ts:
            continue  # sorts before an event already dropped: the newest-events window can never hold it
        pos = bisect_right(times, ts)
        ids = [int(i) for i in ids]
        events.insert(pos, ids)
        times.insert(pos, ts)
        total += len(ids)
        while events and 1 + total > max_length:
            total -= len(events.pop(0))
            dropped_ts = times.pop(0)
    return UserWindow(
        ids=[i for ev in events for i in ev],
        event_lengths=[len(ev) for ev in events],
        event_ts=times,
        n_events=n_events,
        last_event_ts=last_ts,
        dropped_ts=dropped_ts,
        context=context,
    )


def window_input_ids(window: UserWindow, bos_token_id: int) -> np.ndarray:
    """[BOS] + the window's ids as int32 (the model input for this user)."""
    out = np.empty(1 + len(window.ids), dtype=np.int32)
    out[0] = bos_token_id
    out[1:] = window.ids
    return out


def keep_newest_events(group_ends: np.ndarray, event_lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Vectorized truncation rule for many users at once: bool[n_events], True for the newest whole events of each
    user whose lengths sum (plus BOS) to at most max_length.

    event_lengths: int[n] in event order, users contiguous; group_ends: int[n_users] exclusive end index of each user.
    """
    n = len(event_lengths)
    csum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(event_lengths, out=csum[1:])
    group_of = np.repeat(np.arange(len(group_ends)), np.diff(np.concatenate([[0], group_ends])))
    # tokens from event i to the end of its user's events (i included)
    suffix = csum[group_ends][group_of] - csum[:-1]
    return 1 + suffix <= max_length


def _split(ids: list[int], lengths: list[int]) -> list[list[int]]:
    out, pos = [], 0
    for n in lengths:
        out.append(list(ids[pos : pos + n]))
        pos += n
    return out


def truncate_window(ids: np.ndarray, max_length: int, sep_token_id: int | None) -> np.ndarray:
    """Keep [BOS] and the newest whole events whose tokens fit max_length (the tokenizer's rule,
    `domaintok.window.keep_newest_events`); [BOS] alone when even the newest event does not fit.

    An event is the tokens after the previous [SEP] up to and including its own [SEP]; trailing tokens without a
    [SEP] count as one more event. Without a sep_token_id the newest max_length - 1 tokens are kept.
    """
    ids = np.asarray(ids)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if len(ids) <= max_length:
        return ids
    body = ids[1:]
    if sep_token_id is None:
        return np.concatenate([ids[:1], body[len(body) - (max_length - 1):]])
    ends = np.flatnonzero(body == sep_token_id) + 1  # exclusive end of each event in body
    if ends.size == 0 or ends[-1] != len(body):
        ends = np.append(ends, len(body))
    lengths = np.diff(ends, prepend=0)
    keep = keep_newest_events(np.array([len(lengths)]), lengths, max_length)  # a suffix of the events
    start = len(body) if not keep.any() else int(ends[int(keep.argmax())] - lengths[int(keep.argmax())])
    return np.concatenate([ids[:1], body[start:]])
