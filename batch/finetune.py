"""`domaintok finetune`: joint-fusion fine-tuning of a pretrained domain transformer on labels (+ tabular features).

Labels, sequences and features are joined by user id in DuckDB; rows are split train/valid/test with no user on
two sides; training stops early on the validation metric; writes the fused model, metrics.json, predictions.parquet.

Distributed: under `torchrun` (or `accelerate launch`) every process joins the same data, draws the same global
batches (`--batch-size` is the global batch) and trains on its own slice of each through DistributedDataParallel,
its loss weighted by the slice's share, so a step's gradient is the single-process gradient of the global batch.
Evaluation predicts a disjoint slice of rows per process and gathers them, so every process takes the same early
stopping decisions; only rank 0 writes the output directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.checkpoints import CheckpointDirs, checked_checkpoint_dir
from batch.distributed import all_gather, is_rank_zero, leave_process_group
from batch.sequence_files import parquet_files
from domaintok.artifacts import atomic_dir
from domaintok.errors import DomaintokError

if TYPE_CHECKING:
    from batch.finetune_trainer import FusionRun

TASKS = ("binary", "multiclass", "regression")
SEQUENCE_GATES = ("none", "zero", "scalar")  # domaintok.models.fusion.SEQUENCE_GATES (torch stays out of import)
STAGE2_MODES = ("all", "sequence")
STAGE2_STARTS = ("scratch", "stage1")
SPLIT_MODES = ("auto", "column", "user", "time")
SPLITS = ("train", "valid", "test")
_HASH_BUCKETS = 10_000
# The salt keeps this split independent of pretraining's unsalted crc32 eval split (batch/sequence_data.py).
USER_SPLIT_SALT = "domaintok-finetune-split:"


def user_split(user_id: str, valid_fraction: float = 0.15, test_fraction: float = 0.15,
               salt: str = USER_SPLIT_SALT) -> str:
    """"train" / "valid" / "test" from a salted crc32 of the user id: stable across runs and machines."""
    bucket = zlib.crc32((salt + user_id).encode("utf-8")) % _HASH_BUCKETS / _HASH_BUCKETS
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + valid_fraction:
        return "valid"
    return "train"


def quote_identifier(name: str) -> str:
    """A DuckDB identifier, quoted (embedded quotes doubled), for column names that come from a file's schema."""
    return '"' + name.replace('"', '""') + '"'


# --- inputs: schema checks and the DuckDB join --------------------------------------------------------------------


def _columns(path: Path, role: str) -> pa.Schema:
    """The schema of a parquet input (a directory's first file for a `tokenize --engine spark` output)."""
    try:
        schema = pq.read_schema(parquet_files(path)[0])
    except (pa.ArrowInvalid, OSError) as exc:
        raise DomaintokError(f"{role} {path}: cannot read as parquet ({' '.join(str(exc).split())})") from None
    if "user_id" not in schema.names:
        raise DomaintokError(f"{role} {path}: no user_id column (columns: {', '.join(schema.names)})")
    return schema


def infer_feature_types(schema: pa.Schema) -> tuple[list[str], list[str]]:
    """Numeric (ints, floats, decimals, bools) and categorical (strings, dictionaries) columns besides user_id."""
    numeric, categorical = [], []
    for f in schema:
        if f.name == "user_id":
            continue
        t = f.type
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t):
            numeric.append(f.name)
        elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
            categorical.append(f.name)
        else:
            raise DomaintokError(
                f"features column {f.name!r} has type {t}: only numeric, boolean and string columns are supported"
            )
    return numeric, categorical


@dataclass
class JoinedData:
    """One row per labelled user that has a sequence: the join result, split assigned."""

    table: pa.Table  # user_id, input_ids, label, split, feature columns
    numeric_features: list[str]
    categorical_features: list[str]
    labelled_users: int
    users_without_sequence: int
    users_without_features: int


def join_inputs(
    labels: Path,
    sequences: Path,
    features: Path | None = None,
    label_column: str = "label",
    split: str = "auto",
    valid_fraction: float = 0.15,
    test_fraction: float = 0.15,
    con: duckdb.DuckDBPyConnection | None = None,
) -> JoinedData:
    """Join labels, sequences and (optionally) features by user id and assign the split.

    Split modes: "column" uses the labels' `split` column (train/valid/test, e.g. from a task builder);
    "user" hashes the user id (`user_split`); "time" orders labels by their `label_ts` column and cuts it at
    the (1 - valid - test) and (1 - test) quantiles, so every test label is later than every train label;
    "auto" is "column" when the labels have a split column, else "user". One label per user is required, so
    no user sits in two splits.
    """
    con = con or duckdb.connect()
    label_schema = _columns(labels, "labels")
    split = _split_mode(labels, sequences, label_schema, label_column, split)
    numeric, categorical = _feature_columns(features)
    labelled = _load_labels(con, labels, label_column, split)
    table = _joined(con, labels, sequences, features, numeric, categorical, split)
    without_features = 0
    if features is not None:
        without_features = table.num_rows - int(np.sum(table.column("__has_features").to_numpy(zero_copy_only=False)))
        table = table.drop(["__has_features"])
    table = _assign_split(table, split, valid_fraction, test_fraction)
    return JoinedData(
        table=table,
        numeric_features=numeric,
        categorical_features=categorical,
        labelled_users=labelled,
        users_without_sequence=labelled - table.num_rows,
        users_without_features=without_features,
    )


