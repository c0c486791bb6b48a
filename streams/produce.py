"""`domaintok produce`: send raw events to the events topic from parquet, a synthetic generator, or stdin.

Key = user id, murmur2 partitioning; with `--tokenizer` each event is validated against the tokenizer's event
struct and carries its fingerprint header. Optional rate limit; progress on stderr; a summary (and metrics JSON).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from domaintok.errors import DomaintokError
from domaintok.event_sql import input_files, input_rows
from domaintok.synthetic import DOMAINS, generate_events, write_events_parquet
from streams.topics import ensure_topics
from streams.clients import EventProducer
from streams.records import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK
from streams.settings import KafkaSettings

BATCH_ROWS = 5000
_line_decoder = msgspec.json.Decoder()


def _column_mapping(schema_arrow: pa.Schema, tokenizer: Any | None, path: Path) -> dict[str, str] | None:
    """File column -> canonical column for a tokenizer's schema (aliases resolved); None keeps every column."""
    if tokenizer is None:
        return None
    present = set(schema_arrow.names)
    mapping = {}
    for col in tokenizer.schema.columns:
        name = next((n for n in (col.name, *col.aliases) if n in present), None)
        if name is None:
            if not getattr(col, "nullable", True):
                raise DomaintokError(f"{path}: column {col.name!r} of schema {tokenizer.schema.name!r} is missing")
            continue
        mapping[name] = col.name
    return mapping


def _parquet_batches(files: list[Path], tokenizer: Any | None) -> Iterator[pa.Table]:
    for path in files:
        parquet = pq.ParquetFile(path)
        mapping = _column_mapping(parquet.schema_arrow, tokenizer, path)
        columns = None if mapping is None else list(mapping)
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            table = pa.Table.from_batches([batch])
            if mapping is not None:
                table = table.rename_columns([mapping[n] for n in table.column_names])
            yield table


def _stdin_events() -> Iterator[list[dict]]:
    for number, line in enumerate(sys.stdin.buffer, 1):
        line = line.strip()
        if not line:
            continue
        try:
            event = _line_decoder.decode(line)
        except msgspec.DecodeError as exc:
            raise DomaintokError(f"stdin line {number}: not JSON ({exc})") from None
        if not isinstance(event, dict):
            raise DomaintokError(f"stdin line {number}: expected a JSON object, got {type(event).__name__}")
        yield [event]


def _user_keys(table: pa.Table, tokenizer: Any) -> list[str | None]:
    """User ids of a batch by the schema's `user_id` expression (DuckDB, as the tokenizer computes them)."""
    import duckdb

    con = duckdb.connect()
    con.register("batch", table)
    return [row[0] for row in con.sql(f"SELECT CAST(({tokenizer.schema.user_id}) AS VARCHAR) FROM batch").fetchall()]


class _Pacer:
    """Keeps the average rate at `rate` events/s by sleeping when ahead of schedule."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()

    def chunk(self) -> int:
        return BATCH_ROWS if not self.rate else max(1, min(BATCH_ROWS, int(self.rate / 20)))

    def wait(self, sent: int) -> None:
        if self.rate:
            ahead = sent / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                time.sleep(ahead)


def _event_batches(inputs, synthetic, stdin: bool, users: int, n_events: int, seed: int, save_parquet, tok):
    """The events to send (Arrow batches, or lists of dicts from stdin) and their count when known."""
    if synthetic:
        table = generate_events(synthetic, users, n_events, seed=seed)
        if save_parquet:
            write_events_parquet(table, save_parquet)
        return iter(table.to_batches(max_chunksize=BATCH_ROWS)), table.num_rows
    if stdin:
        return _stdin_events(), None
    files = input_files(inputs)  # the input rule of every job: files, or the parquet files under directories
    return _parquet_batches(files, tok), input_rows(files)


def _send_all(producer, batches: Iterator[Any], tok, total: int | None, limit: int | None, pacer, quiet: bool,
              started: float) -> None:
    """Send every event (at most `limit`) at the pacer's rate, with a progress bar. The key is the schema's user id
    column; where the schema's user id is an expression, DuckDB evaluates it per batch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    key_by_sql = tok is not None and tok.schema.user_id not in {c.name for c in tok.schema.columns}
    progress = Progress(
        TextColumn("produce"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]:,.0f} ev/s"),
        TimeRemainingColumn(), disable=quiet, transient=True,
    )
    with progress:
        task = progress.add_task("produce", total=total, rate=0.0)
        for batch in batches:
            rows = batch if isinstance(batch, list) else None
            table = None if rows is not None else (batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch]))
            n_rows = len(rows) if rows is not None else table.num_rows
            offset = 0
            while offset < n_rows:
                if limit is not None and producer.sent >= limit:
                    return
                size = min(pacer.chunk(), n_rows - offset, (limit - producer.sent) if limit else n_rows)
                if rows is not None:
                    events, keys = rows[offset:offset + size], None
                else:
                    part = table.slice(offset, size)
                    events = part.to_pylist()
                    keys = _user_keys(part, tok) if key_by_sql else None
                producer.send_many(events, keys)
                offset += size
                pacer.wait(producer.sent)
                elapsed = max(time.monotonic() - started, 1e-9)
                progress.update(task, completed=producer.sent, rate=producer.sent / elapsed)
            if limit is not None and producer.sent >= limit:
                return


