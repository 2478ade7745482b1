"""Per-task probability calibration, fitted on the validation split, stored in the checkpoint.

For each task one of three maps is chosen by cross-validated log loss *within* the validation
split (choosing on the rows a map was fitted on would always favour the most flexible one):

- identity: the model's own probability (also what a task with too few validation positives or
  negatives keeps, with the reason recorded);
- platt: sigmoid(slope * logit(p) + intercept), slope > 0 (temperature scaling plus a shift);
- isotonic: the isotonic regression of the labels on p (piecewise linear between its knots).

Every non-identity map is strictly increasing, so each task's ranking, hence its ROC-AUC, is
unchanged by construction: isotonic regression has flat steps (ties that would change ROC-AUC)
and a steep Platt map saturates at 1.0 in floating point, so a tiny strictly increasing term is
mixed in: q' = (1 - TIE_BREAK) * q + TIE_BREAK * sigmoid(logit(p) / TIE_SCALE). Its step between
neighbouring float32 inputs stays above float64 resolution over all of (0, 1), and it moves a
probability by at most TIE_BREAK. Outputs are float64 (float32 would merge neighbours again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit

METHODS = ("identity", "platt", "isotonic")  # in order of preference when CV losses tie
MIN_CLASS_COUNT = 10  # validation positives and negatives a task needs to be calibrated
CV_FOLDS = 5  # stratified folds within the validation split
CV_SEED = 0
PLATT_MIN_SLOPE = 1e-2  # slope > 0 keeps the order; this floor keeps it well away from 0
LOGIT_CLIP = 50.0  # |logit| used when fitting (p of exactly 0 or 1 has an infinite logit)
ISOTONIC_FLOOR = 1e-4  # isotonic outputs kept in [floor, 1 - floor]: never certain
LOSS_EPS = 1e-7  # probabilities clipped to [eps, 1 - eps] when scoring log loss
TIE_BREAK = 1e-5  # weight of the strictly increasing term (see the module docstring)
TIE_SCALE = 40.0  # its logit scale: |logit| of any float32 probability is below 104


def _tie(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return expit(logit(p) / TIE_SCALE)


@dataclass(frozen=True, eq=False)
class TaskCalibration:
    """One task's map from raw to calibrated probability."""

    method: str = "identity"
    slope: float = 1.0  # platt
    intercept: float = 0.0  # platt
    knots_x: np.ndarray = field(default_factory=lambda: np.zeros(0))  # isotonic, increasing
    knots_y: np.ndarray = field(default_factory=lambda: np.zeros(0))  # isotonic, non-decreasing
    note: str = ""  # why this method (CV log losses, or too few labels)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; one of {METHODS}")
        if self.method == "platt" and not self.slope > 0:
            raise ValueError(f"a Platt slope must be > 0 to keep the ranking, got {self.slope}")
        if self.method == "isotonic" and (
            len(self.knots_x) == 0 or len(self.knots_x) != len(self.knots_y)
        ):
            raise ValueError("isotonic calibration needs knots_x and knots_y of one length > 0")

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Calibrated float64 probabilities; NaN stays NaN."""
        p = np.asarray(p, dtype=np.float64)
        if self.method == "identity":
            return p.copy()
        out = np.full(p.shape, np.nan)
        ok = ~np.isnan(p)
        x = p[ok]
        if self.method == "platt":
            with np.errstate(divide="ignore", over="ignore"):
                q = expit(self.slope * logit(x) + self.intercept)
        else:
            q = np.interp(x, self.knots_x, self.knots_y)
        out[ok] = (1.0 - TIE_BREAK) * q + TIE_BREAK * _tie(x)
        return out


def _log_loss(y: np.ndarray, q: np.ndarray) -> np.ndarray:
    q = np.clip(q, LOSS_EPS, 1.0 - LOSS_EPS)
    return -(y * np.log(q) + (1.0 - y) * np.log1p(-q))


def _fit_platt(y: np.ndarray, p: np.ndarray) -> TaskCalibration:
    """Slope and intercept on the logit minimising log loss, slope >= PLATT_MIN_SLOPE."""
    with np.errstate(divide="ignore"):
        z = np.clip(logit(p), -LOGIT_CLIP, LOGIT_CLIP)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        u = theta[0] * z + theta[1]
        value = np.mean(np.logaddexp(0.0, u) - y * u)
        r = expit(u) - y
        return float(value), np.array([np.mean(r * z), np.mean(r)])

    fit = minimize(
        loss,
        np.array([1.0, 0.0]),
        jac=True,
        method="L-BFGS-B",
        bounds=[(PLATT_MIN_SLOPE, None), (None, None)],
    )
    return TaskCalibration("platt", slope=float(fit.x[0]), intercept=float(fit.x[1]))


def _fit_isotonic(y: np.ndarray, p: np.ndarray) -> TaskCalibration:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(
        y_min=ISOTONIC_FLOOR, y_max=1.0 - ISOTONIC_FLOOR, increasing=True, out_of_bounds="clip"
    ).fit(p, y)
    return TaskCalibration(
        "isotonic",
        knots_x=np.asarray(iso.X_thresholds_, dtype=np.float64),
        knots_y=np.asarray(iso.y_thresholds_, dtype=np.float64),
    )


def _fit(method: str, y: np.ndarray, p: np.ndarray) -> TaskCalibration:
    if method == "platt":
        return _fit_platt(y, p)
    if method == "isotonic":
        return _fit_isotonic(y, p)
    return TaskCalibration()


def cv_log_losses(
    y: np.ndarray, p: np.ndarray, folds: int = CV_FOLDS, seed: int = CV_SEED
) -> dict[str, float]:
    """Mean held-out log loss of each method over stratified folds of (y, p)."""
    from sklearn.model_selection import StratifiedKFold

    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    k = max(2, min(folds, n_pos, n_neg))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    totals = dict.fromkeys(METHODS, 0.0)
    for fit_rows, held_out in splitter.split(p.reshape(-1, 1), y):
        for method in METHODS:
            calibrator = _fit(method, y[fit_rows], p[fit_rows])
            totals[method] += float(_log_loss(y[held_out], calibrator.apply(p[held_out])).sum())
    return {method: total / len(y) for method, total in totals.items()}


def fit_task(
    y: np.ndarray,
    p: np.ndarray,
    min_class_count: int = MIN_CLASS_COUNT,
    folds: int = CV_FOLDS,
) -> TaskCalibration:
    """One task's calibration from its validation labels (NaN = missing) and raw probabilities."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    keep = ~np.isnan(y) & np.isfinite(p)
    y, p = y[keep], p[keep]
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if min(n_pos, n_neg) < min_class_count:
        return TaskCalibration(
            note=f"uncalibrated: {n_pos} positives and {n_neg} negatives in validation "
            f"(at least {min_class_count} of each needed)"
        )
    losses = cv_log_losses(y, p, folds)
    method = min(METHODS, key=lambda m: (losses[m], METHODS.index(m)))
    shown = ", ".join(f"{m} {losses[m]:.4f}" for m in METHODS)
    chosen = _fit(method, y, p)
    note = f"{method}: cross-validated log loss {shown} ({n_pos} positives, {n_neg} negatives)"
    return TaskCalibration(
        method,
        slope=chosen.slope,
        intercept=chosen.intercept,
        knots_x=chosen.knots_x,
        knots_y=chosen.knots_y,
        note=note,
    )


