"""`domaintok evaluate`: domain tokens vs text serialization vs LightGBM on the Online Retail tasks, end to end.

One run builds the tasks at a cutoff, fits both tokenizers and pretrains both transformers on pre-cutoff events of
train+valid users, fine-tunes (with and without joint fusion), trains LightGBM on RFM features, writes results.md/json.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.finetune import FinetuneSettings, finetune, task_metrics
from batch.pretrain import PretrainSettings, pretrain
from batch.retail_tasks import (
    CATEGORICAL_FEATURES,
    DEFAULT_CUTOFF,
    DEFAULT_HORIZON_DAYS,
    NUMERIC_FEATURES,
    RetailTasks,
    build_retail_tasks,
)
from batch.text_baseline import fit_text_baseline
from domaintok.errors import DomaintokError

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "online_retail"

# Sizes of one evaluation. Both transformers get the same architecture, context and step budgets.
EVAL_PRESETS: dict[str, dict[str, Any]] = {
    # The test's smoke run (< 3 minutes on 2 CPU cores): 400 users, a 2-layer width-32 model, a few steps.
    "tiny": {
        "model_preset": "tiny", "model_overrides": {}, "context_length": 64, "pretrain_steps": 30,
        "pretrain_batch_size": 16, "finetune_epochs": 1, "finetune_batch_size": 16, "domain_bpe_vocab": 300,
        "max_users": 400, "lightgbm_rounds": 200, "tabular_epochs": 5,
    },
    # The full CPU run: every customer, 2 layers of width 64, 128-token windows (about 8 line items as domain
    # tokens, 5 as text), 600 pretraining steps of 32 sequences, up to 5 fine-tuning epochs: under 10 minutes on 2
    # cores for both tasks (measured 6.6 minutes with 3 epochs on a shared 2-core machine). A 512-token
    # window cost about 5x and did not help in one trial (domain-token AUC 0.65 vs 0.71, text 0.745 vs 0.737).
    "small": {
        "model_preset": "tiny",
        "model_overrides": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 256},
        "context_length": 128, "pretrain_steps": 600, "pretrain_batch_size": 32, "finetune_epochs": 5,
        "finetune_batch_size": 32, "domain_bpe_vocab": 2000, "max_users": None,
        "lightgbm_rounds": 2000, "tabular_epochs": 30,
    },
}
TASK_NAMES = ("purchase", "spend")
# What the table compares; each sequence method fine-tunes its own pretrained transformer.
METHODS = ("lightgbm", "tabular_dcnv2", "text_bpe", "domain", "domain_fusion")
METHOD_TITLES = {
    "lightgbm": "LightGBM on RFM features",
    "tabular_dcnv2": "PLR/DCNv2 on RFM features alone (fusion's tabular branch)",
    "text_bpe": "Transformer on text serialization (byte-level BPE)",
    "domain": "Transformer on domain tokens",
    "domain_fusion": "Domain tokens + joint fusion (PLR/DCNv2 on RFM features)",
}


@dataclass
class EvaluateSettings:
    """An evaluation run: where the data is, where results go, which preset, and overrides."""

    data_dir: Path = DEFAULT_DATA_DIR
    output: Path = Path("runs/eval_retail")
    preset: str = "small"
    max_steps: int | None = None
    max_users: int | None = None
    context_length: int | None = None
    cutoff: dt.datetime = DEFAULT_CUTOFF
    horizon_days: int = DEFAULT_HORIZON_DAYS
    tasks: tuple[str, ...] = TASK_NAMES
    schema: str | Path = "online_retail"
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    bootstrap: int = 1000
    progress: bool = True
    log: Any = field(default=print, repr=False)

    def resolved(self) -> dict[str, Any]:
        if self.preset not in EVAL_PRESETS:
            raise DomaintokError(
                f"unknown evaluation preset {self.preset!r}: expected one of {', '.join(EVAL_PRESETS)}"
            )
        bad = [t for t in self.tasks if t not in TASK_NAMES]
        if bad:
            raise DomaintokError(f"unknown task {bad[0]!r}: expected one of {', '.join(TASK_NAMES)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or "lightgbm" not in self.methods:
            raise DomaintokError(f"methods must include lightgbm (the reference) and come from {', '.join(METHODS)}")
        p = dict(EVAL_PRESETS[self.preset])
        if self.max_steps is not None:
            p["pretrain_steps"] = self.max_steps
        if self.max_users is not None:
            p["max_users"] = self.max_users
        if self.context_length is not None:
            p["context_length"] = self.context_length
        return p


# --- LightGBM baseline -------------------------------------------------------------------------------------------


def lightgbm_baseline(tasks: RetailTasks, task: str, rounds: int, seed: int) -> tuple[dict, dict[str, float]]:
    """LightGBM on the RFM features (country as a categorical), early-stopped on valid; test metrics and
    {user_id: prediction} on the test users."""
    import lightgbm as lgb

    joined = _features_with_labels(tasks, task)
    split = np.asarray(joined.column("split").to_pylist())
    train = split == "train"
    columns = [joined.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in NUMERIC_FEATURES]
    categorical_index = []
    for name in CATEGORICAL_FEATURES:
        values = joined.column(name).to_pylist()
        # Codes from the train split only; unseen and null values share -1 (LightGBM's missing category).
        vocabulary = {v: i for i, v in enumerate(sorted({v for v, t in zip(values, train) if t and v is not None}))}
        columns.append(np.array([vocabulary.get(v, -1) for v in values], dtype=np.float64))
        categorical_index.append(len(columns) - 1)
    X = np.stack(columns, axis=1)  # (N, features)
    y = joined.column("target").to_numpy(zero_copy_only=False).astype(np.float64)
    valid, test = split == "valid", split == "test"
    params = {
        "objective": "binary" if task == "purchase" else "regression",
        "metric": "auc" if task == "purchase" else "rmse",
        "learning_rate": 0.03, "num_leaves": 15, "min_data_in_leaf": 20, "feature_fraction": 0.8,
        "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0, "num_threads": 2, "seed": seed,
        "verbose": -1, "deterministic": True, "force_col_wise": True,
    }
    names = [*NUMERIC_FEATURES, *CATEGORICAL_FEATURES]
    train_set = lgb.Dataset(X[train], y[train], feature_name=names, categorical_feature=categorical_index)
    valid_set = lgb.Dataset(X[valid], y[valid], reference=train_set)
    booster = lgb.train(params, train_set, num_boost_round=rounds, valid_sets=[valid_set],
                        callbacks=[lgb.early_stopping(50, verbose=False)])
    pred = booster.predict(X[test], num_iteration=booster.best_iteration)
    metrics = task_metrics("binary" if task == "purchase" else "regression", y[test], pred)
    metrics["best_iteration"] = int(booster.best_iteration)
    importance = booster.feature_importance("gain")
    metrics["top_features"] = [names[i] for i in np.argsort(-importance)[:5]]
    users = np.asarray(joined.column("user_id").to_pylist())[test]
    return metrics, dict(zip(users.tolist(), pred.tolist()))


def _features_with_labels(tasks: RetailTasks, task: str) -> pa.Table:
    target = "label" if task == "purchase" else "spend"
    labels = tasks.labels.select(["user_id", "split", target]).rename_columns(["user_id", "split", "target"])
    return labels.join(tasks.features, "user_id", join_type="left outer").sort_by("user_id")


# --- paired bootstrap of metric differences ----------------------------------------------------------------------


def fast_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties get average ranks)."""
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    # Average ranks over runs of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_p)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(p)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_delta(y: np.ndarray, base: np.ndarray, other: np.ndarray, task: str, n: int, seed: int) -> dict:
    """Paired bootstrap over test users of (other - base): AUC for binary, RMSE for regression; 95% interval."""
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        yy = y[idx]
        if task == "purchase":
            if yy.min() == yy.max():
                continue
            deltas.append(fast_auc(yy, other[idx]) - fast_auc(yy, base[idx]))
        else:
            deltas.append(np.sqrt(np.mean((other[idx] - yy) ** 2)) - np.sqrt(np.mean((base[idx] - yy) ** 2)))
    if not deltas:
        return {}
    deltas = np.asarray(deltas)
    return {"low": float(np.quantile(deltas, 0.025)), "high": float(np.quantile(deltas, 0.975)),
            "p_better": float(np.mean(deltas > 0) if task == "purchase" else np.mean(deltas < 0))}


