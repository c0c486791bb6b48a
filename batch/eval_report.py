"""Scoring and reporting of `domaintok evaluate`: the headline metric per task kind, the paired bootstrap of each
method's relative difference to LightGBM (pooled over folds), results.md and the bar chart.

Headline metrics: AUC (binary), macro one-vs-rest AUC (multiclass; accuracy beside it), RMSE (regression).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import rankdata

HEADLINE = {"binary": "auc", "multiclass": "macro_auc", "regression": "rmse"}
HIGHER_IS_BETTER = {"binary": True, "multiclass": True, "regression": False}


def fast_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties get average ranks); nan when y holds one class."""
    y = np.asarray(y)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean over classes of the one-vs-rest AUC, over classes with both positives and negatives in y."""
    aucs = [fast_auc((y == c).astype(np.int64), p[:, c]) for c in range(p.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def headline(kind: str, y: np.ndarray, p: np.ndarray) -> float:
    if kind == "binary":
        return fast_auc(y, p)
    if kind == "multiclass":
        return macro_auc(y, p)
    return float(np.sqrt(np.mean((p - y) ** 2)))


def kind_metrics(kind: str, y: np.ndarray, p: np.ndarray) -> dict:
    """All metrics of one prediction set: n and the headline, plus logloss/accuracy (classification) or MAE."""
    out: dict = {"n": int(len(y)), HEADLINE[kind]: headline(kind, y, p)}
    if kind == "binary":
        q = np.clip(p, 1e-7, 1 - 1e-7)
        out["logloss"] = float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
        out["accuracy"] = float(np.mean((p > 0.5) == (y == 1)))
        out["positive_rate"] = float(np.mean(y))
    elif kind == "multiclass":
        q = np.clip(p, 1e-7, 1.0)
        q = q / q.sum(axis=1, keepdims=True)
        out["accuracy"] = float(np.mean(q.argmax(axis=1) == y))
        out["logloss"] = float(-np.mean(np.log(q[np.arange(len(y)), y])))
    else:
        out["mae"] = float(np.mean(np.abs(p - y)))
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in out.items()}


def pooled_headline(kind: str, folds: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean over folds of the headline metric (each fold: y, predictions on its test users)."""
    return float(np.mean([headline(kind, y, p) for y, p in folds]))


