"""Semantic IDs: codes in range, unique full IDs, falling reconstruction error, no dead codes, byte-identical
state, JSON round trips, neighbours sharing codes, unseen items by text or hash, nulls, errors, and real Online
Retail items."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from domaintok.errors import DomaintokError
from domaintok.semantic_ids import (
    NULL_ID,
    ORIGIN_CONTENT,
    ORIGIN_HASHED,
    ORIGIN_NULL,
    ORIGIN_SEEN,
    SemanticIdParams,
    SemanticIds,
    fit_semantic_ids,
    item_sequences,
)

TOPICS = [
    ["red", "blue", "green", "pink", "ivory", "black"],
    ["mug", "cup", "teapot", "saucer", "jug", "bowl"],
    ["lamp", "light", "candle", "lantern", "bulb", "torch"],
    ["bag", "tote", "purse", "satchel", "pouch", "case"],
    ["card", "wrap", "ribbon", "tag", "sticker", "label"],
    ["clock", "alarm", "timer", "watch", "dial", "bell"],
]
ROOT = Path(__file__).resolve().parents[2]
SMALL = {"levels": 3, "codes": 16, "dims": 8, "buckets": 512}


def _catalogue(n: int = 240, users: int = 400, seed: int = 0) -> tuple[list[str], list[str], list[np.ndarray]]:
    """Items in 6 topics: texts draw words from the item's topic, users buy within one or two topics."""
    rng = np.random.default_rng(seed)
    items = [f"SKU{i:04d}" for i in range(n)]
    texts = [f"{' '.join(rng.choice(TOPICS[i % 6], 3, replace=False))} no {i % 5}" for i in range(n)]
    sequences = []
    for _ in range(users):
        topics = rng.choice(6, size=2, replace=False)
        pool = np.concatenate([np.arange(t, n, 6) for t in topics])
        sequences.append(rng.choice(pool, size=12))
    return items, texts, sequences


@pytest.fixture(scope="module")
def catalogue():
    return _catalogue()


@pytest.fixture(scope="module")
def model(catalogue):
    items, texts, sequences = catalogue
    return fit_semantic_ids(items, texts, sequences, SemanticIdParams(**SMALL, source="both"))


@pytest.fixture(scope="module")
def content_model(catalogue):
    items, texts, _ = catalogue
    return fit_semantic_ids(items, texts, None, SemanticIdParams(**SMALL, source="content"))


def _unique_rows(ids: np.ndarray) -> int:
    return len({tuple(row) for row in ids.tolist()})


@pytest.mark.parametrize("source", ["content", "cooccurrence", "both"])
def test_codes_in_range_every_code_used_and_full_ids_unique(catalogue, source):
    items, texts, sequences = catalogue
    m = fit_semantic_ids(items, texts, sequences, SemanticIdParams(**SMALL, source=source))
    ids, origin = m.ids_and_origin(items)
    assert ids.shape == (len(items), 4) and (origin == ORIGIN_SEEN).all()
    assert m.vocab_sizes == [16, 16, 16, 64]
    assert ((ids >= 0) & (ids < np.array(m.vocab_sizes))).all()
    assert _unique_rows(ids) == len(items)
    for level in range(m.levels):  # no dead code: every item has a vector here, so every code has an item
        assert np.unique(ids[:, level]).tolist() == list(range(m.vocab_sizes[level]))


def test_reconstruction_error_falls_level_by_level(model, content_model):
    for m in (model, content_model):
        assert len(m.errors) == m.levels + 1
        assert all(later < earlier for earlier, later in zip(m.errors, m.errors[1:])), m.errors
        assert m.to_dict()["stats"]["errors"] == [float(f"{e:.6g}") for e in m.errors]


def test_codes_are_capped_by_the_number_of_items():
    m = fit_semantic_ids(["a", "b", "c", "d", "e"], ["red mug", "blue mug", "tin lamp", "oil lamp", "red bag"], None,
                         SemanticIdParams(source="content", codes=256, dims=4))
    ids = m.ids_for(["a", "b", "c", "d", "e"])
    assert m.vocab_sizes[0] <= 5 and m.vocab_sizes[-1] == 64
    assert np.unique(ids[:, 0]).tolist() == list(range(m.vocab_sizes[0]))
    assert _unique_rows(ids) == 5


