"""Gradient-boosted trees per task (LightGBM) on the networks' own inputs, and their blend.

A second learner whose mistakes differ from the MLP's: averaged with a k-fold job's fold
networks at a weight chosen on out-of-fold predictions (`blend_weight`), it lifted Tox21's test
ROC-AUC where another network configuration did not (benchmarks/RESULTS.md, "Trees beside the
networks"). One `Trees` is one training set's models, one LightGBM booster per task, fitted on
the float32 inputs the networks read (`Predictor.inputs`: fingerprint columns, then descriptors
scaled by that training set's scaler) and stopped early on its validation rows.

Memory: LightGBM bins its training matrix (about one byte a value) after the float32 inputs are
built in full: 4 bytes x (fingerprint + descriptor columns) a training row, 9.7 kB a row at
`configs/tox21.yaml`'s 2,432 columns, about 10 GB at 10^6 rows; meant for the data sizes where a
fold ensemble is (10^3-10^5 molecules). `fit_bytes` estimates one fold's peak, which a job
checks against the driver's memory before its search (`tune.prepare.check_trees_memory`).
A booster is stored as LightGBM's model text, zlib-compressed into a uint8 tensor (Tox21:
8.4-11.8 MB of text a fold's twelve models, 3.4-4.8 MB stored, against 12 MB a default-point
network), so a checkpoint holding trees still loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from toxmodel.metrics import evaluate

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the trees' share tried by `blend_weight`
MIN_CLASS = 2  # fewer positives (or negatives) than this in training: the task's prevalence


@dataclass(frozen=True)
class TreeConfig:
    """LightGBM settings for every task's model (fixed, not searched: chosen on out-of-fold
    predictions in the benchmark that measured them)."""

    max_rounds: int = 2000  # an upper bound: early stopping on the validation rows decides
    learning_rate: float = 0.03
    num_leaves: int = 31
    min_child_samples: int = 10
    subsample: float = 0.8  # rows drawn for each tree
    colsample_bytree: float = 0.3  # columns drawn for each tree
    reg_lambda: float = 1.0
    early_stopping: int = 100  # rounds without a better validation ROC-AUC

    def __post_init__(self) -> None:
        if self.max_rounds < 1 or self.early_stopping < 1 or self.num_leaves < 2:
            raise ValueError(
                f"TreeConfig needs max_rounds, early_stopping >= 1 and num_leaves >= 2: {self}"
            )
        if not (0 < self.subsample <= 1 and 0 < self.colsample_bytree <= 1):
            raise ValueError(f"TreeConfig subsample and colsample_bytree in (0, 1]: {self}")


@dataclass
class Trees:
    """One training set's models, one per task: LightGBM model text, or None where training
    lacked a class (`prevalence`, the task's training share of positives, is answered there)."""

    tasks: list[str]
    models: list[str | None]
    prevalence: list[float]
    rounds: list[int]  # boosting rounds kept per task (0 where no model)
    _boosters: list[Any] | None = field(default=None, repr=False, compare=False)

    def probabilities(self, x: np.ndarray, columns: Sequence[int] | None = None) -> np.ndarray:
        """(n, len(columns)) probabilities of the rows `x` (the networks' float32 inputs), for
        the task columns asked (every task by default)."""
        wanted = range(len(self.tasks)) if columns is None else columns
        boosters = self.boosters()
        out = np.empty((len(x), len(wanted)), dtype=np.float64)
        for i, j in enumerate(wanted):
            booster = boosters[j]
            out[:, i] = self.prevalence[j] if booster is None else booster.predict(x)
        return out

    def boosters(self) -> list[Any]:
        """The LightGBM boosters, parsed from their text once."""
        if self._boosters is None:
            import lightgbm as lgb

            self._boosters = [
                None if text is None else lgb.Booster(model_str=text) for text in self.models
            ]
        return self._boosters

    def to_blob(self) -> dict[str, Any]:
        """Plain types and tensors only (each model's text zlib-compressed into a uint8 tensor):
        safe for `torch.load(weights_only=True)`."""
        return {
            "tasks": list(self.tasks),
            "models": [None if m is None else _pack(m) for m in self.models],
            "prevalence": [float(p) for p in self.prevalence],
            "rounds": [int(r) for r in self.rounds],
        }

    @classmethod
    def from_blob(cls, blob: dict[str, Any]) -> Trees:
        trees = cls(
            tasks=[str(t) for t in blob["tasks"]],
            models=[None if m is None else _unpack(m) for m in blob["models"]],
            prevalence=[float(p) for p in blob["prevalence"]],
            rounds=[int(r) for r in blob["rounds"]],
        )
        if not len(trees.tasks) == len(trees.models) == len(trees.prevalence) == len(trees.rounds):
            raise ValueError(f"trees of {len(trees.tasks)} tasks hold {len(trees.models)} models")
        return trees


def _pack(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(zlib.compress(text.encode(), 6), dtype=np.uint8).copy())


def _unpack(packed: torch.Tensor) -> str:
    return zlib.decompress(packed.numpy().tobytes()).decode()


def fit_trees(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    tasks: Sequence[str],
    config: TreeConfig = TreeConfig(),
    seed: int = 0,
    num_threads: int = 1,
) -> Trees:
    """One LightGBM model per task on the labelled training rows of that task (labels NaN =
    not measured), stopped early on its labelled validation rows' ROC-AUC (at `max_rounds`
    when the validation rows lack a class). Deterministic for a seed and thread count."""
    import lightgbm as lgb

    tasks = [str(t) for t in tasks]
    y_train, y_valid = np.asarray(y_train, np.float64), np.asarray(y_valid, np.float64)
    if y_train.shape != (len(x_train), len(tasks)) or y_valid.shape != (len(x_valid), len(tasks)):
        raise ValueError(
            f"labels {y_train.shape} / {y_valid.shape} do not match inputs of "
            f"{len(x_train)} / {len(x_valid)} rows and {len(tasks)} tasks"
        )
    params = {k: v for k, v in asdict(config).items() if k not in ("max_rounds", "early_stopping")}
    params.update(
        objective="binary",
        metric="auc",
        subsample_freq=1,
        seed=seed,
        num_threads=num_threads,
        deterministic=True,
        force_col_wise=True,  # many columns, few rows: 1.15x faster than row-wise here
        verbosity=-1,
    )
    models: list[str | None] = []
    prevalence: list[float] = []
    rounds: list[int] = []
    for j in range(len(tasks)):
        train = ~np.isnan(y_train[:, j])
        y = y_train[train, j]
        positives = int(y.sum())
        prevalence.append(float(y.mean()) if y.size else math.nan)
        if min(positives, y.size - positives) < MIN_CLASS:
            models.append(None)
            rounds.append(0)
            continue
        data = lgb.Dataset(x_train[train], y, free_raw_data=True)
        valid = ~np.isnan(y_valid[:, j])
        yv = y_valid[valid, j]
        callbacks, sets = [], []
        if np.unique(yv).size == 2:
            sets = [lgb.Dataset(x_valid[valid], yv, reference=data)]
            callbacks = [lgb.early_stopping(config.early_stopping, verbose=False)]
        booster = lgb.train(params, data, config.max_rounds, valid_sets=sets, callbacks=callbacks)
        kept = booster.best_iteration if sets and booster.best_iteration > 0 else config.max_rounds
        models.append(booster.model_to_string(num_iteration=kept))
        rounds.append(int(kept))
    return Trees(tasks=tasks, models=models, prevalence=prevalence, rounds=rounds)


FIT_OVERHEAD = 1.5  # fit_trees adds ~1.4-1.5x the float32 training inputs (a task's labelled
# rows copied, LightGBM's bins): measured at 20,000 and 40,000 rows x 2,432 columns


def fit_bytes(train_rows: int, valid_rows: int, columns: int) -> int:
    """About the most memory one fold's trees take: its float32 training and validation inputs
    (4 bytes a value) and what `fit_trees` adds on top of them."""
    return int(4 * columns * ((1 + FIT_OVERHEAD) * train_rows + valid_rows))


def blend(networks: np.ndarray, trees: np.ndarray, weight: float) -> np.ndarray:
    """The blended probabilities: (1 - weight) x the networks' + weight x the trees'."""
    return (1.0 - weight) * np.asarray(networks) + weight * np.asarray(trees)


def blend_weight(
    labels: np.ndarray,
    networks: np.ndarray,
    trees: np.ndarray,
    tasks: Sequence[str],
    weights: Sequence[float] = WEIGHTS,
) -> tuple[float, dict[float, float]]:
    """The trees' share whose blend scores the best mean ROC-AUC on `labels` (out-of-fold
    predictions: rows neither learner trained on), and every share's score. On a tie the
    smaller share wins (the networks alone, 0, before any trees)."""
    scores = {float(w): evaluate(labels, blend(networks, trees, w), tasks).roc_auc for w in weights}
    finite = {w: s for w, s in scores.items() if math.isfinite(s)}
    if not finite:
        raise ValueError("no task has both classes in the rows the blend is chosen on")
    best = max(sorted(finite), key=lambda w: finite[w])
    return best, scores
