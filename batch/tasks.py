"""Evaluation tasks for any data set: the TASKS.yaml format, the events table a schema reads, the population, the
user-hash split and the labels (from events after the cutoff or from a label file), all in DuckDB.

Rules: events strictly before `cutoff` are the inputs; the population is every user with at least `min_events`
(default 1) such events that pass the schema's filter; labels from events read [cutoff, cutoff + horizon_days), so
every event is either an input or in a label window, never both.
"""

from __future__ import annotations

import datetime as dt
import zlib
from pathlib import Path
from typing import Literal

import duckdb
import msgspec
import numpy as np
import pyarrow as pa
import yaml

from domaintok.errors import DomaintokError
from domaintok.schema import SQL_TYPE_BY_COLUMN, DomainSchema, FieldSpec

KINDS = ("binary", "multiclass", "regression")
SPLITS = ("train", "valid", "test")
_HASH_BUCKETS = 10_000
# The events table's own columns; raw columns keep their canonical names, schema fields get FIELD_PREFIX.
USER, TS = "__user", "__ts"
FIELD_PREFIX = "__f_"
EVENTS_TABLE = "ev"
POPULATION_TABLE = "population"


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every TASKS.yaml struct: unknown keys are errors."""


class SplitSpec(_Strict, forbid_unknown_fields=True, kw_only=True):
    train: float = 0.7
    valid: float = 0.15
    test: float = 0.15
    seed: int = 0


class EventsLabel(_Strict, forbid_unknown_fields=True, kw_only=True, tag="events", tag_field="from"):
    """A label computed from the events in [cutoff, cutoff + horizon_days)."""

    horizon_days: int
    aggregate: Literal["any", "count", "sum"] = "any"
    expression: str | None = None
    where: str | None = None
    transform: Literal["log1p"] | None = None


class FileLabel(_Strict, forbid_unknown_fields=True, kw_only=True, tag="file", tag_field="from"):
    """A label read from a parquet file with a user_id column (relative paths are relative to TASKS.yaml)."""

    path: str
    column: str


class TaskSpec(_Strict, forbid_unknown_fields=True, kw_only=True):
    name: str
    kind: Literal["binary", "multiclass", "regression"]
    label: EventsLabel | FileLabel


class TasksFile(_Strict, forbid_unknown_fields=True, kw_only=True):
    cutoff: dt.datetime
    split: SplitSpec = msgspec.field(default_factory=SplitSpec)
    min_events: int = 1
    max_users: int | None = None
    tasks: list[TaskSpec]


def _bad(origin: str, message: str) -> DomaintokError:
    return DomaintokError(f"tasks {origin}: {' '.join(message.split())}")


def load_tasks(path: str | Path) -> TasksFile:
    """Read and check TASKS.yaml; every problem is one line naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise DomaintokError(f"tasks {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise _bad(path.name, f"invalid yaml: {exc}") from None
    spec = tasks_from_dict(raw, path.name)
    # File labels are relative to the tasks file, so an example directory can be run from anywhere.
    for task in spec.tasks:
        if isinstance(task.label, FileLabel) and not Path(task.label.path).is_absolute():
            task.label.path = str(path.parent / task.label.path)
    return spec


def tasks_from_dict(raw: object, origin: str = "<dict>") -> TasksFile:
    if isinstance(raw, dict) and isinstance(raw.get("cutoff"), dt.date) and not isinstance(raw["cutoff"], dt.datetime):
        raw = {**raw, "cutoff": dt.datetime.combine(raw["cutoff"], dt.time())}  # yaml reads 2011-09-01 as a date
    try:
        spec = msgspec.convert(raw, TasksFile, strict=False)
    except msgspec.ValidationError as exc:
        raise _bad(origin, str(exc)) from None
    validate_tasks(spec, origin)
    return spec


def validate_tasks(spec: TasksFile, origin: str) -> None:
    s = spec.split
    if min(s.train, s.valid, s.test) < 0 or s.train <= 0 or s.valid <= 0 or s.test <= 0:
        raise _bad(origin, f"split: train, valid and test must all be > 0, got {s.train}, {s.valid}, {s.test}")
    if abs(s.train + s.valid + s.test - 1.0) > 1e-6:
        raise _bad(origin, f"split: train + valid + test must be 1, got {s.train + s.valid + s.test:g}")
    if spec.min_events < 1:
        raise _bad(origin, f"min_events must be >= 1, got {spec.min_events}")
    if spec.max_users is not None and spec.max_users < 20:
        raise _bad(origin, f"max_users must be >= 20, got {spec.max_users}")
    if spec.cutoff.tzinfo is not None:
        raise _bad(origin, "cutoff: give a local date or time without a zone (it is read in the schema's timezone)")
    if not spec.tasks:
        raise _bad(origin, "tasks: the list is empty")
    names = set()
    for task in spec.tasks:
        where = f"task {task.name!r}"
        if not task.name.isidentifier():
            raise _bad(origin, f"{where}: names are identifiers (letters, digits, underscore)")
        if task.name in names:
            raise _bad(origin, f"{where}: duplicate task name")
        names.add(task.name)
        label = task.label
        if isinstance(label, FileLabel):
            continue
        if label.horizon_days < 1:
            raise _bad(origin, f"{where}: horizon_days must be >= 1, got {label.horizon_days}")
        if label.aggregate == "sum" and not label.expression:
            raise _bad(origin, f"{where}: aggregate sum needs an expression (SQL over the raw columns)")
        if label.aggregate != "sum" and label.expression:
            raise _bad(origin, f"{where}: expression is only used by aggregate sum")
        if label.aggregate == "any" and task.kind != "binary":
            raise _bad(origin, f"{where}: aggregate any gives a binary label, but kind is {task.kind}")
        if label.aggregate != "any" and task.kind == "binary":
            raise _bad(origin, f"{where}: a binary task from events uses aggregate any")
        if task.kind == "multiclass":
            raise _bad(origin, f"{where}: multiclass labels come from a label file (from: file)")
        if label.transform and task.kind != "regression":
            raise _bad(origin, f"{where}: transform applies to regression labels only")


# --- the events table --------------------------------------------------------------------------------------------


def _raw_column_fields(schema: DomainSchema) -> list[FieldSpec]:
    """One pseudo-field per raw column so the tokenizer's own view maps aliases and casts; types that the view would
    cast lossily (ints, bools) travel as text and are cast back."""
    kind = {"float": "numerical_continuous", "timestamp": "temporal"}
    return [FieldSpec(name=f"raw{i}", type=kind.get(c.type, "categorical_fixed"), source=_quote(c.name))
            for i, c in enumerate(schema.columns)]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def open_events(schema: DomainSchema, data) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection (session in the schema's timezone) holding the table `ev`: one row per event that passes
    the schema's filter and has a user and a time: __user, __ts, __input and __row (which input file and row: the
    tie-break that keeps events of equal time in input order), every raw column under its canonical name and type,
    and every schema field's value as __f_<name>."""
    from domaintok.event_sql import KEEP, connect, create_events_view

    con = connect(schema)
    raw = _raw_column_fields(schema)
    extended = msgspec.structs.replace(schema, fields=[*schema.fields, *raw])
    view = create_events_view(con, extended, data)
    n = len(schema.fields)
    columns = [f"CAST(__f{n + i} AS {SQL_TYPE_BY_COLUMN[c.type]}) AS {_quote(c.name)}"
               for i, c in enumerate(schema.columns)]
    fields = [f"__f{i} AS {_quote(FIELD_PREFIX + f.name)}" for i, f in enumerate(schema.fields)]
    try:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {EVENTS_TABLE} AS SELECT __user AS {USER}, __ts AS {TS}, __input, __row, "
            f"{', '.join(columns + fields)} FROM {view} WHERE {KEEP}"
        )
    except duckdb.Error as exc:
        raise DomaintokError(f"events: {' '.join(str(exc).split())}") from None
    return con


