"""Raw events as DuckDB reads them: one view over any inputs (parquet files, directories, Arrow tables) with every
declared column mapped by name or alias and cast, plus the user id, event time, filter flag and each field's source
expression; the connections it runs on; and the event filter (a time cutoff, a user subset) applied before anything.

Used by fitting, offline tokenize, the online encoder, the aggregates and the task labels: every reader of raw
events sees them through `create_events_view`, so a schema expression means the same thing everywhere.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from domaintok.errors import DomaintokError, SchemaError
from domaintok.schema import SQL_TYPE_BY_COLUMN, SQL_TYPE_BY_FIELD, DomainSchema

DataLike = str | os.PathLike | Sequence[str | os.PathLike] | pa.Table


def quote(name: str) -> str:
    """Quote an identifier taken from the declared schema or an input file's own column list."""
    return '"' + name.replace('"', '""') + '"'


# the rows every job reads: a user id, an event time, and kept by the schema filter (and any EventFilter)
KEEP = "__user IS NOT NULL AND __ts IS NOT NULL AND __keep"


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


def connect(schema: DomainSchema, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """A connection to a new in-memory database of its own."""
    return _session(duckdb.connect(config=_db_config(memory_limit)), schema)


_SHARED_DBS: dict[tuple[int, str | None], duckdb.DuckDBPyConnection] = {}


_SHARED_DBS_LOCK = threading.Lock()


def tokenize_connection(schema: DomainSchema, memory_limit: str | None) -> duckdb.DuckDBPyConnection:
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


def inputs(data: DataLike) -> list[Any]:
    """Arrow tables as they are; a path is a parquet file, or a directory whose parquet files, at any depth (a
    partitioned dataset, a Spark output), are read in path order, except what Hadoop and Spark hide: names that
    start with "_" or "." (`_temporary/` attempts, `.crc` files). The one input rule of every job."""
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
            files = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not _hidden(p.relative_to(path)))
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


def _hidden(relative: Path) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.parts)


def input_files(paths: Any) -> list[Path]:
    """The parquet files of the given paths (files, or directories: `inputs`' rule)."""
    return [f for f in inputs([Path(p) for p in paths]) if isinstance(f, Path)]


def input_rows(data: DataLike) -> int:
    """Rows of all inputs, from Arrow tables and parquet footers (no data read)."""
    total = 0
    for item in inputs(data):
        try:
            total += item.num_rows if isinstance(item, pa.Table) else pq.ParquetFile(item).metadata.num_rows
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise DomaintokError(f"input {str(item)!r}: cannot read as parquet: {exc}") from None
    return total


def sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


ONLINE_INPUT = "__online_input"  # the registered Arrow batch of encode_event_tokens


ONLINE_VIEW = "__online_events"


def with_row_numbers(table: pa.Table) -> pa.Table:
    return table.append_column("__row", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def create_events_view(
    con, schema: DomainSchema, data: DataLike, online: bool = False, restrict: EventFilter | None = None
) -> str:
    """Create the view `__events`: per input, map each declared column (by name or alias) and cast it; UNION ALL BY
    NAME; then the user id, event time, filter flag (the schema's filter and `restrict`) and every field's source
    cast to its encoder's type."""
    selects = []
    for k, item in enumerate(inputs(data)):
        name = ONLINE_INPUT if online else f"__input_{k}"
        if isinstance(item, pa.Table):
            what = "arrow table"
            con.register(name, with_row_numbers(item))
            row_col = "__row"
        else:
            what = str(item)
            try:
                # a TEMP view: visible to this connection only (others may share the database)
                con.execute(
                    f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM read_parquet({sql_str(str(item))}, file_row_number = true)"
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
            cols.append(f"TRY_CAST({quote(found)} AS {SQL_TYPE_BY_COLUMN[col.type]}) AS {quote(col.name)}")
        selects.append(f"SELECT {', '.join(cols)}, {k} AS __input, {quote(row_col)} AS __row FROM {name}")
    union = " UNION ALL BY NAME ".join(f"({s})" for s in selects)
    fields = ", ".join(
        f"{field_sql(spec)} AS __f{i}" for i, spec in enumerate(schema.fields)
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


def ts_micros(col) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.cast(pa.timestamp("us", tz=arr.type.tz)).view(pa.int64()).to_numpy(zero_copy_only=False)


def carries_text(spec) -> bool:
    """Whether a field's encoder input (field_sql) is a struct of the value and its text, not the value alone."""
    params = spec.typed_params()
    return spec.type == "categorical_entity" and params.ids == "semantic" and params.content is not None


def field_value_sql(spec, column: str) -> str:
    """The field's value in `column`, a column holding its field_sql: the struct's value where it carries text."""
    return f"({column}).value" if carries_text(spec) else column


def field_sql(spec) -> str:
    """The SQL of one field's encoder input: its source cast to the type its encoder reads; for a semantic-ID entity
    with a `content` expression, a struct of the value and its text (an unseen item is coded from its text)."""
    value = f"CAST(({spec.source}) AS {SQL_TYPE_BY_FIELD[spec.type]})"
    if carries_text(spec):
        return f"struct_pack(value := {value}, text := CAST(({spec.typed_params().content}) AS VARCHAR))"
    return value
