"""k-fold cross-validation over the rows outside the test split: folds, fold training, OOF.

    folds = make_folds(np.concatenate([split.train, split.valid]), 5, method="scaffold",
                       groups=groups, smiles=smiles, test=split.test)
    fit = fit_folds(features, labels, folds, tasks, model_config, train_config)
    fit.history[-1].best_mean                     # the fold models' mean validation ROC-AUC
    oof = out_of_fold(folds, [(s.valid, probs_i) for s, probs_i in zip(folds.splits, probs)])

Why: one validation split of a few hundred molecules picks the luckiest configuration as much
as the best; k folds score every non-test molecule once, and their k models form an ensemble
whose out-of-fold predictions calibrate it. Folds use `toxmodel.split`'s methods and its
assignment helpers (one molecule, and under scaffold one scaffold, is never in two folds); the
k train/validation pairs train at once with `toxmodel.fused.fit_many`. The test split is never
in a fold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from toxmodel.featurize import Features
from toxmodel.fused import fit_many
from toxmodel.model import ModelConfig
from toxmodel.split import (
    METHODS,
    Split,
    _group_index,
    _join,
    _random_assignment,
    _stratified_assignment,
    scaffold_groups,
)
from toxmodel.train import EpochResult, FitResult, TrainConfig


@dataclass(frozen=True)
class Folds:
    """k folds of the rows outside the test split; fold i validates on its rows and trains on
    the other folds' rows (`splits[i]`, whose test is the test split's rows)."""

    rows: np.ndarray  # the non-test rows (dataset row indices, sorted, int64)
    fold: np.ndarray  # fold id (0..k-1) of each entry of `rows`
    splits: tuple[Split, ...]  # one train/valid pair per fold

    @property
    def k(self) -> int:
        return len(self.splits)


def make_folds(
    rows: np.ndarray | Sequence[int],
    k: int,
    *,
    method: str = "random",
    seed: int = 0,
    labels: np.ndarray | None = None,
    groups: np.ndarray | Sequence[int] | None = None,
    smiles: Sequence[str] | None = None,
    test: np.ndarray | Sequence[int] = (),
) -> Folds:
    """Divide `rows` (the dataset rows outside the test split) into `k` folds of balanced size.

    `labels`, `groups` and `smiles` are per dataset row, as `split_dataset` takes them; `test`
    is the test split's rows. random / stratified / scaffold as in `split_dataset`, with k equal
    parts instead of train/valid/test: rows sharing a group (`molecule_groups`: a molecule's
    rows) share a fold; stratified (needs `labels`) balances each task's positives and negatives
    over the folds; scaffold (needs `smiles`) keeps each Bemis-Murcko scaffold's molecules in
    one fold, big scaffolds placed first, each scaffold into the emptiest fold. Deterministic
    for `seed`. ValueError for k < 2 (one fold is the plain split), k above the number of
    groups that can be placed, a fold left empty, or a molecule group in `rows` and `test`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown split method {method!r}; choose one of {list(METHODS)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(
            f"folds must be an integer >= 2, got {k!r} (1 fold is the single train/valid "
            "split: use split_dataset)"
        )
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    test = np.unique(np.asarray(test, dtype=np.int64).reshape(-1))
    if rows.size == 0:
        raise ValueError("no rows to divide into folds")
    if np.unique(rows).size != rows.size:
        raise ValueError("fold rows repeat a row")
    if np.intersect1d(rows, test).size:
        raise ValueError("fold rows include test rows: the test split is never in a fold")
    rows = np.sort(rows)
    n_data = _dataset_size(rows, test, labels, groups, smiles)
    group_of = _group_index(None if groups is None else np.asarray(groups)[rows], rows.size)
    if groups is not None and test.size:
        shared = np.intersect1d(np.asarray(groups)[rows], np.asarray(groups)[test])
        if shared.size:
            raise ValueError(
                f"{shared.size} molecule group(s) have rows both in the folds and in the test "
                "split: make the split with the same groups"
            )
    rng = np.random.default_rng(seed)
    if method == "scaffold":
        if smiles is None:
            raise ValueError("scaffold folds need the SMILES")
        units = _join(scaffold_groups([smiles[r] for r in rows]), group_of)
        _check_k(k, len(units), "scaffold groups")
        fold = _scaffold_folds(units, rows.size, k, rng)
    else:
        _check_k(k, int(group_of.max()) + 1, "molecule groups")
        targets = _balanced(rows.size, k)
        if method == "random":
            fold = _random_assignment(group_of, targets, rng)
        else:
            if labels is None:
                raise ValueError("stratified folds need the labels")
            y = np.asarray(labels, dtype=np.float64)
            y = y.reshape(n_data, -1)[rows]
            fold = _stratified_assignment(y, group_of, targets, rng)
    sizes = np.bincount(fold, minlength=k)
    if (sizes == 0).any():
        raise ValueError(
            f"fold {int(np.argmin(sizes))} of {k} is empty (fold sizes {sizes.tolist()}): "
            "groups too large for this many folds"
        )
    splits = tuple(Split(rows[fold != i], rows[fold == i], test) for i in range(k))
    return Folds(rows=rows, fold=fold.astype(np.int64), splits=splits)


def out_of_fold(folds: Folds, predictions: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Every fold row's prediction by the model that did not train on it, aligned with
    `folds.rows`: what calibration and the domain threshold of a fold ensemble are fitted on.

    predictions[i] = (rows, values): fold i's model on those dataset rows (its validation rows;
    values (len(rows), ...)). ValueError if fold i predicted a row it trained on or a row in no
    fold, or if a row is predicted twice or not at all.
    """
    if len(predictions) != folds.k:
        raise ValueError(f"{len(predictions)} predictions for {folds.k} folds")
    fold_of = dict(zip(folds.rows.tolist(), folds.fold.tolist(), strict=True))
    first = np.asarray(predictions[0][1])
    out = np.full((folds.rows.size, *first.shape[1:]), np.nan, dtype=np.result_type(first, 1.0))
    seen = np.zeros(folds.rows.size, dtype=np.int64)
    for i, (rows, values) in enumerate(predictions):
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        values = np.asarray(values)
        if values.shape[0] != rows.size:
            raise ValueError(f"fold {i}: {values.shape[0]} predictions for {rows.size} rows")
        wrong = [r for r in rows.tolist() if fold_of.get(r) != i]
        if wrong:
            r = wrong[0]
            where = "is in no fold" if r not in fold_of else f"is in fold {fold_of[r]}"
            raise ValueError(
                f"fold {i} predicted {len(wrong)} row(s) it trained on or that are in no fold "
                f"(row {r} {where})"
            )
        at = np.searchsorted(folds.rows, rows)
        out[at] = values
        np.add.at(seen, at, 1)
    twice = folds.rows[seen > 1]
    if twice.size:
        raise ValueError(f"{twice.size} row(s) predicted more than once (row {twice[0]})")
    missing = folds.rows[seen == 0]
    if missing.size:
        raise ValueError(f"{missing.size} row(s) have no out-of-fold prediction (row {missing[0]})")
    return out


@dataclass(frozen=True)
class FoldScores:
    """One epoch's validation ROC-AUC over the folds: what a cross-validated trial reports."""

    epoch: int
    scores: tuple[float, ...]  # per fold, this epoch's; a fold that has stopped: its best
    best: tuple[float, ...]  # per fold, its best epoch's so far (the model it keeps)
    training: tuple[bool, ...]  # which folds trained this epoch

    @property
    def mean(self) -> float:
        """Mean of `scores` (NaN if a fold's ROC-AUC is undefined)."""
        return float(np.mean(self.scores))

    @property
    def std(self) -> float:
        """Spread of `scores` over the folds (population std, as scikit-learn's CV reports)."""
        return float(np.std(self.scores))

    @property
    def best_mean(self) -> float:
        """Mean of the folds' best scores so far: the score of the fold models kept."""
        return float(np.mean(self.best))


FoldCallback = Callable[[FoldScores, Mapping[int, EpochResult]], None]


@dataclass
class FoldsFit:
    """Fold i's model (best epoch restored) in `results[i]`, and the scores epoch by epoch."""

    results: list[FitResult]
    history: list[FoldScores]


def fit_folds(
    features: Features,
    labels: np.ndarray,
    folds: Folds,
    tasks: Sequence[str],
    model_config: ModelConfig,
    train_config: TrainConfig,
    device: str | torch.device = "cpu",
    callback: FoldCallback | None = None,
    num_threads: int | None = None,
    exact_dropout: bool = True,
) -> FoldsFit:
    """Train `train_config` on every fold's train/valid pair in one `fit_many` pass.

    Fold i trains with seed `train_config.seed + i` (Chemprop's habit: the fold ensemble's
    members then differ in initial weights too) and stops early on its own. After every epoch
    `callback(scores, results)` gets the epoch's `FoldScores` and the `EpochResult` of each fold
    that trained in it (fold id -> result, for checkpoints). Each fold's result equals
    `fit(features, labels, folds.splits[i], ..., replace(train_config, seed=seed + i))`.
    """
    configs = [replace(train_config, seed=train_config.seed + i) for i in range(folds.k)]
    training = [True] * folds.k
    best = [float("nan")] * folds.k
    scores = [float("nan")] * folds.k
    epoch_results: dict[int, EpochResult] = {}
    history: list[FoldScores] = []

    def on_member(fold: int, result: EpochResult) -> None:
        epoch_results[fold] = result
        scores[fold] = result.valid.roc_auc
        if result.is_best:
            best[fold] = result.valid.roc_auc
        if len(epoch_results) < sum(training):
            return
        trained = tuple(training)
        now = FoldScores(
            epoch=result.epoch,
            scores=tuple(s if t else b for s, b, t in zip(scores, best, trained, strict=True)),
            best=tuple(best),
            training=trained,
        )
        history.append(now)
        if callback is not None:
            callback(now, dict(epoch_results))
        for f, r in epoch_results.items():
            if r.stop_reason:
                training[f] = False
        epoch_results.clear()

    results = fit_many(
        features,
        labels,
        folds.splits,
        tasks,
        model_config,
        configs,
        device=device,
        callback=on_member,
        num_threads=num_threads,
        exact_dropout=exact_dropout,
    )
    return FoldsFit(results=results, history=history)


def _check_k(k: int, n_units: int, what: str) -> None:
    if k > n_units:
        raise ValueError(f"{k} folds but only {n_units} {what} to place: use at most {n_units}")


def _balanced(n: int, k: int) -> np.ndarray:
    """Row counts of k folds that differ by at most one and sum to n."""
    return np.array([n // k + (i < n % k) for i in range(k)], dtype=np.int64)


def _dataset_size(
    rows: np.ndarray,
    test: np.ndarray,
    labels: np.ndarray | None,
    groups: np.ndarray | Sequence[int] | None,
    smiles: Sequence[str] | None,
) -> int:
    """The number of dataset rows the per-row inputs describe (they must agree and cover
    `rows` and `test`)."""
    lengths = {
        name: len(value)
        for name, value in (("labels", labels), ("groups", groups), ("smiles", smiles))
        if value is not None
    }
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-row inputs differ in length: {lengths}")
    top = int(max(rows.max(), test.max() if test.size else -1))
    n = next(iter(lengths.values()), top + 1)
    if rows.min() < 0 or top >= n:
        raise ValueError(f"fold or test rows outside [0, {n})")
    return n


def _scaffold_folds(
    units: list[np.ndarray], n: int, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Fold of each row: whole units (joined scaffold and molecule groups) to the emptiest fold,
    those bigger than half a fold first, each part in seeded order (Chemprop's scaffold_balanced,
    with k equal parts)."""
    half = n / k / 2
    big = [u for u in units if len(u) > half]
    small = [u for u in units if len(u) <= half]
    ordered = [big[i] for i in rng.permutation(len(big))]
    ordered += [small[i] for i in rng.permutation(len(small))]
    fold = np.empty(n, dtype=np.int64)
    filled = np.zeros(k, dtype=np.int64)
    for unit in ordered:
        f = int(np.argmin(filled))
        fold[unit] = f
        filled[f] += len(unit)
    return fold