def _split_mode(labels: Path, sequences: Path, label_schema, label_column: str, split: str) -> str:
    """The split mode ("auto" resolved), after checking the columns it and the label need."""
    _columns(sequences, "sequences")
    if label_column not in label_schema.names:
        raise DomaintokError(
            f"labels {labels}: no label column {label_column!r} (columns: {', '.join(label_schema.names)})"
        )
    if "input_ids" not in _columns(sequences, "sequences").names:
        raise DomaintokError(f"sequences {sequences}: no input_ids column (expected a `domaintok tokenize` output)")
    if split == "auto":
        split = "column" if "split" in label_schema.names else "user"
    if split == "column" and "split" not in label_schema.names:
        raise DomaintokError(f"labels {labels}: --split column needs a 'split' column (train/valid/test)")
    if split == "time" and "label_ts" not in label_schema.names:
        raise DomaintokError(f"labels {labels}: --split time needs a 'label_ts' column")
    return split


def _feature_columns(features: Path | None) -> tuple[list[str], list[str]]:
    """(numeric, categorical) feature columns of the feature file; ([], []) without one."""
    if features is None:
        return [], []
    numeric, categorical = infer_feature_types(_columns(features, "features"))
    if not numeric and not categorical:
        raise DomaintokError(f"features {features}: no feature columns besides user_id")
    clash = sorted({"input_ids", "label", "split", "label_ts"} & {*numeric, *categorical})
    if clash:
        raise DomaintokError(f"features {features}: column {clash[0]!r} clashes with a column of the join; rename it")
    return numeric, categorical


