"""DomainTokenizer: fit with DuckDB, tokenize parquet/Arrow into per-user sequences (streaming, vectorized), encode
online micro-batches through the same SQL and encoders, and save/load as JSON plus HF tokenizer files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from domaintok.context import NO_PREVIOUS, UNKNOWN_CELL, EventContext, PreviousEvent
from domaintok.errors import ArtifactError, DomaintokError, SchemaError
from domaintok.fields import FieldEncoder, TextEncoder, make_encoder
from domaintok.schema import (
    SQL_TYPE_BY_COLUMN,
    SQL_TYPE_BY_FIELD,
    DomainSchema,
    load_schema,
    schema_from_dict,
)
from domaintok.window import keep_newest_events

# Token ids: the special tokens 0..5, then each field's tokens in schema order, then the BPE pieces shared by all text
# fields. A sequence is [BOS] e1 [SEP] e2 [SEP] ... en [SEP] (events by time, ties by input order), no [EOS].
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID, SEP_ID, MASK_ID = range(6)
DEFAULT_MAX_LENGTH = 1024
# DuckDB's budget in tokenize (the scans and the per-user counts of a large input): beyond it DuckDB spills to disk
TOKENIZE_MEMORY_LIMIT = "256MB"
# tokenize holds at most this many events in memory: larger inputs are tokenized in user ranges of this size
CHUNK_EVENTS = int(os.environ.get("DOMAINTOK_TOKENIZE_CHUNK_EVENTS", "1000000"))
ARTIFACT_FILE = "domaintok_tokenizer.json"
BPE_FILE = "domaintok_bpe.json"
FORMAT_VERSION = 1

# The sequences table (tokenize() output and sequences.parquet), declared once.
SEQUENCES_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("n_events", pa.int64(), nullable=False),
        pa.field("last_event_ts", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
_ARROW_TYPE_BY_COLUMN = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
_PY_TYPE_BY_COLUMN = {"string": str, "int": int, "float": float, "timestamp": dt.datetime, "bool": bool}

DataLike = str | os.PathLike | Sequence[str | os.PathLike] | pa.Table


@dataclass(frozen=True)
class EventTokens:
    """Token ids of n raw events, in input order: event i is ids[offsets[i]:offsets[i+1]] (ends with [SEP]).

    Rows that cannot be tokenized (null user id, null/unparseable event time, excluded by the schema filter, bad
    types) have zero tokens and a reason in `errors[i]` (None for good rows).
    """

    user_ids: list[str | None]
    event_ts: np.ndarray  # int64[n] microseconds since epoch UTC (0 where errors[i])
    offsets: np.ndarray  # int64[n + 1]
    ids: np.ndarray  # int32[offsets[-1]]
    errors: list[str | None]
    # int64[n, tokenizer.context.n_state]: what the user's next event needs of each event (PreviousEvent.state)
    context: np.ndarray


    def __len__(self) -> int:
        return len(self.errors)

    def event(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]


def _q(name: str) -> str:
    """Quote an identifier taken from the declared schema or an input file's own column list."""
    return '"' + name.replace('"', '""') + '"'


