"""`domaintok evaluate`: on any data set (a schema, its events, a TASKS.yaml), compare LightGBM on generic aggregates
with the domain transformer (alone, fused, as frozen embeddings) and a text-serialization transformer.

A method is a row of data (`METHODS`): which model trains it, which inputs it reads, which pretrained LM
(`LANGUAGE_MODELS`: PretrainSettings options) and which FinetuneSettings options. Tokenizers and pretraining see
only the pre-cutoff events of train+valid users; LightGBM and fine-tuning stop early on valid; test is scored once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import batch.as_of as as_of_mod
from batch.aggregates import DEFAULT_WINDOWS, aggregate_features, join_extra_features
from batch.eval_report import (HEADLINE, HIGHER_IS_BETTER, bootstrap_relative, headline, kind_metrics, plot_relative,
                               render_markdown)
from batch.finetune import FinetuneSettings
from batch.pretrain import PretrainSettings
from batch.tasks import (
    EVENTS_TABLE,
    POPULATION_TABLE,
    TS,
    USER,
    EventsLabel,
    TaskSpec,
    TasksFile,
    assign_split,
    build_labels,
    build_population,
    describe_task,
    load_tasks,
    open_events,
    raw_column_names,
    register_split,
)
from domaintok.errors import DomaintokError


@dataclass(frozen=True)
class LanguageModel:
    """A pretrained transformer: which tokens it reads ("domain" or "text") and its PretrainSettings options
    (over the preset's)."""

    tokens: str
    pretrain: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One row of the comparison.

    trainer: "lightgbm" (inputs from "aggregates", "embeddings" of `lm`) or "finetune" (inputs from "sequence" of
    `lm`, "aggregates"; without "sequence" the fusion model's tabular branch trains alone). `finetune` holds
    FinetuneSettings options over the preset's.
    """

    title: str
    trainer: str
    inputs: tuple[str, ...]
    lm: str | None = None
    finetune: dict = field(default_factory=dict)


# A pretrained LM is one line here and a method one line below; options are checked against PretrainSettings /
# FinetuneSettings when a run starts. Rows outside DEFAULT_METHODS run when named (--methods) or with --methods all.
LANGUAGE_MODELS: dict[str, LanguageModel] = {
    "domain": LanguageModel("domain"),
    "text": LanguageModel("text"),
    # CoLES contrasts users within a batch, so it reads each user's newest window only (windows of one user
    # would be each other's negatives)
    "domain_coles": LanguageModel("domain", {"objective": "clm+coles", "pooling": "mean", "windows": "newest"}),
}
METHODS: dict[str, Method] = {
    "lightgbm": Method("LightGBM on the aggregates", "lightgbm", ("aggregates",)),
    "lightgbm_emb": Method("LightGBM on the aggregates + frozen domain embeddings", "lightgbm",
                           ("aggregates", "embeddings"), lm="domain"),
    "lightgbm_emb_score": Method("LightGBM on the aggregates + a cross-fitted linear score of the frozen domain "
                                 "embeddings", "lightgbm", ("aggregates", "embedding_score"), lm="domain"),
    "lightgbm_emb_only": Method("LightGBM on frozen domain embeddings alone", "lightgbm", ("embeddings",), lm="domain"),
    "tabular_dcnv2": Method("PLR/DCNv2 on the aggregates (fusion's tabular branch alone)", "finetune",
                            ("aggregates",), lm="domain"),
    "text_bpe": Method("Transformer on text serialization (byte-level BPE)", "finetune", ("sequence",), lm="text"),
    "domain": Method("Transformer on domain tokens, fine-tuned", "finetune", ("sequence",), lm="domain"),
    "domain_fusion": Method("Domain tokens + joint fusion with the aggregates", "finetune",
                            ("sequence", "aggregates"), lm="domain"),
    # Opt-in rows: ablations and the contrastive user objective (each extra LM costs one more pretraining).
    "domain_fusion_joint": Method("Domain tokens + fusion trained jointly from the start, no gate", "finetune",
                                  ("sequence", "aggregates"), lm="domain",
                                  finetune={"staged": False, "sequence_gate": "none"}),
    # LoRA (rank 8 adapters on the attention and MLP projections, base weights frozen) against full fine-tuning
    "domain_lora": Method("Transformer on domain tokens, LoRA fine-tuning", "finetune", ("sequence",), lm="domain",
                          finetune={"lora": True}),
    "domain_fusion_lora": Method("Domain tokens + joint fusion with the aggregates, LoRA on the encoder", "finetune",
                                 ("sequence", "aggregates"), lm="domain", finetune={"lora": True}),
    "lightgbm_emb_coles": Method("LightGBM on the aggregates + frozen CoLES+CLM embeddings (mean pooling)",
                                 "lightgbm", ("aggregates", "embeddings"), lm="domain_coles"),
    "domain_coles": Method("Transformer pretrained with CoLES+CLM, fine-tuned", "finetune", ("sequence",),
                           lm="domain_coles"),
    "domain_coles_fusion": Method("CoLES+CLM transformer + fusion with the aggregates", "finetune",
                                  ("sequence", "aggregates"), lm="domain_coles"),
}
DEFAULT_METHODS = ("lightgbm", "lightgbm_emb", "lightgbm_emb_score", "lightgbm_emb_only", "tabular_dcnv2", "text_bpe", "domain",
                   "domain_fusion")

FULL_HISTORY = 1 << 30  # a window length that keeps every event: pretraining files with windows="all"

# Sizes of one evaluation; every LM gets the same architecture, context and step budget.
EVAL_PRESETS: dict[str, dict[str, Any]] = {
    # A smoke run (about 1 minute on 2 CPU cores for two tasks and every method): at most 400 users, a 2-layer width-32 model.
    "quick": {
        "pretrain": {"preset": "tiny", "overrides": {}, "context_length": 64, "max_steps": 30, "batch_size": 16,
                     "windows": "all", "pooling": "mean"},
        "finetune_sequence": {"epochs": 1, "batch_size": 16, "evals_per_epoch": 2, "patience": 2},
        "finetune_tabular": {"epochs": 5, "batch_size": 16, "evals_per_epoch": 1, "patience": 5},
        "domain_bpe_vocab": 300, "max_users": 400, "lightgbm_rounds": 200, "lightgbm_grid": False, "bootstrap": 200,
        "as_of_token": False, "history_tokens": False, "extra_cutoffs": 0, "extra_cutoff_days": None,
        # A 36k-parameter model gains nothing from a second thread, and loses much when the cores are shared.
        "torch_threads": 1,
    },
    # The README's CPU size: 2 layers of width 64, 256-token windows, 600 pretraining steps of 32 windows drawn
    # from every window of the fit users' histories, mean pooling. Chosen on valid (README: what was tried).
    "small": {
        "pretrain": {"preset": "tiny", "context_length": 256, "max_steps": 600, "batch_size": 32, "windows": "all",
                     "pooling": "mean",
                     "overrides": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "intermediate_size": 256}},
        "finetune_sequence": {"epochs": 5, "batch_size": 32, "evals_per_epoch": 2, "patience": 2},
        "finetune_tabular": {"epochs": 30, "batch_size": 32, "evals_per_epoch": 1, "patience": 5},
        "domain_bpe_vocab": 2000, "max_users": None, "lightgbm_rounds": 2000, "lightgbm_grid": False, "bootstrap": 1000,
        "as_of_token": False, "history_tokens": False, "extra_cutoffs": 0, "extra_cutoff_days": None,
        "torch_threads": None,  # torch's default (one per core)
    },
}
PRESET_ALIASES = {"tiny": "quick"}


@dataclass
class EvaluateSettings:
    """An evaluation run: the data (schema, events, tasks), where results go, the preset and its overrides."""

    schema: str | Path
    events: tuple[Path, ...]
    tasks: Path
    output: Path
    preset: str = "small"
    methods: tuple[str, ...] = DEFAULT_METHODS
    features: Path | None = None
    folds: int = 1
    max_users: int | None = None
    max_steps: int | None = None
    context_length: int | None = None
    pretrain_windows: str | None = None
    pooling: str | None = None
    windows: tuple[int, ...] = DEFAULT_WINDOWS
    seed: int = 0
    bootstrap: int | None = None
    threads: int | None = None
    lightgbm_grid: bool | None = None
    as_of_token: bool | None = None
    history_tokens: bool | None = None
    extra_cutoffs: int | None = None
    extra_cutoff_days: int | None = None
    actionpiece_spr: float | None = None
    actionpiece_compose: bool | None = None
    lm_weight: float | None = None
    progress: bool = True
    log: Callable[[str], None] = field(default=print, repr=False)

    def resolved_preset(self) -> dict[str, Any]:
        name = PRESET_ALIASES.get(self.preset, self.preset)
        if name not in EVAL_PRESETS:
            raise DomaintokError(f"unknown evaluation preset {self.preset!r}: expected one of {', '.join(EVAL_PRESETS)}")
        p = json.loads(json.dumps(EVAL_PRESETS[name]))  # a deep copy
        if self.max_steps is not None:
            p["pretrain"]["max_steps"] = self.max_steps
        if self.context_length is not None:
            p["pretrain"]["context_length"] = self.context_length
        if self.pretrain_windows is not None:
            p["pretrain"]["windows"] = self.pretrain_windows
        if self.pooling is not None:
            p["pretrain"]["pooling"] = self.pooling
        if self.actionpiece_spr is not None:
            p["pretrain"]["actionpiece_spr"] = self.actionpiece_spr
        if self.actionpiece_compose is not None:
            p["pretrain"]["actionpiece_compose"] = self.actionpiece_compose
        if self.lm_weight is not None:
            p["finetune_sequence"]["lm_weight"] = self.lm_weight
        if self.max_users is not None:
            p["max_users"] = self.max_users
        if self.bootstrap is not None:
            p["bootstrap"] = self.bootstrap
        if self.threads is not None:
            p["torch_threads"] = self.threads
        if self.lightgbm_grid is not None:
            p["lightgbm_grid"] = self.lightgbm_grid
        for key in ("as_of_token", "history_tokens", "extra_cutoffs", "extra_cutoff_days"):
            if getattr(self, key) is not None:
                p[key] = getattr(self, key)
        return p


def check_options(settings_class: type, options: dict, where: str) -> None:
    """Raise a one-line error for an option the settings dataclass does not have (so a table row written for a
    newer PretrainSettings/FinetuneSettings fails clearly, not deep inside a run)."""
    known = {f.name for f in dataclasses.fields(settings_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DomaintokError(f"{where}: {settings_class.__name__} has no option {unknown[0]!r} "
                             f"(available: {', '.join(sorted(known))})")


def selected_methods(names: tuple[str, ...]) -> list[str]:
    """The methods to run in table order, LightGBM (the reference) always first; their options checked.
    "all" selects every row of the table."""
    if "all" in names:
        names = tuple(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise DomaintokError(f"unknown method {unknown[0]!r}: expected one of {', '.join(METHODS)}")
    chosen = [m for m in METHODS if m == "lightgbm" or m in names]
    for name in chosen:
        method = METHODS[name]
        if method.lm is not None:
            if method.lm not in LANGUAGE_MODELS:
                raise DomaintokError(f"method {name!r}: unknown language model {method.lm!r}")
            check_options(PretrainSettings, LANGUAGE_MODELS[method.lm].pretrain, f"language model {method.lm!r}")
        check_options(FinetuneSettings, method.finetune, f"method {name!r}")
    return chosen


# --- LightGBM ----------------------------------------------------------------------------------------------------


def _matrix(table: pa.Table, columns: list[str], train: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Feature matrix (N, F): numbers as float (null -> NaN), strings as codes of the train split's values (unseen
    and null -> -1, LightGBM's missing category), list<float> columns expanded to one column per dimension."""
    parts, categorical = [], []
    train_rows = pa.array(np.flatnonzero(train))
    for name in columns:
        col = table.column(name).combine_chunks()
        t = col.type
        if pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
            width = len(col[0].values) if len(col) else 0
            parts.append(col.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), width))
        elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
            col = pc.cast(col, pa.string())
            vocabulary = pc.unique(pc.drop_null(col.take(train_rows)))
            codes = pc.fill_null(pc.index_in(col, value_set=vocabulary), -1)
            categorical.append(sum(p.shape[1] for p in parts))
            parts.append(codes.to_numpy(zero_copy_only=False).astype(np.float64)[:, None])
        else:
            parts.append(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)[:, None])
    return np.hstack(parts), categorical


