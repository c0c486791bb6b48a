"""Offline tokenize: raw events (parquet, Arrow) -> one row per user (SEQUENCES_SCHEMA), streamed in user order.

One unsorted DuckDB scan per chunk, encoded batch by batch into a padded token matrix, ordered in numpy on integer
keys, the previous-event step, then the window rule (`domaintok.window.keep_newest_events`). Memory is bounded by
one chunk: inputs over CHUNK_EVENTS events are split into user ranges.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from domaintok.artifacts import atomic_file
from domaintok.event_encoding import EventEncoding, compact
from domaintok.event_sql import (
    KEEP,
    DataLike,
    EventFilter,
    create_events_view,
    field_sql,
    input_rows,
    sql_str,
    tokenize_connection,
    ts_micros,
)
from domaintok.schema import SQL_TYPE_BY_FIELD, DomainSchema
from domaintok.settings import Settings
from domaintok.vocab import BOS_ID
from domaintok.window import keep_newest_events

if TYPE_CHECKING:
    from domaintok.tokenizer import DomainTokenizer

# DuckDB's budget in tokenize (the scans and the per-user counts of a large input): beyond it DuckDB spills to disk
TOKENIZE_MEMORY_LIMIT = "256MB"
# tokenize holds at most this many events in memory: larger inputs are tokenized in user ranges of this size
CHUNK_EVENTS = Settings.tokenize_chunk_events  # the default; DOMAINTOK_TOKENIZE_CHUNK_EVENTS overrides it

# The sequences table (tokenize() output and sequences.parquet), declared once.
SEQUENCES_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("n_events", pa.int64(), nullable=False),
        pa.field("last_event_ts", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def iter_tokenize(
    tok: DomainTokenizer,
    data: DataLike,
    max_length: int | None = None,
    *,
    batch_size: int = 131072,
    on_rows: Callable[[int], None] | None = None,
    memory_limit: str | None = TOKENIZE_MEMORY_LIMIT,
    stats: dict[str, int] | None = None,
    chunk_events: int | None = None,
    restrict: EventFilter | None = None,
) -> Iterator[pa.RecordBatch]:
    """Yield SEQUENCES_SCHEMA record batches, one row per user in user order, memory bounded by one chunk.

    A chunk is read with one unsorted, parallel DuckDB scan and encoded batch by batch (while DuckDB reads ahead)
    into a small padded token matrix; only then is it ordered by (user, event time, input, input row), with numpy
    on integer keys, so no string or payload column ever goes through a sort. The tokens that depend on the
    previous event (domaintok/context.py) are filled in after the ordering. Inputs with more rows than
    `chunk_events` (DOMAINTOK_TOKENIZE_CHUNK_EVENTS) are split into user ranges of at most that many events (a user is never split), one scan each. `stats`, when
    given, receives the counts `events` and `event_tokens` (tokens of every event before truncation, [SEP]
    included), `truncated_users` and `truncated_tokens` (users and event tokens left out of the windows) and
    `user_tokens` (a list of arrays: each user's full sequence length, [BOS] included). `restrict` (a time
    cutoff, a user subset) drops events before tokenizing.
    """
    max_length = tok.check_max_length(max_length)
    chunk_events = int(chunk_events or Settings.from_env().tokenize_chunk_events)
    stats = stats if stats is not None else {}
    con = tokenize_connection(tok.schema, memory_limit)
    try:
        view = create_events_view(con, tok.schema, data, restrict=restrict)
        for where in _user_ranges(con, view, data, chunk_events):
            chunk = _scan_chunk(tok, con, view, where, batch_size, on_rows)
            if chunk is not None:
                yield from _chunk_sequences(tok.encoding, *chunk, max_length, batch_size, stats)
    finally:
        con.close()


def tokenize(tok: DomainTokenizer, data: DataLike, max_length: int | None = None, **kwargs: Any) -> pa.Table:
    """One row per user: user_id, input_ids ([BOS] e1 [SEP] ... en [SEP], newest whole events that fit
    max_length), n_events (all events of the user), last_event_ts (UTC)."""
    return pa.Table.from_batches(list(iter_tokenize(tok, data, max_length, **kwargs)), schema=SEQUENCES_SCHEMA)


def tokenize_to_parquet(
    tok: DomainTokenizer,
    data: DataLike,
    out_path: str | os.PathLike,
    max_length: int | None = None,
    *,
    on_rows: Callable[[int], None] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Stream sequences into a parquet file (written to a temp file beside it, then renamed); returns counts."""
    start = time.perf_counter()
    users = tokens = 0
    counts: dict[str, int] = {}
    with atomic_file(out_path) as tmp, pq.ParquetWriter(tmp, SEQUENCES_SCHEMA, compression="zstd") as writer:
        for batch in iter_tokenize(tok, data, max_length, on_rows=on_rows, stats=counts, **kwargs):
            writer.write_batch(batch)
            users += batch.num_rows
            tokens += len(batch.column("input_ids").values)
    events = counts.get("events", 0)
    user_tokens = np.concatenate(counts.get("user_tokens") or [np.zeros(0, np.int64)])
    return {
        "users": users,
        "events": events,
        "sequence_tokens": tokens,
        "tokens_per_event": counts.get("event_tokens", 0) / max(events, 1),
        "median_user_tokens": float(np.median(user_tokens)) if user_tokens.size else 0.0,
        "truncated_users": counts.get("truncated_users", 0),
        "truncated_token_fraction": counts.get("truncated_tokens", 0) / max(counts.get("event_tokens", 0), 1),
        "seconds": time.perf_counter() - start,
    }


