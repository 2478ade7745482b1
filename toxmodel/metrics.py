"""Multitask classification metrics over partly-missing labels (NaN = not measured)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

THRESHOLD = 0.5  # probability cut for accuracy and balanced accuracy


@dataclass
class Metrics:
    """Macro means over the tasks that have both classes, plus each such task's scores."""

    loss: float
    roc_auc: float
    pr_auc: float  # average precision
    accuracy: float
    balanced_accuracy: float
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # tasks lacking a class: not in the means

    def flat(self, prefix: str) -> dict[str, float]:
        """One flat dict for loggers: `{prefix}_roc_auc`, ..., `{prefix}_roc_auc/{task}`."""
        out = {
            f"{prefix}_loss": self.loss,
            f"{prefix}_roc_auc": self.roc_auc,
            f"{prefix}_pr_auc": self.pr_auc,
            f"{prefix}_accuracy": self.accuracy,
            f"{prefix}_balanced_accuracy": self.balanced_accuracy,
        }
        for task, scores in self.per_task.items():
            out[f"{prefix}_roc_auc/{task}"] = scores["roc_auc"]
            out[f"{prefix}_pr_auc/{task}"] = scores["pr_auc"]
        return out


def _task_scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    pred = p >= THRESHOLD
    pos = y == 1
    tpr = float(np.mean(pred[pos]))
    tnr = float(np.mean(~pred[~pos]))
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "accuracy": float(np.mean(pred == pos)),
        "balanced_accuracy": (tpr + tnr) / 2.0,
        "n_labelled": float(len(y)),
        "n_positive": float(pos.sum()),
    }


def evaluate(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    tasks: Sequence[str],
    loss: float = float("nan"),
) -> Metrics:
    """Score probabilities against 0/1 labels (NaN = missing) task by task.

    Tasks whose labelled rows lack a class have no ROC-AUC; they are left out of every mean and
    named in `skipped`. With every task skipped the means are NaN.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    tasks = list(tasks)
    if y_true.ndim != 2 or y_true.shape != y_prob.shape or y_true.shape[1] != len(tasks):
        raise ValueError(
            f"need y_true and y_prob of shape (n, {len(tasks)}) for tasks {tasks}, "
            f"got {y_true.shape} and {y_prob.shape}"
        )
    labelled = ~np.isnan(y_true)
    if not np.isin(y_true[labelled], (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0, 1 or NaN (missing)")
    bad = labelled & ~np.isfinite(y_prob)
    if bad.any():
        raise ValueError(f"y_prob is not finite at {int(bad.sum())} labelled entries")
    per_task: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    for j, task in enumerate(tasks):
        y, p = y_true[labelled[:, j], j], y_prob[labelled[:, j], j]
        if np.unique(y).size < 2:
            skipped.append(task)
            continue
        per_task[task] = _task_scores(y, p)

    def mean(key: str) -> float:
        values = [scores[key] for scores in per_task.values()]
        return float(np.mean(values)) if values else math.nan

    return Metrics(
        loss=float(loss),
        roc_auc=mean("roc_auc"),
        pr_auc=mean("pr_auc"),
        accuracy=mean("accuracy"),
        balanced_accuracy=mean("balanced_accuracy"),
        per_task=per_task,
        skipped=skipped,
    )


# --------------------------------------------------------------------------------------------
# Calibration: do the probabilities mean what they say?

CALIBRATION_BINS = 10  # equal-width probability bins for ECE and the reliability curve


def _labelled(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (label, probability) pairs where the label is measured; shapes must match."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_prob shapes differ: {y.shape} and {p.shape}")
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0, 1 or NaN (missing)")
    if not np.isfinite(p).all():
        raise ValueError(f"y_prob is not finite at {int((~np.isfinite(p)).sum())} labelled entries")
    return y, p


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per equal-width bin: mean predicted probability, observed positive rate, count.

    Bins without a labelled prediction have NaN means and count 0.
    """

    edges: np.ndarray  # (bins + 1,) from 0 to 1
    mean_predicted: np.ndarray  # (bins,)
    fraction_positive: np.ndarray  # (bins,)
    counts: np.ndarray  # (bins,) int64

    @property
    def ece(self) -> float:
        """Count-weighted mean gap |observed - predicted| (NaN with no labelled entry)."""
        total = int(self.counts.sum())
        if total == 0:
            return math.nan
        used = self.counts > 0
        gaps = np.abs(self.fraction_positive[used] - self.mean_predicted[used])
        return float(np.sum(gaps * self.counts[used]) / total)


def reliability_curve(
    y_true: np.ndarray, y_prob: np.ndarray, bins: int = CALIBRATION_BINS
) -> ReliabilityCurve:
    """Reliability-diagram data over every labelled entry (any shape; NaN labels are masked).

    Bin b holds probabilities in [b/bins, (b+1)/bins); 1.0 falls in the last bin.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    y, p = _labelled(y_true, y_prob)
    index = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.int64)
    sum_p = np.bincount(index, weights=p, minlength=bins)
    sum_y = np.bincount(index, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(counts > 0, sum_p / counts, np.nan)
        frac = np.where(counts > 0, sum_y / counts, np.nan)
    return ReliabilityCurve(np.linspace(0.0, 1.0, bins + 1), mean_p, frac, counts)


def expected_calibration_error(
    y_true: np.ndarray, y_prob: np.ndarray, bins: int = CALIBRATION_BINS
) -> float:
    """ECE: equal-width bins, pooled over every labelled (molecule, task) entry; NaN = missing.

    Pooled rather than averaged per task, so a task with few labels weighs in proportion; pass
    one column for a task's own ECE.
    """
    return reliability_curve(y_true, y_prob, bins).ece


def brier_score(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean squared error of the probabilities over labelled entries (NaN when none)."""
    y, p = _labelled(y_true, y_prob)
    return float(np.mean((p - y) ** 2)) if y.size else math.nan