def embedding_scores(kind: str, embeddings: np.ndarray, y: np.ndarray, train: np.ndarray, n_classes: int,
                     seed: int, folds: int = 5) -> np.ndarray:
    """A linear model's score of the embeddings as features (N, 1) or (N, K classes): cross-fitted on train rows.

    Stacking, the usual way to hand a wide, dense embedding to a tree model: 64 raw dimensions beside a few dozen
    strong aggregates mostly add split candidates that fit noise, while one well-regularized linear score carries
    what the embedding knows about the label. Train rows get out-of-fold scores (a model never scores a row it
    was fit on, so LightGBM sees scores as noisy on train as on valid/test); valid and test rows get the score of
    a model fit on all train rows. The regularization is chosen by inner cross-validation on train only.
    """
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Cs = np.logspace(-4, 1, 8)
    if kind == "regression":
        def model():
            return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))

        def score(m, X):
            return m.predict(X)[:, None]
        splitter = KFold(folds, shuffle=True, random_state=seed)
    else:
        def model():
            search = GridSearchCV(LogisticRegression(max_iter=500), {"C": Cs}, cv=3, scoring="neg_log_loss")
            return make_pipeline(StandardScaler(), search)

        def score(m, X):
            probs = m.predict_proba(X)
            out = np.zeros((len(X), max(n_classes, 2)))
            out[:, m.classes_.astype(int)] = probs
            return out[:, 1:2] if kind == "binary" else out
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    rows = np.flatnonzero(train)
    X, target = embeddings[rows], y[rows]
    width = 1 if kind != "multiclass" else n_classes
    out = np.zeros((len(embeddings), width))
    for fit_idx, score_idx in splitter.split(X, target if kind != "regression" else None):
        out[rows[score_idx]] = score(model().fit(X[fit_idx], target[fit_idx]), X[score_idx])
    rest = np.flatnonzero(~train)
    if rest.size:
        out[rest] = score(model().fit(X, target), embeddings[rest])
    return out


