"""`domaintok consume`: read the embeddings topic (or dead-letter with `--dead-letter`) and print or save it.

Printing shows every record as it arrives; `--output X.parquet|X.jsonl` saves them, by default one row per
user (the record with the largest n_events: the dedupe rule for at-least-once duplicates).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import click
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from domaintok.artifacts import EMBEDDINGS_SCHEMA, atomic_file
from streams.clients import DeadLetterReader, EmbeddingConsumer, latest_per_user
from streams.records import DeadLetter, EmbeddingRecord
from streams.settings import KafkaSettings

# The offline embeddings table (batch `embed`) plus the two stream timestamps, in the same column names.
STREAM_EMBEDDINGS_SCHEMA = pa.schema(
    [
        *EMBEDDINGS_SCHEMA,
        pa.field("produced_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("source_ts_ms", pa.int64(), nullable=False),
    ]
)
DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("key", pa.binary()),
        pa.field("value", pa.binary()),
        pa.field("error", pa.string()),
        pa.field("source", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("headers", pa.string()),  # JSON object of the record's headers (values as text)
        pa.field("timestamp_ms", pa.int64()),
    ]
)


def _ts(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6, dt.timezone.utc).isoformat(timespec="seconds")


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "backslashreplace")


def _headers_json(headers) -> str:
    return json.dumps({k: _text(v) for k, v in headers})


def _embedding_line(r: EmbeddingRecord) -> str:
    head = ", ".join(f"{x:.4f}" for x in r.embedding[:4])
    return (f"{r.user_id}\tn_events={r.n_events}\tlast_event={_ts(r.last_event_ts)}\tmodel={r.model_version}"
            f"\tdim={len(r.embedding)}\t[{head}{', ...' if len(r.embedding) > 4 else ''}]")


def _dead_letter_line(d: DeadLetter) -> str:
    value = _text(d.value) or ""
    return (f"{d.stage}\t{d.source}\tkey={_text(d.key)}\terror={d.error}"
            f"\tvalue={value[:120]}{'...' if len(value) > 120 else ''}")


def _embedding_table(records: list[EmbeddingRecord]) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "user_id": [r.user_id for r in records],
            "embedding": [r.embedding for r in records],
            "n_events": [r.n_events for r in records],
            "last_event_ts": pa.array([r.last_event_ts for r in records], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "model_version": [r.model_version for r in records],
            "produced_at": pa.array([r.produced_at for r in records], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "source_ts_ms": [r.source_ts_ms for r in records],
        },
        schema=STREAM_EMBEDDINGS_SCHEMA,
    )


def _dead_letter_table(records: list[DeadLetter]) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "key": [d.key for d in records],
            "value": [d.value for d in records],
            "error": [d.error for d in records],
            "source": [d.source for d in records],
            "stage": [d.stage for d in records],
            "headers": [_headers_json(d.headers) for d in records],
            "timestamp_ms": [d.timestamp_ms for d in records],
        },
        schema=DEAD_LETTER_SCHEMA,
    )


def _jsonl(record) -> bytes:
    if isinstance(record, EmbeddingRecord):
        return msgspec.json.encode(record)
    return msgspec.json.encode(
        {
            "key": _text(record.key),
            "value": _text(record.value),
            "value_base64": base64.b64encode(record.value).decode() if record.value is not None else None,
            "error": record.error,
            "source": record.source,
            "stage": record.stage,
            "headers": {k: _text(v) for k, v in record.headers},
            "timestamp_ms": record.timestamp_ms,
        }
    )


def write_records(records: list, path: Path, dead_letter: bool) -> None:
    """Write records to parquet or JSONL by `path`'s suffix, atomically (temp file + rename)."""
    with atomic_file(path) as tmp:
        if path.suffix == ".parquet":
            table = _dead_letter_table(records) if dead_letter else _embedding_table(records)
            pq.write_table(table, tmp)
        else:
            with open(tmp, "wb") as out:
                for record in records:
                    out.write(_jsonl(record) + b"\n")


@click.command("consume")
@click.option("--dead-letter", is_flag=True, help="Read the dead-letter topic instead of embeddings.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save to X.parquet or X.jsonl instead of printing.")
@click.option("--all-records", is_flag=True,
              help="With --output: keep every embedding record, not only the newest per user.")
@click.option("--max", "max_records", type=click.IntRange(1), default=None, help="Stop after this many records.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop when no record arrived for this many seconds (default: run until Ctrl-C or --max).")
@click.option("--from-beginning", is_flag=True, help="Read the topic from its start (default: only new records).")
@click.option("--group", default=None,
              help="Consumer group: resume where this group left off and commit progress (default: no group).")
@click.option("--topic", default=None, help="Topic (default: DOMAINTOK_TOPIC_EMBEDDINGS / _DEAD_LETTER).")
def command(dead_letter: bool, output: Path | None, all_records: bool, max_records: int | None, timeout: float | None,
            from_beginning: bool, group: str | None, topic: str | None) -> None:
    """Print or save embeddings (or dead-letter records) from Kafka.

    Needs KAFKA_BOOTSTRAP_SERVERS. Output: one line per record on stdout, or --output X.parquet / X.jsonl
    (embeddings parquet has the offline embed columns plus produced_at and source_ts_ms).
    """
    if output is not None and output.suffix not in (".parquet", ".jsonl"):
        raise click.BadParameter(f"{output}: the file name must end in .parquet or .jsonl", param_hint="--output")
    settings = KafkaSettings.from_env()
    settings.require_bootstrap()
    reader_cls = DeadLetterReader if dead_letter else EmbeddingConsumer
    reader = reader_cls(settings, topic=topic, group_id=group, from_beginning=from_beginning)
    kept: list = []
    newest: dict[str, EmbeddingRecord] = {}
    count = 0
    try:
        for record in reader.records(max_records=max_records, idle_timeout=timeout):
            count += 1
            if output is None:
                click.echo(_dead_letter_line(record) if dead_letter else _embedding_line(record))
            elif dead_letter or all_records:
                kept.append(record)
            else:
                latest_per_user([record], into=newest)
            if group and count % 1000 == 0:
                reader.commit()
    except KeyboardInterrupt:
        pass
    finally:
        if group:
            reader.commit()
        reader.close()
    if reader.undecodable:
        click.echo(f"skipped {reader.undecodable} undecodable records on {reader.topic}", err=True)
    if output is not None:
        records = kept if (dead_letter or all_records) else list(newest.values())
        write_records(records, output, dead_letter)
        click.echo(f"read {count:,} records from {reader.topic}; wrote {len(records):,} to {output}")
    elif count == 0 and timeout is not None:
        click.echo(f"no records on {reader.topic} within {timeout:g} s", err=True)
