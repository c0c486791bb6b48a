"""ActionPiece inside the tokenizer (schema `actionpiece: {merges: N}`): merges learned at fit, saved with the
tokenizer, applied the same way by tokenize and the online encoder, lossless (each event's merged tokens decode to
exactly its field tokens), text pieces left alone, and every merged token in the HF tokenizer at its id."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from domaintok.errors import SchemaError
from domaintok.schema import schema_from_dict
from domaintok.tokenizer import SEP_ID, DomainTokenizer
from tests.domaintok.online_replay import assert_online_equals_offline
from tests.domaintok.test_tokenizer import SCHEMA, _toy_table


def _schema(merges: int | None = 40, **extra):
    raw = {**SCHEMA, "fields": [dict(f) for f in SCHEMA["fields"]], **extra}
    if merges is not None:
        raw["actionpiece"] = {"merges": merges}
    return schema_from_dict(raw)


@pytest.fixture(scope="module")
def fitted():
    table = _toy_table(n=800, seed=11, users=10)
    return DomainTokenizer.fit(_schema(), table, max_length=10_000), DomainTokenizer.fit(
        _schema(None), table, max_length=10_000), table


def _events(ids):
    out, cur = [], []
    for t in ids[1:]:
        if t == SEP_ID:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def test_merges_shorten_events_and_decode_to_exactly_the_field_tokens(fitted):
    tok, plain, table = fitted
    assert tok.merges.n_merges == 40 and tok.vocab_size == plain.vocab_size + 40
    merged, base = tok.tokenize(table), plain.tokenize(table)
    assert merged.column("user_id").equals(base.column("user_id"))
    n_merged = n_base = 0
    for a, b in zip(merged.column("input_ids").to_pylist(), base.column("input_ids").to_pylist()):
        ea, eb = _events(a), _events(b)
        assert len(ea) == len(eb)
        for x, y in zip(ea, eb):
            text = [t for t in y if t >= plain.bpe_base]
            assert [t for t in x if plain.bpe_base <= t < tok.merges.base] == text  # text pieces, in order
            fields = sorted(t for t in x if t < plain.bpe_base or t >= tok.merges.base)
            assert sorted(tok.merges.decode(fields)) == sorted(t for t in y if t < plain.bpe_base)
        n_merged += len(a)
        n_base += len(b)
    assert n_merged < 0.8 * n_base


def test_offline_equals_online_micro_batches_and_round_trip(fitted, tmp_path):
    tok, _, table = fitted
    tok.save_pretrained(tmp_path)
    loaded = DomainTokenizer.from_pretrained(tmp_path)
    assert loaded.fingerprint == tok.fingerprint and loaded.merges.to_json() == tok.merges.to_json()
    assert_online_equals_offline(loaded, table, batches=7)  # small batches take the rounds path, the whole the sweep
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    names = loaded.token_names()
    assert len(hf) == loaded.vocab_size and hf.convert_tokens_to_ids(names[-1]) == loaded.vocab_size - 1
    assert names[-1] == f"[AP_{loaded.merges.n_merges - 1:05d}]"


def test_no_actionpiece_keeps_every_fingerprint_and_bad_options_are_schema_errors(fitted):
    _, plain, _ = fitted
    again = DomainTokenizer.fit(schema_from_dict(SCHEMA), _toy_table(n=800, seed=11, users=10), max_length=10_000)
    assert again.fingerprint == plain.fingerprint and schema_from_dict(SCHEMA).fingerprint == _schema(None).fingerprint
    with pytest.raises(SchemaError, match="actionpiece: merges and max_users must be >= 1"):
        _schema(0)
