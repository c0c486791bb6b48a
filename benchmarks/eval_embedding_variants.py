"""Other ways to hand LightGBM the frozen embeddings, on a finished `domaintok evaluate` run (one fold, its work/
directory, a domain language model): does a lower-dimensional or a whole-history embedding add what the newest
window's raw 64 columns (the `lightgbm_emb` row) do not?

- `newest`: the run's embedding of each user's newest window (as `lightgbm_emb`);
- `newest_pca{k}`: its first k principal components (fitted on train users), k in 2/4/8/16;
- `history_mean` / `history_decay`: every user's pre-cutoff events tokenized whole with the fold's tokenizer, cut
  into windows of the model's context (newest first, whole events: what pretraining reads with `--windows all`),
  each embedded by the run's pretrained model, averaged (or with weights halving every `--half-life` windows back);
- `newest+history_mean`: both.

LightGBM (the run's settings) trains on the aggregates plus each variant, and on the aggregates alone, on the run's
split; printed: valid and test AUC/RMSE, and each variant's relative difference to the aggregates on test with a
paired bootstrap 95% interval. Choose on valid; test is shown for the record.

Run: .venv/bin/python benchmarks/eval_embedding_variants.py runs/eval_retail [--task purchase] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from batch import evaluate as ev
from batch.eval_report import bootstrap_relative, headline
from batch.sequence_data import event_windows
from domaintok.models.embedding import embed_sequences, load_encoder
from domaintok.tokenizer import DomainTokenizer


def window_embeddings(model, sequences: list[np.ndarray], context: int, batch_size: int = 128):
    """Every user's windows embedded: (embeddings (W, H), owner (W,), age (W,): 0 for the newest window)."""
    windows, owner, age = [], [], []
    for user, ids in enumerate(sequences):
        cut = event_windows(ids, context, model.config.sep_token_id)
        windows += cut
        owner += [user] * len(cut)
        age += list(range(len(cut)))
    out = embed_sequences(model, windows, batch_size=batch_size)  # length-sorted batches, input order back
    return out, np.array(owner), np.array(age)


def pooled(emb: np.ndarray, owner: np.ndarray, age: np.ndarray, users: int, half_life: float | None) -> np.ndarray:
    weights = np.ones(len(owner)) if half_life is None else 0.5 ** (age / half_life)
    total = np.zeros((users, emb.shape[1]))
    np.add.at(total, owner, emb * weights[:, None])
    norm = np.zeros(users)
    np.add.at(norm, owner, weights)
    return (total / np.maximum(norm, 1e-12)[:, None]).astype(np.float32)


def principal_components(embedding: np.ndarray, users, labels_path: Path, ks) -> dict[str, np.ndarray]:
    """The embedding's first k principal components for each k, the axes fitted on the train users only."""
    split = dict(zip(*pq.read_table(labels_path, columns=["user_id", "split"]).to_pydict().values()))
    train = np.array([split.get(u) == "train" for u in users.to_pylist()])
    mean = embedding[train].mean(axis=0)
    _, _, axes = np.linalg.svd(embedding[train] - mean, full_matrices=False)
    return {f"newest_pca{k}": ((embedding - mean) @ axes[:k].T).astype(np.float32) for k in ks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--task", default="purchase")
    parser.add_argument("--half-life", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alone", action="store_true",
                        help="also fit LightGBM on each variant without the aggregates (`<variant>/alone` rows)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.run / "work"
    fold = work / "fold0"
    report = json.loads((args.run / "results.json").read_text())
    kind = next(t["kind"] for t in report["tasks"] if t["name"] == args.task)
    started = time.perf_counter()
    tok = DomainTokenizer.from_pretrained(fold / "domain_tokenizer")
    whole = tok.tokenize(pq.read_table(work / "events_inputs.parquet"), max_length=ev.FULL_HISTORY)
    model = load_encoder(fold / "models" / "domain", device="cpu").eval()
    context = model.config.max_position_embeddings
    sequences = [np.asarray(s, np.int64) for s in whole.column("input_ids").to_pylist()]
    emb, owner, age = window_embeddings(model, sequences, context)
    seconds = time.perf_counter() - started
    users = whole.column("user_id")
    newest = emb[age == 0][np.argsort(owner[age == 0])]
    variants = {
        "newest": newest,
        "history_mean": pooled(emb, owner, age, len(sequences), None),
        "history_decay": pooled(emb, owner, age, len(sequences), args.half_life),
    }
    variants["newest+history_mean"] = np.concatenate([newest, variants["history_mean"]], axis=1)
    variants.update(principal_components(newest, users, fold / f"labels_{args.task}.parquet", (2, 4, 8, 16)))

    labels = pq.read_table(fold / f"labels_{args.task}.parquet").sort_by("user_id")
    features = pq.read_table(work / "features.parquet")
    base = ev._attach(labels, features)
    aggregate_columns = [c for c in features.column_names if c != "user_id"]
    rows = {}
    y_test = None
    runs = {name: (matrix, True) for name, matrix in {"aggregates": None, **variants}.items()}
    if args.alone:
        runs.update({f"{name}/alone": (matrix, False) for name, matrix in variants.items()})
    for name, (matrix, with_aggregates) in runs.items():
        table = base
        columns = list(aggregate_columns) if with_aggregates else []
        if matrix is not None:
            column = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
            table = ev._attach(table, pa.table({"user_id": users, "__embedding": column}))
            columns.append("__embedding")
        pred, info = ev.lightgbm_predict(kind, table, columns, 0, 2000, args.seed, threads=args.threads)
        test = table.column("split").to_numpy(zero_copy_only=False) == "test"
        y_test = table.column("label").to_numpy(zero_copy_only=False).astype(np.float64)[test]
        rows[name] = {"valid": info["valid"], "test": headline(kind, y_test, pred), "pred": pred}
    out = {"task": args.task, "windows": int(len(owner)), "users": int(len(sequences)),
           "windows_per_user_median": float(np.median(np.bincount(owner))), "embed_seconds": round(seconds, 1)}
    for name, row in rows.items():
        entry = {"valid": round(row["valid"], 4), "test": round(row["test"], 4)}
        if name != "aggregates":
            boot = bootstrap_relative(kind, [(y_test, rows["aggregates"]["pred"], row["pred"])], 1000, args.seed)
            entry["test_vs_aggregates"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in boot.items()}
        out[name] = entry
    print(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
