"""The peer row: pytorch-lifestream (ptls) CoLES embeddings + LightGBM on the same users, split and labels.

ptls is not a dependency of domaintok. `install` puts pinned ptls and the pure-Python packages it needs that our
venv lacks into a cache directory with `pip install --target --no-deps`, reusing the venv's torch; `run` adds that
directory to sys.path. Both are idempotent.

    python benchmarks/peer_coles.py install [--cache-dir DIR]
    python benchmarks/peer_coles.py run --events E.parquet --labels L.parquet [--features F.parquet] \\
        --user-col CustomerID --time-col InvoiceDate --cat-cols StockCode,Country --num-cols Quantity,Price \\
        --task binary --output DIR

The same users, split and labels as a `domaintok evaluate` run come from its work files (OUT = its --output):
--events OUT/work/events_inputs.parquet (pre-cutoff events of every user), --labels
OUT/work/fold0/labels_<task>.parquet (user_id, split, label), --features OUT/work/features.parquet (the aggregates).

`run` trains ptls's standard CoLES (TrxEncoder + RnnSeqEncoder(GRU), ColesDataset with SampleSlices,
ContrastiveLoss with HardNegativePairSelector) on the pre-cutoff events of train+valid users only, embeds every
user, and fits LightGBM early-stopped on valid on (aggregates), (CoLES embeddings), (CoLES + aggregates); it prints
valid and test metrics and writes results.json, embeddings.parquet and predictions.parquet under --output.

Workarounds for ptls 0.7.0 on torch 2.x / Lightning 2.x, applied here:
- `ptls.data_load.datasets` imports pymonad (and its package __init__ pulls DuckDB/parquet loaders); this script
  never imports it: ColesDataset takes a plain list of feature dicts and inference calls the encoder directly.
- ptls pins spacy/dask/hydra/pandas; none are needed by the modules used here, so they are not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PTLS_PACKAGES = (
    "pytorch-lifestream==0.7.0",
    "pytorch-lightning==2.6.6",
    "lightning-utilities==0.15.3",
    "torchmetrics==1.9.0",
)
DEFAULT_CACHE = Path.home() / ".cache" / "domaintok" / "peer-ptls"
SPLITS = ("train", "valid", "test")
SELECTION_METRIC = {"binary": "auc", "regression": "rmse", "multiclass": "macro_auc"}
TIME_FEATURES = {"hour": 24, "weekday": 7}
# LightGBM settings of domaintok's own baseline (batch/evaluate.py), so every row differs only in its inputs.
LGB_PARAMS = {
    "learning_rate": 0.03, "num_leaves": 15, "min_data_in_leaf": 20, "feature_fraction": 0.8,
    "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0, "verbose": -1, "deterministic": True,
    "force_col_wise": True,
}


# --- the peer's environment ---------------------------------------------------------------------------------------


def ensure_ptls(cache_dir: Path) -> Path:
    """Install PTLS_PACKAGES into cache_dir once (a marker file records the pinned list) and put it on sys.path."""
    marker = cache_dir / ".installed"
    wanted = "\n".join(PTLS_PACKAGES)
    if not marker.is_file() or marker.read_text() != wanted:
        cache_dir.mkdir(parents=True, exist_ok=True)
        click.echo(f"installing {', '.join(PTLS_PACKAGES)} into {cache_dir}", err=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
                        "--target", str(cache_dir), *PTLS_PACKAGES], check=True)
        marker.write_text(wanted)
    if str(cache_dir) not in sys.path:
        sys.path.insert(0, str(cache_dir))
    return cache_dir


# --- inputs -> ptls feature dicts ---------------------------------------------------------------------------------


def read_labels(path: Path) -> pa.Table:
    labels = pq.read_table(path)
    missing = {"user_id", "split", "label"} - set(labels.column_names)
    if missing:
        raise click.UsageError(f"{path} lacks column(s) {', '.join(sorted(missing))}")
    labels = labels.select(["user_id", "split", "label"])
    labels = labels.set_column(0, "user_id", pc.cast(labels.column("user_id"), pa.string()))
    bad = set(labels.column("split").unique().to_pylist()) - set(SPLITS)
    if bad:
        raise click.UsageError(f"{path}: split values must be train/valid/test, found {sorted(map(str, bad))}")
    return labels.sort_by("user_id")


def encode_labels(labels: pa.ChunkedArray, task: str) -> tuple[np.ndarray, list | None]:
    """Targets as floats; multiclass labels (any type) become 0..K-1 in sorted order of their values."""
    if task != "multiclass":
        return pc.cast(labels, pa.float64()).to_numpy(zero_copy_only=False), None
    classes = sorted(labels.unique().to_pylist(), key=str)
    index = pc.index_in(labels, value_set=pa.array(classes, labels.type))
    return index.to_numpy(zero_copy_only=False).astype(np.float64), classes


def read_events(path: Path, user_col: str, time_col: str, cat_cols: list[str], num_cols: list[str]) -> pa.Table:
    """The event columns, user ids as strings, time as a timestamp, sorted by (user, time)."""
    names = set(pq.read_schema(path).names)
    missing = [c for c in (user_col, time_col, *cat_cols, *num_cols) if c not in names]
    if missing:
        raise click.UsageError(f"{path} lacks column(s) {', '.join(missing)}")
    events = pq.read_table(path, columns=[user_col, time_col, *cat_cols, *num_cols])
    user = pc.cast(events.column(user_col), pa.string())
    when = events.column(time_col)
    if not pa.types.is_timestamp(when.type):
        when = pc.cast(when, pa.timestamp("us"))
    columns = {"user_id": user, "event_ts": when}
    columns.update({c: events.column(c) for c in (*cat_cols, *num_cols)})
    return pa.table(columns).sort_by([("user_id", "ascending"), ("event_ts", "ascending")])


def encode_categorical(values: pa.ChunkedArray, fit_rows: np.ndarray, max_vocab: int) -> tuple[np.ndarray, int]:
    """Codes by frequency on the fit rows: 2.. for the top max_vocab values, 1 for the rest (0 is ptls padding)."""
    encoded = pc.dictionary_encode(pc.cast(values, pa.string()).combine_chunks())
    index = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)  # (events,)
    n = len(encoded.dictionary)
    counts = np.bincount(index[fit_rows & (index >= 0)], minlength=n)
    order = np.argsort(-counts, kind="stable")[:max_vocab]
    order = order[counts[order] > 0]
    code_of = np.ones(n + 1, dtype=np.int64)  # last slot: null
    code_of[order] = np.arange(2, len(order) + 2)
    return code_of[index], len(order) + 2


def signed_log1p(values: pa.ChunkedArray) -> np.ndarray:
    x = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
    x = np.nan_to_num(x, nan=0.0)
    return (np.sign(x) * np.log1p(np.abs(x))).astype(np.float32)


def feature_dicts(events: pa.Table, fit_users: set[str], cat_cols: list[str], num_cols: list[str],
                  max_vocab: int, max_events: int) -> tuple[dict[str, dict], dict[str, int]]:
    """{user_id: {field: tensor (events,)}} with the last max_events events, and each categorical field's size."""
    import torch

    users = events.column("user_id").to_numpy(zero_copy_only=False)
    fit_rows = pc.is_in(events.column("user_id"), pa.array(sorted(fit_users))).to_numpy(zero_copy_only=False)
    ts = events.column("event_ts")
    fields: dict[str, np.ndarray] = {
        "event_time": pc.cast(ts, pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64) / 1e6,
        "hour": pc.hour(ts).to_numpy(zero_copy_only=False).astype(np.int64) + 1,
        "weekday": pc.day_of_week(ts).to_numpy(zero_copy_only=False).astype(np.int64) + 1,
    }
    sizes = {name: n + 1 for name, n in TIME_FEATURES.items()}
    for c in cat_cols:
        fields[c], sizes[c] = encode_categorical(events.column(c), fit_rows, max_vocab)
    for c in num_cols:
        fields[c] = signed_log1p(events.column(c))
    starts = np.concatenate([[0], np.flatnonzero(users[1:] != users[:-1]) + 1])
    ends = np.concatenate([starts[1:], [len(users)]])
    tensors = {k: torch.from_numpy(v) for k, v in fields.items()}
    out = {}
    for s, e in zip(starts.tolist(), ends.tolist()):
        s = max(s, e - max_events)
        out[users[s]] = {k: v[s:e] for k, v in tensors.items()}
    return out, sizes


