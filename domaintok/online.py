"""The online encoder: raw events in micro-batches -> token ids per event (EventTokens), with parity to tokenize()
for events that arrive in time order (the previous event of a user's first event in a batch comes from the caller:
PreviousEvent, which the stream keeps in the user's window).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import msgspec
import numpy as np
import pyarrow as pa

from domaintok.context import NO_PREVIOUS, UNKNOWN_CELL, PreviousEvent
from domaintok.errors import DomaintokError
from domaintok.event_encoding import EventEncoding, compact
from domaintok.event_sql import ONLINE_INPUT, ONLINE_VIEW, connect, create_events_view, ts_micros, with_row_numbers
from domaintok.schema import DomainSchema
from domaintok.vocab import BOS_ID
from domaintok.window import keep_newest_events

_ARROW_TYPE_BY_COLUMN = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
_PY_TYPE_BY_COLUMN = {"string": str, "int": int, "float": float, "timestamp": dt.datetime, "bool": bool}


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



class OnlineEncoder:
    """Raw events (dicts, msgspec Structs, an Arrow table) -> token ids per event, through the same DuckDB
    expressions, field encoders and previous-event step as tokenize(); one DuckDB connection per thread."""

    def __init__(self, schema: DomainSchema, encoding: EventEncoding):
        self.schema = schema
        self.encoding = encoding
        self.context = encoding.context
        self._local = threading.local()
        self._event_struct: type[msgspec.Struct] | None = None
        self._canonical = {c.name for c in schema.columns}
        self._alias_of = {a: c.name for c in schema.columns for a in c.aliases}

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
        ts_good = ts_micros(sub.column("__ts"))
        ts_all[good_idx] = ts_good
        matrix = self.encoding.encode_matrix([sub.column(f"__f{i}") for i in range(len(self.encoding.encoders))], len(good_idx))
        state = np.zeros((n, self.context.n_state), np.int64)
        if self.context.active and len(good_idx):
            users_good = sub.column("__user").combine_chunks()
            state[good_idx] = self._apply_online_context(matrix, users_good, ts_good, previous or {})
        lengths_good, flat = compact(self.encoding.merge(matrix))
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


    def encode_events(self, events: Sequence[Mapping[str, Any] | msgspec.Struct] | pa.Table, max_length: int) -> np.ndarray:
        """The full sequence of ONE user's events: exactly the input_ids tokenize() gives for the same events."""
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
            con = connect(self.schema)
            self._local.con = con
            self._local.view_schema = None
        if self._local.view_schema is not None and self._local.view_schema.equals(table.schema):
            # The views only name the registered input, so a batch of the same Arrow schema just replaces it:
            # DESCRIBE and the two CREATE VIEWs were half of a small online batch's DuckDB time.
            con.register(ONLINE_INPUT, with_row_numbers(table))
        else:
            self._local.view_schema = None
            create_events_view(con, self.schema, table, online=True)
            self._local.view_schema = table.schema
        try:
            return con.sql(f"SELECT * FROM {ONLINE_VIEW} ORDER BY __row").to_arrow_table()
        finally:
            con.unregister(ONLINE_INPUT)


    def _all_failed(self, n: int, errors: list[str | None], reason: str) -> EventTokens:
        errs = [e if e is not None else reason for e in errors]
        return EventTokens([None] * n, np.zeros(n, np.int64), np.zeros(n + 1, np.int64), np.zeros(0, np.int32), errs,
                           np.zeros((n, self.context.n_state), np.int64))


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