# `--lightgbm-grid`: the settings each LightGBM row is tuned over (on valid), tree size x column share x leaf size.
LIGHTGBM_GRID = [{"num_leaves": leaves, "feature_fraction": share, "min_data_in_leaf": leaf}
                 for leaves in (7, 15, 31) for share in (0.3, 0.8) for leaf in (20, 60)]


def lightgbm_predict(kind: str, table: pa.Table, columns: list[str], n_classes: int, rounds: int, seed: int,
                     threads: int | None = None, grid: bool = False) -> tuple[np.ndarray, dict]:
    """Train on the train split, early-stop on valid; predictions (P(y=1), class probabilities or values) for the
    test rows, and the best iteration. With `grid`, each setting of LIGHTGBM_GRID is trained the same way and the
    best on valid predicts test. Threads default to 1 below 20k rows (OpenMP's thread handoff costs more than it
    saves there: 22 ms per boosting round on 110 rows with 2 threads on a busy 2-core machine)."""
    if not grid:
        return _lightgbm_fit(kind, table, columns, n_classes, rounds, seed, threads, {})
    best = None
    sign = 1 if HIGHER_IS_BETTER[kind] else -1
    for params in LIGHTGBM_GRID:
        pred, info = _lightgbm_fit(kind, table, columns, n_classes, rounds, seed, threads, params)
        if best is None or sign * info["valid"] > sign * best[1]["valid"]:
            best = (pred, {**info, "params": params})
    return best


def _lightgbm_fit(kind: str, table: pa.Table, columns: list[str], n_classes: int, rounds: int, seed: int,
                  threads: int | None, overrides: dict) -> tuple[np.ndarray, dict]:
    booster, X, y, split = lightgbm_train(kind, table, columns, n_classes, rounds, seed, threads, overrides)
    valid, test = split == "valid", split == "test"
    valid_pred = booster.predict(X[valid], num_iteration=booster.best_iteration)
    info = {"best_iteration": booster.best_iteration, "valid": headline(kind, y[valid], valid_pred)}
    return booster.predict(X[test], num_iteration=booster.best_iteration), info


def lightgbm_train(kind: str, table: pa.Table, columns: list[str], n_classes: int, rounds: int, seed: int,
                   threads: int | None = None, overrides: dict | None = None):
    """The LightGBM of every `lightgbm*` row: trained on the table's train split, early-stopped on valid. Returns
    (booster, feature matrix of every row, labels, split)."""
    import lightgbm as lgb

    split = table.column("split").to_numpy(zero_copy_only=False)
    train, valid = split == "train", split == "valid"
    X, categorical = _matrix(table, columns, train)
    threads = threads or (1 if len(X) < 20_000 else min(8, os.cpu_count() or 1))
    y = table.column("label").to_numpy(zero_copy_only=False).astype(np.float64)
    objective = {"binary": ("binary", "auc"), "multiclass": ("multiclass", "multi_logloss"),
                 "regression": ("regression", "rmse")}[kind]
    params = {
        "objective": objective[0], "metric": objective[1], "learning_rate": 0.03, "num_leaves": 15,
        "min_data_in_leaf": 20, "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1,
        "lambda_l2": 1.0, "num_threads": threads, "seed": seed, "verbose": -1, "deterministic": True,
        "force_col_wise": True, **(overrides or {}),
    }
    if kind == "multiclass":
        params["num_class"] = n_classes
    train_set = lgb.Dataset(X[train], y[train], categorical_feature=categorical or "auto", free_raw_data=False)
    valid_set = lgb.Dataset(X[valid], y[valid], reference=train_set)
    booster = lgb.train(params, train_set, num_boost_round=rounds, valid_sets=[valid_set],
                        callbacks=[lgb.early_stopping(50, verbose=False)])
    return booster, X, y, split


def _attach(table: pa.Table, other: pa.Table) -> pa.Table:
    """`table` with `other`'s columns (all but user_id) appended, matched on user_id; users `other` lacks get nulls."""
    rows = pc.index_in(table.column("user_id"), value_set=other.column("user_id"))
    taken = other.take(rows)
    for name in other.column_names:
        if name != "user_id":
            table = table.append_column(name, taken.column(name))
    return table


def _embedding_table(path: Path) -> pa.Table:
    table = pq.read_table(path, columns=["user_id", "embedding"])
    return table.rename_columns(["user_id", "__embedding"])


# --- the pipeline ------------------------------------------------------------------------------------------------


