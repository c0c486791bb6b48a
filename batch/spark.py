"""Tokenize and embed on Apache Spark: the single-node `tokenize` and `embed` steps run inside `mapInArrow`, so a
cluster writes the same rows as one machine; plus fitting a tokenizer on a sample of users collected by Spark.

How tokenize stays identical to the single-node job:
1. `events_frame` reads every input with its order (input argument, file path, row in the file:
   `_metadata.file_path`, `_metadata.row_index`), maps the schema's columns by name or alias, and passes each
   Arrow batch through DuckDB with the casts of `create_events_view` (TRY_CAST to the declared type, in the
   schema's timezone), adding the user id as `tokenize` computes it (`CAST((user_id) AS VARCHAR)`): inputs whose
   spellings and types differ (the two Online Retail files) come out alike, and an expression as user id works.
2. The events are hash-partitioned by that user id and sorted within partitions by (user, input order), so each
   partition holds all events of its users in input order.
3. `_tokenize_partition` hands whole users, at most `chunk_events` events at a time, to
   `DomainTokenizer.iter_tokenize` as an Arrow table: its ordering by (user, time, input, row) then ties events of
   equal time by their position in that table, which is the input order.
Embedding runs `batch.embed.embed_record_batch` on each Arrow batch of sequences, on the task's GPU when Spark
assigned one. pyspark is imported inside functions: importing this module (the CLI does) needs only click.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from domaintok.errors import DomaintokError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from domaintok.event_sql import EventFilter
    from domaintok.schema import DomainSchema
    from domaintok.tokenizer import DomainTokenizer

ENGINES = ("local", "spark")
ENGINE_HELP = "local: this machine (DuckDB). spark: a Spark job (spark-submit's master, or --spark-master)."
SPARK_MASTER_HELP = "With --engine spark: the master URL (default: spark-submit's, else local[*])."
# Helper columns between the steps (dropped before any output): the user id as tokenize computes it, and the order
# of the events in their inputs
USER, INPUT, FILE, ROW = "__domaintok_user", "__domaintok_input", "__domaintok_file", "__domaintok_row"
_BATCH = "__domaintok_batch"  # the Arrow batch as DuckDB sees it
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class Location(click.ParamType):
    """A local path, checked as `local` checks it, or a URI (hdfs://, s3a://, gs://, file://) kept as text: only
    `--engine spark` reads and writes URIs."""

    name = "path"

    def __init__(self, local: click.Path):
        self.local = local

    def convert(self, value, param, ctx):
        if isinstance(value, str) and _URI.match(value):
            return value
        return self.local.convert(value, param, ctx)


def is_uri(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and bool(_URI.match(location))


def local_paths(*locations: str | os.PathLike) -> None:
    """Refuse a URI where only --engine spark can read or write it."""
    for location in locations:
        if is_uri(location):
            raise DomaintokError(f"{location}: a URI is read and written by --engine spark only (this is --engine local)")


def spark_session(master: str | None = None, app_name: str = "domaintok", config: dict[str, str] | None = None) -> SparkSession:
    """The active SparkSession, or a new one on `master` (default: spark-submit's, else local[*]).

    Outside spark-submit, local Python workers run this interpreter (PYSPARK_PYTHON, unless set), so they see the
    same packages as the driver; on a cluster, ship an environment (README, Spark).
    """
    from pyspark.sql import SparkSession

    submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # spark-submit started this interpreter
    if not submitted and (master is None or master.startswith("local")):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    for key, value in (config or {}).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


# ------------------------------------------------------------------------------------------------------ raw events


def events_frame(
    spark: SparkSession,
    schema: DomainSchema,
    events: DataFrame | str | os.PathLike | Sequence[str | os.PathLike],
    *,
    order: Sequence[str] | None = None,
    restrict: EventFilter | None = None,
    stats=None,
) -> tuple[DataFrame, list[str]]:
    """The schema's columns of every event, cast as `tokenize` casts them, with USER and the input-order columns;
    events without a user id, or outside `restrict`, are left out. Returns the frame and its order columns.

    `events` is parquet paths (files or directories, local or URIs: the order is argument, file path, row in the
    file) or a DataFrame of raw events. A DataFrame's order is `order` (columns of it), by default the file and row
    of a DataFrame read from files (`_metadata`); `order=[]` leaves ties between events of one user at the same time
    in whatever order Spark delivers them. `stats`, an accumulator of count dicts, receives `input_rows`.
    """
    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    if isinstance(events, DataFrame):
        return _normalized(spark, schema, _declared(events, schema, "DataFrame", order), restrict, stats)
    paths = [events] if isinstance(events, (str, os.PathLike)) else list(events)
    if not paths:
        raise DomaintokError("no input given")
    frames = []
    for k, path in enumerate(paths):
        raw = _read_parquet(spark, path)
        frame, order_cols = _declared(raw, schema, str(path), None, extra=[F.lit(k).alias(INPUT)])
        frames.append(_normalized(spark, schema, (frame, [INPUT, *order_cols]), restrict, stats)[0])
    return functools.reduce(DataFrame.unionByName, frames), [INPUT, FILE, ROW]


def _read_parquet(spark: SparkSession, path: str | os.PathLike) -> DataFrame:
    """One input as Spark reads it: a file, or a directory's *.parquet files (schemas merged)."""
    from pyspark.errors import AnalysisException

    text = str(path)
    if not is_uri(text) and not Path(text).exists():
        raise DomaintokError(f"input {text!r}: no such file")
    reader = spark.read.option("mergeSchema", "true")
    if is_uri(text) or Path(text).is_dir():
        reader = reader.option("pathGlobFilter", "*.parquet")  # what the single-node job reads of a directory
    try:
        return reader.parquet(text)
    except AnalysisException as exc:
        raise DomaintokError(f"input {text!r}: cannot read as parquet: {_first_line(exc)}") from None


def _declared(
    raw: DataFrame, schema: DomainSchema, what: str, order: Sequence[str] | None, extra: list | None = None
) -> tuple[DataFrame, list[str]]:
    """The schema's columns under their canonical names (by name or alias, as create_events_view maps them), plus
    `extra` and the order columns: `order`, or the file and row of each event when None."""
    from pyspark.errors import AnalysisException
    from pyspark.sql import functions as F

    def ref(name: str):
        return F.col("`" + name.replace("`", "``") + "`")

    columns = []
    for col in schema.columns:
        found = [s for s in [col.name, *col.aliases] if s in raw.columns]
        if not found:
            spellings = " / ".join([col.name, *col.aliases])
            raise DomaintokError(
                f"input {what!r}: column {spellings!r} of schema {schema.name} is missing (available: {', '.join(raw.columns)})"
            )
        # a directory whose files spell a column differently: each file has one of them, the others read as null
        columns.append((ref(found[0]) if len(found) == 1 else F.coalesce(*map(ref, found))).alias(col.name))
    if order is None:
        try:
            frame = raw.select(*columns, *(extra or []), F.col("_metadata.file_path").alias(FILE),
                               F.col("_metadata.row_index").alias(ROW))
            frame.schema  # noqa: B018 - resolves the plan: a DataFrame not read from files has no _metadata
        except AnalysisException:
            raise DomaintokError(
                f"input {what!r}: not read from files (no _metadata.row_index): pass order=[columns] giving the input "
                "order, or order=[] to leave ties between events of one user at the same time unordered"
            ) from None
        return frame, [FILE, ROW]
    missing = [c for c in order if c not in raw.columns]
    if missing:
        raise DomaintokError(f"input {what!r}: order column(s) {', '.join(missing)} missing")
    return raw.select(*columns, *(extra or []), *map(ref, order)), list(order)


def _normalized(spark: SparkSession, schema: DomainSchema, declared: tuple[DataFrame, list[str]],
                restrict: EventFilter | None, stats=None) -> tuple[DataFrame, list[str]]:
    """`declared` through DuckDB, batch by batch: the canonical columns cast, USER added, events without a user or
    outside `restrict` dropped; the order columns pass through untouched."""
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    frame, order_cols = declared
    carried = [c for c in frame.columns if c not in {col.name for col in schema.columns}]
    # The output schema is what DuckDB makes of an empty batch of the input's Arrow types; an error in a schema
    # expression surfaces here, on the driver, in one line.
    arrow = to_arrow_schema(frame.schema)
    probe = pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in arrow], schema=arrow)
    out = next(_normalize_batches([probe], schema, restrict, carried)).schema
    shared = None if restrict is None else spark.sparkContext.broadcast(restrict)  # its user list may be long
    fn = functools.partial(_normalize_partition, schema=schema, restrict=shared, carried=carried, stats=stats)
    return frame.mapInArrow(fn, from_arrow_schema(out)), order_cols


