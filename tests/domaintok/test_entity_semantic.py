"""categorical_entity with `ids: semantic` inside the tokenizer: fitted from the items' text and co-occurrence
through DuckDB, saved and loaded with the tokenizer, the same ids offline and online, unseen items coded from their
text, and schema errors for options that do not fit together."""

from __future__ import annotations

import pyarrow as pa
import pytest

from domaintok.errors import SchemaError
from domaintok.schema import schema_from_dict
from domaintok.tokenizer import DomainTokenizer
from tests.domaintok.online_replay import assert_online_equals_offline
from tests.domaintok.test_tokenizer import SCHEMA, _toy_table

SEMANTIC = {"ids": "semantic", "content": "text", "semantic": {"levels": 2, "codes": 8, "disambiguation": 64}}


def _schema(params=SEMANTIC):
    raw = {**SCHEMA, "fields": [dict(f) for f in SCHEMA["fields"]]}
    for f in raw["fields"]:
        if f["name"] == "item":
            f["params"] = params
    return schema_from_dict(raw)


@pytest.fixture(scope="module")
def fitted():
    table = _toy_table(n=600, seed=5, users=10)
    return DomainTokenizer.fit(_schema(), table, max_length=10_000), table


def _item_names(tok, ids):
    return [n for n in tok.decode_tokens(ids) if n.startswith("[ITEM_")]


def test_every_event_gets_levels_plus_digit_tokens_in_range(fitted):
    tok, table = fitted
    enc = next(e for e in tok.encoders if e.spec.name == "item")
    assert enc.width == 3 and enc.n_tokens == 1 + sum(enc.semantic.vocab_sizes)
    seq = tok.tokenize(table)
    for ids in seq.column("input_ids").to_pylist():
        names = _item_names(tok, ids)
        assert names and all(n.startswith(("[ITEM_L0_", "[ITEM_L1_", "[ITEM_D_")) for n in names)
        assert max(ids) < tok.vocab_size


def test_offline_equals_online_and_round_trip(fitted, tmp_path):
    tok, table = fitted
    tok.save_pretrained(tmp_path)
    loaded = DomainTokenizer.from_pretrained(tmp_path)
    assert loaded.fingerprint == tok.fingerprint
    assert_online_equals_offline(loaded, table, batches=5)


def test_an_unseen_item_with_a_known_text_gets_that_items_codes(fitted):
    tok, table = fitted
    rows = [r for r in table.to_pylist() if r["user"] is not None and r["cat"] != "drop"]
    # each item's text as the fit takes it: its most frequent non-null text, ties by the smaller text
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        if r["text"] is not None:
            counts.setdefault(r["item"], {}).setdefault(r["text"], 0)
            counts[r["item"]][r["text"]] += 1
    fitted_text = {item: min(c, key=lambda t: (-c[t], t)) for item, c in counts.items()}
    item = min(i for i, t in fitted_text.items() if t.strip())  # the first item (value order) with that text
    text = fitted_text[item]
    row = {**next(r for r in rows if r["item"] == item), "text": text}
    seen = _item_names(tok, tok.encode_event_tokens([row]).ids)
    unseen = _item_names(tok, tok.encode_event_tokens([{**row, "item": "never-seen-sku", "text": text.upper()}]).ids)
    first_with_text = min(i for i, t in fitted_text.items() if t == text)
    first = _item_names(tok, tok.encode_event_tokens([{**row, "item": first_with_text}]).ids)
    assert unseen[:2] == first[:2] and first_with_text == item and seen == first  # level codes; the digit is its own
    hashed = _item_names(tok, tok.encode_event_tokens([{**row, "item": "never-seen-sku", "text": None}]).ids)
    assert len(hashed) == 3
    null = _item_names(tok, tok.encode_event_tokens([{**row, "item": None}]).ids)
    assert null == ["[ITEM_NULL]"]


def test_cooccurrence_only_needs_no_content_and_bad_options_are_schema_errors():
    table = _toy_table(n=300, seed=6, users=8)
    tok = DomainTokenizer.fit(_schema({"ids": "semantic", "semantic": {"source": "cooccurrence", "codes": 4}}), table)
    assert any(n.startswith("[ITEM_L0_") for n in tok.domain_token_names())
    with pytest.raises(SchemaError, match="need `content`"):
        _schema({"ids": "semantic"})
    with pytest.raises(SchemaError, match="semantic: "):
        _schema({"ids": "semantic", "content": "text", "semantic": {"levels": 0}})
    with pytest.raises(SchemaError, match="apply to ids: semantic only"):
        _schema({"content": "text"})


def test_a_hashed_entity_is_unchanged_by_the_option():
    table = _toy_table(n=200, seed=7, users=5)
    a = DomainTokenizer.fit(_schema({"buckets": 16, "n_tokens": 2}), table)
    b = DomainTokenizer.fit(schema_from_dict(SCHEMA), table)
    assert a.tokenize(table).equals(b.tokenize(table)) and a.fingerprint == b.fingerprint
    assert pa.types.is_integer(b.tokenize(table).column("input_ids").type.value_type)