def _load_labels(con, labels: Path, label_column: str, split: str) -> int:
    """The labels as TEMP TABLE ft_labels (user_id, label[, split][, label_ts]), refusing null ids or labels, two
    labels for one user and unknown split names; returns the number of labelled users."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE ft_labels AS SELECT CAST(user_id AS VARCHAR) AS user_id, "
        f"{quote_identifier(label_column)} AS label"
        + (", CAST(split AS VARCHAR) AS split" if split == "column" else "")
        + (", CAST(label_ts AS TIMESTAMP) AS label_ts" if split == "time" else "")
        + " FROM read_parquet($labels)",
        {"labels": str(labels)},
    )
    problems = con.execute(
        "SELECT count(*) FILTER (WHERE user_id IS NULL), count(*) FILTER (WHERE label IS NULL), "
        "count(*) - count(DISTINCT user_id), count(*) FROM ft_labels"
    ).fetchall()[0]
    if problems[3] == 0:
        raise DomaintokError(f"labels {labels}: no rows")
    if problems[0]:
        raise DomaintokError(f"labels {labels}: {problems[0]} rows have a null user_id")
    if problems[1]:
        raise DomaintokError(f"labels {labels}: {problems[1]} rows have a null {label_column!r}")
    if problems[2]:
        dup = con.execute("SELECT user_id FROM ft_labels GROUP BY user_id HAVING count(*) > 1 LIMIT 1").fetchall()[0][0]
        raise DomaintokError(f"labels {labels}: user_id {dup!r} has more than one label (one label per user)")
    if split == "column":
        bad = con.execute(
            "SELECT DISTINCT split FROM ft_labels WHERE split IS NULL OR split NOT IN ('train', 'valid', 'test')"
        ).fetchall()
        if bad:
            raise DomaintokError(f"labels {labels}: split column holds {bad[0][0]!r}; expected train, valid or test")
    return int(problems[3])


def _joined(con, labels: Path, sequences: Path, features: Path | None, numeric: list[str], categorical: list[str],
            split: str) -> pa.Table:
    """Labels joined with sequences (inner) and features (left, with a __has_features flag), by user id."""
    params: dict[str, Any] = {"sequences": [str(f) for f in parquet_files(sequences)]}
    feature_select = feature_join = has_features = ""
    if features is not None:
        feature_select = "".join(f", f.{quote_identifier(c)}" for c in [*numeric, *categorical])
        feature_join = (
            "LEFT JOIN (SELECT * EXCLUDE (user_id), CAST(user_id AS VARCHAR) AS user_id FROM read_parquet($features))"
            " f ON f.user_id = l.user_id"
        )
        has_features = ", f.user_id IS NOT NULL AS __has_features"
        params["features"] = str(features)
        dup = con.execute(
            "SELECT CAST(user_id AS VARCHAR) FROM read_parquet($features) GROUP BY 1 HAVING count(*) > 1 LIMIT 1",
            {"features": str(features)},
        ).fetchall()
        if dup:
            raise DomaintokError(f"features {features}: user_id {dup[0][0]!r} has more than one row")
    extra = (", l.split" if split == "column" else "") + (", l.label_ts" if split == "time" else "")
    table = con.sql(
        f"""
        SELECT l.user_id, s.input_ids, l.label{extra}{feature_select}{has_features}
        FROM ft_labels l
        JOIN (SELECT CAST(user_id AS VARCHAR) AS user_id, input_ids FROM read_parquet($sequences)) s
          ON s.user_id = l.user_id
        {feature_join}
        ORDER BY l.user_id
        """,
        params=params,
    ).to_arrow_table()
    if table.num_rows == 0:
        raise DomaintokError(f"no overlapping users: no user_id of labels {labels} has a sequence in {sequences}")
    return table


def _assign_split(table: pa.Table, split: str, valid_fraction: float, test_fraction: float) -> pa.Table:
    """The table with its `split` column: from the labels, by user hash, or by label time (ties to the earlier
    split, so a timestamp is never on both sides of a cut)."""
    users = table.column("user_id").to_pylist()
    if split == "user":
        assigned = [user_split(u, valid_fraction, test_fraction) for u in users]
    elif split == "time":
        ts = table.column("label_ts").cast(pa.timestamp("us")).to_numpy().astype("datetime64[us]").astype(np.int64)
        train_end, valid_end = np.quantile(ts, [1 - valid_fraction - test_fraction, 1 - test_fraction])
        assigned = np.where(ts <= train_end, "train", np.where(ts <= valid_end, "valid", "test")).tolist()
        table = table.drop(["label_ts"])
    else:
        assigned = table.column("split").to_pylist()
        table = table.drop(["split"])
    return table.append_column("split", pa.array(assigned, pa.string()))


# --- metrics ------------------------------------------------------------------------------------------------------


def task_metrics(task: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float | None]:
    """binary: auc, logloss, accuracy (p > 0.5), brier; multiclass: accuracy, logloss, macro_auc (one-vs-rest,
    averaged over the classes present with both outcomes); regression: rmse, mae."""
    from sklearn.metrics import log_loss, roc_auc_score

    n = len(y)
    if n == 0:
        return {"n": 0}
    if task == "binary":
        p = np.clip(pred.astype(np.float64), 1e-7, 1 - 1e-7)
        both = len(np.unique(y)) == 2
        return {
            "n": n,
            "auc": float(roc_auc_score(y, p)) if both else None,
            "logloss": float(log_loss(y, p, labels=[0, 1])),
            "accuracy": float(np.mean((p > 0.5) == (y == 1))),
            "brier": float(np.mean((p - y) ** 2)),
            "positive_rate": float(np.mean(y)),
        }
    if task == "multiclass":
        p = np.clip(pred.astype(np.float64), 1e-7, 1.0)
        p = p / p.sum(axis=1, keepdims=True)
        return {
            "n": n,
            "accuracy": float(np.mean(p.argmax(axis=1) == y)),
            "logloss": float(log_loss(y, p, labels=list(range(p.shape[1])))),
            "macro_auc": macro_auc(y, p),
        }
    err = pred.astype(np.float64) - y.astype(np.float64)
    return {"n": n, "rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}


def macro_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """Mean one-vs-rest AUC over the classes that occur in y and not in every row (None when there are none)."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(y == c, p[:, c]) for c in range(p.shape[1]) if 0 < np.sum(y == c) < len(y)]
    return float(np.mean(aucs)) if aucs else None


# Metrics early stopping and model selection may use, per task; the first is the default.
SELECTION_METRICS = {
    "binary": ("auc", "logloss", "accuracy", "brier"),
    "multiclass": ("macro_auc", "accuracy", "logloss"),
    "regression": ("rmse", "mae"),
}
HIGHER_IS_BETTER = {"auc", "macro_auc", "accuracy"}


def resolve_metric(task: str, metric: str | None) -> str:
    """The selection metric: `metric`, checked against the task, or the task's default (auc, macro_auc, rmse)."""
    allowed = SELECTION_METRICS[task]
    if metric is None:
        return allowed[0]
    if metric not in allowed:
        raise DomaintokError(f"metric {metric!r} does not apply to a {task} task (choose from {', '.join(allowed)})")
    return metric


def selection_score(task: str, metrics: dict, metric: str | None = None) -> float:
    """Higher is better: the metric, negated where lower is better; an AUC undefined on one class falls back to
    -logloss."""
    metric = resolve_metric(task, metric)
    value = metrics.get(metric)
    if value is None:
        return -metrics["logloss"]
    return value if metric in HIGHER_IS_BETTER else -value


