"""Declarative domain schemas: raw columns, user id, event time and typed fields, loaded from yaml into msgspec Structs.

Validation happens on load (every error names the field or column); `DomainSchema.fingerprint` hashes the canonical form.
"""

from __future__ import annotations

import hashlib
import os
import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from domaintok.errors import DomaintokError, SchemaError

# The schemas shipped inside the package (package data): `load_schema("online_retail")` reads online_retail.yaml here.
SCHEMAS_DIR: Traversable = resources.files("domaintok") / "schemas"

FIELD_TYPES = (
    "sign",
    "numerical_continuous",
    "numerical_discrete",
    "categorical_fixed",
    "categorical_entity",
    "temporal",
    "text",
)
CALENDAR_PARTS = ("month", "dow", "dom", "hour", "quarter", "year")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every schema struct: unknown keys are errors, every field is passed by keyword."""


# --- per-type parameters (the `params:` mapping of a field) -------------------------------------------------------


class SignParams(_Strict, forbid_unknown_fields=True, kw_only=True):
    """sign: tokens POS / NEG / ZERO (+/-0) / NULL (null or NaN); +/-inf take the sign of the infinity."""


class ContinuousParams(_Strict, forbid_unknown_fields=True, kw_only=True):
    """numerical_continuous: n_bins quantile bins of |x| (bin 0 holds the smallest magnitudes, zero included)."""

    n_bins: int = 21


class DiscreteParams(_Strict, forbid_unknown_fields=True, kw_only=True):
    """numerical_discrete: one token per integer 0..max_value, OVER above it; negatives as NEG or by magnitude."""

    max_value: int = 10
    negatives: Literal["bucket", "abs"] = "bucket"


class CategoricalParams(_Strict, forbid_unknown_fields=True, kw_only=True):
    """categorical_fixed: the max_size most frequent values seen at least min_frequency times; others are UNK."""

    max_size: int = 1000
    min_frequency: int = 1


class EntityParams(_Strict, forbid_unknown_fields=True, kw_only=True):
    """categorical_entity: `ids: hashed` (default) spreads a stable 64-bit hash of the value over n_tokens tokens of
    `buckets` ids each; `ids: semantic` gives each value a semantic ID (domaintok/semantic_ids.py): `levels` codes
    from item vectors (the `content` expression's text, co-occurrence in users' histories, or both) plus a digit."""

    ids: Literal["hashed", "semantic"] = "hashed"
    buckets: int = 64
    n_tokens: int = 2
    content: str | None = None  # SQL expression of the item's text (e.g. a product description), for semantic ids
    semantic: dict[str, Any] = {}  # SemanticIdParams: levels, codes, disambiguation, source, dims, ...


class TemporalParams(_Strict, forbid_unknown_fields=True, kw_only=True):
    """temporal: calendar parts in the schema timezone, plus an optional log-bucketed gap to the user's previous event."""

    parts: list[str] = msgspec.field(default_factory=lambda: ["month", "dow", "dom", "hour"])
    time_since_previous: bool = False
    # emit the calendar tokens only from the coarsest part that changed since the user's previous event (none when
    # nothing changed), and the gap token only when the gap is not zero: line items of one basket repeat none of them
    only_changes: bool = False


class TextParams(_Strict, forbid_unknown_fields=True, kw_only=True):
    """text: byte-level BPE pieces (one BPE shared by every text field of the schema), at most max_tokens per event."""

    max_tokens: int = 8
    bpe_vocab_size: int = 2000
    lowercase: bool = False


PARAMS_BY_TYPE: dict[str, type[_Strict]] = {
    "sign": SignParams,
    "numerical_continuous": ContinuousParams,
    "numerical_discrete": DiscreteParams,
    "categorical_fixed": CategoricalParams,
    "categorical_entity": EntityParams,
    "temporal": TemporalParams,
    "text": TextParams,
}

# DuckDB type each field's source expression is cast to before its encoder sees it.
SQL_TYPE_BY_FIELD = {
    "sign": "DOUBLE",
    "numerical_continuous": "DOUBLE",
    "numerical_discrete": "DOUBLE",
    "categorical_fixed": "VARCHAR",
    "categorical_entity": "VARCHAR",
    "temporal": "TIMESTAMPTZ",
    "text": "VARCHAR",
}
SQL_TYPE_BY_COLUMN = {"string": "VARCHAR", "int": "BIGINT", "float": "DOUBLE", "timestamp": "TIMESTAMPTZ", "bool": "BOOLEAN"}


class ColumnSpec(_Strict, forbid_unknown_fields=True, kw_only=True):
    """One raw input column: canonical name, type, other spellings seen in real inputs."""

    name: str
    type: Literal["string", "int", "float", "timestamp", "bool"]
    aliases: list[str] = []
    nullable: bool = True


