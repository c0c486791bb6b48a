"""`domaintok embed`: user embeddings for every row of sequences.parquet, streamed into embeddings.parquet.

Reads record batches, embeds them (length-sorted batches, GPU when present), writes each chunk as it is done
to a temp file that replaces the output only when complete. `--engine spark` runs the same step on each Arrow batch
of a Spark job (batch/spark.py) and writes a directory of parquet files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from batch.spark import ENGINE_HELP, ENGINES, SPARK_MASTER_HELP, Location, is_uri, local_paths
from batch.sequence_files import SequenceFiles
from domaintok.artifacts import atomic_file
from domaintok.errors import DomaintokError

INPUT_COLUMNS = ("user_id", "input_ids", "n_events", "last_event_ts")


def embed_parquet(
    model_dir: Path,
    sequences: Path,
    output: Path,
    batch_size: int = 64,
    device: str | None = None,
    chunk_rows: int = 8_192,
    progress: bool = True,
) -> dict:
    """Embed every user of `sequences` with the model in `model_dir`; returns counts and throughput."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from domaintok.models.embedding import EMBEDDINGS_SCHEMA, load_encoder, model_version

    model = load_encoder(model_dir, device=device)
    version = model_version(model_dir)
    context = model.config.max_position_embeddings  # embed_record_batch cuts longer sequences to it
    if progress:
        click.echo(f"embed: context {context:,} tokens (the model's), pooling {model.config.pooling}", err=True)
    parquet = SequenceFiles(sequences, INPUT_COLUMNS)  # one file, or a directory of them (a Spark output)

    users = tokens = truncated = 0
    started = time.perf_counter()
    bar = tqdm(total=parquet.num_rows, unit="user", desc="embed", disable=not progress)
    try:
        with atomic_file(output) as tmp, pq.ParquetWriter(tmp, EMBEDDINGS_SCHEMA, compression="zstd") as writer:
            for batch in parquet.iter_batches(batch_size=chunk_rows, columns=list(INPUT_COLUMNS)):
                table, cut = embed_record_batch(model, batch, version, batch_size, source=sequences)
                writer.write_table(table)
                users += batch.num_rows
                tokens += token_count(batch)
                truncated += cut
                bar.update(batch.num_rows)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    return {
        "users": users,
        "tokens": tokens,
        "context_length": context,
        "truncated_users": truncated,
        "pooling": model.config.pooling,
        "seconds": seconds,
        "users_per_second": users / seconds if seconds else None,
        "model_version": version,
        "hidden_size": model.config.hidden_size,
        "device": str(next(model.parameters()).device),
        "batch_size": batch_size,
    }


def embed_record_batch(model, batch, version: str, batch_size: int, source) -> tuple:
    """EMBEDDINGS_SCHEMA rows for one record batch of sequences (INPUT_COLUMNS), and how many sequences were cut to
    the model's context. The one per-batch step of `embed`, on one machine and inside Spark tasks alike."""
    import numpy as np

    from domaintok.models.embedding import embed_sequences
    from domaintok.window import truncate_window

    # The model's context is its pretraining context: longer sequences keep [BOS] + their newest whole events.
    context = model.config.max_position_embeddings
    lists = batch.column("input_ids")
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy(zero_copy_only=False)
    if values.size and int(values.max()) >= model.config.vocab_size:
        raise DomaintokError(
            f"{source}: token id {int(values.max())} >= the model's vocab_size {model.config.vocab_size}; "
            "the sequences were tokenized with another tokenizer"
        )
    rows = [values[offsets[i] : offsets[i + 1]] for i in range(batch.num_rows)]
    long_rows = np.flatnonzero(np.diff(offsets) > context)
    for i in long_rows:
        rows[i] = truncate_window(rows[i], context, model.config.sep_token_id)
    embeddings = embed_sequences(model, rows, batch_size=batch_size)  # (rows, H) float32
    return _embeddings_table(batch, embeddings, version), len(long_rows)


def token_count(batch) -> int:
    """Tokens in a record batch of sequences (its input_ids)."""
    offsets = batch.column("input_ids").offsets
    return int(offsets[-1].as_py() - offsets[0].as_py()) if len(offsets) else 0


def _embeddings_table(batch, embeddings, version: str):
    """One EMBEDDINGS_SCHEMA table for a batch of sequences and their (rows, H) float32 embeddings."""
    import numpy as np
    import pyarrow as pa

    from domaintok.models.embedding import EMBEDDINGS_SCHEMA

    H = embeddings.shape[1]
    return pa.table(
        {
            "user_id": batch.column("user_id").cast(pa.string()),
            "embedding": pa.ListArray.from_arrays(
                pa.array(np.arange(0, (batch.num_rows + 1) * H, H, dtype=np.int32)),
                pa.array(embeddings.reshape(-1)),
            ),
            "n_events": batch.column("n_events").cast(pa.int64()),
            "last_event_ts": batch.column("last_event_ts").cast(pa.timestamp("us", tz="UTC")),
            "model_version": pa.array([version] * batch.num_rows, pa.string()),
        },
        schema=EMBEDDINGS_SCHEMA,
    )


@click.command("embed")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Pretrained model directory (`domaintok pretrain`).")
@click.option("--sequences", type=Location(click.Path(exists=True, path_type=Path)), required=True,
              help="sequences.parquet from `domaintok tokenize` (with --engine spark also its directory, or a URI).")
@click.option("--output", type=Location(click.Path(path_type=Path)), required=True,
              help="embeddings.parquet to write (replaced atomically; with --engine spark a directory, or a URI).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda when available, else cpu (with --engine spark: the GPU Spark gives the task).")
@click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write counts and throughput as JSON here (default: <output>.metrics.json).")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True, help=ENGINE_HELP)
@click.option("--spark-master", default=None, metavar="URL", help=SPARK_MASTER_HELP)
@click.option("--partitions", type=click.IntRange(1), default=None,
              help="With --engine spark: repartition the sequences into this many tasks (default: as read).")
def command(model_dir, sequences, output, batch_size, device, metrics, engine, spark_master, partitions):
    """Embed every user: the final token's last hidden state of the pretrained model (or the mean over tokens
    when the model was pretrained with --pooling mean). Sequences longer than the model's context keep [BOS] and
    their newest whole events, as tokenize does.

    Writes OUTPUT parquet with user_id, embedding (list<float32>), n_events, last_event_ts, model_version.
    """
    if engine == "spark":
        from batch.spark import embed_to_parquet, spark_session

        spark = spark_session(spark_master, app_name="domaintok embed")
        result = embed_to_parquet(spark, model_dir, str(sequences), str(output), batch_size=batch_size, device=device,
                                  partitions=partitions)
    else:
        local_paths(sequences, output)
        if output.is_dir():
            raise click.BadParameter(f"File {str(output)!r} is a directory.", param_hint="'--output'")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise DomaintokError("--device cuda: no CUDA device is available")
        result = embed_parquet(model_dir, sequences, output, batch_size=batch_size, device=device)
    if metrics is None and is_uri(output):
        click.echo(f"embed: metrics: {json.dumps(result)}")
    else:
        metrics_path = metrics or output.with_name(output.name + ".metrics.json")
        metrics_path.write_text(json.dumps(result, indent=2))
    click.echo(
        f"embedded {result['users']:,} users ({result['hidden_size']} dims) on {result['device']} in "
        f"{result['seconds']:.1f}s ({result['users_per_second']:,.0f} users/s), context {result['context_length']:,} "
        f"({result['truncated_users']:,} users truncated), model {result['model_version']} -> {output}"
    )