def _normalize_partition(batches, *, schema, restrict, carried, stats) -> Iterator[pa.RecordBatch]:
    counts = {"input_rows": 0}
    for table in _normalize_batches(batches, schema, None if restrict is None else restrict.value, carried, counts):
        yield from table.to_batches()
    if stats is not None:
        stats.add(counts)


def _normalize_batches(batches, schema: DomainSchema, restrict, carried: list[str],
                       counts: dict[str, int] | None = None) -> Iterator[pa.Table]:
    from domaintok.errors import SchemaError
    from domaintok.event_sql import connect, quote
    from domaintok.schema import SQL_TYPE_BY_COLUMN

    con = connect(schema)
    try:
        con.execute("SET threads = 1")  # Spark runs a task per core; one thread also keeps the rows in order
        keep = restrict.condition(con, schema) if restrict is not None else "true"
        casts = ", ".join(
            f"TRY_CAST({quote(c.name)} AS {SQL_TYPE_BY_COLUMN[c.type]}) AS {quote(c.name)}" for c in schema.columns
        )
        # the user id and the event filter as create_events_view writes them, over the cast columns
        sql = (
            f"SELECT *, CAST(({schema.user_id}) AS VARCHAR) AS {USER}, coalesce(({keep}), false) AS __keep "
            f"FROM (SELECT {casts} FROM {_BATCH})"
        )
        for batch in batches:
            if counts is not None:  # a task's batches (the driver's probe is an empty batch)
                counts["input_rows"] += batch.num_rows
                if batch.num_rows == 0:
                    continue
            con.register(_BATCH, batch)
            try:
                table = con.sql(sql).to_arrow_table()
            except Exception as exc:  # noqa: BLE001 - a schema expression DuckDB cannot run on these columns
                raise SchemaError(f"schema {schema.name}: {' '.join(str(exc).split())}") from None
            finally:
                con.unregister(_BATCH)
            if table.num_rows != batch.num_rows:  # never: a projection keeps every row, in order
                raise RuntimeError(f"DuckDB returned {table.num_rows} rows for {batch.num_rows}")
            mask = pc.and_(pc.is_valid(table.column(USER)), table.column("__keep"))
            table = table.drop_columns(["__keep"])
            for name in carried:
                table = table.append_column(name, pa.chunked_array([batch.column(name)]))
            yield table.filter(mask).combine_chunks()
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------------------- fit


