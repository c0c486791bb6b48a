"""Benchmark of semantic IDs on the real Online Retail data (both files, ~1.07M line items, ~5.3k StockCodes):
fit time, how often items share a first-level code with their nearest neighbour vs random pairs, JSON size, and
serving throughput of `ids_for` over every event.

Run: .venv/bin/python benchmarks/bench_semantic_ids.py [--source both] [--levels 3] [--codes 256] [--dims 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from domaintok.semantic_ids import ORIGIN_CONTENT, SemanticIdParams, SemanticIds, fit_semantic_ids, item_sequences

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "online_retail"
FILES = [DATA / "online_retail_II_sheet2009-2010.parquet", DATA / "online_retail_I_2010-2011.parquet"]

# Both files in one spelling; the 2009-2010 file's rows from 2010-12-01 on repeat the other file's first days, and
# its 2,928 'nan' descriptions are missing values spelled out by an export, not text.
EVENTS_SQL = """
SELECT StockCode, NULLIF(Description, 'nan') AS Description, CAST("Customer ID" AS BIGINT) AS customer,
       CAST(InvoiceDate AS TIMESTAMP) AS ts
FROM read_parquet($a) WHERE CAST(InvoiceDate AS TIMESTAMP) < TIMESTAMP '2010-12-01'
UNION ALL
SELECT StockCode, Description, CAST(CustomerID AS BIGINT), InvoiceDate FROM read_parquet($b)
"""
# Each StockCode's text: its most frequent description (ties: the smallest), so the item table is deterministic.
ITEMS_SQL = """
SELECT StockCode, arg_min(Description, (-n, Description)) AS text FROM (
    SELECT StockCode, Description, count(*) AS n FROM events WHERE Description IS NOT NULL GROUP BY ALL
) GROUP BY StockCode
UNION ALL
SELECT DISTINCT StockCode, NULL FROM events
WHERE StockCode NOT IN (SELECT StockCode FROM events WHERE Description IS NOT NULL)
ORDER BY StockCode
"""


def load() -> tuple[pa.Table, pa.Table]:
    """(events: StockCode, Description, customer, ts; items: StockCode, text) of both files."""
    con = duckdb.connect()
    con.execute(f"CREATE TABLE events AS {EVENTS_SQL}", {"a": str(FILES[0]), "b": str(FILES[1])})
    events = con.table("events").to_arrow_table()
    items = con.execute(ITEMS_SQL).to_arrow_table()
    con.close()
    return events, items


def nn_share(
    vectors: np.ndarray, has: np.ndarray, first: np.ndarray, rng: np.random.Generator
) -> tuple[float, float, int]:
    """Share of items whose cosine nearest neighbour (another item with a vector) has the same first code, the same
    share for random pairs, and how many items were compared."""
    idx = np.flatnonzero(has)
    v = vectors[idx] / np.linalg.norm(vectors[idx], axis=1, keepdims=True)
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    nn = idx[np.argmax(sim, axis=1)]
    other = idx[(np.arange(len(idx)) + rng.integers(1, len(idx), size=len(idx))) % len(idx)]
    return float((first[idx] == first[nn]).mean()), float((first[idx] == first[other]).mean()), len(idx)


def report_quality(model: SemanticIds, stock: pa.Array, text: pa.Array, ids: np.ndarray) -> None:
    rows = {tuple(r) for r in ids.tolist()}
    print(f"vocab sizes {model.vocab_sizes}  unique full IDs {len(rows)}/{len(ids)}  max digit {ids[:, -1].max()}")
    print("mean squared residual before quantization and per level:", " ".join(f"{e:.4f}" for e in model.errors))
    groups = np.bincount(ids[:, 0])
    print(f"first-level codes used {len(np.unique(ids[:, 0]))}, largest first-level group {groups.max()}")
    rng = np.random.default_rng(0)
    if model.params.source != "cooccurrence":
        content, has = model.content_vectors(text)
        same, rand, n = nn_share(content, has, ids[:, 0], rng)
        print(f"content nearest neighbour shares the first code: {same:.1%} of {n} items (random pairs {rand:.1%})")
    joint = model.vectors[pc.index_in(stock, value_set=model.items).to_numpy()]  # fit vectors follow sorted items
    same, rand, n = nn_share(joint, np.linalg.norm(joint, axis=1) > 0, ids[:, 0], rng)
    print(f"fit-vector nearest neighbour shares the first code: {same:.1%} of {n} items (random pairs {rand:.1%})")
    print(f"JSON {len(model.to_json()) / 1e6:.2f} MB")


def report_serving(model: SemanticIds, events: pa.Table, text: pa.Array, ids: np.ndarray) -> None:
    values, texts = events["StockCode"].combine_chunks(), events["Description"].combine_chunks()
    start = time.perf_counter()
    model.ids_for(values, texts)
    dt = time.perf_counter() - start
    print(f"ids_for over all {len(values):,} events (seen values): {dt:.2f}s ({len(values) / dt / 1e6:.1f}M/s)")
    rng = np.random.default_rng(1)
    pick = rng.integers(0, len(text), size=100_000)
    # unseen values: with a seen item's exact text (text match), then with distinct edited texts (content vectors)
    for name, new_texts in (
        ("a seen item's text", text.take(pa.array(pick))),
        ("an edited text (+ ' XL <n>')", pa.array([f"{t} XL {i}" for i, t in enumerate(text.take(pa.array(pick)))])),
    ):
        unseen = pa.array([f"NEW-{i}" for i in range(len(pick))])
        start = time.perf_counter()
        new_ids, origin = model.ids_and_origin(unseen, new_texts)
        dt = time.perf_counter() - start
        ok = origin == ORIGIN_CONTENT
        first = (new_ids[ok, 0] == ids[pick[ok], 0]).mean() if ok.any() else float("nan")
        levels = (new_ids[ok, :-1] == ids[pick[ok], :-1]).all(axis=1).mean() if ok.any() else float("nan")
        print(f"{len(pick):,} unseen values with {name}: {dt:.2f}s ({len(pick) / dt / 1e3:.0f}k/s), {ok.mean():.1%} "
              f"coded by content; same first code as that item {first:.1%}, same level codes {levels:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="both", choices=["content", "cooccurrence", "both"])
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--codes", type=int, default=256)
    ap.add_argument("--dims", type=int, default=32)
    ap.add_argument("--buckets", type=int, default=4096)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    params = SemanticIdParams(levels=args.levels, codes=args.codes, dims=args.dims, buckets=args.buckets,
                              window=args.window, source=args.source, seed=args.seed)
    t0 = time.perf_counter()
    events, items = load()
    stock, text = items["StockCode"].combine_chunks(), items["text"].combine_chunks()
    t1 = time.perf_counter()
    sequences = item_sequences(stock, events["StockCode"], events["customer"], events["ts"])
    t2 = time.perf_counter()
    model = fit_semantic_ids(stock, text, sequences, params)
    t3 = time.perf_counter()
    print(f"events {len(events):,}  items {len(stock):,} ({text.null_count} without text)  "
          f"customers {len(sequences):,}")
    print(f"load {t1 - t0:.2f}s  sequences {t2 - t1:.2f}s  fit {t3 - t2:.2f}s  ({params})")
    ids = model.ids_for(stock)
    report_quality(model, stock, text, ids)
    report_serving(model, events, text, ids)


if __name__ == "__main__":
    main()