# --- the pipeline -------------------------------------------------------------------------------------------------


def _write_sequences(table: pa.Table, users: set[str] | None, path: Path) -> Path:
    if users is not None:
        keep = pc.is_in(table.column("user_id"), value_set=pa.array(sorted(users), pa.string()))
        table = table.filter(keep)
    pq.write_table(table, path)
    return path


def _mean_tokens(table: pa.Table) -> float:
    return float(pc.mean(pc.list_value_length(table.column("input_ids"))).as_py())


def _pretrain(name: str, sequences: Path, tokenizer: Path, work: Path, p: dict, seed: int) -> dict:
    output = work / "models" / f"{name}_lm"
    checkpoints = output.with_name(output.name + ".checkpoints")
    if checkpoints.exists():  # a rerun starts over rather than resuming another run's schedule
        shutil.rmtree(checkpoints)
    metrics = pretrain(PretrainSettings(
        sequences=sequences, tokenizer=tokenizer, output=output, preset=p["model_preset"],
        context_length=p["context_length"], max_steps=p["pretrain_steps"], batch_size=p["pretrain_batch_size"],
        save_steps=p["pretrain_steps"], seed=seed, overrides=dict(p["model_overrides"]),
    ))
    shutil.rmtree(checkpoints, ignore_errors=True)
    return metrics