@click.command("produce")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, allow_dash=True, path_type=Path))
@click.option("--synthetic", type=click.Choice(DOMAINS), default=None,
              help="Generate realistic synthetic events of this domain instead of reading INPUTS.")
@click.option("--users", type=click.IntRange(1), default=1000, show_default=True, help="--synthetic: number of users.")
@click.option("--events", "n_events", type=click.IntRange(1), default=100_000, show_default=True,
              help="--synthetic: number of events.")
@click.option("--seed", type=int, default=0, show_default=True, help="--synthetic: random seed (same seed, same events).")
@click.option("--save-parquet", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--synthetic: also write the generated events to this parquet file (for offline jobs).")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Tokenizer directory: events are validated against its event struct and carry its fingerprint.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Events per second (default: as fast as the broker takes them).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Stop after this many events.")
@click.option("--format", "value_format", type=click.Choice(["json", "msgpack"]), default="json", show_default=True,
              help="Value encoding (the content-type header says which).")
@click.option("--topic", default=None, help="Topic (default: DOMAINTOK_TOPIC_EVENTS or domaintok.events).")
@click.option("--create-topic/--no-create-topic", default=True, show_default=True,
              help="Create the topic (DOMAINTOK_PARTITIONS partitions) if it does not exist.")
@click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the summary as JSON to this file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(
    inputs: tuple[Path, ...], synthetic: str | None, users: int, n_events: int, seed: int, save_parquet: Path | None,
    tokenizer: Path | None, rate: float | None, limit: int | None, value_format: str, topic: str | None,
    create_topic: bool, metrics: Path | None, quiet: bool,
) -> None:
    """Send raw events to the events topic (key = user id).

    INPUTS are parquet files or directories, or `-` for JSON lines on stdin; or use --synthetic. Needs
    KAFKA_BOOTSTRAP_SERVERS (start a broker with `domaintok broker`).
    """
    if bool(inputs) == bool(synthetic):
        raise click.UsageError("give INPUTS (parquet files, or - for stdin) or --synthetic DOMAIN, not both or neither")
    stdin = inputs == (Path("-"),)
    if not stdin and any(str(p) == "-" for p in inputs):
        raise click.UsageError("`-` (stdin) cannot be combined with files")
    settings = KafkaSettings.from_env()
    settings.require_bootstrap()
    topic = topic or settings.topic_events

    tok = None
    if tokenizer is not None:
        from domaintok.tokenizer import DomainTokenizer

        tok = DomainTokenizer.from_pretrained(tokenizer)
    batches, total = _event_batches(inputs, synthetic, stdin, users, n_events, seed, save_parquet, tok)
    if limit is not None:
        total = min(total, limit) if total is not None else limit
    if create_topic:
        ensure_topics(settings, [topic], exact=False)
    producer = EventProducer(
        settings,
        topic=topic,
        fingerprint=tok.fingerprint if tok is not None else None,
        content_type=CONTENT_TYPE_JSON if value_format == "json" else CONTENT_TYPE_MSGPACK,
        event_struct=tok.event_struct if tok is not None else None,
        key_field=tok.schema.user_id if tok is not None else "user_id",
    )
    started = time.monotonic()
    interrupted = False
    try:
        _send_all(producer, batches, tok, total, limit, _Pacer(rate), quiet, started)
    except KeyboardInterrupt:
        interrupted = True
    producer.flush()
    seconds = time.monotonic() - started
    summary = {
        "topic": topic,
        "source": synthetic and f"synthetic:{synthetic}" or ("stdin" if stdin else [str(p) for p in inputs]),
        "events": producer.sent,
        "failed": producer.failed,
        "seconds": round(seconds, 3),
        "events_per_second": round(producer.sent / seconds, 1) if seconds > 0 else None,
        "format": value_format,
        "fingerprint": tok.fingerprint if tok is not None else None,
        "interrupted": interrupted,
    }
    if metrics:
        metrics.write_text(json.dumps(summary, indent=2) + "\n")
    click.echo(
        f"produced {producer.sent:,} events to {topic} in {seconds:.1f} s "
        f"({summary['events_per_second'] or 0:,.0f} ev/s){' (interrupted)' if interrupted else ''}"
    )
