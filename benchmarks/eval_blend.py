"""Does a fine-tuned sequence model add to LightGBM when the two are simply blended? An analysis of a finished
`domaintok evaluate` run (its work/ directory): LightGBM on the aggregates is refitted as the run fits it, the saved
fine-tuned models score the valid and test users, and rank averages (1 - w) * LightGBM + w * model are scored for
w = 0, 0.1, ..., 1. The weight is chosen on valid; test is read once, at that weight.

Run: .venv/bin/python benchmarks/eval_blend.py runs/eval_retail [--task purchase] [--methods domain,domain_fusion]
(binary tasks of a one-fold run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch import evaluate as ev
from batch.eval_report import fast_auc
from batch.finetune import predict
from domaintok.models.fusion import JointFusionModel, encode_tabular
from domaintok.window import truncate_window


def model_scores(run: Path, task: str, method: str, table) -> dict[str, float]:
    """The saved fine-tuned model's P(y=1) for every user of `table` that has a sequence."""
    model = JointFusionModel.from_pretrained(run / "work" / "fold0" / "finetuned" / f"{task}_{method}")
    fold = run / "work" / "fold0"
    # the sequences the run fine-tuned on: with --as-of-token, those carrying the token after [BOS]
    path = next(p for p in (fold / "domain_sequences_as_of.parquet", fold / "domain_sequences.parquet") if p.is_file())
    seqs = pq.read_table(path, columns=["user_id", "input_ids"])
    table = ev._attach(table, seqs.rename_columns(["user_id", "__ids"]))
    table = table.filter(pc.is_valid(table.column("__ids")))
    sep, limit = model.transformer.config.sep_token_id, model.config.max_length
    ids = [np.asarray(s, np.int64) for s in table.column("__ids").to_pylist()]
    ids = [truncate_window(s, limit, sep) if limit and len(s) > limit else s for s in ids]
    numeric, categorical = encode_tabular(model.config, table)
    return dict(zip(table.column("user_id").to_pylist(), predict(model, ids, numeric, categorical, 64, "cpu").tolist()))


def lightgbm_scores(table, columns: list[str]) -> dict[str, float]:
    """LightGBM on the aggregates as `domaintok evaluate` fits it, scoring every user (not only test)."""
    booster, X, _, _ = ev.lightgbm_train("binary", table, columns, 2, 2000, seed=0, threads=1)
    return dict(zip(table.column("user_id").to_pylist(), booster.predict(X, num_iteration=booster.best_iteration).tolist()))


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--task", default="purchase")
    parser.add_argument("--methods", default="domain,domain_fusion")
    args = parser.parse_args()
    labels = pq.read_table(args.run / "work" / "fold0" / f"labels_{args.task}.parquet").sort_by("user_id")
    features = pq.read_table(args.run / "work" / "features.parquet")
    table = ev._attach(labels, features)
    boosted = lightgbm_scores(table, [c for c in features.column_names if c != "user_id"])
    split = dict(zip(table.column("user_id").to_pylist(), table.column("split").to_pylist()))
    truth = dict(zip(table.column("user_id").to_pylist(), table.column("label").to_pylist()))
    weights = [round(w, 1) for w in np.arange(0, 1.01, 0.1)]
    for method in args.methods.split(","):
        scored = model_scores(args.run, args.task, method, table)
        row = {"method": method}
        for part in ("valid", "test"):
            users = [u for u in scored if split[u] == part]
            y = np.array([truth[u] for u in users], float)
            a, b = ranks(np.array([boosted[u] for u in users])), ranks(np.array([scored[u] for u in users]))
            row[part] = {w: fast_auc(y, (1 - w) * a + w * b) for w in weights}
        w = max(weights, key=lambda k: row["valid"][k])
        print(json.dumps({"method": method, "weight_chosen_on_valid": w,
                          "valid": {"lightgbm": row["valid"][0.0], "model": row["valid"][1.0], "blend": row["valid"][w]},
                          "test": {"lightgbm": row["test"][0.0], "model": row["test"][1.0], "blend": row["test"][w]},
                          "test_by_weight": row["test"]}))


if __name__ == "__main__":
    main()