def bootstrap_relative(
    kind: str,
    folds: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    n: int = 1000,
    seed: int = 0,
) -> dict:
    """Paired bootstrap of other / base - 1 on the headline metric, folds pooled: each replicate resamples every
    fold's test users with replacement, averages the metric over folds for both methods, and takes the ratio.

    folds: (y, base predictions, other predictions) per fold, on the same users in the same order. Returns the
    point estimate, the 95% interval and p_better (the share of replicates where `other` is better).
    """
    rng = np.random.default_rng(seed)
    point = pooled_headline(kind, [(y, o) for y, _, o in folds]) / pooled_headline(kind, [(y, b) for y, b, _ in folds]) - 1
    ratios = []
    for _ in range(n):
        base_m, other_m = [], []
        for y, b, o in folds:
            idx = rng.integers(0, len(y), len(y))
            base_m.append(headline(kind, y[idx], b[idx]))
            other_m.append(headline(kind, y[idx], o[idx]))
        base_v, other_v = np.mean(base_m), np.mean(other_m)
        if np.isfinite(base_v) and np.isfinite(other_v) and base_v != 0:
            ratios.append(other_v / base_v - 1)
    if not ratios:
        return {"relative": float(point), "low": None, "high": None, "p_better": None, "replicates": 0}
    ratios = np.asarray(ratios)
    better = ratios > 0 if HIGHER_IS_BETTER[kind] else ratios < 0
    return {"relative": float(point), "low": float(np.quantile(ratios, 0.025)),
            "high": float(np.quantile(ratios, 0.975)), "p_better": float(better.mean()), "replicates": int(len(ratios))}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(report: dict) -> str:
    """results.md: data, tasks, split, preset, one table per task (metric, relative difference and its 95% CI)."""
    pop = report["population"]
    lines = [
        f"# domaintok evaluate: {report['schema']}",
        "",
        f"- Events: {', '.join(report['events'])} (schema `{report['schema']}`); inputs are events before "
        f"{report['cutoff']} ({report['timezone']}).",
        f"- Population: {pop['users']:,} users with >= {pop['min_events']} events before the cutoff "
        f"({pop['events']:,} events); split by user hash (seed {report['split']['seed']}): train "
        f"{report['split']['train']}, valid {report['split']['valid']}, test {report['split']['test']}; "
        f"{report['folds']} fold(s).",
        f"- Preset `{report['preset']}`; features: {report['feature_count']} aggregate columns"
        + (f" + {report['extra_features']}" if report.get("extra_features") else "") + ".",
        "- Tokenizers and pretraining saw only the pre-cutoff events of train+valid users of each fold.",
    ]
    for name, m in report["pretrain"].items():
        lines.append(f"- LM `{name}`: {m['parameters']:,} parameters, {m['steps']} steps, train loss "
                     f"{_fmt(m.get('train_loss'), '.3f')}, {m['train_seconds']:.0f}s, mean "
                     f"{m['tokens_mean']:.0f} tokens per sequence (fold 0).")
    lines.append(f"- Total wall time {report['total_seconds']:.0f}s.")
    for task in report["tasks"]:
        name, kind = task["name"], task["kind"]
        metric = HEADLINE[kind]
        lower = "" if HIGHER_IS_BETTER[kind] else " (lower is better)"
        extra = {"binary": "logloss", "multiclass": "accuracy", "regression": "mae"}[kind]
        lines += ["", f"## {name} ({task['definition']})", "",
                  f"| method | test {metric}{lower} | vs LightGBM | 95% CI | P(better) | test {extra} | valid {metric} |",
                  "|---|---|---|---|---|---|---|"]
        for method, r in report["results"][name].items():
            ci = r.get("vs_lightgbm") or {}
            rel = "baseline" if method == "lightgbm" else _fmt(ci.get("relative"), "+.2%")
            interval = "-" if ci.get("low") is None else f"[{ci['low']:+.2%}, {ci['high']:+.2%}]"
            lines.append(f"| {method}: {r['title']} | {_fmt(r['test'].get(metric), '.4f')} | {rel} | {interval} | "
                         f"{_fmt(ci.get('p_better'), '.2f')} | {_fmt(r['test'].get(extra), '.4f')} | "
                         f"{_fmt(r.get('valid'), '.4f')} |")
    lines += ["", "Relative difference = metric / metric(LightGBM) - 1 on the test users; the interval is a paired "
              "bootstrap over test users (folds pooled: resampled within each fold, metric averaged over folds). "
              "Valid is the selection metric on the valid users (fold mean): compare settings there, not on test.", ""]
    return "\n".join(lines)


def plot_relative(report: dict, path: Path) -> None:
    """One panel per task: each method's relative difference to LightGBM (%) with its 95% interval as whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [(m, r["vs_lightgbm"]) for m, r in report["results"][task["name"]].items()
                if m != "lightgbm" and r.get("vs_lightgbm")]
        x = np.arange(len(rows))
        rel = np.array([100 * ci["relative"] for _, ci in rows])
        low = np.array([100 * (ci["relative"] - ci["low"]) if ci.get("low") is not None else 0 for _, ci in rows])
        high = np.array([100 * (ci["high"] - ci["relative"]) if ci.get("high") is not None else 0 for _, ci in rows])
        ax.bar(x, rel, yerr=np.vstack([low, high]), capsize=3, color="tab:blue")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, [m for m, _ in rows], rotation=35, ha="right", fontsize=8)
        better = "higher" if HIGHER_IS_BETTER[task["kind"]] else "lower"
        ax.set_title(f"{task['name']}: {HEADLINE[task['kind']]} vs LightGBM ({better} is better)", fontsize=9)
        ax.set_ylabel("relative difference (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["fast_auc", "macro_auc", "headline", "kind_metrics", "bootstrap_relative", "render_markdown",
           "plot_relative", "HEADLINE"]