# --- CoLES ----------------------------------------------------------------------------------------------------------


def build_coles(sizes: dict[str, int], num_cols: list[str], emb_dim: int, hidden: int, lr: float):
    import torch
    from ptls.frames.coles import CoLESModule
    from ptls.frames.coles.losses import ContrastiveLoss
    from ptls.frames.coles.sampling_strategies import HardNegativePairSelector
    from ptls.nn import Head, RnnSeqEncoder, TrxEncoder

    trx = TrxEncoder(
        embeddings={name: {"in": n, "out": min(emb_dim, n)} for name, n in sizes.items()},
        numeric_values={c: "identity" for c in num_cols},
        embeddings_noise=0.003,
    )
    seq_encoder = RnnSeqEncoder(trx_encoder=trx, hidden_size=hidden, type="gru")
    return CoLESModule(
        seq_encoder=seq_encoder,
        head=Head(use_norm_encoder=True),
        loss=ContrastiveLoss(margin=0.5, sampling_strategy=HardNegativePairSelector(neg_count=5)),
        optimizer_partial=partial(torch.optim.Adam, lr=lr, weight_decay=0.0),
        lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.9),
    )


def train_coles(model, sequences: list[dict], epochs: int, batch_size: int, split_count: int, cnt_min: int,
                cnt_max: int, seed: int, callbacks: list) -> None:
    import pytorch_lightning as pl
    from ptls.frames import PtlsDataModule
    from ptls.frames.coles import ColesDataset
    from ptls.frames.coles.split_strategy import SampleSlices

    pl.seed_everything(seed, workers=True, verbose=False)
    data = PtlsDataModule(
        train_data=ColesDataset(sequences, splitter=SampleSlices(split_count=split_count, cnt_min=cnt_min,
                                                                 cnt_max=cnt_max)),
        train_batch_size=batch_size, train_num_workers=0,
    )
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=True,
                         num_sanity_val_steps=0)
    trainer.fit(model, data)


