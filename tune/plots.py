"""The job's summary plots (PNG files the parent MLflow run keeps under `plots/`).

Each function draws one figure into `path` and returns "" when it did, or why it could not
(no study, too few trials, no test predictions); the caller records the reason as a tag.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import optuna

# More tasks than this (ToxCast has 617) get one histogram of per-task ROC-AUC instead of a
# grid of curves, which would be a 46,000-pixel-tall image nobody can read.
MAX_ROC_PANELS = 24
# Vertices drawn per ROC curve: a 3-inch panel at 100 dpi shows no more. A test split of 10^5
# molecules gave curves of ~10^4-10^5 corners each, whose drawing grew with the rows.
MAX_CURVE_POINTS = 1000


def _complete_trials(study: optuna.Study) -> list[Any]:
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def history(study: optuna.Study | None, path: Path) -> str:
    """Objective per trial and the best so far."""
    if study is None:
        return "no Optuna study given"
    trials = _complete_trials(study)
    if not trials:
        return "no complete trial"
    import optuna

    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    x = [t.number for t in trials]
    y = np.array([t.value for t in trials], dtype=float)
    best = np.maximum.accumulate(y) if maximize else np.minimum.accumulate(y)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(x, y, s=16, label="trial")
    ax.step(x, best, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel="objective (validation ROC-AUC)", title="Optimisation history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


# fANOVA (a random forest over every complete trial) up to this many trials, PED-ANOVA beyond:
# fANOVA took 0.2 s at 30 trials, 2.4 s at 300 and 12.7 s at 1,000 here, PED-ANOVA 0.05 s at
# 1,000; PED-ANOVA reads only the best tenth of the trials, too few in a small study (it warns).
FANOVA_MAX_TRIALS = 300


def importance_method(n_trials: int) -> tuple[str, Any]:
    """The name and evaluator of the importance drawn for a study of `n_trials` complete
    trials. Named explicitly: Optuna 5.1's default is PED-ANOVA, earlier versions' fANOVA."""
    import optuna

    if n_trials <= FANOVA_MAX_TRIALS:
        return "fANOVA", optuna.importance.FanovaImportanceEvaluator(seed=0)
    return "PED-ANOVA", optuna.importance.PedAnovaImportanceEvaluator()


def importance(study: optuna.Study | None, path: Path) -> str:
    """Hyperparameter importance, by the method `importance_method` picks for the study's size
    (its name on the axis)."""
    if study is None:
        return "no Optuna study given"
    n = len(_complete_trials(study))
    if n < 2:
        return f"parameter importance needs at least 2 complete trials, got {n}"
    import optuna

    method, evaluator = importance_method(n)
    scores = optuna.importance.get_param_importances(study, evaluator=evaluator)
    if not scores:
        return "no parameter varied between the complete trials"
    names, values = zip(*sorted(scores.items(), key=lambda kv: kv[1]), strict=True)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    ax.barh(names, values)
    ax.set(xlabel=f"importance ({method}, {n} trials)", title="Hyperparameter importance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


def roc_curves(roc_data: tuple[np.ndarray, np.ndarray, list[str]] | None, path: Path) -> str:
    """The best model on the test split: one ROC curve per task, or (many tasks) a histogram."""
    if roc_data is None:
        return "no test predictions given"
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p, tasks = roc_data
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    keeps = [~np.isnan(y[:, j]) & ~np.isnan(p[:, j]) for j in range(len(tasks))]
    scorable = [len(set(y[keep, j])) == 2 for j, keep in enumerate(keeps)]
    plt = _pyplot()
    if len(tasks) > MAX_ROC_PANELS:
        aucs = [
            roc_auc_score(y[keep, j], p[keep, j]) for j, keep in enumerate(keeps) if scorable[j]
        ]
        if not aucs:
            return "no task has both classes on the test split"
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.hist(aucs, bins=20, range=(0.0, 1.0))
        ax.axvline(float(np.mean(aucs)), color="C1", label=f"mean {np.mean(aucs):.3f}")
        title = f"Test ROC-AUC of the best model, {len(aucs)} tasks"
        if len(aucs) < len(tasks):
            title += f" ({len(tasks) - len(aucs)} more have one class only)"
        ax.set(xlabel="test ROC-AUC", ylabel="tasks", title=title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return ""
    cols = min(4, max(1, len(tasks)))
    rows = max(1, math.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax, (j, task) in zip(axes.flat, enumerate(tasks), strict=False):
        keep = keeps[j]
        if not scorable[j]:
            ax.set_title(f"{task}: one class only", fontsize=9)
            ax.axis("off")
            continue
        fpr, tpr, _ = roc_curve(y[keep, j], p[keep, j])
        ax.plot(*thin_curve(fpr, tpr))
        ax.plot([0, 1], [0, 1], ls="--", color="grey")
        ax.set_title(f"{task}  AUC {roc_auc_score(y[keep, j], p[keep, j]):.3f}", fontsize=9)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.suptitle("Test ROC curves of the best model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ""


def thin_curve(
    x: np.ndarray, y: np.ndarray, limit: int = MAX_CURVE_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """At most `limit` points of a curve, evenly spaced along it (first and last kept), so what
    is drawn does not grow with the rows behind it."""
    if len(x) <= limit:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, limit).round().astype(np.int64))
    return x[keep], y[keep]


def reliability(
    data: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None, path: Path, bins: int = 10
) -> str:
    """Reliability diagram of the registered model on the test split, over every labelled
    (molecule, task) entry: observed positive rate against mean predicted probability per
    equal-width bin, calibrated and (when given) uncalibrated, with how many entries each bin
    holds underneath. `data` is (y_true, calibrated probabilities, uncalibrated or None)."""
    if data is None:
        return "no test predictions given"
    from toxmodel.metrics import reliability_curve

    y, calibrated, raw = data
    if not np.any(~np.isnan(np.asarray(y, dtype=float))):
        return "no labelled test entry"
    curves = [("calibrated", calibrated, "C0")]
    if raw is not None:
        curves.insert(0, ("uncalibrated", raw, "C1"))
    plt = _pyplot()
    fig, (ax, counts) = plt.subplots(
        2, 1, figsize=(6, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfectly calibrated")
    width = 1.0 / bins / (len(curves) + 1)
    for k, (name, probs, color) in enumerate(curves):
        curve = reliability_curve(y, probs, bins)
        used = curve.counts > 0
        label = f"{name} (ECE {curve.ece:.3f})"
        ax.plot(
            curve.mean_predicted[used],
            curve.fraction_positive[used],
            "o-",
            color=color,
            label=label,
        )
        left = curve.edges[:-1] + (k + 0.5) * width
        counts.bar(left, curve.counts, width=width, color=color, align="edge")
    ax.set(
        ylabel="observed positive rate",
        xlim=(0, 1),
        ylim=(0, 1),
        title="Reliability on the test split (all tasks pooled)",
    )
    ax.legend(loc="upper left", fontsize=8)
    counts.set(xlabel="predicted probability", ylabel="entries", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ""
