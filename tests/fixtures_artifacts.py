"""Fixtures for data and fitted artifacts shared across the suite (real Online Retail data, fitted tokenizers).

All session-scoped and fast (about 2 s together, after imports):
- `shared_data_dir`: Path of `<repo>/../shared/data`; the test is skipped (with the reason) where it is absent.
- `retail_events_slice`: Path of a parquet file holding every line item of 200 customers (plus 300 rows without a
  customer, which the schema filter drops) from the 2010-2011 Online Retail file, raw spelling (InvoiceNo,
  UnitPrice, CustomerID float, InvoiceDate timestamp). About 20k rows.
- `retail_tokenizer`: Path of a tokenizer directory fitted with the shipped online_retail schema on that slice
  (`DomainTokenizer.from_pretrained(path)` or `transformers.AutoTokenizer.from_pretrained(path)` load it).
- `retail_domain_tokenizer`: that tokenizer, loaded (a DomainTokenizer).
- `retail_sequences`: Path of sequences.parquet (user_id, input_ids list<int32>, n_events, last_event_ts) tokenized
  from the slice with the tokenizer's default max_length (200 rows).
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
RETAIL_2010_2011 = "online_retail/online_retail_I_2010-2011.parquet"
RETAIL_2009_2010 = "online_retail/online_retail_II_sheet2009-2010.parquet"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not (SHARED_DATA / RETAIL_2010_2011).is_file():
        pytest.skip(f"real data absent: {SHARED_DATA} (../shared/data next to the repo) has no Online Retail files")
    return SHARED_DATA


@pytest.fixture(scope="session")
def retail_events_slice(shared_data_dir, tmp_path_factory) -> Path:
    import duckdb

    out = tmp_path_factory.mktemp("retail_slice") / "events.parquet"
    con = duckdb.connect()
    src = con.read_parquet(str(shared_data_dir / RETAIL_2010_2011))
    src.create_view("src")
    con.execute(
        "CREATE TABLE slice AS "
        "SELECT * FROM src WHERE CustomerID IN (SELECT DISTINCT CustomerID FROM src WHERE CustomerID IS NOT NULL "
        "ORDER BY CustomerID LIMIT 200) "
        "UNION ALL (SELECT * FROM src WHERE CustomerID IS NULL ORDER BY InvoiceNo, StockCode LIMIT 300)"
    )
    con.table("slice").to_parquet(str(out))
    con.close()
    return out


@pytest.fixture(scope="session")
def retail_tokenizer(retail_events_slice, tmp_path_factory) -> Path:
    from domaintok.tokenizer import DomainTokenizer

    out = tmp_path_factory.mktemp("retail_tokenizer")
    DomainTokenizer.fit("online_retail", retail_events_slice, bpe_vocab_size=600).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def retail_domain_tokenizer(retail_tokenizer):
    from domaintok.tokenizer import DomainTokenizer

    return DomainTokenizer.from_pretrained(retail_tokenizer)


@pytest.fixture(scope="session")
def retail_sequences(retail_domain_tokenizer, retail_events_slice, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("retail_sequences") / "sequences.parquet"
    retail_domain_tokenizer.tokenize_to_parquet(retail_events_slice, out)
    return out