def run_evaluation(settings: EvaluateSettings) -> dict:
    """Run the whole comparison; writes <output>/results.json and results.md and returns the results."""
    from domaintok.tokenizer import DomainTokenizer

    s = settings
    p = s.resolved()
    log = s.log
    out = Path(s.output)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        log(f"[{now - t0:7.1f}s] {name} done in {now - since:.1f}s")
        return now

    t = time.perf_counter()
    tasks = build_retail_tasks(s.data_dir, cutoff=s.cutoff, horizon_days=s.horizon_days, max_users=p["max_users"])
    summary = tasks.summary()
    fit_users = tasks.users_in("train", "valid")
    fit_events = tasks.events_of(fit_users)
    pq.write_table(tasks.labels.select(["user_id", "split", "label", "label_ts"]), work / "labels_purchase.parquet")
    spend = tasks.labels.select(["user_id", "split", "spend", "label_ts"]).rename_columns(
        ["user_id", "split", "label", "label_ts"])
    pq.write_table(spend, work / "labels_spend.parquet")
    pq.write_table(tasks.features, work / "features.parquet")
    t = lap("tasks", t)

    # Domain tokens: fitted on pre-cutoff events of train+valid users only. Always built: the tabular-only model
    # reads the same join (and the transformer's config) even though it ignores the tokens.
    domain_tok = DomainTokenizer.fit(s.schema, fit_events, max_length=p["context_length"],
                                     bpe_vocab_size=p["domain_bpe_vocab"])
    domain_tok.save_pretrained(work / "domain_tokenizer")
    domain_all = domain_tok.tokenize(tasks.events, max_length=p["context_length"])
    sequence_files = {"domain": _write_sequences(domain_all, None, work / "domain_sequences.parquet")}
    pretrain_files = {"domain": _write_sequences(domain_all, fit_users, work / "domain_pretrain.parquet")}
    tokens_mean = {"domain": _mean_tokens(domain_all)}
    t = lap("domain tokenizer", t)

    if "text_bpe" in s.methods:
        # The text BPE gets the domain tokenizer's vocabulary size: both transformers have exactly the same size.
        _, text_all = fit_text_baseline(fit_events, tasks.events, work / "text_tokenizer", p["context_length"],
                                        vocab_size=domain_tok.vocab_size)
        sequence_files["text_bpe"] = _write_sequences(text_all, None, work / "text_sequences.parquet")
        pretrain_files["text_bpe"] = _write_sequences(text_all, fit_users, work / "text_pretrain.parquet")
        tokens_mean["text_bpe"] = _mean_tokens(text_all)
        t = lap("text tokenizer", t)

    pretrain_metrics = {}
    for name, sequences in pretrain_files.items():
        tokenizer = work / ("domain_tokenizer" if name == "domain" else "text_tokenizer")
        m = _pretrain(name, sequences, tokenizer, work, p, s.seed)
        pretrain_metrics[name] = {k: m[k] for k in ("parameters", "non_embedding_parameters", "vocab_size", "steps",
                                                    "train_loss", "eval_loss", "train_seconds", "tokens_per_second")}
        t = lap(f"pretrain {name}", t)

    # method -> (pretrained LM, uses features, uses the sequence)
    runs = {
        "tabular_dcnv2": ("domain", True, False),
        "text_bpe": ("text_bpe", False, True),
        "domain": ("domain", False, True),
        "domain_fusion": ("domain", True, True),
    }
    results: dict[str, Any] = {}
    for task in s.tasks:
        kind = "binary" if task == "purchase" else "regression"
        labels = work / f"labels_{task}.parquet"
        task_results: dict[str, Any] = {}
        predictions: dict[str, dict[str, float]] = {}
        metrics, predictions["lightgbm"] = lightgbm_baseline(tasks, task, p["lightgbm_rounds"], s.seed)
        task_results["lightgbm"] = {"test": metrics}
        t = lap(f"{task}: lightgbm", t)
        for method in (m for m in METHODS if m in runs and m in s.methods):
            lm, with_features, use_sequence = runs[method]
            ft = finetune(FinetuneSettings(
                model=work / "models" / f"{lm}_lm", sequences=sequence_files[lm], labels=labels,
                features=work / "features.parquet" if with_features else None, use_sequence=use_sequence,
                output=work / "finetuned" / f"{task}_{method}", task=kind, split="column",
                epochs=p["finetune_epochs"] if use_sequence else p["tabular_epochs"],
                batch_size=p["finetune_batch_size"], evals_per_epoch=2 if use_sequence else 1,
                patience=2 if use_sequence else 5, seed=s.seed, progress=s.progress,
            ))
            task_results[method] = {k: ft[k] for k in ("test", "valid", "best_step", "steps", "train_seconds",
                                                       "trainable_parameters")}
            pred = pq.read_table(work / "finetuned" / f"{task}_{method}" / "predictions.parquet")
            predictions[method] = dict(zip(pred.column("user_id").to_pylist(), pred.column("prediction").to_pylist()))
            t = lap(f"{task}: finetune {method}", t)
        _compare(task, tasks, task_results, predictions, s.bootstrap, s.seed)
        results[task] = task_results

    report = {
        "dataset": "UCI Online Retail + Online Retail II (both files, overlap dropped, customers only)",
        "tasks": _task_definitions(tasks),
        "summary": summary,
        "preset": s.preset,
        "settings": p,
        "schema": str(s.schema),
        "sequence_tokens_mean": tokens_mean,
        "pretrain": pretrain_metrics,
        "results": results,
        "timings_seconds": timings,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "machine": {"python": platform.python_version(), "processor": platform.machine(),
                    "torch_threads": _torch_threads()},
    }
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "results.md").write_text(render_markdown(report))
    log(f"wrote {out / 'results.md'} and {out / 'results.json'} in {report['total_seconds']:.0f}s")
    return report


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _compare(task: str, tasks: RetailTasks, results: dict, predictions: dict, n_boot: int, seed: int) -> None:
    """Add each method's metric relative to LightGBM, with a paired bootstrap interval, on common test users."""
    users = sorted(set.intersection(*(set(p) for p in predictions.values())))
    target = "label" if task == "purchase" else "spend"
    truth = dict(zip(tasks.labels.column("user_id").to_pylist(), tasks.labels.column(target).to_pylist()))
    y = np.array([truth[u] for u in users], dtype=np.float64)
    base = np.array([predictions["lightgbm"][u] for u in users], dtype=np.float64)
    key = "auc" if task == "purchase" else "rmse"
    base_value = results["lightgbm"]["test"][key]
    for method in predictions:
        test = results[method]["test"]
        if test.get(key) is None or base_value is None:
            continue
        test[f"relative_{key}_vs_lightgbm"] = test[key] / base_value - 1.0
        if method != "lightgbm" and n_boot:
            other = np.array([predictions[method][u] for u in users], dtype=np.float64)
            if task == "purchase":
                y_int = y.astype(np.int64)
                test[f"delta_{key}_ci95"] = bootstrap_delta(y_int, base, other, task, n_boot, seed)
            else:
                test[f"delta_{key}_ci95"] = bootstrap_delta(y, base, other, task, n_boot, seed)