def epoch_selector(every: int, evaluate):
    """A Lightning callback that, every `every` epochs and after the last, calls evaluate(epoch) -> (score, state)
    and keeps the state of the highest score (the epoch is chosen on valid, never on test)."""
    import pytorch_lightning as pl

    class EpochSelector(pl.Callback):
        def __init__(self):
            self.history, self.best, self.best_state, self.seconds = [], None, None, 0.0

        def on_train_epoch_end(self, trainer, pl_module):
            epoch = trainer.current_epoch + 1
            if epoch % every and epoch != trainer.max_epochs:
                return
            t = time.perf_counter()
            score, state, record = evaluate(pl_module)
            pl_module.train()
            self.seconds += time.perf_counter() - t
            self.history.append({"epoch": epoch, **record})
            click.echo(f"\nepoch {epoch}: {record}", err=True)
            if self.best is None or score > self.best["score"]:
                self.best, self.best_state = {"epoch": epoch, "score": score}, state

    return EpochSelector()


def embed_users(model, sequences: dict[str, dict], users: list[str], batch_size: int) -> np.ndarray:
    """(users, hidden) embeddings; users without events get NaN rows (LightGBM's missing value)."""
    import torch
    from ptls.data_load.utils import collate_feature_dict

    encoder = model.seq_encoder.eval()
    present = [u for u in users if u in sequences]
    present.sort(key=lambda u: len(sequences[u]["event_time"]))  # similar lengths per batch: less padding
    rows = {}
    with torch.no_grad():
        for i in range(0, len(present), batch_size):
            chunk = present[i:i + batch_size]
            out = encoder(collate_feature_dict([sequences[u] for u in chunk])).numpy()  # (B, hidden)
            rows.update(zip(chunk, out))
    hidden = next(iter(rows.values())).shape[0]
    return np.stack([rows.get(u, np.full(hidden, np.nan, dtype=np.float32)) for u in users])