def raw_column_names(schema: DomainSchema) -> list[str]:
    return [c.name for c in schema.columns]


# --- population and split ----------------------------------------------------------------------------------------


def hash_bucket(users: list[str], salt: str) -> np.ndarray:
    """Salted crc32 of each user id into [0, 1): stable across runs, machines and row order."""
    prefix = salt.encode("utf-8")
    return np.fromiter((zlib.crc32(prefix + u.encode("utf-8")) % _HASH_BUCKETS for u in users), dtype=np.int64,
                       count=len(users)) / _HASH_BUCKETS


def assign_split(users: list[str], split: SplitSpec, fold: int = 0, folds: int = 1) -> np.ndarray:
    """"train"/"valid"/"test" per user from the hash of (seed, user); fold k of K rotates the hash by k/K, so the
    test sets of different folds are disjoint whenever K x test <= 1."""
    bucket = (hash_bucket(users, f"domaintok-eval-split:{split.seed}:") + fold / folds) % 1.0
    return np.where(bucket < split.test, "test", np.where(bucket < split.test + split.valid, "valid", "train"))


def build_population(con: duckdb.DuckDBPyConnection, spec: TasksFile, max_users: int | None = None) -> list[str]:
    """Users with at least min_events events before the cutoff, sorted; `max_users` (or the file's) keeps a
    deterministic subset by another hash. Registers nothing: see `register_split`."""
    users = [u for (u,) in con.execute(
        f"SELECT {USER} FROM {EVENTS_TABLE} WHERE {TS} < $cutoff GROUP BY 1 HAVING count(*) >= $min ORDER BY 1",
        {"cutoff": spec.cutoff, "min": spec.min_events},
    ).fetchall()]
    if not users:
        raise DomaintokError(f"no user has {spec.min_events} or more events before the cutoff {spec.cutoff:%Y-%m-%d}")
    caps = [c for c in (spec.max_users, max_users) if c is not None]
    if caps and len(users) > min(caps):
        order = np.argsort(hash_bucket(users, "domaintok-eval-subset:"), kind="stable")[: min(caps)]
        users = sorted(users[i] for i in order)
    return users