def test_items_sharing_all_codes_get_digits_in_value_order():
    # identical texts give identical vectors, so these items can only differ by the final digit
    m = fit_semantic_ids(["z", "y", "x", "w"], ["red mug", "red mug", "red mug", "blue lamp"], None,
                         SemanticIdParams(source="content", codes=4, dims=2))
    ids = m.ids_for(["w", "x", "y", "z"])
    assert (ids[1, :3] == ids[2, :3]).all() and (ids[2, :3] == ids[3, :3]).all()
    assert ids[1:, 3].tolist() == [0, 1, 2]
    assert ids[0, 3] == 0 and (ids[0, :3] != ids[1, :3]).any()


def test_too_many_collisions_name_the_fix():
    items = [f"i{k}" for k in range(10)]
    expected = r"10 items \('i0', 'i1', 'i2', \.\.\.\) share .* holds only 4: raise codes or levels"
    with pytest.raises(DomaintokError, match=expected):
        fit_semantic_ids(items, ["same text"] * 10, None, SemanticIdParams(source="content", disambiguation=4))


def test_same_seed_gives_byte_identical_json_whatever_the_input_order(catalogue, model):
    items, texts, sequences = catalogue
    params = SemanticIdParams(**SMALL, source="both")
    again = fit_semantic_ids(items, texts, sequences, params)
    assert again.to_json() == model.to_json()
    order = np.random.default_rng(1).permutation(len(items))
    where = np.argsort(order)  # new index of each old item
    shuffled = fit_semantic_ids(
        [items[i] for i in order], [texts[i] for i in order], [where[s] for s in sequences], params
    )
    assert shuffled.to_json() == model.to_json()
    # nor on the BLAS thread count of the process
    script = (
        "import sys, json; sys.path.insert(0, '.'); from tests.domaintok.test_semantic_ids import _catalogue, SMALL; "
        "from domaintok.semantic_ids import SemanticIdParams, fit_semantic_ids; "
        "sys.stdout.buffer.write(fit_semantic_ids(*_catalogue(), SemanticIdParams(**SMALL, source='both')).to_json())"
    )
    # the rest of the environment kept: a machine's OPENBLAS_CORETYPE picks other kernels (other last bits), and
    # the claim is about threads on one machine
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True, env=env, cwd=ROOT)
    assert out.stdout == model.to_json()
    other = fit_semantic_ids(items, texts, sequences, SemanticIdParams(**SMALL, source="both", seed=1))
    assert other.to_json() != model.to_json()
    assert len(model.to_json()) < 200_000  # 512 buckets x 8 dims: the projection dominates


def test_json_round_trip_gives_identical_ids_for_seen_unseen_and_null(model, content_model):
    values = ["SKU0003", "SKU0100", "NEW-1", "NEW-2", "NEW-3", None, "NEW-4"]
    texts = [None, "ignored for seen", "blue green teapot", "", None, "x", "torch bulb lamp no 9"]
    for m in (model, content_model):
        loaded = SemanticIds.from_json(m.to_json())
        assert loaded.to_json() == m.to_json()
        assert json.loads(m.to_json()) == m.to_dict()
        ids, origin = m.ids_and_origin(values, texts)
        ids2, origin2 = loaded.ids_and_origin(pa.array(values), pa.array(texts))
        assert np.array_equal(ids, ids2) and np.array_equal(origin, origin2)
        assert origin.tolist() == [ORIGIN_SEEN, ORIGIN_SEEN, ORIGIN_CONTENT, ORIGIN_HASHED, ORIGIN_HASHED,
                                   ORIGIN_NULL, ORIGIN_CONTENT]
        assert ids[5].tolist() == [NULL_ID] * 4
        assert np.array_equal(ids[:2], m.ids_for(["SKU0003", "SKU0100"]))


