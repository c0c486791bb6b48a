"""ActionPiece merges (domaintok/actionpiece.py): counts by hand, incremental counts equal a recount after every merge,
exact ties, determinism and order independence, segmentation equal to plain per-event references, round trips."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domaintok.actionpiece import (
    ActionPiece,
    EventMergeTrainer,
    SequenceMergeTrainer,
    _distinct_rows_sorted,
    distinct_rows,
    fit_actionpiece,
    pair_key,
)
from domaintok.errors import DomaintokError

BASE = 100
WIDTH = 6

# a corpus: events of 0-5 distinct ids out of 1..9, as a padded matrix, and a split into sequences
events_st = st.lists(st.sets(st.integers(1, 9), max_size=5), min_size=1, max_size=14)
FAST = settings(max_examples=40, deadline=None)


def _matrix(events: list[set[int]] | list[list[int]], width: int = WIDTH) -> np.ndarray:
    out = np.zeros((len(events), width), np.int64)
    for n, event in enumerate(events):
        ids = sorted(event)
        out[n, : len(ids)] = ids
    return out


@st.composite
def corpus_st(draw):
    events = draw(events_st)
    cuts = sorted(draw(st.sets(st.integers(1, len(events) - 1), max_size=4))) if len(events) > 1 else []
    lengths = np.diff([0, *cuts, len(events)])
    return events, lengths


def _rows(seg: np.ndarray) -> list[Counter[int]]:
    return [Counter(int(t) for t in row if t) for row in seg]


def _steps(trainer, limit: int = 100):
    for _ in range(limit):
        if trainer.step() is None:
            return
        yield trainer


# --- plain references, written for the tests --------------------------------------------------------------------


def reference_segment(model: ActionPiece, event) -> Counter[int]:
    """Per event: apply the present merge of lowest rank, repeat."""
    rank = {m: r for r, m in enumerate(model.merges)}
    tokens = {int(t) for t in event if t}
    while True:
        present = [rank[(x, y)] for x in tokens for y in tokens if x < y and (x, y) in rank]
        if not present:
            return Counter(tokens)
        r = min(present)
        tokens -= set(model.merges[r])
        tokens.add(model.base + r)


def reference_bpe(model: ActionPiece, row) -> list[int]:
    """Per ordered row: merge the adjacent pair of lowest rank (leftmost first), repeat."""
    rank = {m: r for r, m in enumerate(model.merges)}
    seq = [int(t) for t in row if t]
    while True:
        found = [(rank[(min(x, y), max(x, y))], i) for i, (x, y) in enumerate(itertools.pairwise(seq))
                 if (min(x, y), max(x, y)) in rank]
        if not found:
            return seq
        r, i = min(found)
        seq[i : i + 2] = [model.base + r]


def hand_counts(events: list[set[int]], cross: bool) -> dict[tuple[int, int], Fraction]:
    """Pair weights of one fresh sequence: 2/|A| inside events, 1/(|A||B|) across adjacent ones."""
    out: Counter = Counter()
    for e in events:
        for x in e:
            for y in e:
                if x < y:
                    out[(x, y)] += Fraction(2, len(e))
    if cross:
        for left, right in itertools.pairwise(events):
            for x in left:
                for y in right:
                    out[(min(x, y), max(x, y))] += Fraction(1, len(left) * len(right))
    return dict(out)


def _exact(trainer) -> dict[tuple[int, int], Fraction]:
    return {p: Fraction(c, trainer.scale) for p, c in trainer.pair_counts().items()}


# --- counting and the first merge, by hand ------------------------------------------------------------------------


def test_toy_corpus_counts_and_first_merge_by_hand():
    events = [{1, 2, 3}, {1, 2}, {2, 3, 4}]
    # (1,2): 2/3 + 2/2 = 5/3; (2,3): 2/3 + 2/3 = 4/3; (1,3), (2,4), (3,4): 2/3
    expected = {(1, 2): Fraction(5, 3), (2, 3): Fraction(4, 3), (1, 3): Fraction(2, 3), (2, 4): Fraction(2, 3),
                (3, 4): Fraction(2, 3)}
    for trainer in (EventMergeTrainer(_matrix(events), base=BASE),
                    SequenceMergeTrainer(_matrix(events), base=BASE, cross_event=False)):
        assert _exact(trainer) == expected
        assert trainer.step() == (1, 2)
        # {1,2,3} -> {100, 3}: (3,100) weighs 2/2; {1,2} -> {100}; {2,3,4} unchanged
        assert _exact(trainer) == {(3, 100): 1, (2, 3): Fraction(2, 3), (2, 4): Fraction(2, 3),
                                   (3, 4): Fraction(2, 3)}


def test_cross_event_counting_by_hand_changes_the_first_merge():
    events = [{1, 2}, {5}, {5}, {5}]
    lengths = [4]
    within = SequenceMergeTrainer(_matrix(events), lengths, base=BASE, cross_event=False)
    cross = SequenceMergeTrainer(_matrix(events), lengths, base=BASE, cross_event=True)
    assert _exact(within) == {(1, 2): 1}
    # across: {1,2}|{5}: 1/2 each for (1,5), (2,5); {5}|{5} twice: 1 each for (5,5)
    assert _exact(cross) == {(1, 2): 1, (1, 5): Fraction(1, 2), (2, 5): Fraction(1, 2), (5, 5): 2}
    assert _exact(cross) == hand_counts(events, cross=True)
    assert within.step() == (1, 2)
    assert cross.step() == (5, 5)
    # the first {5},{5} meet in the slot between them: [{1,2}, {100}, {5}] once the emptied events are resolved
    assert cross.segmented() == [[[1, 2], [100], [5]]]
    assert _exact(cross) == {(1, 2): 1, (1, 100): Fraction(1, 2), (2, 100): Fraction(1, 2), (5, 100): 1}
    assert cross.pair_counts() == cross.recount()


def test_cross_event_merge_lives_in_a_context_slot():
    # (5, 6) across events in five sequences: 5 * 1/4 beats every within pair (1 each)
    seqs = [[{x, 5}, {y, 6}] for x, y in ((1, 2), (3, 4), (7, 8), (9, 10), (11, 12))]
    trainer = SequenceMergeTrainer(_matrix([e for s in seqs for e in s]), [2] * 5, base=BASE, cross_event=True)
    assert _exact(trainer)[(5, 6)] == Fraction(5, 4)
    assert trainer.step() == (5, 6)
    assert trainer.segmented()[0] == [[1], [100], [2]]
    # a slot's id pairs with each neighbour with weight 1/|neighbour|; the neighbours no longer pair directly
    expected = {}
    for x, y in ((1, 2), (3, 4), (7, 8), (9, 10), (11, 12)):
        expected[(x, 100)] = expected[(y, 100)] = 1
    assert _exact(trainer) == expected
    model = trainer.result()
    assert model.segment_sequence([[1, 5], [2, 6]]) == [[1], [100], [2]]
    assert model.covered(100) == (5, 6)


def test_exact_ties_go_to_the_smaller_pair_where_float_sums_would_not():
    # (1,2) sits in events of 2, 3 and 6 ids: 1 + 2/3 + 1/3 = 2, but summed in floats 1.9999999999999998;
    # (3,4) sits in two events of 2 ids: 2.0. A real tie: the smaller pair must win.
    assert 2 / 2 + 2 / 3 + 2 / 6 < 2 / 2 + 2 / 2
    events = [{1, 2}, {1, 2, 10}, {1, 2, 11, 12, 13, 14}, {3, 4}, {3, 4}]
    for trainer in (EventMergeTrainer(_matrix(events), base=BASE),
                    SequenceMergeTrainer(_matrix(events), base=BASE, cross_event=False)):
        assert trainer.step() == (1, 2)
        assert trainer.counts == [2 * trainer.scale]
        assert trainer.step() == (3, 4)


def test_weights_are_integers():
    rng = np.random.default_rng(3)
    mat = _matrix([set(rng.choice(np.arange(1, 30), size=rng.integers(1, 7), replace=False).tolist())
                   for _ in range(200)], width=7)
    for trainer in (EventMergeTrainer(mat, base=BASE),
                    SequenceMergeTrainer(mat, [50] * 4, base=BASE, cross_event=True)):
        assert all(type(c) is int for c in trainer.pair_counts().values())
        trainer.train(20)
        assert all(type(c) is int for c in trainer.counts)
        assert all(type(c) is int for c in trainer.pair_counts().values())
    assert all(type(c) is int for c in trainer._queue.priorities())  # the heap orders ints only


# --- invariants over random corpora --------------------------------------------------------------------------------


@FAST
@given(corpus_st())
def test_incremental_counts_equal_a_recount_after_every_merge(corpus):
    events, lengths = corpus
    mat = _matrix(events)
    trainers = [EventMergeTrainer(mat, base=BASE),
                SequenceMergeTrainer(mat, lengths, base=BASE, cross_event=False),
                SequenceMergeTrainer(mat, lengths, base=BASE, cross_event=True)]
    for trainer in trainers:
        assert trainer.pair_counts() == trainer.recount()
        for t in _steps(trainer):
            assert t.pair_counts() == t.recount()
        assert trainer.pair_counts() == {}  # trained out: every event is one token


@FAST
@given(corpus_st())
def test_cross_event_counts_of_a_fresh_corpus_match_the_hand_formula(corpus):
    events, lengths = corpus
    trainer = SequenceMergeTrainer(_matrix(events), lengths, base=BASE, cross_event=True)
    expected: Counter = Counter()
    start = 0
    for n in lengths:
        expected.update(hand_counts([e for e in events[start : start + n] if e], cross=True))
        start += n
    assert _exact(trainer) == {p: w for p, w in expected.items() if w}


@FAST
@given(corpus_st())
def test_event_and_sequence_trainers_learn_the_same_merges(corpus):
    events, lengths = corpus
    mat = _matrix(events)
    fast = EventMergeTrainer(mat, base=BASE).train(50)
    plain = SequenceMergeTrainer(mat, lengths, base=BASE, cross_event=False).train(50)
    assert fast.merges == plain.merges


def test_pair_slots_found_by_table_or_by_sorting_agree(monkeypatch):
    rng = np.random.default_rng(5)
    mat = _matrix([set(rng.choice(np.arange(1, 25), size=rng.integers(0, 7), replace=False).tolist())
                   for _ in range(300)], width=7)
    table = EventMergeTrainer(mat, base=BASE)
    monkeypatch.setattr("domaintok.actionpiece._DENSE_PAIRS", 0)
    sorting = EventMergeTrainer(mat, base=BASE)
    assert np.array_equal(table._slots, sorting._slots)
    assert table.pair_counts() == sorting.pair_counts() == table.recount()
    assert table.train(40).merges == sorting.train(40).merges


@FAST
@given(corpus_st(), st.integers(0, 8), st.integers(0, 8), st.booleans())
def test_training_to_fewer_merges_is_a_prefix(corpus, q, more, cross):
    events, lengths = corpus
    short = fit_actionpiece(_matrix(events), base=BASE, n_merges=q, cross_event=cross, sequence_lengths=lengths)
    long = fit_actionpiece(_matrix(events), base=BASE, n_merges=q + more, cross_event=cross,
                           sequence_lengths=lengths)
    assert long.merges[: short.n_merges] == short.merges
    assert long.prefix(short.n_merges).to_json() == short.to_json()


@FAST
@given(corpus_st(), st.integers(0, 2**32 - 1), st.booleans())
def test_order_of_ids_within_an_event_does_not_matter(corpus, seed, cross):
    events, lengths = corpus
    mat = _matrix(events)
    shuffled = np.random.default_rng(seed).permuted(mat, axis=1)  # each row's cells, padding included
    a = fit_actionpiece(mat, base=BASE, n_merges=30, cross_event=cross, sequence_lengths=lengths)
    b = fit_actionpiece(shuffled, base=BASE, n_merges=30, cross_event=cross, sequence_lengths=lengths)
    assert a.to_json() == b.to_json()
    assert _rows(a.segment(mat)[0]) == _rows(a.segment(shuffled)[0])


@FAST
@given(corpus_st(), events_st)
def test_segment_equals_the_plain_per_event_reference_and_decodes_back(corpus, others):
    events, _ = corpus
    model = fit_actionpiece(_matrix(events), base=BASE, n_merges=12)
    for mat in (_matrix(events), _matrix(others)):  # the training events and events it never saw
        seg, lengths = model.segment(mat)
        assert seg.shape == mat.shape
        assert _rows(seg) == [reference_segment(model, row) for row in mat]
        assert lengths.tolist() == [len(r) for r in _rows(seg)]
        assert (seg[np.arange(seg.shape[1])[None, :] >= lengths[:, None]] == 0).all()  # ids first, zeros after
        assert [model.decode(row) for row in seg] == [tuple(sorted(t for t in row if t)) for row in mat]


@pytest.mark.parametrize("route", ["sweep, table lookup", "sweep, searchsorted", "rounds"])
def test_segment_equals_the_reference_on_a_larger_corpus(monkeypatch, route):
    # skewed ids so some cell lists are long, others short, and merged ids get merged again
    rng = np.random.default_rng(11)

    def corpus(n):
        return _matrix([set(np.minimum(rng.zipf(1.4, size=rng.integers(1, 9)), 60).tolist()) for _ in range(n)],
                       width=8)

    model = fit_actionpiece(corpus(3000), base=BASE, n_merges=80)
    assert any(b >= BASE for _, b in model.merges)
    if route == "sweep, searchsorted":
        monkeypatch.setattr("domaintok.actionpiece._DENSE_LOOKUP", 0)
    # a batch with fewer rows than merges / _ROUNDS_PER_MERGE takes rounds (the online path's small batches)
    # (rounds where rows * _ROUNDS_PER_MERGE < merges: 0 forces them, a huge value forces the sweep)
    monkeypatch.setattr("domaintok.actionpiece._ROUNDS_PER_MERGE", 0 if route == "rounds" else 10**9)
    mat = rng.permuted(corpus(3000), axis=1).astype(np.int32)
    seg = model.segment(mat)[0]
    assert seg.dtype == np.int32
    assert _rows(seg) == [reference_segment(model, row) for row in mat]
    assert [model.decode(row) for row in seg] == [model.decode(row) for row in mat]


@pytest.mark.parametrize("dedupe", [True, False])
def test_segment_of_field_columns_equals_the_reference(monkeypatch, dedupe):
    """A tokenizer's matrix keeps each field's ids in fixed columns: a merge of two such ids finds its partner at a
    fixed offset in the row. Two columns here share one id range, so their ids are seen in both columns and their
    merges take the binary search; every route must give the per-event reference, deduplicated or not."""
    import domaintok.actionpiece as module

    rng = np.random.default_rng(5)

    def corpus(n):
        mat = np.stack([np.minimum(rng.zipf(1.5, n), 8) + 10 * k for k in range(5)], axis=1)  # column k: 10k+1..
        first = rng.integers(60, 66, n)
        second = 60 + (first - 60 + rng.integers(1, 6, n)) % 6  # another id of the shared range 60..65
        mat = np.concatenate([mat, np.stack([first, second], axis=1)], axis=1)
        mat[rng.random(mat.shape) < 0.2] = 0  # empty cells
        return mat

    model = fit_actionpiece(corpus(4000), base=BASE, n_merges=60)
    assert any(b >= BASE for _, b in model.merges)
    routes = Counter()
    real = module._sweep_merge

    def spy(*args):
        routes.update(["fixed offset" if args[-1] is not None else "binary search"])
        return real(*args)

    monkeypatch.setattr(module, "_sweep_merge", spy)
    monkeypatch.setattr(module, "_few_repeats", lambda mat: not dedupe)
    monkeypatch.setattr(module, "_ROUNDS_PER_MERGE", 10**9)  # always the sweep
    mat = corpus(3000).astype(np.uint16)
    seg = model.segment(mat)[0]
    assert routes["fixed offset"] > 0 and routes["binary search"] > 0, routes
    assert _rows(seg) == [reference_segment(model, row) for row in mat]


def test_few_repeats_decides_from_a_sample(monkeypatch):
    monkeypatch.setattr("domaintok.actionpiece._DEDUPE_SAMPLE", 64)
    distinct = np.arange(2000 * 3).reshape(2000, 3)
    repeated = np.tile(np.arange(30 * 3).reshape(30, 3), (70, 1))
    assert module_few_repeats(distinct) and not module_few_repeats(repeated)
    assert not module_few_repeats(distinct[:64])  # small: always deduplicated


def module_few_repeats(mat):
    from domaintok.actionpiece import _few_repeats

    return _few_repeats(mat)


@FAST
@given(corpus_st())
def test_segmentation_reproduces_what_training_did_to_its_corpus(corpus):
    events, lengths = corpus
    mat = _matrix(events)
    trainer = EventMergeTrainer(mat, base=BASE)
    for t in _steps(trainer, limit=10):
        model = t.result()
        assert np.array_equal(model.segment(mat)[0], t.segmented()[0])
        assert np.array_equal(model.segment(mat)[1], t.segmented()[1])
    cross = SequenceMergeTrainer(mat, lengths, base=BASE, cross_event=True)
    bounds = np.cumsum([0, *lengths])
    for t in _steps(cross, limit=10):
        model = t.result()
        assert [model.segment_sequence(mat[s:e]) for s, e in itertools.pairwise(bounds)] == t.segmented()


@FAST
@given(corpus_st(), st.integers(0, 2**32 - 1))
def test_sequence_segmentation_decodes_back(corpus, seed):
    events, lengths = corpus
    mat = _matrix(events)
    model = fit_actionpiece(mat, base=BASE, n_merges=15, cross_event=True, sequence_lengths=lengths)
    shuffled = np.random.default_rng(seed).permuted(mat, axis=1)
    units = model.segment_sequence(shuffled)
    assert model.decode(t for u in units for t in u) == tuple(sorted(int(t) for t in mat.reshape(-1) if t))
    within = fit_actionpiece(mat, base=BASE, n_merges=15)
    assert [Counter(u) for u in within.segment_sequence(mat) if u] == [r for r in _rows(within.segment(mat)[0]) if r]


@FAST
@given(corpus_st(), st.integers(0, 2**32 - 1))
def test_ordered_and_spr_segmentation(corpus, seed):
    events, _ = corpus
    mat = _matrix(events)
    model = fit_actionpiece(mat, base=BASE, n_merges=12)
    ordered = np.random.default_rng(seed).permuted(mat, axis=1)
    seg, lengths = model.segment_ordered(ordered)
    assert [[int(t) for t in row[:n]] for row, n in zip(seg, lengths, strict=True)] == [
        reference_bpe(model, row) for row in ordered]
    spr, _ = model.segment_spr(mat, np.random.default_rng(seed))
    again, _ = model.segment_spr(mat, np.random.default_rng(seed))
    assert np.array_equal(spr, again)  # the rng decides, nothing else
    assert [model.decode(row) for row in spr] == [model.decode(row) for row in mat]


def test_spr_gives_varied_segmentations_of_one_event():
    # merges: (1,2) then (3,4); with ids 1..4 in random orders, 1 and 2 (3 and 4) are not always adjacent
    model = ActionPiece([(1, 2), (3, 4), (2, 3)], base=BASE)
    mat = np.tile(np.array([[1, 2, 3, 4]]), (200, 1))
    seen = {tuple(sorted(row[row > 0].tolist())) for row in model.segment_spr(mat, np.random.default_rng(0))[0]}
    assert {(100, 101), (1, 4, 102), (1, 2, 101)} <= seen
    assert {tuple(sorted(r.elements())) for r in _rows(model.segment(mat)[0])} == {(100, 101)}


@FAST
@given(events_st)
def test_no_merges_is_the_identity(events):
    model = ActionPiece([], base=BASE)
    mat = _matrix(events)
    for seg, lengths in (model.segment(mat), model.segment_ordered(mat),
                         model.segment_spr(mat, np.random.default_rng(0))):
        assert _rows(seg) == _rows(mat)
        assert lengths.tolist() == [len(e) for e in events]
    assert model.segment_sequence(mat) == [sorted(e) for e in events if e]
    assert fit_actionpiece(mat, base=BASE, n_merges=0).merges == ()


# --- state ---------------------------------------------------------------------------------------------------------


def test_state_is_json_builtins_and_byte_identical():
    rng = np.random.default_rng(0)
    mat = _matrix([set(rng.choice(np.arange(1, 40), size=5, replace=False).tolist()) for _ in range(300)])
    a = fit_actionpiece(mat, base=1000, n_merges=25)
    b = fit_actionpiece(mat.copy(), base=1000, n_merges=25)
    assert a.to_json() == b.to_json()
    state = json.loads(a.to_json())
    assert state == a.to_dict()
    assert state["format"] == "domaintok.actionpiece/1" and state["base"] == 1000 and len(state["merges"]) == 25
    back = ActionPiece.from_dict(state)
    assert back.to_json() == a.to_json()
    assert np.array_equal(back.segment(mat)[0], a.segment(mat)[0])
    assert fit_actionpiece(mat, base=1000, vocab_size=1010).merges == a.merges[:10]


def test_segment_keeps_the_matrix_dtype_where_it_holds_the_merged_ids():
    mat = np.array([[1, 2, 3, 0], [3, 2, 0, 0]], np.uint16)
    small = ActionPiece([(1, 2), (2, 3)], base=65534)
    seg, lengths = small.segment(mat)
    assert seg.dtype == np.uint16 and seg.tolist() == [[65534, 3, 0, 0], [65535, 0, 0, 0]]
    assert lengths.tolist() == [2, 1]
    big = ActionPiece([(1, 2), (2, 3), (3, 65535)], base=65535)
    seg, _ = big.segment(mat)
    assert seg.dtype == np.int64 and seg.tolist() == [[65537, 0, 0, 0], [65536, 0, 0, 0]]
    assert mat.tolist() == [[1, 2, 3, 0], [3, 2, 0, 0]]  # the input is not modified


def test_covered_and_decode():
    model = ActionPiece([(1, 2), (3, 100), (5, 5)], base=100, cross_event=True)
    assert model.covered(7) == (7,)
    assert model.covered(100) == (1, 2)
    assert model.covered(101) == (1, 2, 3)
    assert model.covered(102) == (5, 5)  # a cross-event merge can cover one id twice
    assert model.decode([101, 0, 102, 9]) == (1, 2, 3, 5, 5, 9)
    assert model.end == 103 and model.n_merges == 3
    with pytest.raises(DomaintokError, match="neither an original id"):
        model.covered(103)


def test_wide_events_count_exactly_with_python_ints():
    # 40 ids per event: lcm(1..40) * 2 * 600 events does not fit int64, so counts become Python ints
    rng = np.random.default_rng(1)
    mat = np.stack([rng.choice(np.arange(1, 61), size=40, replace=False) for _ in range(600)])
    fast = EventMergeTrainer(mat, base=BASE)
    assert fast._counts.dtype == object
    plain = SequenceMergeTrainer(mat, [1] * len(mat), base=BASE, cross_event=False)
    assert fast.train(3).merges == plain.train(3).merges
    assert fast.pair_counts() == fast.recount()


# --- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("events, match", [
    ([[1, -2]], "negative id"),
    ([[1, 2, 2]], "id 2 twice"),
    ([[1, 2**31]], "not below 2"),
    ([[1, 2000]], "not below base"),
    ([1, 2, 3], "2-D"),
    ([[1.5, 2.0]], "must be integers"),
])
def test_bad_training_events_raise(events, match):
    with pytest.raises(DomaintokError, match=match):
        fit_actionpiece(np.array(events), base=1000, n_merges=3)
    with pytest.raises(DomaintokError, match=match):
        SequenceMergeTrainer(np.array(events), base=1000)


def test_bad_training_options_raise():
    mat = _matrix([{1, 2}, {2, 3}])
    with pytest.raises(DomaintokError, match="exactly one of"):
        fit_actionpiece(mat, base=BASE)
    with pytest.raises(DomaintokError, match="exactly one of"):
        fit_actionpiece(mat, base=BASE, n_merges=2, vocab_size=110)
    with pytest.raises(DomaintokError, match="below base"):
        fit_actionpiece(mat, base=BASE, vocab_size=50)
    with pytest.raises(DomaintokError, match="needs sequence_lengths"):
        fit_actionpiece(mat, base=BASE, n_merges=2, cross_event=True)
    with pytest.raises(DomaintokError, match="sum to the 2 events"):
        fit_actionpiece(mat, base=BASE, n_merges=2, cross_event=True, sequence_lengths=[1, 2])
    with pytest.raises(DomaintokError, match="sum to the 2 events"):
        fit_actionpiece(mat, base=BASE, n_merges=2, sequence_lengths=[3])
    with pytest.raises(DomaintokError, match="base must be"):
        fit_actionpiece(mat, base=0, n_merges=2)
    with pytest.raises(DomaintokError, match="does not fit"):
        fit_actionpiece(mat, base=2**31 - 1, n_merges=2)


def test_bad_segmentation_input_raises():
    model = ActionPiece([(1, 2), (3, 100)], base=100)
    with pytest.raises(DomaintokError, match="merged ids"):
        model.segment(np.array([[1, 101]]))
    with pytest.raises(DomaintokError, match="id 1 twice"):
        model.segment(np.array([[1, 5, 1]]))
    # distinct rows are segmented once each: the error still names the event's own number
    with pytest.raises(DomaintokError, match="event 3 has id 2 twice"):
        model.segment(np.array([[1, 2, 0]] * 3 + [[2, 5, 2]] + [[1, 2, 0]] * 2))
    with pytest.raises(DomaintokError, match="negative"):
        model.segment_spr(np.array([[1, -5]]), np.random.default_rng(0))
    with pytest.raises(DomaintokError, match="repeats an id"):
        model.segment_sequence([[1, 1]])
    with pytest.raises(DomaintokError, match="not an original id"):
        model.segment_sequence([[100]])


@pytest.mark.parametrize("state, match", [
    ({"format": "other"}, "not a domaintok.actionpiece/1"),
    ({"format": "domaintok.actionpiece/1", "base": 10, "merges": [[1, 12]]}, "merge 0"),
    ({"format": "domaintok.actionpiece/1", "base": 10, "merges": [[3, 3]]}, "a == b only with cross_event"),
    ({"format": "domaintok.actionpiece/1", "base": 10, "merges": [[1, 2], [1, 2]]}, "no repeated merge"),
    ({"format": "domaintok.actionpiece/1", "base": 10, "merges": [[1, 2, 3]]}, "pair of ids"),
    ({"format": "domaintok.actionpiece/1", "base": 10, "merges": [["1", 2]]}, "int pairs"),
    ({"format": "domaintok.actionpiece/1", "base": "10", "merges": []}, "base must be"),
])
def test_bad_state_raises(state, match):
    with pytest.raises(DomaintokError, match=match):
        ActionPiece.from_dict(state)


def test_pair_key_orders_like_pairs():
    assert pair_key(5, 3) == pair_key(3, 5) == (3 << 31) | 5
    assert pair_key(1, 2**31 - 1) < pair_key(2, 3)


def test_segmentation_of_a_column_slice_of_a_wider_matrix():
    """A tokenizer hands segment() some columns of its token matrix: a Fortran-ordered array, which the in-place
    sweep must not silently copy (it did: no merge was applied to large batches)."""
    rng = np.random.default_rng(3)
    base_rows = np.array([[1, 2, 3, 0], [1, 2, 4, 5], [2, 3, 5, 0], [1, 3, 4, 0]] * 50)
    ap = fit_actionpiece(base_rows, base=10, n_merges=4)
    wide = np.zeros((len(base_rows) * 10, 7), np.uint16)
    wide[:, [0, 2, 4, 6]] = np.tile(base_rows, (10, 1))
    cols = wide[:, [0, 2, 4, 6]]
    assert not cols.flags["C_CONTIGUOUS"]
    sweep, _ = ap.segment(cols)  # many rows: the sweep
    rounds = np.vstack([ap.segment(cols[i : i + 1])[0] for i in range(0, len(cols), 97)])
    assert (sweep >= 10).any() and np.array_equal(sweep[::97], rounds)
    del rng


@pytest.mark.parametrize("method", [distinct_rows, _distinct_rows_sorted])
@pytest.mark.parametrize("shape, high, dtype", [((500, 6), 4, np.uint16), ((300, 12), 2**20, np.int64),
                                                ((50, 3), 2**40, np.int64), ((0, 4), 5, np.int64),
                                                ((40, 0), 1, np.int64)])
def test_distinct_rows_by_hand_and_past_64_bits_of_key(method, shape, high, dtype):
    # the hashed rows (Arrow) and the sorting fallback; (300, 12) values up to 2**20: the fallback's packed key passes
    # 62 bits and is densified on the way; 2**40: no table; a Fortran-ordered column slice; rows of width 0
    rng = np.random.default_rng(3)
    base = rng.integers(0, high, size=(max(shape[0] // 5, 1), shape[1]), dtype=np.int64).astype(dtype)
    mat = base[rng.integers(0, len(base), size=shape[0])] if shape[0] else np.zeros(shape, dtype)
    if shape == (500, 6):
        mat = np.asfortranarray(np.hstack([mat, mat]))[:, ::2]
    first, inverse = method(mat)
    assert np.array_equal(mat[first][inverse], mat)
    want = {}
    for i, row in enumerate(map(tuple, mat.tolist())):
        want.setdefault(row, i)
    assert first.tolist() == sorted(want.values())  # first occurrences, in order