class _Clock:
    """Stage timings with a progress line per finished stage."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.started, self.last, self.timings = log, time.perf_counter(), time.perf_counter(), {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self.last, 1)
        self.log(f"[{now - self.started:7.1f}s] {stage}: {now - self.last:.1f}s")
        self.last = now

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)


def _write_events(con, path: Path, columns: list[str], cutoff, splits: tuple[str, ...] | None) -> int:
    """Pre-cutoff events of population users (of `splits`, or all), raw columns only, ordered by user, time and input
    position (so events of equal time keep their input order and reruns tokenize alike): the only input the
    tokenizers and pretraining ever read."""
    cols = ", ".join('e."' + c.replace('"', '""') + '"' for c in columns)
    where = "" if splits is None else " AND p.split IN (" + ", ".join(f"'{s}'" for s in splits) + ")"
    rel = con.sql(
        f"SELECT {cols} FROM {EVENTS_TABLE} e JOIN {POPULATION_TABLE} p USING ({USER}) "
        f"WHERE e.{TS} < $cutoff{where} ORDER BY e.{USER}, e.{TS}, e.__input, e.__row",
        params={"cutoff": cutoff},
    )
    table = rel.to_arrow_table()
    pq.write_table(table, path)
    return table.num_rows


def _filter_users(table: pa.Table, users: np.ndarray) -> pa.Table:
    return table.filter(pc.is_in(table.column("user_id"), value_set=pa.array(users.tolist(), pa.string())))


def _mean_tokens(table: pa.Table) -> float:
    return float(pc.mean(pc.list_value_length(table.column("input_ids"))).as_py() or 0.0)


@dataclass
class _Fold:
    """Everything one fold built: where its files are, and its per-LM metrics."""

    index: int
    dir: Path
    split: np.ndarray
    sequences: dict[str, Path] = field(default_factory=dict)  # token kind -> sequences of every population user
    # token kind -> what fine-tuning reads when it differs (the as-of token inserted)
    finetune_sequences: dict[str, Path] = field(default_factory=dict)
    models: dict[str, Path] = field(default_factory=dict)  # LM name -> pretrained model dir
    embeddings: dict[str, Path] = field(default_factory=dict)
    pretrain: dict[str, dict] = field(default_factory=dict)


@dataclass
class _AsOf:
    """Prediction times: the real cutoff and the extra ones (train examples only), with their inputs."""

    cutoff: Any
    timezone: str
    token: bool
    extra: list = field(default_factory=list)  # [(as_of, events parquet, users with enough events before it)]
    history: bool = False  # the history tokens after the as-of token
    first_us: dict = field(default_factory=dict)  # user -> first event (UTC us), with history tokens

    def us(self, as_of) -> int:
        return as_of_mod.utc_us(as_of, self.timezone)


def _extra_sequences(table: pa.Table, fold: _Fold, users: list[str], as_of, eligible: set) -> pa.Table:
    """Sequences at an extra cutoff: the fold's train users with enough events, tagged `<user>@<date>`."""
    keep = np.array(sorted(_train_users(users, fold) & eligible), dtype=object)
    return as_of_mod.tagged_users(_filter_users(table, keep), as_of)


def _train_users(users: list[str], fold: _Fold) -> set[str]:
    return set(np.asarray(users)[fold.split == "train"].tolist())


def _domain_sequences(tok, events_all: Path, fold: _Fold, users: list[str], times: _AsOf, context: int,
                      as_of_token: bool, at_cutoff: pa.Table | None = None) -> pa.Table:
    """Every population user's newest window at the cutoff (`at_cutoff` when already tokenized at this length),
    then the extra cutoffs' train examples; with `as_of_token`, windows one token shorter with the token after
    [BOS]."""
    history = as_of_token and times.history
    length = context - as_of_mod.tokens_inserted(history) if as_of_token else context
    gap_token = as_of_mod.gap_token_function(tok) if as_of_token else None
    parts = []
    for as_of, path, eligible in [(times.cutoff, events_all, None), *times.extra]:
        table = at_cutoff if eligible is None and at_cutoff is not None else tok.tokenize(path, max_length=length)
        if eligible is not None:
            table = _extra_sequences(table, fold, users, as_of, eligible)
        if as_of_token:
            first = None
            if history:  # a tagged example's first event is its user's (it has events before its own cutoff)
                first = np.array([times.first_us[u.partition(as_of_mod.SEPARATOR)[0]]
                                  for u in table.column("user_id").to_pylist()], np.int64)
            table = as_of_mod.insert_as_of(table, np.full(table.num_rows, times.us(as_of)), gap_token, first)
        parts.append(table)
    return pa.concat_tables(parts)