def register_split(con: duckdb.DuckDBPyConnection, users: list[str], split: np.ndarray) -> None:
    """The table `population` (__user, split) the label and feature queries join on."""
    con.register("__population_arrow", pa.table({USER: pa.array(users, pa.string()), "split": pa.array(split.tolist(), pa.string())}))
    con.execute(f"CREATE OR REPLACE TEMP TABLE {POPULATION_TABLE} AS SELECT * FROM __population_arrow")
    con.unregister("__population_arrow")


# --- labels ------------------------------------------------------------------------------------------------------


def build_labels(con: duckdb.DuckDBPyConnection, spec: TasksFile, task: TaskSpec) -> pa.Table:
    """user_id, split, label for every population user that has a label (all of them for labels from events)."""
    if isinstance(task.label, FileLabel):
        return _file_labels(con, task)
    label = task.label
    end = spec.cutoff + dt.timedelta(days=label.horizon_days)
    where = f" AND ({label.where})" if label.where else ""
    if label.aggregate == "any":
        value = "CAST(count(e.__user) > 0 AS INTEGER)"
    elif label.aggregate == "count":
        value = "CAST(count(e.__user) AS DOUBLE)"
    else:
        value = "CAST(coalesce(sum(e.__value), 0) AS DOUBLE)"
    if label.transform == "log1p":
        value = f"ln(1 + greatest({value}, 0))"
    source = f"(SELECT *, ({label.expression}) AS __value FROM {EVENTS_TABLE})" if label.expression else EVENTS_TABLE
    sql = (
        f"SELECT p.{USER} AS user_id, p.split, {value} AS label FROM {POPULATION_TABLE} p "
        f"LEFT JOIN {source} e ON e.{USER} = p.{USER} AND e.{TS} >= $cutoff AND e.{TS} < $end{where} "
        f"GROUP BY p.{USER}, p.split ORDER BY 1"
    )
    try:
        return con.sql(sql, params={"cutoff": spec.cutoff, "end": end}).to_arrow_table()
    except duckdb.Error as exc:
        raise DomaintokError(f"task {task.name!r}: bad label SQL: {' '.join(str(exc).split())}") from None


def _file_labels(con: duckdb.DuckDBPyConnection, task: TaskSpec) -> pa.Table:
    label = task.label
    path = Path(label.path)
    if not path.is_file():
        raise DomaintokError(f"task {task.name!r}: label file {path}: no such file")
    names = [d[0] for d in con.execute("DESCRIBE SELECT * FROM read_parquet($p)", {"p": str(path)}).fetchall()]
    for needed in ("user_id", label.column):
        if needed not in names:
            raise DomaintokError(f"task {task.name!r}: label file {path}: no column {needed!r} (columns: {', '.join(names)})")
    value = {"binary": "CAST(l.{c} AS INTEGER)", "multiclass": "CAST(l.{c} AS VARCHAR)",
             "regression": "CAST(l.{c} AS DOUBLE)"}[task.kind].format(c=_quote(label.column))
    try:
        table = con.sql(
            f"SELECT p.{USER} AS user_id, p.split, {value} AS label FROM {POPULATION_TABLE} p "
            f"JOIN read_parquet($p) l ON CAST(l.user_id AS VARCHAR) = p.{USER} "
            f"WHERE l.{_quote(label.column)} IS NOT NULL ORDER BY 1",
            params={"p": str(path)},
        ).to_arrow_table()
    except duckdb.Error as exc:
        raise DomaintokError(f"task {task.name!r}: label file {path}: {' '.join(str(exc).split())}") from None
    if len(set(table.column("user_id").to_pylist())) != table.num_rows:
        raise DomaintokError(f"task {task.name!r}: label file {path}: a user_id has more than one row")
    if table.num_rows == 0:
        raise DomaintokError(f"task {task.name!r}: label file {path}: no row matches a user of the population")
    if task.kind == "binary" and not set(table.column("label").to_pylist()) <= {0, 1}:
        raise DomaintokError(f"task {task.name!r}: label file {path}: binary labels must be 0/1")
    return table


def describe_task(spec: TasksFile, task: TaskSpec) -> str:
    """One sentence saying how the label is made (for results.md)."""
    label = task.label
    if isinstance(label, FileLabel):
        return f"{task.kind}: column `{label.column}` of {Path(label.path).name}"
    end = spec.cutoff + dt.timedelta(days=label.horizon_days)
    window = f"events in [{spec.cutoff:%Y-%m-%d %H:%M}, {end:%Y-%m-%d %H:%M})"
    what = {"any": "at least one of the", "count": "number of", "sum": f"sum of `{label.expression}` over the"}
    text = f"{task.kind}: {what[label.aggregate]} {window}"
    if label.where:
        text += f" where `{label.where}`"
    if label.transform:
        text = text.replace(f"{task.kind}: ", f"{task.kind}: {label.transform} of the ", 1)
    return text


__all__ = [
    "TasksFile", "TaskSpec", "SplitSpec", "EventsLabel", "FileLabel", "load_tasks", "tasks_from_dict", "open_events",
    "build_population", "assign_split", "register_split", "build_labels", "describe_task", "hash_bucket", "KINDS",
    "USER", "TS", "FIELD_PREFIX", "EVENTS_TABLE", "POPULATION_TABLE", "raw_column_names",
]