class FieldSpec(_Strict, forbid_unknown_fields=True, kw_only=True):
    """One typed field of an event: its encoder type, a column or DuckDB expression over the columns, parameters."""

    name: str
    type: str
    source: str
    params: dict[str, Any] = {}

    def typed_params(self) -> Any:
        """The params mapping decoded into this field type's parameter struct (validated on schema load)."""
        return msgspec.convert(self.params, PARAMS_BY_TYPE[self.type])


class ActionPieceParams(_Strict, forbid_unknown_fields=True, kw_only=True):
    """actionpiece: merge the per-field tokens of an event (text pieces excepted) into `merges` learned tokens
    (domaintok/actionpiece.py), trained on the events of at most `max_users` users' whole histories."""

    merges: int
    max_users: int = 2000


class DomainSchema(_Strict, forbid_unknown_fields=True, kw_only=True):
    """A domain: raw columns, how to get the user id and event time from them, an optional filter, ordered fields,
    and optionally an ActionPiece merge vocabulary over the fields' tokens."""

    name: str
    version: int = 1
    timezone: str = "UTC"
    columns: list[ColumnSpec]
    user_id: str
    event_time: str
    filter: str | None = None
    fields: list[FieldSpec]
    actionpiece: ActionPieceParams | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 (first 16 hex) of the canonical JSON form: equal schemas give equal fingerprints in any process."""
        return hashlib.sha256(self.canonical_json()).hexdigest()[:16]

    def canonical_json(self) -> bytes:
        return msgspec.json.encode(self.to_builtins(), order="sorted")

    def to_builtins(self) -> dict[str, Any]:
        """The schema as JSON builtins; options left unset are left out, so adding an option to domaintok changes no
        existing schema's (or tokenizer's) fingerprint."""
        out = msgspec.to_builtins(self)
        if out.get("actionpiece") is None:
            out.pop("actionpiece", None)
        return out

    def column(self, name: str) -> ColumnSpec:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)


def load_schema(path_or_name: str | os.PathLike | Traversable) -> DomainSchema:
    """Load and validate a schema from a yaml file, or from a bare name (no suffix, and no such path) naming a schema
    shipped in the package: `load_schema("online_retail")` reads `domaintok/schemas/online_retail.yaml`."""
    source = _schema_file(path_or_name)
    try:
        raw = yaml.safe_load(source.read_text())
    except yaml.YAMLError as exc:
        raise SchemaError(f"schema {source.name}: invalid yaml: {exc}") from None
    return schema_from_dict(raw, origin=source.name)


def shipped_schema_names() -> list[str]:
    """The names `load_schema` resolves without a path: the stems of the package's schemas/*.yaml."""
    return sorted(f.name.removesuffix(".yaml") for f in SCHEMAS_DIR.iterdir() if f.name.endswith(".yaml"))


def _schema_file(path_or_name: str | os.PathLike | Traversable) -> Traversable:
    """The file a schema reference names: a path as given, or, for a bare name that is no path, the shipped schema."""
    source = Path(path_or_name) if isinstance(path_or_name, str | os.PathLike) else path_or_name
    if isinstance(source, Path) and not source.suffix and not source.exists():
        source = SCHEMAS_DIR / f"{source}.yaml"
    if not source.is_file():
        known = ", ".join(shipped_schema_names())
        raise SchemaError(f"schema {str(path_or_name)!r}: no such file (known names: {known})")
    return source


def schema_from_dict(raw: Any, origin: str = "<dict>") -> DomainSchema:
    """Build and validate a schema from plain data (the yaml document or a saved tokenizer's copy)."""
    try:
        schema = msgspec.convert(raw, DomainSchema)
    except msgspec.ValidationError as exc:
        raise SchemaError(f"schema {origin}: {exc}") from None
    validate_schema(schema, origin)
    return schema