def _build_language_models(s: EvaluateSettings, p: dict, schema, fold: _Fold, events_all: Path, users: list[str],
                           lms: list[str], embed_lms: list[str], clock: _Clock, times: _AsOf) -> None:
    from batch.embed import embed_parquet
    from batch.pretrain import pretrain
    from batch.text_baseline import fit_text_baseline, serialize_events, text_sequences
    from domaintok.tokenizer import DomainTokenizer

    context = p["pretrain"]["context_length"]
    # every window of the history: the pretraining file holds each fit user's whole sequence (CoLES LMs read
    # only its newest window, see LANGUAGE_MODELS)
    full_history = any({**p["pretrain"], **LANGUAGE_MODELS[lm].pretrain}.get("windows") == "all" for lm in lms)
    fit_users = np.asarray(users)[fold.split != "test"]
    events_fit = fold.dir / "events_fit.parquet"
    tokens = {LANGUAGE_MODELS[lm].tokens for lm in lms}
    vocab = None
    if "domain" in tokens or "text" in tokens:
        # The text BPE gets the domain tokenizer's vocabulary size, so both transformers have the same size.
        tok = DomainTokenizer.fit(schema, events_fit, max_length=context, bpe_vocab_size=p["domain_bpe_vocab"])
        vocab = tok.vocab_size
        if "domain" in tokens:
            tok.save_pretrained(fold.dir / "domain_tokenizer")
            table = tok.tokenize(events_all, max_length=context)
            if full_history:
                pq.write_table(tok.tokenize(events_fit, max_length=FULL_HISTORY), fold.dir / "domain_pretrain.parquet")
            else:
                pq.write_table(_filter_users(table, fit_users), fold.dir / "domain_pretrain.parquet")
            fold.pretrain["domain_tokens_mean"] = _mean_tokens(table)
            fold.sequences["domain"] = fold.dir / "domain_sequences.parquet"
            if times.extra:
                table = _domain_sequences(tok, events_all, fold, users, times, context, False, at_cutoff=table)
            pq.write_table(table, fold.sequences["domain"])
            if times.token:
                fold.finetune_sequences["domain"] = fold.dir / "domain_sequences_as_of.parquet"
                pq.write_table(_domain_sequences(tok, events_all, fold, users, times, context, True),
                               fold.finetune_sequences["domain"])
        clock.lap(f"fold {fold.index}: domain tokenizer")
    if "text" in tokens:
        text_tok, table = fit_text_baseline(schema, events_fit, events_all, fold.dir / "text_tokenizer", context,
                                            vocab_size=vocab or 2000)
        fold.pretrain["text_tokens_mean"] = _mean_tokens(table)
        if times.extra:  # the text serialization has no as-of token: its extra examples carry event times only
            max_events = max(8, context // 4)
            table = pa.concat_tables([table] + [
                _extra_sequences(text_sequences(text_tok, serialize_events(schema, path, max_events), context), fold,
                                 users, as_of, eligible) for as_of, path, eligible in times.extra])
        fold.sequences["text"] = fold.dir / "text_sequences.parquet"
        pq.write_table(table, fold.sequences["text"])
        if full_history:
            history = text_sequences(text_tok, serialize_events(schema, events_fit), FULL_HISTORY)
            pq.write_table(history, fold.dir / "text_pretrain.parquet")
        else:
            pq.write_table(_filter_users(table, fit_users), fold.dir / "text_pretrain.parquet")
        clock.lap(f"fold {fold.index}: text tokenizer")
    for lm in lms:
        kind = LANGUAGE_MODELS[lm].tokens
        output = fold.dir / "models" / lm
        options = {**p["pretrain"], **LANGUAGE_MODELS[lm].pretrain}
        options.setdefault("save_steps", options.get("max_steps"))
        if kind != "domain":
            options.pop("actionpiece_spr", None)  # the text serialization's BPE has no merges to permute or compose
            options.pop("actionpiece_compose", None)
        settings = PretrainSettings(sequences=fold.dir / f"{kind}_pretrain.parquet",
                                    tokenizer=fold.dir / f"{kind}_tokenizer", output=output, seed=s.seed, **options)
        shutil.rmtree(settings.resolved_checkpoint_dir(), ignore_errors=True)  # a rerun starts over
        m = pretrain(settings)
        shutil.rmtree(settings.resolved_checkpoint_dir(), ignore_errors=True)
        fold.models[lm] = output
        fold.pretrain[lm] = {k: m.get(k) for k in ("parameters", "non_embedding_parameters", "vocab_size", "steps",
                                                   "train_loss", "eval_loss", "train_seconds", "tokens_per_second")}
        fold.pretrain[lm]["tokens_mean"] = fold.pretrain[f"{kind}_tokens_mean"]
        clock.lap(f"fold {fold.index}: pretrain {lm}")
    for lm in embed_lms:
        fold.embeddings[lm] = fold.dir / f"embeddings_{lm}.parquet"
        embed_parquet(fold.models[lm], fold.sequences[LANGUAGE_MODELS[lm].tokens], fold.embeddings[lm], progress=False)
        clock.lap(f"fold {fold.index}: embed {lm}")


def _classes(labels: pa.Table, kind: str) -> list[str]:
    return sorted(set(labels.column("label").to_pylist())) if kind == "multiclass" else []


def _encoded_labels(labels: pa.Table, kind: str, classes: list[str]) -> np.ndarray:
    if kind == "multiclass":
        return pc.index_in(labels.column("label"), value_set=pa.array(classes, pa.string())).to_numpy(
            zero_copy_only=False).astype(np.int64)
    return labels.column("label").to_numpy(zero_copy_only=False).astype(np.float64)


def _run_lightgbm(method: Method, kind: str, labels: pa.Table, features: pa.Table, fold: _Fold, classes: list[str],
                  rounds: int, seed: int, grid: bool = False) -> tuple[list[str], np.ndarray, dict]:
    table = labels
    if kind == "multiclass":
        table = table.set_column(2, "label", pa.array(_encoded_labels(labels, kind, classes)))
    columns: list[str] = []
    table = table.sort_by("user_id")
    if "aggregates" in method.inputs:
        table = _attach(table, features)
        columns += [c for c in features.column_names if c != "user_id"]
    if "embeddings" in method.inputs or "embedding_score" in method.inputs:
        table = _attach(table, _embedding_table(fold.embeddings[method.lm]))
        table = table.filter(pc.is_valid(table.column("__embedding")))
    if "embeddings" in method.inputs:
        columns.append("__embedding")
    if "embedding_score" in method.inputs:
        split = table.column("split").to_numpy(zero_copy_only=False)
        emb, _ = _matrix(table, ["__embedding"], split == "train")
        y = table.column("label").to_numpy(zero_copy_only=False).astype(np.float64)
        scores = embedding_scores(kind, emb, y, split == "train", len(classes), seed)
        table = table.append_column("__embedding_score", pa.FixedSizeListArray.from_arrays(
            pa.array(scores.ravel()), scores.shape[1]))
        columns.append("__embedding_score")
    pred, info = lightgbm_predict(kind, table, columns, len(classes), rounds, seed, grid=grid)
    test_users = table.filter(pc.equal(table.column("split"), "test")).column("user_id").to_pylist()
    return test_users, pred, info


def _read_predictions(path: Path, kind: str, classes: list[str], class_names: list[str]) -> tuple[list[str], np.ndarray]:
    """A finetune predictions.parquet as (users, predictions), multiclass probabilities reordered to `classes`."""
    table = pq.read_table(path)
    users = table.column("user_id").to_pylist()
    if kind != "multiclass":
        return users, table.column("prediction").to_numpy(zero_copy_only=False).astype(np.float64)
    if "probabilities" in table.column_names:
        probs = table.column("probabilities").combine_chunks()
        width = len(class_names)
        matrix = probs.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(users), width)
        columns = {name: matrix[:, i] for i, name in enumerate(class_names)}
    else:  # one column per class: prob_<class>
        columns = {}
        for name in classes:
            found = [c for c in (f"prob_{name}", f"probability_{name}", f"p_{name}") if c in table.column_names]
            if not found:
                raise DomaintokError(f"{path}: no probability column for class {name!r} (columns: {table.column_names})")
            columns[name] = table.column(found[0]).to_numpy(zero_copy_only=False).astype(np.float64)
    return users, np.stack([columns.get(c, np.zeros(len(users))) for c in classes], axis=1)


def _run_finetune(s: EvaluateSettings, p: dict, name: str, method: Method, task: TaskSpec, fold: _Fold,
                  labels_path: Path, features_path: Path, classes: list[str]) -> tuple[list[str], np.ndarray, dict]:
    from batch.finetune import finetune

    use_sequence = "sequence" in method.inputs
    kind = LANGUAGE_MODELS[method.lm].tokens
    base = p["finetune_sequence"] if use_sequence else p["finetune_tabular"]
    options = {**base, **method.finetune}
    output = fold.dir / "finetuned" / f"{task.name}_{name}"
    settings = FinetuneSettings(
        model=fold.models[method.lm], sequences=fold.finetune_sequences.get(kind, fold.sequences[kind]),
        labels=labels_path, features=features_path if "aggregates" in method.inputs else None,
        use_sequence=use_sequence, output=output, task=task.kind, split="column", seed=s.seed,
        progress=s.progress, **options,
    )
    # a killed evaluation's checkpoints: this run starts afresh
    shutil.rmtree(settings.resolved_checkpoint_dir(), ignore_errors=True)
    metrics = finetune(settings)
    users, pred = _read_predictions(output / "predictions.parquet", task.kind, classes, metrics.get("class_names") or [])
    info = {k: metrics.get(k) for k in ("best_step", "best_stage", "still_improving", "steps", "train_seconds",
                                        "trainable_parameters")}
    info["valid"] = (metrics.get("valid") or {}).get(HEADLINE[task.kind])
    return users, pred, info