# --- processes ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun / accelerate launch job: `world` processes, this one `rank` (1 and 0 alone)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        """This rank's slice of a global batch and the weight of its mean loss, `len(slice) / len(rows) * world`, so
        that DDP's average of the ranks' gradients is the gradient of the global batch's mean loss. A rank left with
        no row (a batch smaller than the ranks) runs one row at weight 0: every rank must join every all-reduce."""
        if self.world == 1:
            return rows, 1.0
        mine = np.array_split(rows, self.world)[self.rank]
        if len(mine) == 0:
            return rows[:1], 0.0
        return mine, len(mine) / len(rows) * self.world

    def all_sum(self, value: float) -> float:
        """`value` summed over the ranks."""
        return float(sum(self.gather(float(value))))

    def gather(self, value) -> list:
        """`value` of every rank, in rank order."""
        return [value] if self.world == 1 else all_gather(value)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def join_process_group(device_type: str) -> Ranks:
    """Join the job's process group when started by torchrun / accelerate launch (WORLD_SIZE > 1): NCCL on CUDA, gloo
    on CPU; one process otherwise. A group already joined (e.g. by an earlier run in this process) is reused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch

    if device_type != "cuda":
        # accelerate names the device of a multi-CPU run "cpu:0", which torch.load cannot map a checkpoint's
        # tensors to (--resume); the Trainer's accelerate state takes the device from this variable instead.
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Ranks(world=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank)


# --- training -----------------------------------------------------------------------------------------------------


@dataclass
class FinetuneSettings(CheckpointDirs):
    """Every knob of a fine-tuning run (the CLI's options).

    Early stopping counts evaluations (`evals_per_epoch` per epoch): a stage stops at the first evaluation after
    `patience` evaluations in a row that failed to beat the stage's best valid score by more than `min_delta`, but
    never before `min_epochs` epochs of the stage. The saved model, the valid and the test metrics are those of the best
    valid evaluation of the run.
    Staged fusion (`staged`, sequence models with features) adds a tabular stage: the tabular branch and head
    alone, the sequence branch off (its head weights zeroed, the encoder frozen and not run), up to
    `stage1_epochs` with `stage1_patience`. With `stage2_from="scratch"` the fusion run is the joint run exactly as
    without staging and the tabular stage follows from the same initial weights; with `"stage1"` the tabular stage
    comes first and fusion starts from its best, training what `stage2` says. Selection spans both stages, so the
    saved model is never worse on valid than the tabular-only stage (nor, with "scratch", than the joint run).
    """

    model: Path
    sequences: Path
    labels: Path
    output: Path
    features: Path | None = None
    task: str = "binary"
    label_column: str = "label"
    split: str = "auto"
    valid_fraction: float = 0.15
    test_fraction: float = 0.15
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 32
    encoder_lr: float = 3e-4
    head_lr: float = 1e-3
    # AdamW decoupled weight decay on weight matrices; biases, norms and the sequence gate get none.
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of a stage's steps (linear warm-up, then cosine decay to 10%)
    warmup_steps: int | None = None  # overrides `warmup`
    metric: str | None = None  # selection metric; None: auc / macro_auc / rmse by task
    patience: int = 2
    min_epochs: float = 1.0
    min_delta: float = 0.0
    evals_per_epoch: int = 1
    max_length: int | None = None
    dropout: float = 0.1  # head and DCNv2 deep tower
    sequence_dropout: float = 0.0  # drop a row's whole user embedding in training
    lm_weight: float = 0.0  # auxiliary next-token loss on the input sequences, weighted into the task loss
    sequence_gate: str = "none"  # "none", "zero" (a zero-initialized projection into the head) or "scalar"
    staged: bool = True
    stage1_epochs: int = 30
    stage1_patience: int = 5
    stage2_from: str = "scratch"  # fusion starts from the initial weights ("scratch") or the tabular stage's best
    stage2: str = "all"  # with stage2_from "stage1": "all", or "sequence" (encoder + gate/projection only)
    embedding_layernorm: bool = True
    # False trains the tabular branch alone (PLR/DCNv2 + head, no transformer): the ablation of joint fusion.
    use_sequence: bool = True
    seed: int = 0
    device: str | None = None
    progress: bool = True
    checkpoint_dir: Path | None = None  # default: <output>.checkpoints beside the output
    resume: bool = False
    keep_checkpoints: bool = False  # removed once the output is written, unless kept


def _targets(task: str, labels: pa.ChunkedArray, label_column: str) -> tuple[np.ndarray, list[str]]:
    if task == "binary":
        values = labels.cast(pa.int64()).to_numpy(zero_copy_only=False) if not pa.types.is_boolean(labels.type) \
            else labels.to_numpy(zero_copy_only=False).astype(np.int64)
        bad = set(np.unique(values).tolist()) - {0, 1}
        if bad:
            raise DomaintokError(f"binary task: label column {label_column!r} holds {sorted(bad)[0]!r}; expected 0/1")
        return values.astype(np.int64), []
    if task == "multiclass":
        strings = pc.cast(labels, pa.string())
        classes = sorted(v for v in pc.unique(strings).to_pylist())
        if len(classes) < 2:
            raise DomaintokError(f"multiclass task: label column {label_column!r} has fewer than 2 classes")
        index = pc.index_in(strings, value_set=pa.array(classes, pa.string()))
        return index.to_numpy(zero_copy_only=False).astype(np.int64), classes
    try:
        return labels.cast(pa.float64()).to_numpy(zero_copy_only=False), []
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DomaintokError(f"regression task: label column {label_column!r} is not numeric ({labels.type})") from None


