"""UserWindow: insertion by event time, truncation on whole-event boundaries, n_events counting, and parity of the
incremental rule with the offline (vectorized) truncation tokenize() uses."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from domaintok.window import UserWindow, append_events, keep_newest_events, window_input_ids


def _events(window):
    out, pos = [], 0
    for n in window.event_lengths:
        out.append(window.ids[pos : pos + n])
        pos += n
    return out


def test_in_order_append_and_bos():
    w = append_events(None, [[10, 11, 4], [12, 4]], [100, 200], max_length=100)
    assert w.ids == [10, 11, 4, 12, 4]
    assert w.event_lengths == [3, 2] and w.event_ts == [100, 200]
    assert w.n_events == 2 and w.last_event_ts == 200 and w.dropped_ts is None
    ids = window_input_ids(w, bos_token_id=2)
    assert ids.dtype == np.int32 and ids.tolist() == [2, 10, 11, 4, 12, 4]


def test_out_of_order_inserts_by_time_and_ties_go_after_existing():
    w = append_events(None, [[1, 4], [2, 4]], [100, 300], max_length=100)
    w = append_events(w, [[3, 4]], [200], max_length=100)  # older than the newest: goes between
    w = append_events(w, [[5, 4]], [100], max_length=100)  # tie with the first: after it (arrival order)
    assert _events(w) == [[1, 4], [5, 4], [3, 4], [2, 4]]
    assert w.event_ts == [100, 100, 200, 300]
    assert w.last_event_ts == 300 and w.n_events == 4


def test_truncation_drops_oldest_whole_events():
    w = append_events(None, [[1, 1, 4], [2, 4], [3, 3, 3, 4]], [1, 2, 3], max_length=8)
    # 1 (BOS) + 3 + 2 + 4 = 10 > 8: the oldest event goes; 1 + 2 + 4 = 7 fits
    assert _events(w) == [[2, 4], [3, 3, 3, 4]]
    assert w.n_events == 3 and w.dropped_ts == 1
    assert 1 + len(w.ids) <= 8


def test_event_longer_than_window_leaves_it_empty():
    w = append_events(None, [[1] * 10], [5], max_length=4)
    assert w.ids == [] and w.event_lengths == [] and w.n_events == 1 and w.last_event_ts == 5
    assert window_input_ids(w, 2).tolist() == [2]


def test_late_event_older_than_dropped_is_counted_not_inserted():
    w = append_events(None, [[1, 4], [2, 4], [3, 4]], [10, 20, 30], max_length=5)  # keeps the two newest
    assert w.event_ts == [20, 30] and w.dropped_ts == 10
    late = append_events(w, [[9, 4]], [5], max_length=5)
    assert late.event_ts == [20, 30] and late.n_events == 4
    # a late event newer than the dropped one does enter (and pushes out the oldest kept)
    w2 = append_events(w, [[7, 4]], [25], max_length=5)
    assert w2.event_ts == [25, 30]


def test_input_window_not_modified_and_roundtrips_msgspec():
    w = append_events(None, [[1, 4]], [1], max_length=10)
    w2 = append_events(w, [[2, 4]], [2], max_length=10)
    assert w.ids == [1, 4] and w2.ids == [1, 4, 2, 4]
    assert msgspec.json.decode(msgspec.json.encode(w2), type=UserWindow) == w2


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        append_events(None, [[1]], [1, 2], max_length=10)
    with pytest.raises(ValueError):
        append_events(None, [[1]], [1], max_length=0)


def _offline(events, times, max_length):
    """Reference: sort the whole history (time, arrival), keep the newest whole events that fit."""
    order = sorted(range(len(times)), key=lambda i: (times[i], i))
    lengths = np.array([len(events[i]) for i in order])
    keep = keep_newest_events(np.array([len(order)]), lengths, max_length)
    return [events[i] for i, k in zip(order, keep) if k]


@pytest.mark.parametrize("seed", range(30))
def test_incremental_window_equals_offline_truncation(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    events = [list(rng.integers(10, 99, size=int(rng.integers(1, 7)))) + [4] for _ in range(n)]
    times = [int(t) for t in rng.integers(0, 15, size=n)]  # many ties and out-of-order arrivals
    max_length = int(rng.integers(2, 40))
    w = None
    pos = 0
    while pos < n:  # arrival in micro-batches of random size
        step = int(rng.integers(1, 5))
        w = append_events(w, events[pos : pos + step], times[pos : pos + step], max_length)
        pos += step
    assert _events(w) == _offline(events, times, max_length)
    assert w.n_events == n and w.last_event_ts == max(times)


def test_keep_newest_events_many_users():
    lengths = np.array([3, 2, 4, 5, 1, 1])
    ends = np.array([3, 4, 6])  # users: [3,2,4] [5] [1,1]
    keep = keep_newest_events(ends, lengths, max_length=7)
    assert keep.tolist() == [False, True, True, True, True, True]
    assert keep_newest_events(ends, lengths, max_length=5).tolist() == [False, False, True, False, True, True]
