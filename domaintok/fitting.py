"""Fitting a tokenizer: each field encoder's state (quantiles, vocabularies, year range) and the text fields' shared
byte-level BPE, all computed by DuckDB over the raw events the filter keeps."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from domaintok.errors import DomaintokError
from domaintok.event_encoding import compact
from domaintok.event_sql import KEEP, DataLike, EventFilter, connect, create_events_view, ts_micros
from domaintok.fields import TextEncoder, make_encoder
from domaintok.schema import DomainSchema, load_schema

if TYPE_CHECKING:
    from domaintok.tokenizer import DomainTokenizer


def fit_tokenizer(
    cls: type[DomainTokenizer],
    schema: DomainSchema | str | os.PathLike,
    data: DataLike,
    *,
    bpe_vocab_size: int | None = None,
    max_length: int,
    progress: Callable[[str], None] | None = None,
    restrict: EventFilter | None = None,
) -> DomainTokenizer:
    """Fit quantile edges, vocabularies, calendar year range and the shared text BPE over all of `data`
    (parquet path(s) or an Arrow table) with DuckDB queries; nothing is loaded into Python row by row.
    `restrict` (a time cutoff, a user subset) drops events before anything is fitted."""
    if not isinstance(schema, DomainSchema):
        schema = load_schema(schema)
    if max_length < 2:
        raise DomaintokError(f"max_length must be >= 2, got {max_length}")
    report = progress or (lambda step: None)
    con = connect(schema)
    try:
        view = create_events_view(con, schema, data, restrict=restrict)
        con.execute(f"CREATE TEMP VIEW __fit AS SELECT * FROM {view} WHERE {KEEP}")
        encoders = [make_encoder(spec) for spec in schema.fields]
        for i, enc in enumerate(encoders):
            report(f"fit {enc.spec.name} ({enc.spec.type})")
            enc.fit(con, "__fit", f"__f{i}")
        texts = [(i, enc) for i, enc in enumerate(encoders) if isinstance(enc, TextEncoder)]
        bpe = None
        if texts:
            report("train BPE on " + ", ".join(enc.spec.name for _, enc in texts))
            size = bpe_vocab_size or max(enc.params.bpe_vocab_size for _, enc in texts)
            bpe = _train_bpe(con, texts, size)
        tok = cls(schema, encoders, bpe, max_length)
        if schema.actionpiece is not None:
            report(f"learn {schema.actionpiece.merges} ActionPiece merges")
            tok = cls(schema, encoders, bpe, max_length, _fit_merges(tok, con, schema.actionpiece))
        report("measure")
        tok.fit_stats = _measure(tok, con)
    finally:
        con.close()
    return tok


def _user_histories(tok: DomainTokenizer, con, max_users: int, max_events: int | None = None):
    """The events of up to `max_users` users' whole histories (users by id, events in time order), encoded and with
    the previous-event step applied: (token matrix, per-user row counts)."""
    n_fields = len(tok.encoders)
    cols = ", ".join(f"__f{i}" for i in range(n_fields))
    limit = f" LIMIT {int(max_events)}" if max_events else ""
    sample = con.sql(
        f"SELECT __user, __ts, {cols} FROM __fit WHERE __user IN "
        f"(SELECT DISTINCT __user FROM __fit ORDER BY __user LIMIT {int(max_users)}) "
        f"ORDER BY __user, __ts, __input, __row{limit}"
    ).to_arrow_table()
    matrix = tok.encoding.encode_matrix([sample.column(2 + i) for i in range(n_fields)], sample.num_rows)
    users = sample.column(0).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]])) if len(users) else np.zeros(0, np.int64)
    if tok.context.active and sample.num_rows:
        tok.context.apply_sorted(matrix, ts_micros(sample.column(1)), starts)
    return matrix, np.diff(np.append(starts, len(users)))


def _fit_merges(tok: DomainTokenizer, con, params):
    """ActionPiece merges of the fields' tokens (text pieces excepted), learned within events on whole histories."""
    from domaintok.actionpiece import fit_actionpiece

    matrix, _ = _user_histories(tok, con, params.max_users)
    events = matrix[:, tok.encoding.merge_columns]
    return fit_actionpiece(events[(events != 0).any(axis=1)], base=tok.vocab_size, n_merges=params.merges)


def _measure(tok: DomainTokenizer, con) -> dict[str, Any]:
    """What the data looked like (not part of the saved state or fingerprint): counts, and tokens per event over
    the whole histories of up to 2,000 users (at most 50,000 events), previous-event step included."""
    n_events, n_users = con.execute("SELECT count(*), count(DISTINCT __user) FROM __fit").fetchall()[0]
    matrix, _ = _user_histories(tok, con, max_users=2000, max_events=50_000)
    lengths, _ = compact(tok.encoding.merge(matrix))
    return {
        "events": int(n_events),
        "users": int(n_users),
        "tokens_per_event": float(lengths.mean()) if len(lengths) else 0.0,
        "vocab_size": tok.vocab_size,
        "bpe_pieces": tok.bpe.get_vocab_size() if tok.bpe is not None else 0,
    }


def _train_bpe(con, texts: list[tuple[int, TextEncoder]], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )

    def corpus() -> Iterator[list[str]]:
        # distinct texts with their counts; a text seen c times is fed as min(c, 20) space-separated copies, so merges
        # follow event frequency (the cap keeps fit fast: 1M events in ~1 s) and each copy gets the same prefix space
        # as at encode time
        for i, enc in texts:
            expr = f"trim(__f{i})"
            if enc.params.lowercase:
                expr = f"lower({expr})"
            reader = con.sql(
                f"SELECT v, count(*)::BIGINT AS c FROM (SELECT {expr} AS v FROM __fit) WHERE v <> '' GROUP BY v"
            ).to_arrow_reader(8192)
            for batch in reader:
                vs = batch.column(0).to_pylist()
                cs = batch.column(1).to_pylist()
                yield [(v + " ") * min(c, 20) for v, c in zip(vs, cs)]

    bpe.train_from_iterator(corpus(), trainer=trainer)
    return bpe