def _batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None):
    """Index batches of similar lengths: sort chunks of 32 batches by length (less padding), shuffle batches."""
    chunk = batch_size * 32
    batches = []
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def predict(model, sequences: list[np.ndarray], numeric, categorical, batch_size: int, device) -> np.ndarray:
    """Model outputs for every row, in row order: P(y=1) (N,), class probabilities (N, C) or values (N,)."""
    import torch

    from domaintok.models.padded import PaddedBatch

    model.eval()
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    outputs: list[tuple[np.ndarray, np.ndarray]] = []
    pad = model.transformer.config.pad_token_id if model.transformer is not None else 0
    with torch.inference_mode():
        for rows in _batches(np.arange(len(sequences)), lengths, batch_size * 2, None):
            batch = PaddedBatch.from_sequences([sequences[i] for i in rows], pad_token_id=pad).to(device)
            out = model(batch.input_ids, batch.attention_mask, numeric[rows].to(device), categorical[rows].to(device))
            outputs.append((rows, model.predict(out.logits).float().cpu().numpy()))
    width = outputs[0][1].shape[1:] if outputs else ()
    result = np.zeros((len(sequences), *width), dtype=np.float32)
    for rows, values in outputs:
        result[rows] = values
    return result


def _no_weight_decay(name: str, parameter) -> bool:
    """Biases, norm parameters and other vectors/scalars (the sequence gate) are kept out of weight decay."""
    leaf = name.rsplit(".", 1)[-1]
    return parameter.ndim < 2 or leaf == "bias" or "norm" in name.lower()


