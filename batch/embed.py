"""`domaintok embed`: user embeddings for every row of sequences.parquet, streamed into embeddings.parquet.

Reads record batches, embeds them (length-sorted batches, GPU when present), writes each chunk as it is done
to a temp file that replaces the output only when complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

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
    import numpy as np
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from domaintok.models.embedding import EMBEDDINGS_SCHEMA, embed_sequences, load_encoder, model_version
    from domaintok.window import truncate_window

    model = load_encoder(model_dir, device=device)
    version = model_version(model_dir)
    vocab_size = model.config.vocab_size
    # The model's context is its pretraining context: longer sequences keep [BOS] + their newest whole events.
    context = model.config.max_position_embeddings
    sep = model.config.sep_token_id
    if progress:
        click.echo(f"embed: context {context:,} tokens (the model's), pooling {model.config.pooling}", err=True)
    parquet = pq.ParquetFile(sequences)
    missing = [c for c in INPUT_COLUMNS if c not in parquet.schema_arrow.names]
    if missing:
        raise DomaintokError(f"{sequences}: missing column(s) {', '.join(missing)} (expected a `domaintok tokenize` output)")

    users = tokens = truncated = 0
    started = time.perf_counter()
    bar = tqdm(total=parquet.metadata.num_rows, unit="user", desc="embed", disable=not progress)
    try:
        with atomic_file(output) as tmp, pq.ParquetWriter(tmp, EMBEDDINGS_SCHEMA, compression="zstd") as writer:
            for batch in parquet.iter_batches(batch_size=chunk_rows, columns=list(INPUT_COLUMNS)):
                lists = batch.column("input_ids")
                offsets = lists.offsets.to_numpy()
                values = lists.values.to_numpy(zero_copy_only=False)
                if values.size and int(values.max()) >= vocab_size:
                    raise DomaintokError(
                        f"{sequences}: token id {int(values.max())} >= the model's vocab_size {vocab_size}; "
                        "the sequences were tokenized with another tokenizer"
                    )
                rows = [values[offsets[i] : offsets[i + 1]] for i in range(batch.num_rows)]
                for i in np.flatnonzero(np.diff(offsets) > context):
                    rows[i] = truncate_window(rows[i], context, sep)
                    truncated += 1
                embeddings = embed_sequences(model, rows, batch_size=batch_size)  # (rows, H) float32
                writer.write_table(_embeddings_table(batch, embeddings, version))
                users += batch.num_rows
                tokens += int(offsets[-1] - offsets[0])
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
@click.option("--sequences", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="sequences.parquet from `domaintok tokenize`.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="embeddings.parquet to write (replaced atomically).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda when available, else cpu.")
@click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write counts and throughput as JSON here (default: <output>.metrics.json).")
def command(model_dir, sequences, output, batch_size, device, metrics):
    """Embed every user: the final token's last hidden state of the pretrained model (or the mean over tokens
    when the model was pretrained with --pooling mean). Sequences longer than the model's context keep [BOS] and
    their newest whole events, as tokenize does.

    Writes OUTPUT parquet with user_id, embedding (list<float32>), n_events, last_event_ts, model_version.
    """
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DomaintokError("--device cuda: no CUDA device is available")
    result = embed_parquet(model_dir, sequences, output, batch_size=batch_size, device=device)
    metrics_path = metrics or output.with_name(output.name + ".metrics.json")
    metrics_path.write_text(json.dumps(result, indent=2))
    click.echo(
        f"embedded {result['users']:,} users ({result['hidden_size']} dims) on {result['device']} in "
        f"{result['seconds']:.1f}s ({result['users_per_second']:,.0f} users/s), context {result['context_length']:,} "
        f"({result['truncated_users']:,} users truncated), model {result['model_version']} -> {output}"
    )