@dataclass(frozen=True, eq=False)
class Calibration:
    """A `TaskCalibration` per task, applied column by column."""

    tasks: tuple[str, ...]
    per_task: tuple[TaskCalibration, ...]

    def __post_init__(self) -> None:
        if len(self.tasks) != len(self.per_task):
            raise ValueError(f"{len(self.tasks)} tasks but {len(self.per_task)} calibrations")

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(n, n_tasks) raw probabilities -> calibrated float64 ones (NaN stays NaN)."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != len(self.tasks):
            raise ValueError(
                f"need probabilities of shape (n, {len(self.tasks)}), got {probs.shape}"
            )
        out = np.empty_like(probs)
        for j, task in enumerate(self.per_task):
            out[:, j] = task.apply(probs[:, j])
        return out

    def methods(self) -> dict[str, str]:
        """Task -> chosen method."""
        return {t: c.method for t, c in zip(self.tasks, self.per_task, strict=True)}

    def notes(self) -> dict[str, str]:
        """Task -> why its method was chosen (or why it stayed uncalibrated)."""
        return {t: c.note for t, c in zip(self.tasks, self.per_task, strict=True)}

    def to_blob(self) -> dict[str, Any]:
        """Plain lists, numbers and arrays, for a weights_only checkpoint."""
        return {
            "tasks": list(self.tasks),
            "method": [c.method for c in self.per_task],
            "slope": [float(c.slope) for c in self.per_task],
            "intercept": [float(c.intercept) for c in self.per_task],
            "knots_x": [np.asarray(c.knots_x, np.float64) for c in self.per_task],
            "knots_y": [np.asarray(c.knots_y, np.float64) for c in self.per_task],
            "note": [c.note for c in self.per_task],
        }

    @classmethod
    def from_blob(cls, blob: dict[str, Any]) -> Calibration:
        """What `to_blob` wrote (arrays may come back as tensors)."""

        def array(value: Any) -> np.ndarray:
            value = value.numpy() if hasattr(value, "numpy") else value
            return np.asarray(value, dtype=np.float64)

        per_task = tuple(
            TaskCalibration(
                method=str(method),
                slope=float(slope),
                intercept=float(intercept),
                knots_x=array(kx),
                knots_y=array(ky),
                note=str(note),
            )
            for method, slope, intercept, kx, ky, note in zip(
                blob["method"],
                blob["slope"],
                blob["intercept"],
                blob["knots_x"],
                blob["knots_y"],
                blob["note"],
                strict=True,
            )
        )
        return cls(tuple(str(t) for t in blob["tasks"]), per_task)


def fit_calibration(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    tasks: Sequence[str],
    min_class_count: int = MIN_CLASS_COUNT,
    folds: int = CV_FOLDS,
) -> Calibration:
    """Per-task calibration from validation labels (n, n_tasks; NaN = missing) and the model's
    raw probabilities for the same rows."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    tasks = tuple(str(t) for t in tasks)
    if y_true.shape != y_prob.shape or y_true.ndim != 2 or y_true.shape[1] != len(tasks):
        raise ValueError(
            f"need labels and probabilities of shape (n, {len(tasks)}), "
            f"got {y_true.shape} and {y_prob.shape}"
        )
    per_task = tuple(
        fit_task(y_true[:, j], y_prob[:, j], min_class_count, folds) for j in range(len(tasks))
    )
    return Calibration(tasks, per_task)