def run_evaluation(settings: EvaluateSettings) -> dict:
    """Run the whole comparison; writes results.json, results.md and results.png into settings.output."""
    from domaintok.schema import load_schema

    s = settings
    p = s.resolved_preset()
    methods = selected_methods(s.methods)
    spec: TasksFile = load_tasks(s.tasks)
    schema = load_schema(s.schema)
    _check_settings(s, p)
    for option in ("actionpiece_spr", "actionpiece_compose"):
        if p["pretrain"].get(option) and schema.actionpiece is None:
            raise DomaintokError(f"--{option.replace('_', '-')}: schema {schema.name!r} has no actionpiece merges")
    cutoffs = _prediction_times(s, p, spec, schema)  # refused before any work
    out = Path(s.output)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    clock = _Clock(s.log)
    data = _prepare_inputs(s, p, spec, schema, work, clock, cutoffs)
    lms = sorted({METHODS[m].lm for m in methods if METHODS[m].lm})
    # predictions[task][method] = one (y, prediction) per fold on that fold's test users, aligned across methods
    per_fold: dict[str, dict[str, list]] = {t.name: {m: [] for m in methods} for t in spec.tasks}
    infos: dict[str, dict[str, list]] = {t.name: {m: [] for m in methods} for t in spec.tasks}
    folds_meta = []
    pretrain_meta: dict[str, dict] = {}
    for k in range(s.folds):
        fold = _run_fold(s, p, k, spec, schema, data, methods, lms, per_fold, infos, clock)
        folds_meta.append({k2: int((fold.split == k2).sum()) for k2 in ("train", "valid", "test")})
        if k == 0:
            pretrain_meta = {lm: fold.pretrain[lm] for lm in lms}
    results = _compare(spec, methods, per_fold, infos, p["bootstrap"], s.seed)
    report = _report(s, p, spec, schema, data, methods, folds_meta, pretrain_meta, results, clock)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "results.md").write_text(render_markdown(report))
    plot_relative(report, out / "results.png")
    s.log(f"wrote {out / 'results.md'}, results.json and results.png in {report['total_seconds']:.0f}s")
    return report


def _check_settings(s: EvaluateSettings, p: dict) -> None:
    """Refuse bad folds and preset options before anything runs; set torch's threads."""
    if s.folds < 1:
        raise DomaintokError(f"--folds must be >= 1, got {s.folds}")
    for key, options in (("finetune_sequence", p["finetune_sequence"]), ("finetune_tabular", p["finetune_tabular"])):
        check_options(FinetuneSettings, options, f"preset {s.preset!r} {key}")
    check_options(PretrainSettings, p["pretrain"], f"preset {s.preset!r} pretrain")
    if p["torch_threads"]:
        import torch

        torch.set_num_threads(p["torch_threads"])


@dataclass
class _Inputs:
    """What every fold shares: the events connection, the population, the aggregates and the pre-cutoff events."""

    con: Any
    users: Any
    features: Any
    features_path: Path
    n_aggregates: int
    events_all: Path
    n_events: int
    work: Path
    times: _AsOf


def _prepare_inputs(s: EvaluateSettings, p: dict, spec: TasksFile, schema, work: Path, clock,
                    cutoffs: list) -> _Inputs:
    con = open_events(schema, [Path(e) for e in s.events])
    users = build_population(con, spec, p["max_users"])
    register_split(con, users, assign_split(users, spec.split))
    clock.lap(f"events: {len(users):,} users")
    features = aggregate_features(con, schema, spec.cutoff, s.windows)
    n_aggregates = features.num_columns - 1
    if s.features is not None:
        features = join_extra_features(features, Path(s.features))
    events_all = work / "events_inputs.parquet"
    n_events = _write_events(con, events_all, raw_column_names(schema), spec.cutoff, None)
    times = _AsOf(spec.cutoff, schema.timezone, bool(p["as_of_token"]), history=bool(p["history_tokens"]))
    if times.history:
        times.first_us = dict(con.sql(
            f"SELECT {USER}, epoch_us(min({TS})) FROM {EVENTS_TABLE} WHERE {TS} < $cutoff GROUP BY {USER}",
            params={"cutoff": spec.cutoff}).fetchall())
    extra_features = []
    for k, as_of in enumerate(cutoffs, start=1):
        at = aggregate_features(con, schema, as_of, s.windows)
        at = at.filter(pc.greater_equal(at.column("event_count"), float(spec.min_events)))
        path = work / f"events_inputs_extra{k}.parquet"
        _write_events(con, path, raw_column_names(schema), as_of, None)
        times.extra.append((as_of, path, set(at.column("user_id").to_pylist())))
        extra_features.append(as_of_mod.tagged_users(at, as_of))
    if extra_features:  # the extra examples' aggregates, measured at their own cutoffs
        features = pa.concat_tables([features, *extra_features])
    features_path = work / "features.parquet"
    pq.write_table(features, features_path)
    clock.lap(f"aggregates: {n_aggregates} columns" + (f", {len(times.extra)} extra cutoffs" if times.extra else ""))
    return _Inputs(con, users, features, features_path, n_aggregates, events_all, n_events, work, times)