def param_groups(model, encoder_lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: encoder / head (head = tabular branch, gate and MLP head) x decay /
    no decay; each group carries a `name` (encoder_decay, encoder_no_decay, head_decay, head_no_decay)."""
    groups: dict[str, list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "encoder" if name.startswith("transformer.") else "head"
        kind = "no_decay" if _no_weight_decay(name, parameter) else "decay"
        groups.setdefault(f"{part}_{kind}", []).append(parameter)
    return [
        {"name": key, "params": params, "lr": encoder_lr if key.startswith("encoder") else head_lr,
         "weight_decay": weight_decay if key.endswith("_decay") and not key.endswith("no_decay") else 0.0}
        for key, params in sorted(groups.items())
    ]


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier per step: linear warm-up over warmup_steps, then cosine decay to 10% at total_steps."""
    warmup_steps = max(1, min(warmup_steps, total_steps))

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


def _set_stage(model, stage: str, trainable: dict[str, bool]) -> None:
    """Which parameters train, per stage. "tabular": the sequence branch is off (the encoder does not run) and
    only the tabular path trains; "all": everything; "sequence": the encoder, gate and sequence projection train
    while the tabular path stays as stage 1 left it. `trainable` is the model's own choice (LoRA freezes base
    weights), which no stage overrides."""
    model.sequence_open = stage != "tabular"
    for name, parameter in model.named_parameters():
        tabular = model.tabular_parameter(name)
        on = {"tabular": tabular, "all": True, "sequence": not tabular}[stage]
        parameter.requires_grad = on and trainable[name]


def _tabular_stage(model, run: FusionRun, s: FinetuneSettings, trainable: dict[str, bool], index: int) -> None:
    """Train the tabular path alone: the sequence weights zeroed (a selected tabular-stage model predicts as its
    tabular path once the branch is open again), the encoder frozen and not run."""
    model.close_sequence()
    _set_stage(model, "tabular", trainable)
    run.run_stage(index, "tabular", s.stage1_epochs, s.stage1_patience, s.encoder_lr)


def _train_joint_then_tabular_floor(model, run: FusionRun, s: FinetuneSettings) -> None:
    """stage2_from "scratch": the joint run exactly as without staging, then the tabular-only stage from the same
    initial weights; selection over both keeps whichever is better on valid."""
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run.run_stage(0, "fusion", s.epochs, s.patience, s.encoder_lr)
    model.load_state_dict(initial)
    _tabular_stage(model, run, s, trainable, 1)
    _set_stage(model, "all", trainable)


def _train_tabular_then_fusion(model, run: FusionRun, s: FinetuneSettings) -> None:
    """stage2_from "stage1": the tabular stage, then fusion warm-started from its best (what trains: `stage2`)."""
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    _tabular_stage(model, run, s, trainable, 0)
    run.restore_best()
    _set_stage(model, s.stage2, trainable)
    run.run_stage(1, "fusion", s.epochs, s.patience, s.encoder_lr)


def _build_model(s: FinetuneSettings, encoder, stats: dict, extra: dict, max_length: int):
    from domaintok.models.fusion import JointFusionConfig, JointFusionModel

    lora = {"r": s.lora_r, "alpha": s.lora_alpha, "dropout": 0.0} if s.lora else None
    if s.lm_weight and not s.use_sequence:
        raise DomaintokError("--lm-weight: a tabular-only model has no sequence to predict")
    if s.lm_weight and not encoder.config.tie_word_embeddings:
        raise DomaintokError(f"--lm-weight: model {s.model} has no tied LM head (tie_word_embeddings is false)")
    if s.use_sequence:
        return JointFusionModel.from_encoder(
            encoder, task=s.task, lora=lora, max_length=max_length, dropout=s.dropout,
            # The gate starts the fused model as its tabular path; without features there is nothing to start from.
            sequence_gate=s.sequence_gate if s.features is not None else "none", sequence_dropout=s.sequence_dropout,
            lm_loss_weight=s.lm_weight, embedding_layernorm=s.embedding_layernorm, **stats, **extra,
        )
    if s.features is None:
        raise DomaintokError("a tabular-only model needs --features")
    return JointFusionModel(JointFusionConfig(
        task=s.task, use_sequence=False, dropout=s.dropout,
        tokenizer_fingerprint=encoder.config.tokenizer_fingerprint, **stats, **extra,
    ))


def _predictions_table(task: str, table: pa.Table, rows: np.ndarray, split: np.ndarray, y: np.ndarray,
                       pred: np.ndarray, class_names: list[str]) -> pa.Table:
    """user_id, split, label, prediction (P(1) / argmax class name / value), and prob_<class> per class."""
    columns = {
        "user_id": table.column("user_id").take(pa.array(rows)),
        "split": pa.array(split[rows].tolist(), pa.string()),
    }
    if task == "multiclass":
        names = pa.array(class_names, pa.string())
        columns["label"] = names.take(pa.array(y[rows]))
        columns["prediction"] = names.take(pa.array(pred.argmax(axis=1)))
        for c, name in enumerate(class_names):
            columns[f"prob_{name}"] = pa.array(pred[:, c].astype(np.float64))
    else:
        columns["label"] = pa.array(y[rows])
        columns["prediction"] = pa.array(pred.astype(np.float64))
    return pa.table(columns)


def finetune(settings: FinetuneSettings) -> dict:
    """Run a fine-tuning job end to end; returns the metrics also written to <output>/metrics.json."""
    import torch

    from domaintok.models.embedding import load_encoder
    from domaintok.models.fusion import encode_tabular, fit_tabular_stats

    from batch.finetune_trainer import FusionRun

    s = settings
    _check_settings(s)
    metric = resolve_metric(s.task, s.metric)
    checkpoint_dir = checked_checkpoint_dir(s.resolved_checkpoint_dir(), s.resume, "stage-*/checkpoint-*")
    started = time.perf_counter()
    data = join_inputs(s.labels, s.sequences, s.features, s.label_column, s.split, s.valid_fraction,
                       s.test_fraction)
    table = data.table
    split = np.asarray(table.column("split").to_pylist())
    counts = {name: int((split == name).sum()) for name in SPLITS}
    if counts["train"] == 0:
        raise DomaintokError("no training rows after the split (check the split column or the fractions)")
    if counts["valid"] == 0:
        raise DomaintokError("no validation rows after the split: early stopping needs some (raise --valid-fraction)")
    y, class_names = _targets(s.task, table.column("label"), s.label_column)

    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ranks = join_process_group(device.type)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)  # one GPU per process
    torch.manual_seed(s.seed)
    encoder = load_encoder(s.model, device="cpu")
    max_length = s.max_length or encoder.config.max_position_embeddings
    sequences = _windows(table, max_length, encoder.config.sep_token_id, s.sequences)
    rows = {name: np.flatnonzero(split == name) for name in SPLITS}
    stats = fit_tabular_stats(table.take(pa.array(rows["train"])), data.numeric_features, data.categorical_features)
    extra: dict[str, Any] = {"class_names": class_names}
    if s.task == "regression":
        extra["target_mean"] = float(y[rows["train"]].mean())
        extra["target_std"] = float(y[rows["train"]].std()) or 1.0
    model = _build_model(s, encoder, stats, extra, max_length).to(device)  # the same initial weights on every rank
    numeric, categorical = encode_tabular(model.config, table)
    pad = encoder.config.pad_token_id if encoder.config.pad_token_id is not None else 0
    run = FusionRun(model, s, sequences, numeric, categorical, y, rows, device, pad, ranks, checkpoint_dir)
    if s.resume:
        run.load_latest()
    _train(model, run, s)
    train_seconds = time.perf_counter() - started

    valid_metrics, _ = run.evaluate(rows["valid"])
    held_out = rows["test"] if len(rows["test"]) else rows["valid"]
    test_metrics, test_pred = run.evaluate(held_out)
    metrics = _metrics(s, metric, model, run, data, counts, class_names, max_length, device, ranks,
                       test_metrics, valid_metrics, train_seconds, held_out_split="test" if len(rows["test"]) else "valid")
    if ranks.main:
        with atomic_dir(s.output) as tmp:  # rerun-safe: built aside, then swapped in
            model.save_pretrained(tmp)
            predictions = _predictions_table(s.task, table, held_out, split, y, test_pred, class_names)
            pq.write_table(predictions, tmp / "predictions.parquet")
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    ranks.barrier()  # no process returns before the output is in place
    if ranks.main and not s.keep_checkpoints:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the output is the result; checkpoints were for resuming
    return metrics