def _task_definitions(tasks: RetailTasks) -> dict[str, str]:
    end = tasks.cutoff + dt.timedelta(days=tasks.horizon_days)
    return {
        "inputs": f"every line item of a customer before {tasks.cutoff:%Y-%m-%d}",
        "purchase": (f"binary: the customer has a non-cancelled invoice in [{tasks.cutoff:%Y-%m-%d}, "
                     f"{end:%Y-%m-%d}) ({tasks.horizon_days} days)"),
        "spend": f"regression: ln(1 + max(0, net spend in [{tasks.cutoff:%Y-%m-%d}, {end:%Y-%m-%d})))",
        "split": "salted crc32 of the customer id: 70% train / 15% valid / 15% test; tokenizers and pretraining "
                 "see only pre-cutoff events of train+valid customers",
    }


def _interval(ci: dict) -> str:
    return f"[{ci['low']:+.4f}, {ci['high']:+.4f}]" if ci else "-"


def render_markdown(report: dict) -> str:
    """results.md: task definitions, setup, one table per task, honest notes."""
    s = report["summary"]
    p = report["settings"]
    lines = [
        "# domaintok on Online Retail: domain tokens vs text serialization vs LightGBM",
        "",
        f"- Inputs: {report['tasks']['inputs']}.",
        f"- Task `purchase`: {report['tasks']['purchase']}.",
        f"- Task `spend`: {report['tasks']['spend']}.",
        f"- Split: {report['tasks']['split']}.",
        f"- Customers: {s['users']} (train {s['users_train']}, valid {s['users_valid']}, test {s['users_test']}); "
        f"positive rate test {s['positive_rate_test']:.3f}; {s['events']:,} pre-cutoff line items.",
        f"- Preset `{report['preset']}`: transformer preset {p['model_preset']} with overrides "
        f"{p['model_overrides'] or 'none'}, context {p['context_length']} tokens, pretraining "
        f"{p['pretrain_steps']} steps x batch {p['pretrain_batch_size']} (both tokenizations), fine-tuning up to "
        f"{p['finetune_epochs']} epochs x batch {p['finetune_batch_size']} with early stopping on valid.",
        f"- Domain schema: `{report['schema']}`. Mean tokens per sequence: "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["sequence_tokens_mean"].items()) + ".",
    ]
    for name, m in report["pretrain"].items():
        lines.append(
            f"- Pretraining `{name}`: {m['parameters']:,} parameters ({m['non_embedding_parameters']:,} non-embedding, "
            f"vocab {m['vocab_size']}), {m['steps']} steps, train loss {m['train_loss']:.3f}, eval loss "
            f"{m['eval_loss'] if m['eval_loss'] is None else round(m['eval_loss'], 3)}, {m['train_seconds']:.0f}s."
        )
    lines.append(f"- Total wall time {report['total_seconds']:.0f}s on {report['machine']['torch_threads']} torch "
                 "threads (CPU).")
    for task, results in report["results"].items():
        lines += ["", f"## {task}", ""]
        if task == "purchase":
            lines += ["| method | test AUC | AUC vs LightGBM | 95% CI of AUC diff | test logloss | accuracy |",
                      "|---|---|---|---|---|---|"]
            for method, r in results.items():
                t = r["test"]
                ci = t.get("delta_auc_ci95") or {}
                rel = t.get("relative_auc_vs_lightgbm")
                lines.append(
                    f"| {METHOD_TITLES[method]} | {t['auc']:.4f} | "
                    f"{'baseline' if method == 'lightgbm' else f'{rel:+.2%}'} | "
                    f"{_interval(ci)} | {t['logloss']:.4f} | "
                    f"{t['accuracy']:.3f} |"
                )
        else:
            lines += ["| method | test RMSE | RMSE vs LightGBM | 95% CI of RMSE diff | test MAE |",
                      "|---|---|---|---|---|"]
            for method, r in results.items():
                t = r["test"]
                ci = t.get("delta_rmse_ci95") or {}
                rel = t.get("relative_rmse_vs_lightgbm")
                lines.append(
                    f"| {METHOD_TITLES[method]} | {t['rmse']:.4f} | "
                    f"{'baseline' if method == 'lightgbm' else f'{rel:+.2%}'} | "
                    f"{_interval(ci)} | {t['mae']:.4f} |"
                )
    lines += [
        "",
        "Relative AUC = AUC / AUC(LightGBM) - 1 (nuFormer reports +1.25% for joint fusion on its own data). The CI "
        "is a paired bootstrap over test customers of the metric difference to LightGBM.",
        "",
    ]
    return "\n".join(lines)