def _prediction_times(s: EvaluateSettings, p: dict, spec: TasksFile, schema) -> list:
    """Resolve the as-of token and the extra cutoffs (into `p`, which the report records) and return the extra
    cutoffs' times. Asked for on the command line, each is refused where it cannot apply; as a preset default it
    applies where it can and says why not elsewhere: the as-of token needs a temporal field with gap tokens, extra
    cutoffs need every task's labels from events (a label file holds them at the real cutoff only) and no
    `--features` (a user's columns describe the real cutoff)."""
    if p["as_of_token"] and not any(as_of_mod.emits_gap_tokens(f) for f in schema.fields):
        if s.as_of_token:
            raise DomaintokError(f"--as-of-token: {as_of_mod.NO_GAP_TOKENS}")
        s.log(f"as-of token off: {as_of_mod.NO_GAP_TOKENS}")
        p["as_of_token"] = False
    if p["history_tokens"] and not p["as_of_token"]:
        if s.history_tokens:
            raise DomaintokError("--history-tokens: they follow the as-of token; give --as-of-token too")
        p["history_tokens"] = False
    if not p["extra_cutoffs"]:
        return []
    file_tasks = [t.name for t in spec.tasks if not isinstance(t.label, EventsLabel)]
    why = (f"task {file_tasks[0]!r} takes its labels from a file, which holds them at the real cutoff only"
           if file_tasks else
           "--features describes users at the real cutoff, not at the earlier ones" if s.features is not None else None)
    if why:
        if s.extra_cutoffs:
            raise DomaintokError(f"--extra-cutoffs: {why}")
        s.log(f"extra cutoffs off: {why}")
        p["extra_cutoffs"] = 0
        return []
    horizons = [t.label.horizon_days for t in spec.tasks]
    every = p["extra_cutoff_days"] or max(horizons)
    return as_of_mod.extra_cutoffs(spec.cutoff, p["extra_cutoffs"], every, horizons)


def _run_fold(s, p, k: int, spec: TasksFile, schema, data: _Inputs, methods, lms, per_fold, infos, clock) -> _Fold:
    """One rotation of the user-hash split: its tokenizers and language models, then every task's methods, scored
    on the users every method scored."""
    fold = _Fold(k, data.work / f"fold{k}", assign_split(data.users, spec.split, k, s.folds))
    fold.dir.mkdir(parents=True, exist_ok=True)
    register_split(data.con, data.users, fold.split)
    _write_events(data.con, fold.dir / "events_fit.parquet", raw_column_names(schema), spec.cutoff, ("train", "valid"))
    embed_lms = sorted({METHODS[m].lm for m in methods if {"embeddings", "embedding_score"} & set(METHODS[m].inputs)})
    _build_language_models(s, p, schema, fold, data.events_all, data.users, lms, embed_lms, clock, data.times)
    for task in spec.tasks:
        labels = _labels(data, spec, task, fold)
        labels_path = fold.dir / f"labels_{task.name}.parquet"
        pq.write_table(labels, labels_path)
        classes = _classes(labels, task.kind)
        truth = dict(zip(labels.column("user_id").to_pylist(), _encoded_labels(labels, task.kind, classes)))
        preds = {}
        for name in methods:
            method = METHODS[name]
            if method.trainer == "lightgbm":
                preds[name] = _run_lightgbm(method, task.kind, labels, data.features, fold, classes,
                                            p["lightgbm_rounds"], s.seed, p["lightgbm_grid"])
            else:
                preds[name] = _run_finetune(s, p, name, method, task, fold, labels_path, data.features_path, classes)
            clock.lap(f"fold {k}: {task.name}: {name}")
        common = sorted(set.intersection(*(set(u) for u, _, _ in preds.values())))
        if not common:
            raise DomaintokError(f"task {task.name!r}: no test user is scored by every method")
        y = np.array([truth[u] for u in common])
        for name, (u, pred, info) in preds.items():
            index = {user: i for i, user in enumerate(u)}
            per_fold[task.name][name].append((y, pred[[index[c] for c in common]]))
            infos[task.name][name].append(info)
    return fold


def _labels(data: _Inputs, spec: TasksFile, task: TaskSpec, fold: _Fold) -> pa.Table:
    """The task's labels at the cutoff, then the extra cutoffs' (train users with enough events before each)."""
    parts = [build_labels(data.con, spec, task)]
    train = _train_users(data.users, fold)
    for as_of, _, eligible in data.times.extra:
        at = build_labels(data.con, msgspec.structs.replace(spec, cutoff=as_of), task)
        keep = pa.array(sorted(train & eligible), pa.string())
        parts.append(as_of_mod.tagged_users(at.filter(pc.is_in(at.column("user_id"), value_set=keep)), as_of))
    return pa.concat_tables(parts)


def _report(s, p, spec: TasksFile, schema, data: _Inputs, methods, folds_meta, pretrain_meta, results, clock) -> dict:
    """results.json: the settings, the population, each method's definition and results, and the timings."""
    return {
        "schema": schema.name,
        "timezone": schema.timezone,
        "events": [str(e) for e in s.events],
        "tasks_file": str(s.tasks),
        "cutoff": spec.cutoff.isoformat(sep=" "),
        "split": msgspec_builtins(spec.split),
        "population": {"users": len(data.users), "events": data.n_events, "min_events": spec.min_events},
        "folds": s.folds,
        "fold_sizes": folds_meta,
        "tasks": [{"name": t.name, "kind": t.kind, "definition": describe_task(spec, t)} for t in spec.tasks],
        "preset": s.preset,
        "settings": p,
        "feature_count": data.n_aggregates,
        "extra_features": str(s.features) if s.features else None,
        "methods": {m: {"title": METHODS[m].title, "trainer": METHODS[m].trainer, "inputs": list(METHODS[m].inputs),
                        "lm": METHODS[m].lm, "finetune": METHODS[m].finetune,
                        "pretrain": LANGUAGE_MODELS[METHODS[m].lm].pretrain if METHODS[m].lm else None}
                    for m in methods},
        "pretrain": pretrain_meta,
        "results": results,
        "timings_seconds": clock.timings,
        "total_seconds": clock.total,
        "machine": {"python": platform.python_version(), "processor": platform.machine(),
                    "torch_threads": _torch_threads()},
    }


def msgspec_builtins(struct) -> dict:
    import msgspec

    return msgspec.to_builtins(struct)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _compare(spec: TasksFile, methods: list[str], per_fold: dict, infos: dict, n_boot: int, seed: int) -> dict:
    """Per task and method: test metrics (fold means), per-fold metrics, and the relative difference to LightGBM
    with its paired bootstrap interval."""
    results: dict[str, dict] = {}
    for task in spec.tasks:
        rows = {}
        for name in methods:
            folds = per_fold[task.name][name]
            fold_metrics = [kind_metrics(task.kind, y, pred) for y, pred in folds]
            test = {k: _mean([m.get(k) for m in fold_metrics]) for k in fold_metrics[0] if k != "n"}
            test["n"] = sum(m["n"] for m in fold_metrics)
            row = {"title": METHODS[name].title, "test": test, "folds": fold_metrics, "train": infos[task.name][name],
                   # the selection metric on valid (fold mean): what settings are chosen on, never test
                   "valid": _mean([i.get("valid") for i in infos[task.name][name]])}
            if name != "lightgbm":
                base = per_fold[task.name]["lightgbm"]
                row["vs_lightgbm"] = bootstrap_relative(
                    task.kind, [(y, b, o) for (y, b), (_, o) in zip(base, folds)], n_boot, seed)
            else:
                row["vs_lightgbm"] = {"relative": 0.0}
            rows[name] = row
        results[task.name] = rows
    return results


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# --- CLI ---------------------------------------------------------------------------------------------------------