def validate_schema(schema: DomainSchema, origin: str = "<schema>") -> None:
    """Raise SchemaError naming the field or column at the first problem found."""
    where = f"schema {origin}"
    _check_timezone(schema.timezone, where)
    seen_cols: set[str] = set()
    for col in schema.columns:
        for spelling in [col.name, *col.aliases]:
            if spelling in seen_cols:
                raise SchemaError(f"{where}: column {spelling!r} declared twice (as a name or alias)")
            seen_cols.add(spelling)
        if not _NAME_RE.match(col.name):
            raise SchemaError(f"{where}: column {col.name!r}: canonical names are identifiers (put other spellings in aliases)")
    if not schema.fields:
        raise SchemaError(f"{where}: no fields")
    names: set[str] = set()
    for spec in schema.fields:
        if spec.name in names:
            raise SchemaError(f"{where}: field {spec.name!r}: duplicate field name")
        names.add(spec.name)
        if not _NAME_RE.match(spec.name):
            raise SchemaError(f"{where}: field {spec.name!r}: names are identifiers (letters, digits, underscore)")
        if spec.type not in PARAMS_BY_TYPE:
            raise SchemaError(f"{where}: field {spec.name!r}: unknown field type {spec.type!r} (known: {', '.join(FIELD_TYPES)})")
        try:
            params = spec.typed_params()
        except msgspec.ValidationError as exc:
            raise SchemaError(f"{where}: field {spec.name!r}: bad params: {exc}") from None
        _check_params(spec.name, spec.type, params, where)
    ap = schema.actionpiece
    if ap is not None and (ap.merges < 1 or ap.max_users < 1):
        raise SchemaError(f"{where}: actionpiece: merges and max_users must be >= 1, got {ap.merges} and {ap.max_users}")
    _check_expressions(schema, where)


def _check_params(name: str, ftype: str, p: Any, where: str) -> None:
    def bad(msg: str) -> SchemaError:
        return SchemaError(f"{where}: field {name!r}: {msg}")

    if ftype == "numerical_continuous" and not 2 <= p.n_bins <= 1000:
        raise bad(f"n_bins must be in 2..1000, got {p.n_bins}")
    if ftype == "numerical_discrete" and not 0 <= p.max_value <= 10000:
        raise bad(f"max_value must be in 0..10000, got {p.max_value}")
    if ftype == "categorical_fixed" and (p.max_size < 1 or p.min_frequency < 1):
        raise bad(f"max_size and min_frequency must be >= 1, got {p.max_size} and {p.min_frequency}")
    if ftype == "categorical_entity" and (not 2 <= p.buckets <= 65536 or not 1 <= p.n_tokens <= 4):
        raise bad(f"buckets must be in 2..65536 and n_tokens in 1..4, got {p.buckets} and {p.n_tokens}")
    if ftype == "categorical_entity" and p.ids == "semantic":
        from domaintok.semantic_ids import SemanticIdParams  # numpy + msgspec only

        try:
            semantic = msgspec.convert(p.semantic, SemanticIdParams)
        except (msgspec.ValidationError, DomaintokError) as exc:
            raise bad(f"semantic: {exc}") from None
        if semantic.source != "cooccurrence" and p.content is None:
            raise bad(f"semantic ids from source {semantic.source!r} need `content` (the item's text expression)")
    elif ftype == "categorical_entity" and (p.content is not None or p.semantic):
        raise bad("`content` and `semantic` apply to ids: semantic only")
    if ftype == "temporal":
        unknown = [part for part in p.parts if part not in CALENDAR_PARTS]
        if unknown:
            raise bad(f"unknown calendar parts {unknown} (known: {', '.join(CALENDAR_PARTS)})")
        if len(set(p.parts)) != len(p.parts):
            raise bad(f"calendar parts repeated: {p.parts}")
        if not p.parts and not p.time_since_previous:
            raise bad("no calendar parts and no time_since_previous: the field would emit nothing")
    if ftype == "text" and (not 1 <= p.max_tokens <= 256 or not 256 <= p.bpe_vocab_size <= 100000):
        raise bad(f"max_tokens must be in 1..256 and bpe_vocab_size in 256..100000, got {p.max_tokens} and {p.bpe_vocab_size}")


def _check_timezone(tz: str, where: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise SchemaError(f"{where}: unknown timezone {tz!r}") from None


def _check_expressions(schema: DomainSchema, where: str) -> None:
    """Bind every expression against an empty table of the declared columns: a column that is not declared fails here."""
    import duckdb

    con = duckdb.connect()
    cols = ", ".join(f'CAST(NULL AS {SQL_TYPE_BY_COLUMN[c.type]}) AS "{c.name}"' for c in schema.columns)
    con.execute(f"CREATE TEMP TABLE __cols AS SELECT {cols} LIMIT 0")
    checks = [("user_id", schema.user_id, "VARCHAR"), ("event_time", schema.event_time, "TIMESTAMPTZ")]
    if schema.filter:
        checks.append(("filter", schema.filter, "BOOLEAN"))
    checks += [(f"field {f.name!r}", f.source, SQL_TYPE_BY_FIELD[f.type]) for f in schema.fields]
    for what, expr, sql_type in checks:
        try:
            con.execute(f"SELECT CAST(({expr}) AS {sql_type}) FROM __cols").fetchall()
        except duckdb.Error as exc:
            msg = " ".join(str(exc).split())
            declared = ", ".join(c.name for c in schema.columns)
            raise SchemaError(f"{where}: {what}: bad source {expr!r}: {msg} (declared columns: {declared})") from None
    con.close()