class DomainTokenizer:
    """A fitted schema: field encoders with their state, the shared text BPE, the token layout and max_length."""

    def __init__(self, schema: DomainSchema, encoders: list[FieldEncoder], bpe: Any | None, max_length: int):
        self.schema = schema
        self.encoders = encoders
        self.bpe = bpe
        self.max_length = int(max_length)
        next_id = len(SPECIAL_TOKENS)
        for enc in encoders:
            enc.base = next_id
            next_id += enc.n_tokens
        self.bpe_base = next_id
        for enc in encoders:
            if isinstance(enc, TextEncoder):
                enc.bpe, enc.bpe_base = bpe, self.bpe_base
        self.vocab_size = next_id + (bpe.get_vocab_size() if bpe is not None else 0)
        names = self.domain_token_names()
        if len(set(names)) != len(names):
            dupes = sorted({t for t in names if names.count(t) > 1})
            raise SchemaError(f"schema {schema.name}: fields produce the same token names {dupes[:5]}: rename a field")
        self.max_event_length = 1 + sum(enc.max_tokens_per_event for enc in encoders)
        self.context = EventContext(encoders)
        self._local = threading.local()
        self._event_struct = None
        self._canonical = {c.name for c in schema.columns}
        self._alias_of = {a: c.name for c in schema.columns for a in c.aliases}
        self.fingerprint = self._compute_fingerprint()
        self.fit_stats: dict[str, Any] = {}

    # ---------------------------------------------------------------- ids
    pad_token_id = PAD_ID
    unk_token_id = UNK_ID
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    sep_token_id = SEP_ID
    mask_token_id = MASK_ID

    def domain_token_names(self) -> list[str]:
        """Special tokens then every field's tokens, in id order (BPE pieces excluded)."""
        out = list(SPECIAL_TOKENS)
        for enc in self.encoders:
            out += enc.token_names()
        return out

    def token_names(self) -> list[str]:
        """Every token string in id order (BPE pieces in their byte-level spelling)."""
        out = self.domain_token_names()
        if self.bpe is not None:
            inv = {i: t for t, i in self.bpe.get_vocab().items()}
            out += [inv[i] for i in range(self.bpe.get_vocab_size())]
        return out

    def decode_tokens(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        names = self.token_names()
        return [names[int(i)] for i in ids]

    # ---------------------------------------------------------------- fit
    @classmethod
    def fit(
        cls,
        schema: DomainSchema | str | os.PathLike,
        data: DataLike,
        *,
        bpe_vocab_size: int | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
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
        con = _connect(schema)
        view = _create_events_view(con, schema, data, restrict=restrict)
        con.execute(f"CREATE TEMP VIEW __fit AS SELECT * FROM {view} WHERE {_KEEP}")
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
        report("measure")
        n_events, n_users = con.execute("SELECT count(*), count(DISTINCT __user) FROM __fit").fetchall()[0]
        cols = ", ".join(f"__f{i}" for i in range(len(encoders)))
        sample = con.sql(
            f"SELECT __user, __ts, {cols} FROM __fit WHERE __user IN (SELECT DISTINCT __user FROM __fit LIMIT 2000) "
            "ORDER BY __user, __ts, __input, __row LIMIT 50000"
        ).to_arrow_table()
        matrix = tok._encode_matrix([sample.column(2 + i) for i in range(len(encoders))], sample.num_rows)
        if tok.context.active and sample.num_rows:
            users = sample.column(0).to_numpy(zero_copy_only=False)
            starts = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]]))
            tok.context.apply_sorted(matrix, _ts_micros(sample.column(1)), starts)
        lengths, _ = tok._compact(matrix)
        con.close()
        # what the data looked like (not part of the saved state or fingerprint)
        tok.fit_stats = {
            "events": int(n_events),
            "users": int(n_users),
            "tokens_per_event": float(lengths.mean()) if len(lengths) else 0.0,
            "vocab_size": tok.vocab_size,
            "bpe_pieces": bpe.get_vocab_size() if bpe is not None else 0,
        }
        return tok

    # ---------------------------------------------------------------- save / load
    def _state(self) -> dict[str, Any]:
        return {
            "format": "domaintok-tokenizer",
            "format_version": FORMAT_VERSION,
            "schema": msgspec.to_builtins(self.schema),
            "fields": {enc.spec.name: enc.state for enc in self.encoders},
            "max_length": self.max_length,
            "special_tokens": SPECIAL_TOKENS,
        }

    def _compute_fingerprint(self) -> str:
        state = self._state()
        state.pop("max_length")  # the window length does not change any token id
        h = hashlib.sha256(msgspec.json.encode(state, order="sorted"))
        if self.bpe is not None:
            h.update(self.bpe.to_str().encode())
        return f"{self.schema.fingerprint[:12]}-{h.hexdigest()[:12]}"

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the fitted state (JSON), the BPE (tokenizers JSON) and the HF tokenizer files into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = self._state()
        state["fingerprint"] = self.fingerprint
        state["vocab_size"] = self.vocab_size
        (out / ARTIFACT_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(state), indent=2))
        if self.bpe is not None:
            (out / BPE_FILE).write_text(self.bpe.to_str(pretty=True))
        elif (out / BPE_FILE).exists():
            (out / BPE_FILE).unlink()
        self.to_hf().save_pretrained(str(out))
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DomainTokenizer:
        """Load a tokenizer saved by save_pretrained; ArtifactError when files are missing or do not match."""
        from tokenizers import Tokenizer

        path = Path(directory)
        if not (path / ARTIFACT_FILE).is_file():
            raise ArtifactError(f"tokenizer dir {str(path)!r}: no {ARTIFACT_FILE} (not a fitted domaintok tokenizer)")
        try:
            state = msgspec.json.decode((path / ARTIFACT_FILE).read_bytes())
        except msgspec.DecodeError as exc:
            raise ArtifactError(f"tokenizer dir {str(path)!r}: {ARTIFACT_FILE} is not valid JSON: {exc}") from None
        if state.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"tokenizer dir {str(path)!r}: format_version {state.get('format_version')} != {FORMAT_VERSION}")
        schema = schema_from_dict(state["schema"], origin=str(path / ARTIFACT_FILE))
        encoders = [make_encoder(spec, state["fields"].get(spec.name)) for spec in schema.fields]
        bpe = None
        if any(isinstance(e, TextEncoder) for e in encoders):
            if not (path / BPE_FILE).is_file():
                raise ArtifactError(f"tokenizer dir {str(path)!r}: schema has text fields but {BPE_FILE} is missing")
            bpe = Tokenizer.from_file(str(path / BPE_FILE))
        tok = cls(schema, encoders, bpe, state["max_length"])
        if state.get("fingerprint") != tok.fingerprint:
            raise ArtifactError(
                f"tokenizer dir {str(path)!r}: fingerprint {state.get('fingerprint')} does not match its content ({tok.fingerprint})"
            )
        return tok

    def to_hf(self):
        """A transformers PreTrainedTokenizerFast with the same ids: specials and domain tokens are special added
        tokens; the model is the byte-level BPE (pieces at their global ids) or a WordLevel when there is no text."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        domain = self.domain_token_names()
        vocab = {t: i for i, t in enumerate(domain)}
        if self.bpe is not None:
            bpe_state = json.loads(self.bpe.to_str())["model"]
            for piece, i in bpe_state["vocab"].items():
                if piece in vocab:
                    raise ArtifactError(f"BPE piece {piece!r} collides with a domain token")
                vocab[piece] = i + self.bpe_base
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in bpe_state["merges"]]
            core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
            core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
            core.decoder = decoders.ByteLevel()
        else:
            core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
            core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        # stripping the spaces around domain tokens makes `" ".join(token_strings)` encode like tokenize()
        core.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=True, rstrip=True) for t in domain])
        for t in SPECIAL_TOKENS:
            if core.token_to_id(t) != SPECIAL_TOKENS.index(t):
                raise ArtifactError(f"special token {t} did not keep its id")
        hf = PreTrainedTokenizerFast(
            tokenizer_object=core,
            pad_token="[PAD]",
            unk_token="[UNK]",
            bos_token="[BOS]",
            eos_token="[EOS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=self.max_length,
        )
        hf.init_kwargs["domaintok_fingerprint"] = self.fingerprint
        return hf

    # ---------------------------------------------------------------- offline tokenize
    def iter_tokenize(
        self,
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
        previous event (domaintok/context.py) are filled in after the ordering. Inputs with more rows than `chunk_events` (DOMAINTOK_TOKENIZE_CHUNK_EVENTS) are
        split into user ranges of at most that many events (a user is never split), one scan each. `stats`, when
        given, receives the counts `events` and `event_tokens` (tokens of every event before truncation, [SEP]
        included), `truncated_users` and `truncated_tokens` (users and event tokens left out of the windows) and
        `user_tokens` (a list of arrays: each user's full sequence length, [BOS] included). `restrict` (a time
        cutoff, a user subset) drops events before tokenizing.
        """
        max_length = self._check_max_length(max_length)
        chunk_events = int(chunk_events or CHUNK_EVENTS)
        stats = stats if stats is not None else {}
        con = _tokenize_connection(self.schema, memory_limit)
        try:
            view = _create_events_view(con, self.schema, data, restrict=restrict)
            for where in self._user_ranges(con, view, data, chunk_events):
                chunk = self._scan_chunk(con, view, where, batch_size, on_rows)
                if chunk is not None:
                    yield from self._chunk_sequences(*chunk, max_length, batch_size, stats)
        finally:
            con.close()

    def tokenize(self, data: DataLike, max_length: int | None = None, **kwargs: Any) -> pa.Table:
        """One row per user: user_id, input_ids ([BOS] e1 [SEP] ... en [SEP], newest whole events that fit
        max_length), n_events (all events of the user), last_event_ts (UTC)."""
        return pa.Table.from_batches(list(self.iter_tokenize(data, max_length, **kwargs)), schema=SEQUENCES_SCHEMA)

    def tokenize_to_parquet(
        self,
        data: DataLike,
        out_path: str | os.PathLike,
        max_length: int | None = None,
        *,
        on_rows: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Stream sequences into a parquet file (written to a temp file beside it, then renamed); returns counts."""
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        users = tokens = 0
        counts: dict[str, int] = {}
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            with pq.ParquetWriter(tmp, SEQUENCES_SCHEMA, compression="zstd") as writer:
                for batch in self.iter_tokenize(data, max_length, on_rows=on_rows, stats=counts, **kwargs):
                    writer.write_batch(batch)
                    users += batch.num_rows
                    tokens += len(batch.column("input_ids").values)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
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

    def _check_max_length(self, max_length: int | None) -> int:
        max_length = self.max_length if max_length is None else int(max_length)
        if max_length < 2:
            raise DomaintokError(f"max_length must be >= 2, got {max_length}")
        return max_length

    def _user_ranges(self, con, view: str, data: DataLike, chunk_events: int) -> list[str]:
        """SQL conditions on __user that split the kept events into user ranges of at most chunk_events events each
        ('' = all of them, the case whenever the input has no more rows than that: no extra pass)."""
        if _input_rows(data) <= chunk_events:
            return [""]
        counts = con.sql(
            f"SELECT __user, count(*) AS c FROM {view} WHERE {_KEEP} GROUP BY __user ORDER BY __user"
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
        lit = [_sql_str(users[b - 1].as_py()) for b in bounds]
        conds = [f"__user <= {lit[0]}"]
        conds += [f"__user > {lo} AND __user <= {hi}" for lo, hi in zip(lit[:-2], lit[1:-1])]
        return conds + [f"__user > {lit[-2]}"]

    def _scan_chunk(self, con, view: str, where: str, batch_size: int, on_rows) -> tuple | None:
        """Kept events of one user range, unsorted: (users, event time us, input position key, token matrix)."""
        from concurrent.futures import ThreadPoolExecutor

        field_cols, payload = self._field_columns()
        cols = "".join(f", {c}" for c in payload)
        cond = f"{_KEEP} AND ({where})" if where else _KEEP
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
                future = pool.submit(self._encode_batch, batch, field_cols)
                if pending is not None:
                    parts.append(pending.result())
                pending = future
            if pending is not None:
                parts.append(pending.result())
        if not parts:
            return None
        users = pa.concat_arrays([p[0].cast(pa.string()) for p in parts])
        return users, *(np.concatenate([p[k] for p in parts]) for k in (1, 2, 3))

    def _encode_batch(self, batch: pa.RecordBatch, field_cols: list[str]):
        """One unsorted batch -> (users, ts us, position key, token matrix); the previous-event cells stay as the
        encoders left them until the chunk is ordered."""
        n = batch.num_rows
        ts = _ts_micros(batch.column(1))
        pos = (batch.column(2).to_numpy(zero_copy_only=False).astype(np.int64) << 40) | batch.column(3).to_numpy(
            zero_copy_only=False
        ).astype(np.int64)
        return batch.column(0), ts, pos, self._encode_matrix([batch.column(c) for c in field_cols], n)

    def _chunk_sequences(self, users, ts, pos, matrix, max_length: int, batch_size: int, stats: dict[str, int]):
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
        if self.context.active:
            self.context.apply_sorted(matrix, ts, starts)
        lengths = (matrix != 0).sum(axis=1) + 1  # + [SEP]
        stats["events"] = stats.get("events", 0) + n
        stats["event_tokens"] = stats.get("event_tokens", 0) + int(lengths.sum())
        keep = keep_newest_events(ends, lengths, max_length)
        csum = np.concatenate([[0], np.cumsum(lengths)])
        user_tokens = csum[ends] - csum[starts] + 1  # + [BOS]
        stats.setdefault("user_tokens", []).append(user_tokens)
        stats["truncated_users"] = stats.get("truncated_users", 0) + int((user_tokens > max_length).sum())
        stats["truncated_tokens"] = stats.get("truncated_tokens", 0) + int(lengths[~keep].sum())
        _, flat = self._compact(matrix[keep])
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

    def _field_columns(self) -> tuple[list[str], list[str]]:
        """Column of each field in the sorted query, and the distinct payload columns: fields with the same source
        and type (amount sign and magnitude of one expression; a temporal field on the event time) share one column,
        so the sort moves each value once."""
        names, seen = [], {}
        event_time = (self.schema.event_time.strip(), "TIMESTAMPTZ")
        for i, spec in enumerate(self.schema.fields):
            key = (spec.source.strip(), SQL_TYPE_BY_FIELD[spec.type])
            names.append("__ts" if key == event_time else seen.setdefault(key, f"__f{i}"))
        return names, list(dict.fromkeys(n for n in names if n != "__ts"))

    @property
    def _token_dtype(self):
        """Cell type of the token matrix: 2 bytes while every id fits (the matrix is what a chunk holds in memory)."""
        return np.uint16 if self.vocab_size <= 65536 else np.int32

    def _encode_matrix(self, columns: list, n: int) -> np.ndarray:
        """Every field of n events side by side: (n, sum of field widths), 0 in unused cells, no [SEP]."""
        widths = [enc.width for enc in self.encoders]
        out = np.empty((n, sum(widths)), self._token_dtype)
        col = 0
        for enc, column, w in zip(self.encoders, columns, widths):
            out[:, col : col + w] = enc.encode_padded(column)
            col += w
        return out

    @staticmethod
    def _compact(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token matrix -> (event lengths int64[n] incl. [SEP], flat ids int32): nonzero cells in order, then [SEP]."""
        full = np.empty((len(matrix), matrix.shape[1] + 1), np.int32)
        full[:, :-1] = matrix
        full[:, -1] = SEP_ID
        nonzero = full != 0
        return nonzero.sum(axis=1).astype(np.int64), full[nonzero]

    # ---------------------------------------------------------------- online
    @property
    def event_struct(self) -> type[msgspec.Struct]:
        """msgspec Struct of one raw event on the wire: canonical column names, kw_only, forbid_unknown_fields;
        nullable columns are Optional with default None."""
        if self._event_struct is None:
            fields = []
            for col in self.schema.columns:
                typ = _PY_TYPE_BY_COLUMN[col.type]
                fields.append((col.name, typ | None, None) if col.nullable else (col.name, typ))
            # required fields first: defstruct wants defaults last even with kw_only
            fields.sort(key=lambda f: len(f) == 3)
            self._event_struct = msgspec.defstruct(
                f"{self.schema.name.title().replace('_', '')}Event", fields, kw_only=True, forbid_unknown_fields=True
            )
        return self._event_struct

    def encode_event_tokens(
        self,
        events: Sequence[Mapping[str, Any] | msgspec.Struct] | pa.Table,
        previous: Mapping[str, PreviousEvent] | None = None,
    ) -> EventTokens:
        """Token ids of each raw event (input order), through the same DuckDB expressions and field encoders as
        tokenize(). One DuckDB pass per call. Tokens that depend on the user's previous event (time since previous,
        calendar parts with only_changes) take it from these events (by time, ties by input order) or, for a user's
        first event here, from `previous` (user -> PreviousEvent); parity with tokenize() then holds for events
        that arrive in event-time order."""
        errors: list[str | None]
        if isinstance(events, pa.Table):
            table, errors = events, [None] * events.num_rows
        else:
            table, errors = self._events_to_table(events)
        n = table.num_rows
        try:
            projected = self._project_online(table)
        except (duckdb.Error, DomaintokError) as exc:
            if n <= 1:
                return self._all_failed(n, errors, f"cannot tokenize: {' '.join(str(exc).split())}")
            # isolate the bad rows: one pass per row only on this failure path
            parts = [self.encode_event_tokens(table.slice(i, 1), previous) for i in range(n)]
            return _concat_event_tokens(parts, errors)
        users = projected.column("__user")
        user_null = users.is_null().to_numpy(zero_copy_only=False)
        self._row_errors(projected, errors, user_null)
        good_idx = np.flatnonzero(np.array([e is None for e in errors], bool))
        sub = projected.take(pa.array(good_idx)) if len(good_idx) < n else projected
        ts_all = np.zeros(n, np.int64)
        ts_good = _ts_micros(sub.column("__ts"))
        ts_all[good_idx] = ts_good
        matrix = self._encode_matrix([sub.column(f"__f{i}") for i in range(len(self.encoders))], len(good_idx))
        state = np.zeros((n, self.context.n_state), np.int64)
        if self.context.active and len(good_idx):
            users_good = sub.column("__user").combine_chunks()
            state[good_idx] = self._apply_online_context(matrix, users_good, ts_good, previous or {})
        lengths_good, flat = self._compact(matrix)
        lengths = np.zeros(n, np.int64)
        lengths[good_idx] = lengths_good
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        user_ids = users.to_pylist()
        return EventTokens(user_ids=user_ids, event_ts=ts_all, offsets=offsets, ids=flat, errors=errors, context=state)

    def _row_errors(self, projected: pa.Table, errors: list[str | None], user_null: np.ndarray) -> None:
        """Set the reason of every row the tokenizer rejects (null user id or time, the schema filter)."""
        ts_null = projected.column("__ts").is_null().to_numpy(zero_copy_only=False)
        kept = projected.column("__keep").fill_null(False).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(user_null | ts_null | ~kept):
            if errors[i] is None:
                if user_null[i]:
                    errors[i] = f"null user id ({self.schema.user_id})"
                elif ts_null[i]:
                    errors[i] = f"null or unparseable event time ({self.schema.event_time})"
                else:
                    errors[i] = f"excluded by the schema filter ({self.schema.filter})"

    def _apply_online_context(
        self, matrix: np.ndarray, users: pa.Array, ts: np.ndarray, previous: Mapping[str, PreviousEvent]
    ) -> np.ndarray:
        """The previous-event step on one micro-batch: each event's predecessor is the same user's event before it
        here (by time, ties by input order), else `previous`. Returns the events' state cells (before the step)."""
        denc = users.dictionary_encode()
        codes = denc.indices.to_numpy(zero_copy_only=False)
        n = len(ts)
        order = np.lexsort((np.arange(n), ts, codes))
        state = self.context.state_cells(matrix)
        prev_ts = np.full(n, NO_PREVIOUS, np.int64)
        prev_state = np.full_like(state, UNKNOWN_CELL)
        same = np.zeros(n, bool)
        same[1:] = codes[order[1:]] == codes[order[:-1]]
        prev_ts[order[1:][same[1:]]] = ts[order[:-1][same[1:]]]
        prev_state[order[1:][same[1:]]] = state[order[:-1][same[1:]]]
        if previous:
            names = denc.dictionary.to_pylist()
            for i in order[~same]:  # each user's first event of the batch
                before = previous.get(names[codes[i]])
                if before is not None:
                    prev_ts[i] = before.ts
                    if len(before.state) == self.context.n_state:
                        prev_state[i] = before.state
        self.context.apply(matrix, ts, prev_ts, prev_state)
        return state

    def encode_events(self, events: Sequence[Mapping[str, Any] | msgspec.Struct] | pa.Table, max_length: int | None = None) -> np.ndarray:
        """The full sequence of ONE user's events: exactly the input_ids tokenize() gives for the same events."""
        max_length = self._check_max_length(max_length)
        et = self.encode_event_tokens(events)
        good = [i for i, e in enumerate(et.errors) if e is None]
        if len({et.user_ids[i] for i in good}) > 1:
            raise DomaintokError("encode_events takes the events of one user; got several user ids")
        if not good:
            return np.array([BOS_ID], np.int32)
        good_arr = np.array(good)
        order = good_arr[np.lexsort((good_arr, et.event_ts[good_arr]))]  # by time, ties by input order
        lengths = np.diff(et.offsets)[order]
        keep = keep_newest_events(np.array([len(order)]), lengths, max_length)
        pieces = [et.event(i) for i, k in zip(order, keep) if k]
        return np.concatenate([np.array([BOS_ID], np.int32), *pieces]).astype(np.int32)

    def _events_to_table(self, events) -> tuple[pa.Table, list[str | None]]:
        """Validate each event against event_struct (dicts) and build the raw Arrow table of canonical columns."""
        struct = self.event_struct
        errors: list[str | None] = [None] * len(events)
        rows: list[Any] = []
        for i, ev in enumerate(events):
            if isinstance(ev, struct):
                rows.append(ev)
                continue
            try:
                if isinstance(ev, Mapping):
                    if not self._canonical.issuperset(ev.keys()):
                        ev = {self._alias_of.get(k, k): v for k, v in ev.items()}
                    rows.append(msgspec.convert(ev, struct, strict=False))
                else:
                    rows.append(msgspec.convert(msgspec.to_builtins(ev), struct, strict=False))
            except (msgspec.ValidationError, TypeError) as exc:
                errors[i] = f"invalid event: {exc}"
                rows.append(None)
        arrays, names = [], []
        for col in self.schema.columns:
            values = [getattr(r, col.name) if r is not None else None for r in rows]
            arrays.append(_column_array(values, col.type, self.schema.timezone))
            names.append(col.name)
        return pa.Table.from_arrays(arrays, names=names), errors

    def _project_online(self, table: pa.Table) -> pa.Table:
        con = getattr(self._local, "con", None)
        if con is None:
            con = _connect(self.schema)
            self._local.con = con
            self._local.view_schema = None
        if self._local.view_schema is not None and self._local.view_schema.equals(table.schema):
            # The views only name the registered input, so a batch of the same Arrow schema just replaces it:
            # DESCRIBE and the two CREATE VIEWs were half of a small online batch's DuckDB time.
            con.register(ONLINE_INPUT, _with_row_numbers(table))
        else:
            self._local.view_schema = None
            _create_events_view(con, self.schema, table, online=True)
            self._local.view_schema = table.schema
        try:
            return con.sql(f"SELECT * FROM {ONLINE_VIEW} ORDER BY __row").to_arrow_table()
        finally:
            con.unregister(ONLINE_INPUT)

    def _all_failed(self, n: int, errors: list[str | None], reason: str) -> EventTokens:
        errs = [e if e is not None else reason for e in errors]
        return EventTokens([None] * n, np.zeros(n, np.int64), np.zeros(n + 1, np.int64), np.zeros(0, np.int32), errs,
                           np.zeros((n, self.context.n_state), np.int64))


# ---------------------------------------------------------------------- DuckDB plumbing
_KEEP = "__user IS NOT NULL AND __ts IS NOT NULL AND __keep"
_USERS_TABLE = "__domaintok_keep_users"


@dataclass(frozen=True)
class EventFilter:
    """Which events fit and tokenize read: those strictly before `before` (a naive time is in the schema's
    timezone) and of the user ids in `users` only; None keeps everything. Applied in DuckDB before any fitting."""

    before: dt.datetime | None = None
    users: pa.Array | None = None  # distinct string user ids

    @classmethod
    def from_options(cls, before: str | None = None, users: str | os.PathLike | None = None) -> EventFilter:
        """From CLI text: an ISO time (`2011-06-01`, `2011-06-01T12:00:00+00:00`) and a user-id file."""
        when = None
        if before is not None:
            try:
                when = dt.datetime.fromisoformat(before)
            except ValueError:
                raise DomaintokError(f"--before {before!r}: not an ISO date or time (e.g. 2011-06-01)") from None
        return cls(before=when, users=None if users is None else read_user_ids(users))

    def condition(self, con, schema: DomainSchema) -> str:
        """The SQL condition on the raw event row (registers the user table on `con`); 'true' when empty."""
        parts = []
        if self.before is not None:
            # isoformat of a parsed datetime holds only digits, '-', ':', '.', 'T', '+': safe as a literal
            parts.append(f"TRY_CAST(({schema.event_time}) AS TIMESTAMPTZ) < TIMESTAMPTZ '{self.before.isoformat()}'")
        if self.users is not None:
            con.register(_USERS_TABLE, pa.table({"user_id": self.users}))
            parts.append(f"CAST(({schema.user_id}) AS VARCHAR) IN (SELECT user_id FROM {_USERS_TABLE})")
        return " AND ".join(parts) or "true"

    def describe(self) -> dict[str, Any]:
        """What metrics JSON records: the cutoff (ISO) and how many user ids were kept."""
        return {
            "before": None if self.before is None else self.before.isoformat(),
            "users_filter": None if self.users is None else len(self.users),
        }


def read_user_ids(path: str | os.PathLike) -> pa.Array:
    """Distinct user ids (strings) from a parquet file (its `user_id` column, or its only column) or a text file
    (one id per line, blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DomaintokError(f"users file {str(path)!r}: no such file")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise DomaintokError(f"users file {str(path)!r}: cannot read as parquet: {exc}") from None
        if "user_id" in table.column_names:
            column = table.column("user_id")
        elif table.num_columns == 1:
            column = table.column(0)
        else:
            raise DomaintokError(
                f"users file {str(path)!r}: no user_id column (columns: {', '.join(table.column_names)})"
            )
        ids = pc.drop_null(column.cast(pa.string())).combine_chunks()
    else:
        lines = [line.strip() for line in path.read_text().splitlines()]
        ids = pa.array([line for line in lines if line], pa.string())
    return pc.unique(ids)


def _db_config(memory_limit: str | None) -> dict[str, Any]:
    config = {
        "threads": max(1, min(os.cpu_count() or 1, 8)),
        # anything larger than memory_limit spills here (never into the working directory)
        "temp_directory": os.path.join(tempfile.gettempdir(), f"domaintok-duckdb-{os.getpid()}"),
    }
    if memory_limit:
        config["memory_limit"] = memory_limit
    return config


def _session(con: duckdb.DuckDBPyConnection, schema: DomainSchema) -> duckdb.DuckDBPyConnection:
    # naive timestamps are wall-clock times in the schema timezone; TIMESTAMPTZ results come out in it
    con.execute(f"SET TimeZone = '{schema.timezone}'")
    con.execute("SET enable_progress_bar = false")
    return con


def _connect(schema: DomainSchema, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """A connection to a new in-memory database of its own."""
    return _session(duckdb.connect(config=_db_config(memory_limit)), schema)


_SHARED_DBS: dict[tuple[int, str | None], duckdb.DuckDBPyConnection] = {}
_SHARED_DBS_LOCK = threading.Lock()


def _tokenize_connection(schema: DomainSchema, memory_limit: str | None) -> duckdb.DuckDBPyConnection:
    """A new connection (cursor) to this process's tokenize database: opening a database costs ~15 ms of CPU, a
    cursor ~0.2 ms, and every tokenize() call used to pay the former. Keyed by pid (never used across fork) and
    memory limit; insertion order is off database-wide because tokenize orders by its own keys. The session settings
    and TEMP views are per cursor, so concurrent calls do not see each other."""
    key = (os.getpid(), memory_limit)
    with _SHARED_DBS_LOCK:
        db = _SHARED_DBS.get(key)
        if db is None:
            db = _SHARED_DBS[key] = duckdb.connect(config={**_db_config(memory_limit), "preserve_insertion_order": False})
        return _session(db.cursor(), schema)


def _inputs(data: DataLike) -> list[Any]:
    if isinstance(data, pa.Table):
        return [data]
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    out = []
    for item in data:
        if isinstance(item, pa.Table):
            out.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(path.glob("*.parquet"))
            if not files:
                raise DomaintokError(f"input {str(path)!r}: directory holds no .parquet files")
            out += files
        elif path.is_file():
            out.append(path)
        else:
            raise DomaintokError(f"input {str(path)!r}: no such file")
    if not out:
        raise DomaintokError("no input given")
    return out


def _input_rows(data: DataLike) -> int:
    """Rows of all inputs, from Arrow tables and parquet footers (no data read)."""
    total = 0
    for item in _inputs(data):
        total += item.num_rows if isinstance(item, pa.Table) else pq.ParquetFile(item).metadata.num_rows
    return total


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


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


ONLINE_INPUT = "__online_input"  # the registered Arrow batch of encode_event_tokens
ONLINE_VIEW = "__online_events"


def _with_row_numbers(table: pa.Table) -> pa.Table:
    return table.append_column("__row", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def _create_events_view(
    con, schema: DomainSchema, data: DataLike, online: bool = False, restrict: EventFilter | None = None
) -> str:
    """Create the view `__events`: per input, map each declared column (by name or alias) and cast it; UNION ALL BY
    NAME; then the user id, event time, filter flag (the schema's filter and `restrict`) and every field's source
    cast to its encoder's type."""
    selects = []
    for k, item in enumerate(_inputs(data)):
        name = ONLINE_INPUT if online else f"__input_{k}"
        if isinstance(item, pa.Table):
            what = "arrow table"
            con.register(name, _with_row_numbers(item))
            row_col = "__row"
        else:
            what = str(item)
            try:
                # a TEMP view: visible to this connection only (others may share the database)
                con.execute(
                    f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM read_parquet({_sql_str(str(item))}, file_row_number = true)"
                )
            except duckdb.Error as exc:
                raise DomaintokError(f"input {what!r}: cannot read as parquet: {' '.join(str(exc).split())}") from None
            row_col = "file_row_number"
        available = [d[0] for d in con.execute(f"DESCRIBE {name}").fetchall()]
        cols = []
        for col in schema.columns:
            found = next((s for s in [col.name, *col.aliases] if s in available), None)
            if found is None:
                shown = [c for c in available if c not in ("__row", "file_row_number")]
                spellings = " / ".join([col.name, *col.aliases])
                raise DomaintokError(
                    f"input {what!r}: column {spellings!r} of schema {schema.name} is missing (available: {', '.join(shown)})"
                )
            cols.append(f"TRY_CAST({_q(found)} AS {SQL_TYPE_BY_COLUMN[col.type]}) AS {_q(col.name)}")
        selects.append(f"SELECT {', '.join(cols)}, {k} AS __input, {_q(row_col)} AS __row FROM {name}")
    union = " UNION ALL BY NAME ".join(f"({s})" for s in selects)
    fields = ", ".join(
        f"CAST(({spec.source}) AS {SQL_TYPE_BY_FIELD[spec.type]}) AS __f{i}" for i, spec in enumerate(schema.fields)
    )
    keep = f"coalesce(({schema.filter}), false)" if schema.filter else "true"
    if restrict is not None:
        keep = f"({keep}) AND coalesce(({restrict.condition(con, schema)}), false)"
    view = ONLINE_VIEW if online else "__events"
    try:
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT CAST(({schema.user_id}) AS VARCHAR) AS __user, "
            f"TRY_CAST(({schema.event_time}) AS TIMESTAMPTZ) AS __ts, {keep} AS __keep, __input, __row, {fields} "
            f"FROM ({union})"
        )
    except duckdb.Error as exc:
        raise SchemaError(f"schema {schema.name}: {' '.join(str(exc).split())}") from None
    return view


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


def _ts_micros(col) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.cast(pa.timestamp("us", tz=arr.type.tz)).view(pa.int64()).to_numpy(zero_copy_only=False)


def _column_array(values: list[Any], ctype: str, tz: str) -> pa.Array:
    if ctype != "timestamp":
        return pa.array(values, type=_ARROW_TYPE_BY_COLUMN[ctype])
    aware = [v is not None and v.tzinfo is not None for v in values]
    n_aware, n_naive = sum(aware), sum(v is not None for v in values) - sum(aware)
    if n_aware == 0 or n_naive == 0:
        # all naive (wall-clock in the schema timezone) or all aware (pyarrow keeps the instants)
        return pa.array(values, type=pa.timestamp("us")) if n_aware == 0 else pa.array(values)
    # mixed: pyarrow would silently drop the offsets, so aware ones become wall-clock times in the schema timezone
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(tz)
    local = [v.astimezone(zone).replace(tzinfo=None) if a else v for v, a in zip(values, aware)]
    return pa.array(local, type=pa.timestamp("us"))


def _concat_event_tokens(parts: list[EventTokens], errors: list[str | None]) -> EventTokens:
    user_ids = [u for p in parts for u in p.user_ids]
    errs = [errors[i] if errors[i] is not None else p.errors[0] for i, p in enumerate(parts)]
    lengths = np.concatenate([np.diff(p.offsets) for p in parts])
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return EventTokens(
        user_ids=user_ids,
        event_ts=np.concatenate([p.event_ts for p in parts]),
        offsets=offsets,
        ids=np.concatenate([p.ids for p in parts]).astype(np.int32),
        errors=errs,
        context=np.concatenate([p.context for p in parts]),
    )