def _split_methods(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(m.strip() for v in values for m in v.split(",") if m.strip())


@click.command("evaluate")
@click.option("--schema", default=None, help="Domain schema: the name of a schema shipped with domaintok, or a yaml path.")
@click.option("--events", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Events parquet file or a directory of them (repeat for several).")
@click.option("--tasks", "tasks_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="TASKS.yaml: cutoff, split, tasks (see the README).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for results.md/json/png and the intermediate files (under work/).")
@click.option("--preset", type=click.Choice([*EVAL_PRESETS, *PRESET_ALIASES]), default="small", show_default=True,
              help="quick: a smoke run (<= 400 users, tiny model); small: the README's 2 x 64 CPU run.")
@click.option("--methods", "methods", multiple=True,
              help=f"Comma-separated methods, or all (default: {', '.join(DEFAULT_METHODS)}; more: "
                   f"{', '.join(m for m in METHODS if m not in DEFAULT_METHODS)}); lightgbm always runs.")
@click.option("--features", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Your own feature parquet (user_id + columns), joined to the aggregates.")
@click.option("--folds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repeat everything (tokenizers, pretraining, training) on K rotated user-hash splits.")
@click.option("--max-users", type=click.IntRange(min=20), default=None, help="Cap on users (deterministic by hash).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Pretraining steps (overrides the preset).")
@click.option("--context-length", type=click.IntRange(min=16), default=None, help="Tokens per sequence.")
@click.option("--pretrain-windows", type=click.Choice(["newest", "all"]), default=None,
              help="Pretraining reads each user's newest window, or every window of the history (preset default).")
@click.option("--pooling", type=click.Choice(["last", "mean"]), default=None,
              help="User embedding of the transformers: the last token's state or the mean (preset default: mean).")
@click.option("--bootstrap", type=click.IntRange(min=0), default=None, help="Bootstrap replicates (preset default).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads (default: 1 for quick, torch's default for small).")
@click.option("--lightgbm-grid/--no-lightgbm-grid", default=None,
              help="Tune every LightGBM row on valid over 12 settings (leaves, column share, leaf size); preset: off.")
@click.option("--as-of-token/--no-as-of-token", default=None,
              help="Fine-tuned domain models read, after [BOS], the gap from the user's newest event to the prediction "
                   "time (the schema's gap tokens); preset: off.")
@click.option("--history-tokens/--no-history-tokens", default=None,
              help="With --as-of-token: two more tokens after it, the user's tenure and mean time between events "
                   "over the whole history (the same gap tokens); preset: off.")
@click.option("--extra-cutoffs", type=click.IntRange(min=0), default=None,
              help="More train examples: train users again at K earlier cutoffs (their own labels and aggregates); "
                   "preset: 0.")
@click.option("--extra-cutoff-days", type=click.IntRange(min=1), default=None,
              help="Days between those cutoffs (default: the longest task horizon, its minimum).")
@click.option("--actionpiece-spr", type=click.FloatRange(0, 1), default=None, metavar="RATE",
              help="With a schema with ActionPiece merges: pretrain the domain model with this share of its training "
                   "windows randomly segmented (set permutation regularization); preset: 0, off.")
@click.option("--actionpiece-compose/--no-actionpiece-compose", default=None,
              help="With a schema with ActionPiece merges: the domain model embeds each merged token as its own vector "
                   "plus the mean of its parts' (pretrain --actionpiece-compose); preset: off.")
@click.option("--lm-weight", type=click.FloatRange(min=0), default=None,
              help="Fine-tuned sequence rows keep their next-token loss at this weight beside the task loss "
                   "(finetune --lm-weight); preset: 0, off.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed (the split's seed is in TASKS.yaml).")
def command(schema, events, tasks_file, output, preset, methods, features, folds, max_users, max_steps,
            context_length, pretrain_windows, pooling, bootstrap, threads, lightgbm_grid, as_of_token, history_tokens,
            extra_cutoffs, extra_cutoff_days, actionpiece_spr, actionpiece_compose, lm_weight, seed):
    """Compare LightGBM on generic aggregates with the domain transformer (alone, fused, frozen embeddings) and a
    text-serialization transformer, on your schema, events and tasks. Writes OUTPUT/results.md, results.json and
    results.png.
    """
    missing = [name for name, value in (("--schema", schema), ("--events", events), ("--tasks", tasks_file),
                                        ("--output", output)) if not value]
    if missing:
        raise DomaintokError(f"needs {', '.join(missing)} (e.g. --schema online_retail --events DATA.parquet --tasks "
                             "examples/online_retail/tasks.yaml --output runs/eval; see examples/online_retail)")
    settings = EvaluateSettings(
        schema=schema, events=tuple(events), tasks=tasks_file, output=output, preset=preset,
        methods=_split_methods(methods) or DEFAULT_METHODS, features=features, folds=folds, max_users=max_users,
        max_steps=max_steps, context_length=context_length, pretrain_windows=pretrain_windows, pooling=pooling,
        bootstrap=bootstrap, threads=threads, lightgbm_grid=lightgbm_grid, as_of_token=as_of_token,
        history_tokens=history_tokens, extra_cutoffs=extra_cutoffs, extra_cutoff_days=extra_cutoff_days,
        actionpiece_spr=actionpiece_spr, actionpiece_compose=actionpiece_compose, lm_weight=lm_weight, seed=seed,
        progress=preset not in ("quick", "tiny"), log=lambda m: click.echo(m, err=True),
    )
    report = run_evaluation(settings)
    for task in report["tasks"]:
        metric = HEADLINE[task["kind"]]
        rows = report["results"][task["name"]]
        click.echo(f"{task['name']} ({metric}): " + ", ".join(
            f"{m} {r['test'][metric]:.4f}" if r["test"].get(metric) is not None else f"{m} -" for m, r in rows.items()))


__all__ = ["EvaluateSettings", "run_evaluation", "lightgbm_predict", "check_options", "selected_methods",
           "Method", "LanguageModel", "METHODS", "DEFAULT_METHODS", "LANGUAGE_MODELS", "EVAL_PRESETS", "command"]
