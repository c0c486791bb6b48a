"""ActionPiece's set-permutation regularization on a tokenizer's windows (domaintok/set_permutation.py): lossless,
in the tokenizer's event layout (the deterministic segmentation gives back the windows exactly), varied across
draws, and cut to the context at whole events."""

from __future__ import annotations

import numpy as np
import pytest

from domaintok.set_permutation import SetPermutation
from domaintok.tokenizer import SEP_ID, DomainTokenizer
from tests.domaintok.test_tokenizer import SCHEMA, _toy_table
from tests.domaintok.test_tokenizer_actionpiece import _schema


@pytest.fixture(scope="module", params=["text last", "text between fields"])
def fitted(request):
    table = _toy_table(n=600, seed=5, users=8)
    schema = _schema(60)
    if request.param == "text between fields":  # field cells on both sides of the text pieces (as Online Retail)
        fields = [dict(f) for f in SCHEMA["fields"]]
        schema = _schema(60, fields=fields[:3] + fields[-1:] + fields[3:-1])
        assert SetPermutation.from_tokenizer(DomainTokenizer.fit(schema, table)).lead == 3
    tok = DomainTokenizer.fit(schema, table, max_length=10_000)
    windows = [np.asarray(w) for w in tok.tokenize(table).column("input_ids").to_pylist()]
    return tok, windows


def _events(ids):
    cuts = np.flatnonzero(np.asarray(ids) == SEP_ID) + 1
    return np.split(np.asarray(ids), cuts)[:-1] if len(cuts) else []


def test_the_deterministic_segmentation_gives_the_windows_back(fitted, monkeypatch):
    """The rebuild follows the tokenizer's layout: with `segment` in place of the random draw, nothing changes."""
    tok, windows = fitted
    spr = SetPermutation.from_tokenizer(tok)
    monkeypatch.setattr(spr.merges, "segment_spr", lambda mat, rng: tok.merges.segment(mat))
    out = spr.apply(windows, np.random.default_rng(0))
    assert len(out) == len(windows)
    for got, want in zip(out, windows):
        assert got.tolist() == want.tolist()


def test_random_segmentations_are_lossless_and_vary(fitted):
    tok, windows = fitted
    spr = SetPermutation.from_tokenizer(tok)
    text = spr._is_text
    draws = [spr.apply(windows, np.random.default_rng(seed)) for seed in range(4)]
    changed = 0
    for out in draws:
        for got, want in zip(out, windows):
            assert got[0] == want[0] == tok.bos_token_id
            ev_got, ev_want = _events(got[1:]), _events(want[1:])
            assert len(ev_got) == len(ev_want)
            for g, w in zip(ev_got, ev_want):
                assert g[text(g)].tolist() == w[text(w)].tolist()  # text pieces and [SEP], in order
                fg, fw = g[~text(g) & (g > SEP_ID)], w[~text(w) & (w > SEP_ID)]
                assert tok.merges.decode(fg) == tok.merges.decode(fw)  # the same field tokens
                assert fg.tolist() == sorted(fg.tolist(), reverse=True)  # merged first, decreasing
            changed += got.tolist() != want.tolist()
    assert changed > 0
    assert any(a.tolist() != b.tolist() for a, b in zip(draws[0], draws[1]))


def test_a_longer_segmentation_is_cut_to_the_context_at_whole_events(fitted):
    tok, windows = fitted
    spr = SetPermutation.from_tokenizer(tok)
    context = 40
    short = [w[:1].tolist() + w[-(context - 1):].tolist() for w in windows]
    short = [np.asarray(w[:1] + w[1 + int(np.flatnonzero(np.asarray(w[1:]) == SEP_ID)[0]) + 1:]) for w in short]
    out = spr.apply(short, np.random.default_rng(1), context_length=context)
    for got, want in zip(out, short):
        assert len(got) <= context and got[0] == tok.bos_token_id and got[-1] == SEP_ID
        assert tok.merges.decode(_events(got[1:])[-1]) == tok.merges.decode(_events(want[1:])[-1])


def test_a_rate_re_segments_that_share_of_the_windows(fitted):
    tok, windows = fitted
    spr = SetPermutation.from_tokenizer(tok)
    many = windows * 25
    assert [w.tolist() for w in spr.apply(many, np.random.default_rng(0), rate=0.0)] == [w.tolist() for w in many]
    out = spr.apply(many, np.random.default_rng(0), rate=0.5)
    kept = np.mean([a.tolist() == b.tolist() for a, b in zip(out, many)])
    assert 0.3 < kept < 0.75  # half re-segmented, a few of those by chance the same as before


def test_ids_outside_the_vocabulary_are_refused(fitted):
    from domaintok.errors import DomaintokError

    tok, windows = fitted
    spr = SetPermutation.from_tokenizer(tok)
    with pytest.raises(DomaintokError, match="this tokenizer's vocabulary"):
        spr.apply([np.append(windows[0], tok.vocab_size)], np.random.default_rng(0))
    with pytest.raises(DomaintokError, match="an empty window"):
        spr.apply([np.zeros(0, np.int64)], np.random.default_rng(0))


def test_no_merges_no_spr(fitted):
    table = _toy_table(n=100, seed=1, users=3)
    assert SetPermutation.from_tokenizer(DomainTokenizer.fit(_schema(None), table)) is None