def _check_settings(s: FinetuneSettings) -> None:
    if s.task not in TASKS:
        raise DomaintokError(f"task must be one of {', '.join(TASKS)}, got {s.task!r}")
    if s.stage2 not in STAGE2_MODES:
        raise DomaintokError(f"stage2 must be one of {', '.join(STAGE2_MODES)}, got {s.stage2!r}")
    if s.stage2_from not in STAGE2_STARTS:
        raise DomaintokError(f"stage2_from must be one of {', '.join(STAGE2_STARTS)}, got {s.stage2_from!r}")


def _windows(table: pa.Table, max_length: int, sep_token_id: int | None, path: Path) -> list[np.ndarray]:
    """Each row's input_ids cut to the model's window (the window rule of domaintok/window.py)."""
    from domaintok.window import truncate_window

    lists = table.column("input_ids").combine_chunks()
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
    if np.any(np.diff(offsets) == 0):
        raise DomaintokError(f"sequences {path}: a user has an empty input_ids list")
    return [truncate_window(values[offsets[i] : offsets[i + 1]], max_length, sep_token_id)
            for i in range(table.num_rows)]


def _train(model, run: FusionRun, s: FinetuneSettings) -> None:
    """The stages: one run (tabular only, or fusion), or fusion and a tabular stage in the order --stage2-from
    says; the best evaluated weights are restored at the end."""
    staged = s.staged and s.use_sequence and model.config.has_tabular
    first = "tabular" if not s.use_sequence else "fusion"
    if not staged:
        run.run_stage(0, first, s.epochs, s.patience, s.encoder_lr)
    elif s.stage2_from == "scratch":
        _train_joint_then_tabular_floor(model, run, s)
    else:
        _train_tabular_then_fusion(model, run, s)
    run.restore_best()


def _metrics(s, metric, model, run: FusionRun, data: JoinedData, counts, class_names, max_length, device, ranks,
             test_metrics, valid_metrics, train_seconds, held_out_split: str) -> dict:
    """metrics.json of a fine-tuning run."""
    state = run.state
    last = state.history[-1]
    return {
        "task": s.task,
        "metric": metric,
        "held_out_split": held_out_split,
        "test": test_metrics,
        "valid": valid_metrics,
        "best_step": state.best.step,
        "best_stage": state.best.stage,
        "stages": list(state.stages),
        "steps": state.step,
        "stopped_early": any(state.stopped_early),
        # The run ended on its best evaluation without stopping early: more epochs may still help.
        "still_improving": last["step"] == state.best.step and not state.stopped_early[-1],
        # The scalar gate, or the norm of the head's weights on the user embedding: 0 means the tabular path alone.
        "sequence_weight": model.sequence_weight() if model.transformer is not None else None,
        "train_seconds": train_seconds,
        "rows": counts,
        "labelled_users": data.labelled_users,
        "users_without_sequence": data.users_without_sequence,
        "users_without_features": data.users_without_features,
        "numeric_features": data.numeric_features,
        "categorical_features": data.categorical_features,
        "class_names": class_names,
        "max_length": max_length,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "processes": ranks.world,
        "history": state.history,
        "bf16": run.bf16,
        "resumed": s.resume,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
    }


@click.command("finetune")
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Pretrained model directory (`domaintok pretrain`).")
@click.option("--sequences", type=click.Path(exists=True, path_type=Path), required=True,
              help="sequences.parquet (user_id, input_ids) from `domaintok tokenize`, or the directory of parquet files "
                   "`tokenize --engine spark` writes.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Labels parquet: user_id, label, and optionally split (train/valid/test) or label_ts.")