def fit_on_sample(
    spark: SparkSession,
    schema: DomainSchema | str | os.PathLike,
    events,
    fraction: float,
    *,
    seed: int = 0,
    order: Sequence[str] | None = None,
    restrict: EventFilter | None = None,
    **fit_kwargs: Any,
) -> DomainTokenizer:
    """Fit a tokenizer on the events of a random `fraction` of the users, collected to the driver in input order.

    The fit itself is `DomainTokenizer.fit` (DuckDB) on the sample, so `fraction=1` gives the single-node tokenizer;
    a smaller one fits quantile bins, vocabularies and the BPE on the sample (README, Spark: what differs). Users
    are drawn by a seeded hash of their id, so the same seed draws the same users on any cluster.
    """
    from pyspark.sql import functions as F

    from domaintok.schema import DomainSchema, load_schema
    from domaintok.tokenizer import DomainTokenizer

    if not 0 < fraction <= 1:
        raise DomaintokError(f"fraction must be in (0, 1], got {fraction}")
    schema = schema if isinstance(schema, DomainSchema) else load_schema(schema)
    frame, order_cols = events_frame(spark, schema, events, order=order, restrict=restrict)
    if fraction < 1:
        draw = F.pmod(F.xxhash64(F.lit(int(seed)), F.col(USER)), F.lit(1_000_000))
        frame = frame.where(draw < int(round(fraction * 1_000_000)))
    if order_cols:
        frame = frame.orderBy(*order_cols)
    with spark_errors():
        sample = frame.select(*[c.name for c in schema.columns]).toArrow()
    if sample.num_rows == 0:
        raise DomaintokError(f"the {fraction:g} sample holds no events (raise the fraction)")
    return DomainTokenizer.fit(schema, sample, **fit_kwargs)


# ----------------------------------------------------------------------------------------------------- tokenize


