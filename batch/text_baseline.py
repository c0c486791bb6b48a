"""The text-serialization baseline: each event as a line of plain text, a generic byte-level BPE trained on it.

Each event is its schema fields' values in schema order ("+ | 15.30 | 2011-03-04 12:30 | WHITE HANGING HEART | United
Kingdom | 6 | 85123A" for a retail line item): no column is named here. Sequences are laid out like the domain tokens
([BOS] e1 [SEP] ... en [SEP], newest whole events kept), so the same transformer can read them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from domaintok.errors import DomaintokError
from domaintok.offline import SEQUENCES_SCHEMA
from domaintok.vocab import BOS_ID, SEP_ID, SPECIAL_TOKENS


def _field_text(i: int, ftype: str) -> str:
    """SQL rendering of field i's value (column __f{i} of the tokenizer's events view) as short text."""
    col = f"__f{i}"
    if ftype == "temporal":
        return f"strftime({col}, '%Y-%m-%d %H:%M')"
    if ftype == "sign":
        return f"CASE WHEN {col} > 0 THEN '+' WHEN {col} < 0 THEN '-' WHEN {col} = 0 THEN '0' END"
    if ftype == "numerical_discrete":
        return f"CAST(CAST(round({col}) AS BIGINT) AS VARCHAR)"
    if ftype == "numerical_continuous":
        return f"printf('%.2f', {col})"
    return f"trim({col})"


def serialize_events(schema, data, max_events_per_user: int | None = None) -> pa.Table:
    """Events a schema reads (parquet path(s) or an Arrow table) -> (user_id, event_ts, n_events, text), ordered by
    user then time; text is every schema field's value in schema order, joined by " | " ("?" when null).

    Only each user's newest `max_events_per_user` events are serialized (the context window never holds more);
    n_events still counts all of them. Rows the schema's filter drops, or without a user or time, are left out.
    """
    from domaintok.schema import DomainSchema, load_schema
    from domaintok.event_sql import KEEP, connect, create_events_view

    if not isinstance(schema, DomainSchema):
        schema = load_schema(schema)
    con = connect(schema)
    view = create_events_view(con, schema, data)
    parts = [f"coalesce({_field_text(i, f.type)}, '?')" for i, f in enumerate(schema.fields)]
    text = " || ' | ' || ".join(parts)
    limit = "" if max_events_per_user is None else "WHERE rank_from_newest <= $limit"
    params = {} if max_events_per_user is None else {"limit": int(max_events_per_user)}
    try:
        return con.sql(
            f"""
            WITH numbered AS (
                SELECT __user AS user_id, __ts AS event_ts, {text} AS text,
                       row_number() OVER (PARTITION BY __user ORDER BY __ts DESC, __input DESC, __row DESC)
                         AS rank_from_newest,
                       count(*) OVER (PARTITION BY __user) AS n_events
                FROM {view} WHERE {KEEP}
            )
            SELECT user_id, event_ts, n_events, text FROM numbered {limit}
            ORDER BY user_id, event_ts, rank_from_newest DESC
            """,
            params=params,
        ).to_arrow_table()
    finally:
        con.close()


def train_text_tokenizer(texts: list[str], vocab_size: int = 4096, context_length: int = 1024):
    """A generic byte-level BPE (GPT-2 style pre-tokenization) trained on `texts`, as a PreTrainedTokenizerFast
    with the same special tokens and ids as the domain tokenizer ([PAD]=0 ... [MASK]=5)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise DomaintokError("no event text to train the text BPE on")
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    for token, expected in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
        if bpe.token_to_id(token) != expected:
            raise DomaintokError(
                f"text BPE: special token {token} got id {bpe.token_to_id(token)}, expected {expected}"
            )
    fingerprint = "text-bpe-" + hashlib.sha256(bpe.to_str().encode("utf-8")).hexdigest()[:16]
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=context_length, fingerprint=fingerprint,
    )


def text_sequences(tokenizer, serialized: pa.Table, context_length: int) -> pa.Table:
    """Serialized events (ordered by user, time) -> one row per user in the sequences.parquet layout.

    [BOS] e1 [SEP] ... en [SEP], keeping the newest whole events within `context_length` tokens (the domain
    tokenizer's rule); an event longer than the whole window keeps its last tokens.
    """
    texts = serialized.column("text").to_pylist()
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    users = serialized.column("user_id").to_pylist()
    n_events = serialized.column("n_events").to_numpy()
    ts = serialized.column("event_ts").cast(pa.timestamp("us")).to_numpy().astype("datetime64[us]").astype(np.int64)
    out_users, out_ids, out_n, out_ts = [], [], [], []
    start = 0
    N = len(users)
    while start < N:
        end = start
        while end < N and users[end] == users[start]:
            end += 1
        budget = context_length - 1  # [BOS]
        kept: list[list[int]] = []
        for i in range(end - 1, start - 1, -1):  # newest first
            ids = encoded[i].ids + [SEP_ID]
            if len(ids) > budget:
                if not kept:
                    kept.append(ids[len(ids) - budget:])
                break
            kept.append(ids)
            budget -= len(ids)
        out_users.append(users[start])
        out_ids.append(np.concatenate([[BOS_ID], *reversed(kept)]).astype(np.int32))
        out_n.append(int(n_events[start]))
        out_ts.append(int(ts[start:end].max()))
        start = end
    return pa.table(
        {
            "user_id": pa.array(out_users, pa.string()),
            "input_ids": pa.array(out_ids, pa.list_(pa.int32())),
            "n_events": pa.array(out_n, pa.int64()),
            "last_event_ts": pa.array(out_ts, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        },
        schema=SEQUENCES_SCHEMA,
    )


def fit_text_baseline(
    schema,
    fit_events,
    all_events,
    tokenizer_dir: str | Path,
    context_length: int,
    vocab_size: int = 4096,
) -> tuple[object, pa.Table]:
    """Train the BPE on the text of `fit_events` (what `schema` reads: parquet path(s) or an Arrow table), save it to
    `tokenizer_dir`, and return it with the sequences of every user in `all_events`."""
    # Enough events that a window of context_length tokens is always full (an event is >= ~10 BPE tokens).
    max_events = max(8, context_length // 4)
    fit_text = serialize_events(schema, fit_events).column("text").to_pylist()
    tokenizer = train_text_tokenizer(fit_text, vocab_size=vocab_size, context_length=context_length)
    tokenizer.save_pretrained(str(tokenizer_dir))
    sequences = text_sequences(tokenizer, serialize_events(schema, all_events, max_events), context_length)
    return tokenizer, sequences


__all__ = ["serialize_events", "train_text_tokenizer", "text_sequences", "fit_text_baseline", "SEQUENCES_SCHEMA"]