@click.option("--features", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Tabular features parquet: user_id + numeric/boolean (PLR) and string (embedding) columns.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Fused model directory to write (replaced if it exists).")
@click.option("--task", type=click.Choice(TASKS), default="binary", show_default=True)
@click.option("--label-column", default="label", show_default=True, help="Name of the label column.")
@click.option("--split", type=click.Choice(SPLIT_MODES), default="auto", show_default=True,
              help="column: the labels' split column; user: hash of user_id; time: by label_ts quantiles; "
                   "auto: column if present, else user.")
@click.option("--valid-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.15,
              show_default=True)
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.15, show_default=True)
@click.option("--lora", is_flag=True, help="Fine-tune the transformer through LoRA adapters (PEFT) only.")
@click.option("--lora-r", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Epochs of the fusion run (the tabular stage has --stage1-epochs).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Cap on optimizer steps per stage.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Rows per step over all processes (under torchrun / accelerate launch each process takes its share).")
@click.option("--encoder-lr", "--lr", "encoder_lr", type=click.FloatRange(min=0, min_open=True), default=3e-4,
              show_default=True, help="Peak learning rate of the transformer (or its adapters).")
@click.option("--head-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Peak learning rate of the head, the tabular branch and the sequence gate.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="AdamW weight decay of weight matrices (biases and norms get none).")
@click.option("--warmup", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Linear warm-up as a fraction of each stage's steps (then cosine decay to 10%).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None, help="Warm-up in steps (overrides --warmup).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Dropout of the head and the DCNv2 deep tower.")
@click.option("--sequence-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Probability of dropping a row's whole user embedding in training.")
@click.option("--lm-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Keep the encoder's next-token loss on the input sequences while fine-tuning, at this weight "
                   "beside the task loss (GPT-1 used 0.5); 0: the task loss alone.")
@click.option("--sequence-gate", type=click.Choice(SEQUENCE_GATES), default="none", show_default=True,
              help="none: the user embedding enters the head like any input; zero: through a projection that starts "
                   "at 0; scalar: scaled by a learned gate that starts at 0 (zero/scalar start the fused model as its "
                   "tabular path).")
@click.option("--staged/--joint", default=True, show_default=True,
              help="staged: the fusion run plus a tabular-only stage (sequence branch off), the better on valid "
                   "kept; joint: the fusion run alone.")
@click.option("--stage1-epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Epoch budget of the tabular stage (the encoder does not run, so epochs are cheap).")
@click.option("--stage1-patience", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--stage2-from", type=click.Choice(STAGE2_STARTS), default="scratch", show_default=True,
              help="scratch: the fusion run starts from the initial weights (the joint run, the tabular stage "
                   "as its floor); stage1: the tabular stage first and fusion warm-starts from its best (pair "
                   "with --sequence-gate zero).")
@click.option("--stage2", type=click.Choice(STAGE2_MODES), default="all", show_default=True,
              help="With --stage2-from stage1, what the fusion stage trains: all, or sequence (the encoder and "
                   "the gate/projection; the tabular path stays as the tabular stage left it).")
@click.option("--metric", type=click.Choice(sorted({m for ms in SELECTION_METRICS.values() for m in ms})),
              default=None, help="Validation metric for early stopping and model selection "
                                 "[default: auc (binary), macro_auc (multiclass), rmse (regression)].")
@click.option("--evals-per-epoch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--patience", type=click.IntRange(min=0), default=2, show_default=True,
              help="Evaluations without improvement tolerated; the next one stops the stage.")
@click.option("--min-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="No early stop before this many epochs of a stage.")
@click.option("--min-delta", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Improvement of the metric that resets patience.")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Tokens per sequence (default: the model's context); older whole events are dropped.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Trainer checkpoints, one after every evaluation (default: <output>.checkpoints beside the output).")
@click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint (same options).")
@click.option("--keep-checkpoints", is_flag=True, help="Keep the checkpoints once the output is written.")
def command(model, sequences, labels, features, output, task, label_column, split, valid_fraction, test_fraction,
            lora, lora_r, epochs, max_steps, batch_size, encoder_lr, head_lr, weight_decay, warmup, warmup_steps,
            dropout, sequence_dropout, lm_weight, sequence_gate, staged, stage1_epochs, stage1_patience, stage2_from,
            stage2, metric, evals_per_epoch, patience, min_epochs, min_delta, max_length, seed, checkpoint_dir, resume,
            keep_checkpoints):
    """Fine-tune a pretrained domain transformer with joint fusion (transformer + PLR/DCNv2 over features).

    Joins labels, sequences and features by user_id (DuckDB), splits without user leakage, stops early on the
    validation metric and writes OUTPUT/ (config.json + model.safetensors of the best validation
    evaluation, metrics.json with its held-out test metrics, predictions.parquet).
    """
    settings = FinetuneSettings(
        model=model, sequences=sequences, labels=labels, output=output, features=features, task=task,
        label_column=label_column, split=split, valid_fraction=valid_fraction, test_fraction=test_fraction,
        lora=lora, lora_r=lora_r, epochs=epochs, max_steps=max_steps, batch_size=batch_size, encoder_lr=encoder_lr,
        head_lr=head_lr, weight_decay=weight_decay, warmup=warmup, warmup_steps=warmup_steps, dropout=dropout,
        sequence_dropout=sequence_dropout, lm_weight=lm_weight, sequence_gate=sequence_gate, staged=staged,
        stage1_epochs=stage1_epochs, stage1_patience=stage1_patience, stage2_from=stage2_from, stage2=stage2,
        metric=metric, evals_per_epoch=evals_per_epoch, patience=patience, min_epochs=min_epochs,
        min_delta=min_delta, max_length=max_length, seed=seed, checkpoint_dir=checkpoint_dir, resume=resume,
        keep_checkpoints=keep_checkpoints,
    )
    try:
        metrics = finetune(settings)
    finally:
        leave_process_group()
    if not is_rank_zero():
        return
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics["test"].items() if isinstance(v, float))
    click.echo(
        f"fine-tuned {metrics['task']} on {metrics['rows']['train']} users for {metrics['steps']} steps "
        f"(best {metrics['metric']} at step {metrics['best_step']}, stage {metrics['best_stage']} of "
        f"{metrics['stages']}); {metrics['held_out_split']} ({metrics['test']['n']} users): {shown} -> {output}"
    )
    if metrics["still_improving"]:
        click.echo("note: the validation metric was still improving at the last evaluation; more --epochs may help")


__all__ = [
    "FinetuneSettings",
    "Ranks",
    "join_process_group",
    "finetune",
    "join_inputs",
    "infer_feature_types",
    "task_metrics",
    "macro_auc",
    "resolve_metric",
    "selection_score",
    "param_groups",
    "SELECTION_METRICS",
    "user_split",
    "quote_identifier",
    "command",
]