def tokenize_frame(
    spark: SparkSession,
    tokenizer: DomainTokenizer | str | os.PathLike,
    events,
    max_length: int | None = None,
    *,
    order: Sequence[str] | None = None,
    restrict: EventFilter | None = None,
    partitions: int | None = None,
    chunk_events: int | None = None,
) -> DataFrame:
    """Sequences (the columns of SEQUENCES_SCHEMA, one row per user) of `events` (paths or a DataFrame, as in
    `events_frame`), lazily: the rows of the single-node `tokenize`, in another row order (by user within each of
    `partitions` hash partitions of the users; default: Spark's, spark.sql.shuffle.partitions)."""
    return _tokenize(spark, tokenizer, events, max_length, order=order, restrict=restrict, partitions=partitions,
                     chunk_events=chunk_events, stats=None)


def tokenize_to_parquet(
    spark: SparkSession,
    tokenizer: DomainTokenizer | str | os.PathLike,
    events,
    output: str | os.PathLike,
    max_length: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Write `tokenize_frame` as a parquet directory (replaced, zstd) and return the counts the single-node
    `tokenize_to_parquet` returns (users, events, tokens per event, median user tokens, truncation)."""
    stats = spark.sparkContext.accumulator({}, _SumCounts())
    started = time.perf_counter()
    frame = _tokenize(spark, tokenizer, events, max_length, stats=stats, **kwargs)
    _write(spark, frame, output)
    counts = stats.value
    events_n = counts.get("events", 0)
    lengths = counts.get("user_tokens", {})
    return {
        "users": counts.get("users", 0),
        "events": events_n,
        "sequence_tokens": counts.get("sequence_tokens", 0),
        "tokens_per_event": counts.get("event_tokens", 0) / max(events_n, 1),
        "median_user_tokens": _median(lengths),
        "truncated_users": counts.get("truncated_users", 0),
        "truncated_token_fraction": counts.get("truncated_tokens", 0) / max(counts.get("event_tokens", 0), 1),
        "seconds": time.perf_counter() - started,
        "input_rows": counts.get("input_rows", 0),
        "partitions": counts.get("partitions", 0),
    }


def _tokenize(spark, tokenizer, events, max_length=None, *, order=None, restrict=None, partitions=None,
              chunk_events=None, stats=None) -> DataFrame:
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    from domaintok.offline import SEQUENCES_SCHEMA
    from domaintok.settings import Settings

    files, tok = _tokenizer_files(tokenizer)
    max_length = tok.check_max_length(max_length)
    chunk_events = int(chunk_events or Settings.from_env().tokenize_chunk_events)
    frame, order_cols = events_frame(spark, tok.schema, events, order=order, restrict=restrict, stats=stats)
    frame = frame.repartition(partitions, F.col(USER)) if partitions else frame.repartition(F.col(USER))
    frame = frame.sortWithinPartitions(USER, *order_cols)
    fn = functools.partial(
        _tokenize_partition,
        files=spark.sparkContext.broadcast(files),
        columns=[c.name for c in tok.schema.columns],
        max_length=max_length,
        chunk_events=chunk_events,
        stats=stats,
    )
    return frame.mapInArrow(fn, from_arrow_schema(SEQUENCES_SCHEMA))


def _tokenizer_files(tokenizer) -> tuple[tuple[tuple[str, bytes], ...], DomainTokenizer]:
    """The tokenizer's directory as (file name, bytes) pairs, what executors rebuild it from, and the tokenizer."""
    from domaintok.tokenizer import DomainTokenizer

    if isinstance(tokenizer, DomainTokenizer):
        with tempfile.TemporaryDirectory(prefix="domaintok-tokenizer-") as tmp:
            tokenizer.save_pretrained(tmp)
            return _tokenizer_files(tmp)[0], tokenizer
    directory = Path(tokenizer)
    tok = DomainTokenizer.from_pretrained(directory)
    files = tuple(sorted((p.name, p.read_bytes()) for p in directory.iterdir() if p.is_file()))
    return files, tok


@functools.lru_cache(maxsize=4)
def _tokenizer_from_files(files: tuple[tuple[str, bytes], ...]) -> DomainTokenizer:
    """The broadcast tokenizer, loaded once per Python worker (from_pretrained checks its fingerprint)."""
    from domaintok.tokenizer import DomainTokenizer

    with tempfile.TemporaryDirectory(prefix="domaintok-tokenizer-") as tmp:
        for name, data in files:
            Path(tmp, name).write_bytes(data)
        return DomainTokenizer.from_pretrained(tmp)


def _tokenize_partition(batches, *, files, columns, max_length, chunk_events, stats) -> Iterator[pa.RecordBatch]:
    """One partition's events, sorted by (user, input order), to sequences: whole users at a time, about
    `chunk_events` events per tokenize call (more when one user has more)."""
    tok = _tokenizer_from_files(files.value)
    counts: dict[str, Any] = {}
    pending: list[pa.RecordBatch] = []
    rows, limit = 0, chunk_events
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        rows += batch.num_rows
        if rows < limit:
            continue
        table = pa.Table.from_batches(pending)
        users = table.column(USER)
        cut = pc.index(users, users[-1]).as_py()  # where the last user starts: it may go on in the next batch
        if cut == 0:  # one user so far: read on until it ends
            limit = rows + chunk_events
            continue
        yield from _sequences(tok, table.slice(0, cut), columns, max_length, counts)
        rest = table.slice(cut)
        pending, rows, limit = rest.to_batches(), rest.num_rows, chunk_events
    if rows:
        yield from _sequences(tok, pa.Table.from_batches(pending), columns, max_length, counts)
    if stats is not None:
        lengths = np.concatenate(counts.pop("user_tokens", []) or [np.zeros(0, np.int64)])
        values, n = np.unique(lengths, return_counts=True)
        counts["user_tokens"] = dict(zip(values.tolist(), n.tolist()))
        counts["partitions"] = 1
        stats.add(counts)


def _sequences(tok: DomainTokenizer, table: pa.Table, columns: list[str], max_length: int, counts: dict):
    for batch in tok.iter_tokenize(table.select(columns), max_length, stats=counts, chunk_events=table.num_rows):
        counts["users"] = counts.get("users", 0) + batch.num_rows
        counts["sequence_tokens"] = counts.get("sequence_tokens", 0) + len(batch.column("input_ids").values)
        yield batch


# -------------------------------------------------------------------------------------------------------- embed


def embed_frame(
    spark: SparkSession,
    model_dir: str | os.PathLike,
    sequences,
    *,
    batch_size: int = 64,
    device: str | None = None,
    partitions: int | None = None,
) -> DataFrame:
    """Embeddings (the columns of EMBEDDINGS_SCHEMA) of `sequences` (a DataFrame, or a parquet file or directory
    written by `tokenize`), lazily, with the step of the single-node `embed` on each Arrow batch.

    `model_dir` is a local directory of the driver, shipped to the executors with SparkContext.addFile. A task runs
    on the GPU Spark assigned it (spark.task.resource.gpu.amount), else on `device` (default: CUDA when the
    executor has one, else the CPU with as many threads as the task has cores).
    """
    return _embed(spark, model_dir, sequences, batch_size=batch_size, device=device, partitions=partitions, stats=None)


def embed_to_parquet(spark: SparkSession, model_dir, sequences, output: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Write `embed_frame` as a parquet directory (replaced, zstd); returns the counts of the single-node `embed`."""
    from domaintok.models.configuration_domain_transformer import DomainTransformerConfig

    stats = spark.sparkContext.accumulator({}, _SumCounts())
    started = time.perf_counter()
    _write(spark, _embed(spark, model_dir, sequences, stats=stats, **kwargs), output)
    seconds = time.perf_counter() - started
    counts = stats.value
    config = DomainTransformerConfig.from_pretrained(model_dir)
    return {
        "users": counts.get("users", 0),
        "tokens": counts.get("tokens", 0),
        "context_length": config.max_position_embeddings,
        "truncated_users": counts.get("truncated_users", 0),
        "pooling": config.pooling,
        "seconds": seconds,
        "users_per_second": counts.get("users", 0) / seconds if seconds else None,
        "model_version": _model_version(model_dir),
        "hidden_size": config.hidden_size,
        "device": ", ".join(sorted(counts.get("devices", {}))),
        "batch_size": kwargs.get("batch_size", 64),
        "partitions": counts.get("partitions", 0),
    }


def _embed(spark, model_dir, sequences, *, batch_size: int = 64, device: str | None = None,
           partitions: int | None = None, stats=None) -> DataFrame:
    from pyspark.sql import DataFrame
    from pyspark.sql.pandas.types import from_arrow_schema

    from batch.embed import INPUT_COLUMNS
    from domaintok.models.embedding import EMBEDDINGS_SCHEMA, check_model_dir

    if batch_size <= 0:
        raise DomaintokError(f"batch_size must be positive, got {batch_size}")
    if is_uri(str(model_dir)):
        raise DomaintokError(f"--model {model_dir}: a local directory of the driver (it is shipped to the executors)")
    path = check_model_dir(model_dir).resolve()
    version = _model_version(path)
    if isinstance(sequences, DataFrame):
        frame, source = sequences, "sequences DataFrame"
    else:
        frame, source = _read_parquet(spark, sequences), str(sequences)
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise DomaintokError(f"{source}: missing column(s) {', '.join(missing)} (expected a `domaintok tokenize` output)")
    frame = frame.select(*INPUT_COLUMNS)
    if partitions:
        frame = frame.repartition(partitions)
    spark.sparkContext.addFile(str(path), recursive=True)
    fn = functools.partial(_embed_partition, model=path.name, version=version, batch_size=batch_size,
                           device=device, source=source, stats=stats)
    return frame.mapInArrow(fn, from_arrow_schema(EMBEDDINGS_SCHEMA))


def _model_version(model_dir) -> str:
    from domaintok.models.embedding import model_version

    return model_version(model_dir)


@functools.lru_cache(maxsize=2)
def _encoder(path: str, device: str | None):
    from domaintok.models.embedding import load_encoder

    return load_encoder(path, device=device)


def _embed_partition(batches, *, model, version, batch_size, device, source, stats) -> Iterator[pa.RecordBatch]:
    import torch
    from pyspark import SparkFiles, TaskContext

    from batch.embed import embed_record_batch, token_count

    task = TaskContext.get()
    gpus = task.resources().get("gpu") if task is not None else None
    if gpus is not None and gpus.addresses:
        device = f"cuda:{gpus.addresses[0]}"
    elif task is not None:
        torch.set_num_threads(max(1, task.cpus()))  # a task per core: torch would otherwise use every core in each
    encoder = _encoder(SparkFiles.get(model), device)
    counts = {"users": 0, "tokens": 0, "truncated_users": 0, "partitions": 1,
              "devices": {str(next(encoder.parameters()).device): 1}}
    for batch in batches:
        if batch.num_rows == 0:
            continue
        table, cut = embed_record_batch(encoder, batch, version, batch_size, source)
        counts["users"] += batch.num_rows
        counts["tokens"] += token_count(batch)
        counts["truncated_users"] += cut
        yield from table.to_batches()
    if stats is not None:
        stats.add(counts)


# ---------------------------------------------------------------------------------------------- shared plumbing


class _SumCounts:
    """Accumulator of count dicts from the tasks: numbers add up, dicts of numbers add up key by key. A task that
    Spark retries (or runs speculatively) adds its counts again: the counts are a report, never an input."""

    def zero(self, value):
        return {}

    def addInPlace(self, total, counts):  # noqa: N802 - pyspark's AccumulatorParam interface
        for key, value in counts.items():
            if isinstance(value, dict):
                into = total.setdefault(key, {})
                for k, v in value.items():
                    into[k] = into.get(k, 0) + v
            else:
                total[key] = total.get(key, 0) + value
        return total


def _median(counts: dict[int, int]) -> float:
    """The median of values given as {value: how many times}."""
    if not counts:
        return 0.0
    values = np.array(sorted(counts), dtype=np.int64)
    csum = np.cumsum([counts[v] for v in values])
    n = int(csum[-1])
    lo, hi = (values[np.searchsorted(csum, k, side="right")] for k in ((n - 1) // 2, n // 2))
    return float((lo + hi) / 2)


def _write(spark: SparkSession, frame: DataFrame, output: str | os.PathLike) -> None:
    """`frame` as a parquet directory at `output` (replacing it): zstd, timestamps as microseconds with UTC meaning,
    as the single-node jobs write them (Spark's default would be INT96)."""
    key = "spark.sql.parquet.outputTimestampType"
    before = spark.conf.get(key)
    spark.conf.set(key, "TIMESTAMP_MICROS")
    try:
        with spark_errors():
            frame.write.mode("overwrite").option("compression", "zstd").parquet(str(output))
    finally:
        spark.conf.set(key, before)


@contextmanager
def spark_errors():
    """A DomaintokError raised in a Spark task reaches the driver inside a long Java stack trace: re-raise its own
    one-line message on the driver."""
    from pyspark.errors import PythonException

    try:
        yield
    except PythonException as exc:
        found = re.search(r"domaintok\.errors\.\w+: (.*)", str(exc))
        if found is None:
            raise
        raise DomaintokError(found.group(1).strip()) from None


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(getattr(exc, "getMessage", lambda: exc)()).split())
    return text.split(" JVM stacktrace:")[0][:500]
