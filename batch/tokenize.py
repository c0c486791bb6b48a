"""`domaintok tokenize`: turn parquet events into sequences.parquet (one row per user) with a fitted tokenizer.

Reads the input in user-range chunks of at most DOMAINTOK_TOKENIZE_CHUNK_EVENTS events (bounded memory); writes
SEQ.parquet and its summary to SEQ.parquet.metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from domaintok.errors import DomaintokError
from domaintok.tokenizer import DomainTokenizer


def _rows(path: Path) -> int:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise DomaintokError(f"input {str(path)!r}: cannot read as parquet: {exc}") from None


@click.command("tokenize")
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Directory written by `domaintok fit`.")
@click.option(
    "--input", "inputs", required=True, multiple=True, type=click.Path(exists=True, path_type=Path),
    help="Parquet file or directory of parquet files; repeat for several.",
)
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="sequences.parquet to write.")
@click.option("--max-length", type=click.IntRange(2), default=None, help="Window length in tokens (default: the tokenizer's).")
def command(tokenizer_dir: Path, inputs: tuple[Path, ...], output: Path, max_length: int | None) -> None:
    """Tokenize parquet events into per-user sequences.

    Output columns: user_id, input_ids ([BOS] e1 [SEP] ... en [SEP], the newest whole events that fit max_length),
    n_events (all events of the user), last_event_ts (UTC). Prints a summary and writes it to
    OUTPUT.metrics.json.
    """
    tok = DomainTokenizer.from_pretrained(tokenizer_dir)
    total = sum(_rows(p) for p in inputs)
    columns = [TextColumn("tokenize"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"), TimeElapsedColumn()]
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("rows", total=total)
        stats = tok.tokenize_to_parquet(list(inputs), output, max_length, on_rows=lambda n: progress.advance(task, n))
    metrics = {
        "tokenizer": str(tokenizer_dir),
        "fingerprint": tok.fingerprint,
        "inputs": [str(p) for p in inputs],
        "output": str(output),
        "input_rows": total,
        **stats,
        "events_per_second": stats["events"] / max(stats["seconds"], 1e-9),
        "max_length": max_length or tok.max_length,
        "vocab_size": tok.vocab_size,
    }
    metrics_path = output.with_name(output.name + ".metrics.json")
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    click.echo(
        f"tokenize: {stats['events']:,} events, {stats['users']:,} users, {stats['tokens_per_event']:.1f} tokens/event, "
        f"{stats['sequence_tokens']:,} tokens in sequences, vocab {tok.vocab_size:,}, {stats['seconds']:.1f} s ({metrics['events_per_second']:,.0f} events/s) -> {output}"
    )
