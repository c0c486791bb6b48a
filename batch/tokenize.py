"""`domaintok tokenize`: turn parquet events into sequences.parquet (one row per user) with a fitted tokenizer.

Reads the input in user-range chunks of at most DOMAINTOK_TOKENIZE_CHUNK_EVENTS events (bounded memory); writes
SEQ.parquet and its summary to SEQ.parquet.metrics.json. `--engine spark` runs the same tokenizer on Spark
(batch/spark.py) and writes a directory of parquet files with the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from batch.fit import BEFORE_HELP, USERS_HELP
from batch.spark import ENGINE_HELP, ENGINES, SPARK_MASTER_HELP, Location, is_uri, local_paths
from domaintok.event_sql import input_rows
from domaintok.tokenizer import DomainTokenizer, EventFilter


PARTITIONS_HELP = "With --engine spark: partitions of the users (default: spark.sql.shuffle.partitions)."


@click.command("tokenize")
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Directory written by `domaintok fit`.")
@click.option(
    "--input", "inputs", required=True, multiple=True, type=Location(click.Path(exists=True, path_type=Path)),
    help="Parquet file or directory of parquet files; repeat for several. With --engine spark also a URI (hdfs://, s3a://).",
)
@click.option("--output", required=True, type=Location(click.Path(path_type=Path)),
              help="sequences.parquet to write (with --engine spark: a directory of parquet files, or a URI).")
@click.option("--max-length", type=click.IntRange(2), default=None, help="Window length in tokens (default: the tokenizer's).")
@click.option("--before", default=None, metavar="TIMESTAMP", help=BEFORE_HELP)
@click.option("--users", "users_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help=USERS_HELP)
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True, help=ENGINE_HELP)
@click.option("--spark-master", default=None, metavar="URL", help=SPARK_MASTER_HELP)
@click.option("--partitions", type=click.IntRange(1), default=None, help=PARTITIONS_HELP)
def command(tokenizer_dir: Path, inputs: tuple[Path | str, ...], output: Path | str, max_length: int | None,
            before: str | None, users_file: Path | None, engine: str, spark_master: str | None,
            partitions: int | None) -> None:
    """Tokenize parquet events into per-user sequences.

    Output columns: user_id, input_ids ([BOS] e1 [SEP] ... en [SEP], the newest whole events that fit max_length),
    n_events (all events of the user), last_event_ts (UTC). Prints a summary and writes it to
    OUTPUT.metrics.json.
    """
    tok = DomainTokenizer.from_pretrained(tokenizer_dir)
    restrict = EventFilter.from_options(before, users_file)
    window = max_length or tok.max_length
    source = "--max-length" if max_length else "the tokenizer's max_length"
    click.echo(f"tokenize: window {window:,} tokens ({source})")
    if engine == "spark":
        from batch.spark import spark_session, tokenize_to_parquet

        spark = spark_session(spark_master, app_name="domaintok tokenize")
        stats = tokenize_to_parquet(spark, tok, [str(p) for p in inputs], str(output), max_length,
                                    restrict=restrict, partitions=partitions)
        total = stats.pop("input_rows")
    else:
        local_paths(*inputs, output)
        if output.is_dir():
            raise click.BadParameter(f"File {str(output)!r} is a directory.", param_hint="'--output'")
        total = input_rows(list(inputs))
        columns = [TextColumn("tokenize"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"), TimeElapsedColumn()]
        with Progress(*columns, transient=True) as progress:
            task = progress.add_task("rows", total=total)
            stats = tok.tokenize_to_parquet(
                list(inputs), output, max_length, on_rows=lambda n: progress.advance(task, n), restrict=restrict
            )
    metrics = {
        "tokenizer": str(tokenizer_dir),
        "fingerprint": tok.fingerprint,
        "inputs": [str(p) for p in inputs],
        **restrict.describe(),
        "users_file": None if users_file is None else str(users_file),
        "output": str(output),
        "engine": engine,
        "input_rows": total,
        **stats,
        "events_per_second": stats["events"] / max(stats["seconds"], 1e-9),
        "max_length": window,
        "vocab_size": tok.vocab_size,
    }
    warning = window_warning(window, stats)
    if warning:
        click.echo(f"tokenize: warning: {warning}", err=True)
    if is_uri(output):
        click.echo(f"tokenize: metrics: {json.dumps(metrics)}")
    else:
        metrics_path = output.with_name(output.name + ".metrics.json")
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    click.echo(
        f"tokenize: {stats['events']:,} events, {stats['users']:,} users, {stats['tokens_per_event']:.1f} tokens/event, "
        f"{stats['sequence_tokens']:,} tokens in sequences, vocab {tok.vocab_size:,}, {stats['seconds']:.1f} s ({metrics['events_per_second']:,.0f} events/s) -> {output}"
    )


def window_warning(window: int, stats: dict) -> str | None:
    """One line when the window is shorter than the median user's full sequence: how much it cuts."""
    median = stats.get("median_user_tokens", 0)
    if not stats.get("users") or median <= window:
        return None
    return (
        f"the {window:,}-token window is shorter than the median user's sequence ({median:,.0f} tokens): "
        f"{stats['truncated_users'] / stats['users']:.0%} of users keep only their newest events, "
        f"{stats['truncated_token_fraction']:.0%} of event tokens are left out (raise --max-length to keep more)"
    )