# --- LightGBM rows --------------------------------------------------------------------------------------------------


def aggregate_matrix(path: Path, users: list[str], train: np.ndarray) -> tuple[np.ndarray, list[str], list[int]]:
    """Feature matrix aligned to users: numeric columns as floats, others as train-vocabulary codes (-1 unseen)."""
    table = pq.read_table(path)
    if "user_id" not in table.column_names:
        raise click.UsageError(f"{path} lacks column user_id")
    table = table.set_column(table.column_names.index("user_id"), "user_id",
                             pc.cast(table.column("user_id"), pa.string()))
    aligned = pa.table({"user_id": pa.array(users, pa.string()), "_row": np.arange(len(users))})
    aligned = aligned.join(table, "user_id", join_type="left outer").sort_by("_row")
    columns, names, categorical = [], [], []
    for name in table.column_names:
        if name == "user_id":
            continue
        col = aligned.column(name)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
            columns.append(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False))
        else:
            values = pc.cast(col, pa.string()).to_pylist()
            vocabulary = {v: i for i, v in enumerate(sorted({v for v, t in zip(values, train) if t and v}))}
            columns.append(np.array([vocabulary.get(v, -1) for v in values], dtype=np.float64))
            categorical.append(len(columns) - 1)
        names.append(name)
    return np.stack(columns, axis=1), names, categorical


def task_metrics(task: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, roc_auc_score

    if task == "binary":
        return {"auc": float(roc_auc_score(y, pred))}
    if task == "regression":
        return {"rmse": float(np.sqrt(np.mean((pred - y) ** 2)))}
    return {"accuracy": float(accuracy_score(y, pred.argmax(1))),
            "macro_auc": float(roc_auc_score(y, pred, multi_class="ovr", average="macro",
                                             labels=np.arange(pred.shape[1])))}


def fit_lightgbm(X: np.ndarray, y: np.ndarray, split: np.ndarray, task: str, categorical: list[int],
                 rounds: int, threads: int, seed: int) -> tuple[dict, np.ndarray]:
    """LightGBM early-stopped on valid; valid and test metrics and predictions for every user."""
    import lightgbm as lgb

    params = dict(LGB_PARAMS, num_threads=threads, seed=seed)
    if task == "binary":
        params.update(objective="binary", metric="auc")
    elif task == "regression":
        params.update(objective="regression", metric="rmse")
    else:
        params.update(objective="multiclass", metric="multi_logloss", num_class=int(np.nanmax(y)) + 1)
    train, valid, test = (split == s for s in SPLITS)
    train_set = lgb.Dataset(X[train], y[train], categorical_feature=categorical or "auto")
    valid_set = lgb.Dataset(X[valid], y[valid], reference=train_set)
    booster = lgb.train(params, train_set, num_boost_round=rounds, valid_sets=[valid_set],
                        callbacks=[lgb.early_stopping(50, verbose=False)])
    pred = booster.predict(X, num_iteration=booster.best_iteration)
    result = {"best_iteration": int(booster.best_iteration),
              "valid": task_metrics(task, y[valid], pred[valid]), "test": task_metrics(task, y[test], pred[test])}
    return result, pred


def paired_bootstrap(task: str, y: np.ndarray, base: np.ndarray, other: np.ndarray, n: int, seed: int) -> dict:
    """95% interval of (other - base) over test users resampled with replacement (binary AUC / regression RMSE)."""
    if task == "multiclass" or n == 0:
        return {}
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if task == "binary" and y[idx].min() == y[idx].max():
            continue
        a, b = task_metrics(task, y[idx], other[idx]), task_metrics(task, y[idx], base[idx])
        deltas.append(next(iter(a.values())) - next(iter(b.values())))
    return {"low": float(np.quantile(deltas, 0.025)), "high": float(np.quantile(deltas, 0.975))}


# --- CLI ------------------------------------------------------------------------------------------------------------


def _columns(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


@click.group()
def main():
    """pytorch-lifestream CoLES + LightGBM: the peer row of domaintok's evaluation."""


@main.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CACHE,
              show_default=True)
def install(cache_dir):
    """Install the pinned ptls packages into the cache directory (idempotent) and check that they import."""
    ensure_ptls(cache_dir)
    import ptls.frames.coles  # noqa: F401
    import pytorch_lightning

    click.echo(f"ptls ready in {cache_dir} (pytorch-lightning {pytorch_lightning.__version__})")


@main.command()
@click.option("--events", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Pre-cutoff events (parquet).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="user_id, split (train/valid/test), label.")
@click.option("--features", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Optional aggregates: user_id + feature columns (non-numeric ones become categoricals).")
@click.option("--user-col", required=True)
@click.option("--time-col", required=True)
@click.option("--cat-cols", default="", help="Comma-separated categorical event fields.")
@click.option("--num-cols", default="", help="Comma-separated numeric event fields (signed log1p applied).")
@click.option("--task", type=click.Choice(["binary", "regression", "multiclass"]), required=True)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CACHE,
              show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=1), default=2, show_default=True,
              help="Embed all users and score LightGBM on valid every N epochs; the best valid epoch is kept.")