def test_nearest_neighbours_share_the_first_code_far_more_often_than_random_pairs(catalogue, model):
    items, _, _ = catalogue
    v = model.vectors / np.linalg.norm(model.vectors, axis=1, keepdims=True)
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    first = model.ids_for(model.items)[:, 0]
    nn_share = (first == first[np.argmax(sim, axis=1)]).mean()
    pairs = np.random.default_rng(0).integers(0, len(items), size=(5000, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    random_share = (first[pairs[:, 0]] == first[pairs[:, 1]]).mean()
    assert nn_share > 0.5 and nn_share > 4 * random_share, (nn_share, random_share)


def test_an_unseen_item_with_a_seen_items_text_gets_its_level_codes(catalogue, model, content_model):
    items, texts, _ = catalogue
    new = [f"NEW-{i}" for i in range(40)]
    # case and punctuation do not matter: the vectorizer sees lowercased words
    new_texts = [texts[i].upper().replace(" ", ", ") if i % 2 else texts[i] for i in range(40)]
    # where several items share a text, the first by value lends its codes
    lender = [items[texts.index(texts[i])] for i in range(40)]
    assert lender != items[:40]
    for m in (model, content_model):
        ids, origin = m.ids_and_origin(new, new_texts)
        assert (origin == ORIGIN_CONTENT).all()
        assert np.array_equal(ids[:, :3], m.ids_for(lender)[:, :3])
    # in a content model that holds for any text, through the content vector: an unseen item with the text of
    # another unseen item gets the same codes, and a near-copy of a seen text mostly keeps the first code
    ids = content_model.ids_for(["NEW-a", "NEW-b"], ["ribbon sticker bell", "ribbon sticker bell"])
    assert np.array_equal(ids[0, :3], ids[1, :3])
    near = content_model.ids_for(new, [t + " extra" for t in texts[:40]])
    assert (near[:, 0] == content_model.ids_for(items[:40])[:, 0]).mean() > 0.6


def test_hashed_fallback_is_fixed_across_processes_and_versions(catalogue):
    items, _, sequences = catalogue
    m = fit_semantic_ids(items, None, sequences, SemanticIdParams(**SMALL, source="cooccurrence"))
    assert m.vocab_sizes == [16, 16, 16, 64]
    values = ["NEW-1", "", "café ☕", "SKU9999"]
    ids, origin = m.ids_and_origin(values, ["a text a cooccurrence model cannot use"] * 4)
    assert (origin == ORIGIN_HASHED).all()
    assert ids.tolist() == EXPECTED_HASHED  # computed once; any change breaks every saved tokenizer's unseen IDs
    script = (
        "import sys, json; from domaintok.semantic_ids import SemanticIds; "
        "m = SemanticIds.from_json(sys.stdin.read()); "
        f"print(json.dumps(m.ids_for({values!r}).tolist())); "
        "print(sorted(k for k in ('sklearn', 'scipy', 'torch') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", script], input=m.to_json().decode(), capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", "PATH": ""})
    lines = out.stdout.splitlines()
    assert json.loads(lines[0]) == EXPECTED_HASHED
    assert lines[1] == "[]"  # serving needs neither scikit-learn, scipy nor torch


EXPECTED_HASHED = [[5, 5, 3, 60], [0, 11, 8, 35], [6, 13, 13, 56], [14, 6, 3, 13]]


def test_items_without_a_vector_get_hashed_codes_and_still_unique_ids(catalogue):
    items, texts, _ = catalogue
    texts = list(texts)
    texts[:30] = [None] * 10 + [""] * 10 + ["--- !!"] * 10  # no word at all
    m = fit_semantic_ids(items, texts, None, SemanticIdParams(**SMALL, source="content"))
    assert m.to_dict()["stats"]["hashed"] == 30
    ids = m.ids_for(items)
    assert _unique_rows(ids) == len(items)
    # the same value unseen (and without text) hashes to the same level codes
    unseen = SemanticIds.from_dict({**m.to_dict(), "items": ["other"], "ids": [[0, 0, 0, 0]]})
    assert np.array_equal(unseen.ids_for(items[:30])[:, :3], ids[:30, :3])


def test_item_sequences_orders_each_users_events_by_time():
    seqs = item_sequences(
        items=["a", "b", "c"],
        event_items=["b", "a", "zz", "c", "a", "b"],
        event_users=[2, 1, 1, None, 2, 1],
        event_times=[5, 9, 3, 1, 4, 3],
    )
    assert [s.tolist() for s in seqs] == [[-1, 1, 0], [0, 1]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": 0}, "levels=0 must be >= 1"),
        ({"codes": 0, "window": 0}, "codes=0 must be >= 1; window=0 must be >= 1"),
        ({"ngram_min": 3, "ngram_max": 2}, r"ngram range \[3, 2\]"),
        ({"content_weight": 1.5}, r"content_weight=1.5 must be within \[0, 1\]"),
    ],
)
def test_bad_params_are_named(kwargs, message):
    with pytest.raises(DomaintokError, match=message):
        SemanticIdParams(**kwargs)


def test_bad_inputs_are_named(model):
    with pytest.raises(DomaintokError, match="source='content' needs texts"):
        fit_semantic_ids(["a", "b"], None, None, SemanticIdParams(source="content"))
    with pytest.raises(DomaintokError, match="source='both' needs sequences"):
        fit_semantic_ids(["a", "b"], ["x", "y"], None, SemanticIdParams(source="both"))
    with pytest.raises(DomaintokError, match="items must be distinct, got 1 repeated"):
        fit_semantic_ids(["a", "b", "a"], ["x", "y", "z"], None, SemanticIdParams(source="content"))
    with pytest.raises(DomaintokError, match="2 texts for 3 items"):
        fit_semantic_ids(["a", "b", "c"], ["x", "y"], None, SemanticIdParams(source="content"))
    with pytest.raises(DomaintokError, match=r"outside \[-1, 2\)"):
        fit_semantic_ids(["a", "b"], None, [np.array([0, 2])], SemanticIdParams(source="cooccurrence"))
    with pytest.raises(DomaintokError, match="1 texts for 2 values"):
        model.ids_for(["NEW-1", "NEW-2"], ["x"])
    with pytest.raises(DomaintokError, match="expected format"):
        SemanticIds.from_dict({"format": "something else"})
    with pytest.raises(DomaintokError, match="semantic id params"):
        SemanticIds.from_dict({**model.to_dict(), "params": {"levels": "three"}})


# --- real data ----------------------------------------------------------------------------------------------------


def test_online_retail_items_by_description_and_basket(retail_events_slice):
    """The Online Retail slice (200 customers, ~20k line items): StockCodes with their most frequent description and
    each customer's purchases in time order."""
    import duckdb

    con = duckdb.connect()
    con.read_parquet(str(retail_events_slice)).create_view("ev")
    items = con.sql(
        "SELECT StockCode, arg_min(Description, (-n, Description)) AS text FROM "
        "(SELECT StockCode, Description, count(*) AS n FROM ev GROUP BY ALL) GROUP BY StockCode ORDER BY StockCode"
    ).to_arrow_table()
    events = con.sql("SELECT StockCode, CustomerID, InvoiceDate FROM ev").to_arrow_table()
    stock, text = items["StockCode"].combine_chunks(), items["text"].combine_chunks()
    sequences = item_sequences(stock, events["StockCode"], events["CustomerID"], events["InvoiceDate"])
    m = fit_semantic_ids(stock, text, sequences, SemanticIdParams(codes=64, dims=16, buckets=1024))
    ids = m.ids_for(stock)
    assert len(stock) > 1000 and _unique_rows(ids) == len(stock)
    content, has = m.content_vectors(text)
    v = content[has]
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    first = ids[has, 0]
    nn_share = (first == first[np.argmax(sim, axis=1)]).mean()
    random_share = (first == np.random.default_rng(0).permutation(first)).mean()
    assert nn_share > 0.3 and nn_share > 5 * random_share, (nn_share, random_share)
    # a re-coded product (new StockCode, same description) gets the product's level codes
    new_ids = m.ids_for([f"NEW-{s}" for s in stock.to_pylist()[:100]], text[:100])
    assert (new_ids[:, 0] == ids[:100, 0]).mean() > 0.9
