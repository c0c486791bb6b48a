"""Embedding throughput: batched, length-sorted inference (`embed_sequences`) against a naive per-sequence loop.

Run: `.venv/bin/python benchmarks/bench_embed.py [--preset 24m] [--users 128] [--max-length 256]`.
Uses real Online Retail sequences when ../shared/data is present (a slice is tokenized on the fly), else
synthetic sequences with the same layout; the model has random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import domaintok  # noqa: F401  (registers the Auto classes)
from domaintok.models import DomainTransformerConfig, DomainTransformerModel
from domaintok.models.embedding import default_device, embed_sequences

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "online_retail"
RETAIL = SHARED / "online_retail_I_2010-2011.parquet"


def retail_sequences(users: int, max_length: int) -> tuple[list[np.ndarray], int, str]:
    """Sequences of the first `users` customers, tokenized with a tokenizer fitted on them."""
    import duckdb

    from domaintok.tokenizer import DomainTokenizer

    con = duckdb.connect()
    con.read_parquet(str(RETAIL)).create_view("src")
    events = con.sql(
        "SELECT * FROM src WHERE CustomerID IN (SELECT DISTINCT CustomerID FROM src "
        "WHERE CustomerID IS NOT NULL ORDER BY CustomerID LIMIT ?)",
        params=[users],
    ).to_arrow_table()
    con.close()
    tokenizer = DomainTokenizer.fit("online_retail", events)
    table = tokenizer.tokenize(events, max_length=max_length)
    sequences = [np.asarray(s, dtype=np.int64) for s in table.column("input_ids").to_pylist()]
    return sequences, tokenizer.vocab_size, f"Online Retail, {len(sequences)} customers"


def synthetic_sequences(users: int, max_length: int, vocab_size: int = 2_048) -> tuple[list[np.ndarray], int, str]:
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.geometric(1 / (max_length / 2), size=users) + 1, max_length)
    return [rng.integers(5, vocab_size, size=n) for n in lengths], vocab_size, "synthetic (geometric lengths)"


def naive_loop(model: DomainTransformerModel, sequences: list[np.ndarray], device: torch.device) -> np.ndarray:
    """What one writes first: one sequence at a time, input order, plain no_grad eager forward."""
    out = []
    with torch.no_grad():
        for s in sequences:
            input_ids = torch.as_tensor(s, device=device)[None]  # (1, T)
            hidden = model(input_ids).last_hidden_state  # (1, T, H)
            out.append(hidden[0, -1].float().cpu().numpy())
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="24m")
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per user window")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--synthetic", action="store_true", help="skip the real data even when present")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    if RETAIL.is_file() and not args.synthetic:
        sequences, vocab_size, source = retail_sequences(args.users, args.max_length)
    else:
        sequences, vocab_size, source = synthetic_sequences(args.users, args.max_length)
    lengths = np.array([len(s) for s in sequences])
    device = default_device()
    torch.manual_seed(0)
    model = DomainTransformerModel(DomainTransformerConfig.from_preset(args.preset, vocab_size=vocab_size)).to(device)
    model.eval()
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads; no GPU)"
    print(f"data: {source}; {len(sequences)} sequences, tokens/sequence mean {lengths.mean():.0f}, "
          f"median {np.median(lengths):.0f}, max {lengths.max()}")
    print(f"model: {args.preset} ({sum(p.numel() for p in model.parameters()):,} parameters), device: {where}")

    embed_sequences(model, sequences[: args.batch_size], batch_size=args.batch_size)  # warm-up
    started = time.perf_counter()
    batched = embed_sequences(model, sequences, batch_size=args.batch_size)
    batched_seconds = time.perf_counter() - started

    started = time.perf_counter()
    naive = naive_loop(model, sequences, device)
    naive_seconds = time.perf_counter() - started

    max_diff = float(np.abs(batched - naive).max())
    result = {
        "preset": args.preset, "device": str(device), "sequences": len(sequences), "batch_size": args.batch_size,
        "batched_sequences_per_second": len(sequences) / batched_seconds,
        "naive_sequences_per_second": len(sequences) / naive_seconds,
        "speedup": naive_seconds / batched_seconds, "max_abs_diff": max_diff,
    }
    print(f"batched (batch {args.batch_size}, length-sorted, inference_mode): "
          f"{result['batched_sequences_per_second']:,.1f} sequences/s")
    print(f"naive loop (batch 1, input order, eager):                 "
          f"{result['naive_sequences_per_second']:,.1f} sequences/s")
    print(f"speedup {result['speedup']:.2f}x; max |batched - naive| = {max_diff:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