def _user_ranges(con, view: str, data: DataLike, chunk_events: int) -> list[str]:
    """SQL conditions on __user that split the kept events into user ranges of at most chunk_events events each
    ('' = all of them, the case whenever the input has no more rows than that: no extra pass)."""
    if input_rows(data) <= chunk_events:
        return [""]
    counts = con.sql(
        f"SELECT __user, count(*) AS c FROM {view} WHERE {KEEP} GROUP BY __user ORDER BY __user"
    ).to_arrow_table()
    users, csum = counts.column(0), np.cumsum(counts.column(1).to_numpy())
    bounds, start = [], 0
    while start < len(csum):
        before = int(csum[start - 1]) if start else 0
        end = max(int(np.searchsorted(csum, before + chunk_events, side="right")), start + 1)
        bounds.append(end)
        start = end
    if len(bounds) <= 1:
        return [""]
    lit = [sql_str(users[b - 1].as_py()) for b in bounds]
    conds = [f"__user <= {lit[0]}"]
    conds += [f"__user > {lo} AND __user <= {hi}" for lo, hi in zip(lit[:-2], lit[1:-1])]
    return conds + [f"__user > {lit[-2]}"]


def _scan_chunk(tok: DomainTokenizer, con, view: str, where: str, batch_size: int, on_rows) -> tuple | None:
    """Kept events of one user range, unsorted: (users, event time us, input position key, token matrix)."""
    from concurrent.futures import ThreadPoolExecutor

    field_cols, payload = _field_columns(tok.schema)
    cols = "".join(f", {c}" for c in payload)
    cond = f"{KEEP} AND ({where})" if where else KEEP
    reader = con.sql(f"SELECT __user, __ts, __input, __row{cols} FROM {view} WHERE {cond}").to_arrow_reader(batch_size)
    parts = []
    # encoding batch k (numpy/arrow/Rust kernels release the GIL) overlaps DuckDB producing batch k+1
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="domaintok-encode") as pool:
        pending = None
        for batch in reader:
            if batch.num_rows == 0:
                continue
            if on_rows is not None:
                on_rows(batch.num_rows)
            future = pool.submit(_encode_batch, tok.encoding, batch, field_cols)
            if pending is not None:
                parts.append(pending.result())
            pending = future
        if pending is not None:
            parts.append(pending.result())
    if not parts:
        return None
    users = pa.concat_arrays([p[0].cast(pa.string()) for p in parts])
    return users, *(np.concatenate([p[k] for p in parts]) for k in (1, 2, 3))


def _encode_batch(encoding: EventEncoding, batch: pa.RecordBatch, field_cols: list[str]):
    """One unsorted batch -> (users, ts us, position key, token matrix); the previous-event cells stay as the
    encoders left them until the chunk is ordered."""
    n = batch.num_rows
    ts = ts_micros(batch.column(1))
    pos = (batch.column(2).to_numpy(zero_copy_only=False).astype(np.int64) << 40) | batch.column(3).to_numpy(
        zero_copy_only=False
    ).astype(np.int64)
    return batch.column(0), ts, pos, encoding.encode_matrix([batch.column(c) for c in field_cols], n)


