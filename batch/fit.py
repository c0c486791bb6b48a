"""`domaintok fit`: fit a schema's tokenizer on parquet input with DuckDB and save it as a tokenizer directory.

Writes the HF tokenizer files plus domaintok_tokenizer.json / domaintok_bpe.json, and DIR/fit_metrics.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.console import Console

from domaintok.schema import load_schema
from domaintok.tokenizer import DEFAULT_MAX_LENGTH, DomainTokenizer, EventFilter

BEFORE_HELP = "Read only events strictly before this time (ISO date or time; naive = the schema's timezone)."
USERS_HELP = "Read only these users: a parquet file (user_id column, or its only column) or a text file, one id a line."


@click.command("fit")
@click.option("--schema", "schema_ref", required=True, help="Schema yaml path, or the name of a schema shipped with domaintok (e.g. online_retail).")
@click.option(
    "--input", "inputs", required=True, multiple=True, type=click.Path(exists=True, dir_okay=True, path_type=Path),
    help="Parquet file or directory of parquet files; repeat for several (spellings may differ: the schema's aliases map them).",
)
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Tokenizer directory to write.")
@click.option("--bpe-vocab-size", type=click.IntRange(256, 100000), default=None, help="Byte-level BPE size for text fields (default: the schema's).")
@click.option("--max-length", type=click.IntRange(2), default=DEFAULT_MAX_LENGTH, show_default=True, help="Default window length in tokens, saved with the tokenizer (tokenize and pretrain use it unless told otherwise).")
@click.option("--before", default=None, metavar="TIMESTAMP", help=BEFORE_HELP)
@click.option("--users", "users_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help=USERS_HELP)
def command(schema_ref: str, inputs: tuple[Path, ...], output: Path, bpe_vocab_size: int | None, max_length: int,
            before: str | None, users_file: Path | None) -> None:
    """Fit a domain tokenizer on parquet events.

    Computes quantile bins, category vocabularies, calendar ranges and the text BPE with DuckDB over every input,
    then saves a tokenizer directory that DomainTokenizer.from_pretrained and transformers.AutoTokenizer load.
    Prints a summary and writes it to DIR/fit_metrics.json.
    """
    console = Console(stderr=True)
    schema = load_schema(schema_ref)
    restrict = EventFilter.from_options(before, users_file)
    start = time.perf_counter()
    with console.status("fitting") as status:
        tok = DomainTokenizer.fit(
            schema, list(inputs), bpe_vocab_size=bpe_vocab_size, max_length=max_length,
            progress=lambda step: status.update(f"fit: {step}"), restrict=restrict,
        )
        status.update("saving")
        tok.save_pretrained(output)
    metrics = {
        "schema": schema.name,
        "inputs": [str(p) for p in inputs],
        **restrict.describe(),
        "users_file": None if users_file is None else str(users_file),
        **tok.fit_stats,
        "max_length": tok.max_length,
        "fingerprint": tok.fingerprint,
        "seconds": round(time.perf_counter() - start, 3),
    }
    (output / "fit_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    click.echo(
        f"fit {schema.name}: {metrics['events']:,} events, {metrics['users']:,} users, "
        f"{metrics['tokens_per_event']:.1f} tokens/event, vocab {metrics['vocab_size']:,}, "
        f"window {tok.max_length:,} tokens (~{(tok.max_length - 1) / max(metrics['tokens_per_event'], 1e-9):,.0f} events), "
        f"{metrics['seconds']:.1f} s -> {output}"
    )