@click.option("--hidden", type=click.IntRange(min=2), default=256, show_default=True, help="GRU hidden size.")
@click.option("--emb-dim", type=click.IntRange(min=1), default=16, show_default=True,
              help="Embedding size per categorical field (capped at its vocabulary).")
@click.option("--max-vocab", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--max-events", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Keep each user's last N events.")
@click.option("--split-count", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--cnt-min", type=click.IntRange(min=1), default=15, show_default=True)
@click.option("--cnt-max", type=click.IntRange(min=1), default=150, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--lightgbm-rounds", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def run(events, labels, features, user_col, time_col, cat_cols, num_cols, task, output, cache_dir, epochs, eval_every,
        hidden, emb_dim, max_vocab, max_events, split_count, cnt_min, cnt_max, batch_size, lr, lightgbm_rounds,
        bootstrap, threads, seed):
    """Train CoLES on train+valid users' events, embed every user, LightGBM rows early-stopped on valid."""
    ensure_ptls(cache_dir)
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cat_cols, num_cols = _columns(cat_cols), _columns(num_cols)
    label_table = read_labels(labels)
    users = label_table.column("user_id").to_pylist()
    split = np.asarray(label_table.column("split").to_pylist())
    y, classes = encode_labels(label_table.column("label"), task)
    fit_users = {u for u, s in zip(users, split) if s != "test"}
    table = read_events(events, user_col, time_col, cat_cols, num_cols)
    sequences, sizes = feature_dicts(table, fit_users, cat_cols, num_cols, max_vocab, max_events)
    fit_sequences = [sequences[u] for u in users if u in fit_users and u in sequences]
    t_data = time.perf_counter() - t0
    click.echo(f"{len(sequences)} users with events, {len(fit_sequences)} fit users, fields {sizes} "
               f"(data {t_data:.1f} s)", err=True)

    model = build_coles(sizes, num_cols, emb_dim, hidden, lr)
    agg = agg_categorical = None
    if features is not None:
        agg, _, agg_categorical = aggregate_matrix(features, users, split == "train")
    key = SELECTION_METRIC[task]
    sign = -1.0 if key == "rmse" else 1.0

    def evaluate(module):
        emb = embed_users(module, sequences, users, batch_size=256)  # (users, hidden)
        record = {}
        for name, X, cats in (("coles", emb, []),
                              *((("coles+aggregates", np.concatenate([agg, emb], 1), agg_categorical),)
                                if agg is not None else ())):
            result, _ = fit_lightgbm(X, y, split, task, cats, lightgbm_rounds, threads, seed)
            record[f"valid_{key}_{name}"] = result["valid"][key]
        return sign * record[f"valid_{key}_coles"], emb, record

    selector = epoch_selector(eval_every, evaluate)
    t1 = time.perf_counter()
    train_coles(model, fit_sequences, epochs, batch_size, split_count, cnt_min, cnt_max, seed, [selector])
    t_train = time.perf_counter() - t1 - selector.seconds
    emb = selector.best_state
    click.echo(f"chosen on valid: epoch {selector.best['epoch']}", err=True)

    inputs = {"coles": (emb, [])}
    if agg is not None:
        inputs = {"aggregates": (agg, agg_categorical), **inputs,
                  "coles+aggregates": (np.concatenate([agg, emb], axis=1), agg_categorical)}
    rows, preds = {}, {}
    for name, (X, categorical) in inputs.items():
        rows[name], preds[name] = fit_lightgbm(X, y, split, task, categorical, lightgbm_rounds, threads, seed)
    test = split == "test"
    if "aggregates" in rows:
        base_name = "aggregates"
        for name in rows:
            if name == base_name:
                continue
            rows[name]["test"][f"relative_{key}_vs_aggregates"] = (
                rows[name]["test"][key] / rows[base_name]["test"][key] - 1.0)
            rows[name]["test"]["bootstrap_delta_95"] = paired_bootstrap(
                task, y[test], preds[base_name][test], preds[name][test], bootstrap, seed)

    output.mkdir(parents=True, exist_ok=True)
    report = {
        "peer": "pytorch-lifestream CoLES + LightGBM", "packages": list(PTLS_PACKAGES), "task": task,
        "classes": classes,
        "users": {s: int((split == s).sum()) for s in SPLITS}, "fit_users": len(fit_sequences),
        "settings": {"epochs": epochs, "hidden": hidden, "emb_dim": emb_dim, "max_vocab": max_vocab,
                     "max_events": max_events, "split_count": split_count, "cnt_min": cnt_min, "cnt_max": cnt_max,
                     "batch_size": batch_size, "lr": lr, "threads": threads, "seed": seed,
                     "cat_cols": cat_cols, "num_cols": num_cols, "field_sizes": sizes},
        "epoch_history": selector.history, "chosen_epoch": selector.best["epoch"],
        "selection": f"epoch with the best valid {key} of LightGBM on the CoLES embeddings alone",
        "seconds": {"data": t_data, "coles_train": t_train, "per_epoch_evaluation": selector.seconds,
                    "total": time.perf_counter() - t0},
        "rows": rows,
    }
    (output / "results.json").write_text(json.dumps(report, indent=1))
    emb_table = pa.table({"user_id": users, **{f"coles_{i}": emb[:, i] for i in range(emb.shape[1])}})
    pq.write_table(emb_table, output / "embeddings.parquet")
    pred_cols = {name: (p if p.ndim == 1 else p.tolist()) for name, p in preds.items()}
    pq.write_table(pa.table({"user_id": users, "split": split.tolist(), "label": y, **pred_cols}),
                   output / "predictions.parquet")
    click.echo(render_table(report))


def _interval(ci: dict) -> str:
    return f"[{ci['low']:+.4f}, {ci['high']:+.4f}]" if ci else ""


def render_table(report: dict) -> str:
    key = SELECTION_METRIC[report["task"]]
    extra = ["accuracy"] if key == "macro_auc" else []
    header = ["LightGBM on", f"valid {key}", f"test {key}", *(f"test {e}" for e in extra), "vs aggregates (test)",
              "95% CI of the difference", "rounds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in report["rows"].items():
        test = row["test"]
        rel = test.get(f"relative_{key}_vs_aggregates")
        cells = [name, f"{row['valid'][key]:.4f}", f"{test[key]:.4f}", *(f"{test[e]:.4f}" for e in extra),
                 ("baseline" if name == "aggregates" else "") if rel is None else f"{rel:+.2%}",
                 _interval(test.get("bootstrap_delta_95") or {}), str(row["best_iteration"])]
        lines.append("| " + " | ".join(cells) + " |")
    s = report["seconds"]
    lines.append(f"\nCoLES epoch {report['chosen_epoch']} (chosen on valid), training {s['coles_train']:.0f} s, "
                 f"per-epoch evaluation {s['per_epoch_evaluation']:.0f} s, total {s['total']:.0f} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