def _chunk_sequences(encoding: EventEncoding, users, ts, pos, matrix, max_length: int, batch_size: int, stats: dict[str, int]):
    """Order one chunk by (user, time, input, row), apply the previous-event step, truncate to whole newest events,
    emit batches."""
    denc = users.dictionary_encode()
    codes = denc.indices.to_numpy(zero_copy_only=False)
    rank = np.empty(len(denc.dictionary), np.int64)  # byte order of the user ids, as DuckDB's ORDER BY
    rank[pc.sort_indices(denc.dictionary).to_numpy()] = np.arange(len(denc.dictionary))
    order = _stable_order(pos, ts, rank[codes])
    codes, ts, matrix = codes[order], ts[order], np.take(matrix, order, axis=0)
    n = len(order)
    starts = np.flatnonzero(np.concatenate([[True], codes[1:] != codes[:-1]]))
    ends = np.append(starts[1:], n)
    if encoding.context.active:
        encoding.context.apply_sorted(matrix, ts, starts)
    matrix = encoding.merge(matrix)
    lengths = (matrix != 0).sum(axis=1) + 1  # + [SEP]
    stats["events"] = stats.get("events", 0) + n
    stats["event_tokens"] = stats.get("event_tokens", 0) + int(lengths.sum())
    keep = keep_newest_events(ends, lengths, max_length)
    csum = np.concatenate([[0], np.cumsum(lengths)])
    user_tokens = csum[ends] - csum[starts] + 1  # + [BOS]
    stats.setdefault("user_tokens", []).append(user_tokens)
    stats["truncated_users"] = stats.get("truncated_users", 0) + int((user_tokens > max_length).sum())
    stats["truncated_tokens"] = stats.get("truncated_tokens", 0) + int(lengths[~keep].sum())
    _, flat = compact(matrix[keep])
    kept_csum = np.zeros(n + 1, np.int64)
    np.cumsum(np.where(keep, lengths, 0), out=kept_csum[1:])
    # [BOS] before each user's kept tokens
    offsets = kept_csum[np.append(starts, n)] + np.arange(len(starts) + 1)
    values = np.empty(int(offsets[-1]), np.int32)
    is_bos = np.zeros(len(values), bool)
    is_bos[offsets[:-1]] = True
    values[is_bos] = BOS_ID
    values[~is_bos] = flat
    group_users = denc.dictionary.take(pa.array(codes[starts]))
    n_events = ends - starts
    last = ts[ends - 1]
    a = 0
    while a < len(starts):
        b = max(int(np.searchsorted(ends, starts[a] + batch_size, side="right")), a + 1)
        off = offsets[a : b + 1]
        input_ids = pa.ListArray.from_arrays(pa.array((off - off[0]).astype(np.int32)), pa.array(values[off[0] : off[-1]]))
        yield pa.RecordBatch.from_arrays(
            [
                group_users.slice(a, b - a),
                input_ids,
                pa.array(n_events[a:b], pa.int64()),
                pa.array(last[a:b], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            ],
            schema=SEQUENCES_SCHEMA,
        )
        a = b


def _field_columns(schema: DomainSchema) -> tuple[list[str], list[str]]:
    """Column of each field in the sorted query, and the distinct payload columns: fields with the same source
    and type (amount sign and magnitude of one expression; a temporal field on the event time) share one column,
    so the sort moves each value once."""
    names, seen = [], {}
    event_time = (schema.event_time.strip(), "TIMESTAMPTZ")
    for i, spec in enumerate(schema.fields):
        sql = field_sql(spec)
        # a semantic-ID entity reads a struct of value and text: its own column, shared only with the same struct
        key = (spec.source.strip(), SQL_TYPE_BY_FIELD[spec.type]) if sql.startswith("CAST(") else (sql, "STRUCT")
        names.append("__ts" if key == event_time else seen.setdefault(key, f"__f{i}"))
    return names, list(dict.fromkeys(n for n in names if n != "__ts"))


def _stable_order(*keys: np.ndarray) -> np.ndarray:
    """Permutation sorting by keys[-1], then keys[-2], ... (as np.lexsort) by chained stable argsorts: input that is
    nearly in order (positions, event times) sorts in about linear time, and user ranks under 2**16 by radix sort."""
    order = np.argsort(keys[0], kind="stable")
    for key in keys[1:]:
        k = key[order]
        if k.size and 0 <= k.min() and k.max() < 2**16:
            k = k.astype(np.uint16)
        order = order[np.argsort(k, kind="stable")]
    return order