@click.command("evaluate")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Directory holding both Online Retail parquet files (default: ../shared/data/online_retail).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/eval_retail"),
              show_default=True, help="Directory for results.md, results.json and the intermediate artifacts.")
@click.option("--preset", type=click.Choice(sorted(EVAL_PRESETS)), default="small", show_default=True,
              help="small: the full CPU run (~20 min on 2 cores); tiny: a smoke run.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Pretraining steps (overrides the preset).")
@click.option("--max-users", type=click.IntRange(min=20), default=None, help="Keep this many customers (hash order).")
@click.option("--context-length", type=click.IntRange(min=16), default=None,
              help="Tokens per sequence for both transformers (overrides the preset).")
@click.option("--task", "tasks", type=click.Choice(TASK_NAMES), multiple=True, default=TASK_NAMES,
              show_default=True, help="Tasks to run (repeat the option for several; default both).")
@click.option("--schema", default="online_retail", show_default=True,
              help="Domain schema for the domain tokens (a name under schemas/ or a yaml path).")
@click.option("--method", "methods", type=click.Choice(METHODS), multiple=True, default=METHODS,
              help="Methods to run (repeat; default all; lightgbm is always the reference).")
@click.option("--quick", is_flag=True, help="The tiny preset on 400 customers: under 3 minutes, for tests.")
@click.option("--seed", type=int, default=0, show_default=True)
def command(data_dir, output, preset, max_steps, max_users, context_length, tasks, schema, methods, quick, seed):
    """Compare domain tokens, text serialization + BPE and LightGBM on Online Retail (next-90-day purchase, spend).

    Runs everything (tasks, both tokenizers, both pretrainings, fine-tuning with and without joint fusion,
    LightGBM) and writes OUTPUT/results.md and OUTPUT/results.json.
    """
    settings = EvaluateSettings(
        data_dir=data_dir or DEFAULT_DATA_DIR, output=output, preset="tiny" if quick else preset,
        max_steps=max_steps, max_users=max_users, context_length=context_length, tasks=tuple(tasks), seed=seed,
        schema=schema,
        methods=tuple(dict.fromkeys(("lightgbm", *methods))),
        bootstrap=200 if quick else 1000, progress=not quick, log=lambda m: click.echo(m, err=True),
    )
    report = run_evaluation(settings)
    for task, results in report["results"].items():
        key = "auc" if task == "purchase" else "rmse"
        click.echo(f"{task}: " + ", ".join(f"{m} {r['test'][key]:.4f}" for m, r in results.items()))


__all__ = ["EvaluateSettings", "run_evaluation", "lightgbm_baseline", "render_markdown", "EVAL_PRESETS", "command"]
