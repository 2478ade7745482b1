"""Train/validation/test splits: random, stratified by label, Bemis-Murcko scaffold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

METHODS = ("random", "stratified", "scaffold")
SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class SplitConfig:
    """How rows are divided; deterministic for a seed."""

    method: str = "random"  # random | stratified | scaffold
    train: float = 0.8
    valid: float = 0.1
    test: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Split:
    """Disjoint int64 row indices."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def validate_split_config(config: SplitConfig) -> None:
    """ValueError naming the problem: unknown method, bad or non-summing fractions."""
    if config.method not in METHODS:
        raise ValueError(f"unknown split method {config.method!r}; choose one of {list(METHODS)}")
    fractions = {"train": config.train, "valid": config.valid, "test": config.test}
    for name, value in fractions.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"split fraction {name}={value!r} must be a number >= 0")
    if config.train <= 0:
        raise ValueError(f"split fraction train={config.train!r} must be > 0")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions must sum to 1, got train+valid+test = {config.train}+"
            f"{config.valid}+{config.test} = {total:g}"
        )


def split_dataset(smiles: Sequence[str], labels: np.ndarray, config: SplitConfig) -> Split:
    """Divide rows into train/valid/test index arrays (each sorted, disjoint, covering all rows).

    random: a seeded permutation cut at the fractions.
    stratified: iterative stratification (Sechidis et al. 2011) over the positives and the
        negatives of every task (rarest first), so each split gets each task's positives and
        labelled rows in proportion; rows with no label at all fill the remaining room at
        random. Works for one or many tasks.
    scaffold: Bemis-Murcko scaffold groups (acyclic molecules share the empty scaffold; each
        unparsable SMILES is its own group) assigned whole, Chemprop "scaffold_balanced" style:
        groups bigger than half the valid/test size come first, then the small ones, each part
        shuffled by the seed; a group goes to train if it fits, else valid, else test. No
        scaffold appears in two splits; sizes are approximate.
    """
    validate_split_config(config)
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim == 1:
        y = y.reshape(-1, 1)
    n = len(smiles)
    if y.shape[0] != n:
        raise ValueError(f"{n} SMILES but {y.shape[0]} label rows")
    if n == 0:
        raise ValueError("cannot split an empty dataset")
    rng = np.random.default_rng(config.seed)
    targets = _target_sizes(n, config)
    if config.method == "random":
        assignment = _random_assignment(n, targets, rng)
    elif config.method == "stratified":
        assignment = _stratified_assignment(y, targets, rng)
    else:
        assignment = _scaffold_assignment(smiles, targets, config, rng)
    return Split(*(np.flatnonzero(assignment == k).astype(np.int64) for k in range(3)))


def missing_class_warnings(labels: np.ndarray, split: Split, tasks: Sequence[str]) -> list[str]:
    """One message per (split, task) lacking positives or negatives (its AUC is undefined there).

    Empty splits (a fraction of 0) are skipped.
    """
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim == 1:
        y = y.reshape(-1, 1)
    messages: list[str] = []
    for name in SPLIT_NAMES:
        rows = np.asarray(getattr(split, name), dtype=np.int64)
        if rows.size == 0:
            continue
        part = y[rows]
        for j, task in enumerate(tasks):
            positives = int(np.sum(part[:, j] == 1))
            negatives = int(np.sum(part[:, j] == 0))
            if positives and negatives:
                continue
            lacking = "positives" if not positives else "negatives"
            if not positives and not negatives:
                lacking = "labels"
            messages.append(
                f"{name} split: task {task!r} has no {lacking} ({positives} positives, "
                f"{negatives} negatives in {rows.size} rows); its ROC-AUC is undefined there"
            )
    return messages


def _target_sizes(n: int, config: SplitConfig) -> np.ndarray:
    """Row counts per split from cumulative rounded boundaries (they sum to n exactly)."""
    train_end = round(config.train * n)
    valid_end = round((config.train + config.valid) * n)
    if config.test == 0:
        valid_end = n
    if config.valid == 0 and config.test == 0:
        train_end = n
    train_end = max(1, min(train_end, n))
    valid_end = max(train_end, min(valid_end, n))
    return np.array([train_end, valid_end - train_end, n - valid_end], dtype=np.int64)


def _random_assignment(n: int, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    assignment = np.empty(n, dtype=np.int64)
    order = rng.permutation(n)
    bounds = np.cumsum(targets)
    assignment[order[: bounds[0]]] = 0
    assignment[order[bounds[0] : bounds[1]]] = 1
    assignment[order[bounds[1] :]] = 2
    return assignment


def _stratified_assignment(
    y: np.ndarray, targets: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Iterative stratification over (task, class) pairs: positives and negatives of every task.

    Balancing both classes keeps each task's labelled count, and so its positive rate, in
    proportion even where labels are missing unevenly.
    """
    n = y.shape[0]
    positive = np.concatenate([y == 1, y == 0], axis=1)
    open_splits = targets > 0
    fractions = targets / targets.sum()
    desired = fractions[:, None] * positive.sum(axis=0)[None, :].astype(np.float64)
    capacity = targets.astype(np.float64).copy()
    assignment = np.full(n, -1, dtype=np.int64)
    remaining = positive.copy()
    order = rng.permutation(n)
    counts = remaining.sum(axis=0)
    while True:
        active = np.flatnonzero(counts > 0)
        if active.size == 0:
            break
        fewest = active[counts[active] == counts[active].min()]
        task = int(rng.choice(fewest))
        rows = order[remaining[order, task]]
        for row in rows:
            want = np.where(open_splits, desired[:, task], -np.inf)
            best = np.flatnonzero(want == want.max())
            if best.size > 1:
                room = capacity[best]
                best = best[room == room.max()]
            k = int(best[0]) if best.size == 1 else int(rng.choice(best))
            assignment[row] = k
            capacity[k] -= 1
            desired[k] -= positive[row]
            counts -= remaining[row]
            remaining[row] = False
    rest = order[assignment[order] < 0]
    room = np.maximum(targets - np.bincount(assignment[assignment >= 0], minlength=3), 0)
    if rest.size:
        room = _share(rest.size, room, open_splits)
        bounds = np.cumsum(room)
        assignment[rest[: bounds[0]]] = 0
        assignment[rest[bounds[0] : bounds[1]]] = 1
        assignment[rest[bounds[1] :]] = 2
    return assignment


def _share(total: int, room: np.ndarray, open_splits: np.ndarray) -> np.ndarray:
    """Split `total` rows over the splits by remaining room (all rows placed, open splits only)."""
    room = np.where(open_splits, room, 0).astype(np.int64)
    if room.sum() >= total:
        out = np.zeros(3, dtype=np.int64)
        left = total
        for k in range(3):
            out[k] = min(room[k], left)
            left -= out[k]
        return out
    extra = total - room.sum()
    out = room.copy()
    out[int(np.argmax(open_splits))] += extra
    return out


def scaffold_groups(smiles: Sequence[str]) -> list[np.ndarray]:
    """Row indices grouped by Bemis-Murcko scaffold (first-seen order).

    Acyclic molecules share the empty scaffold; each unparsable SMILES is a group of its own.
    """
    from rdkit import Chem, rdBase
    from rdkit.Chem.Scaffolds import MurckoScaffold

    groups: dict[str, list[int]] = {}
    with rdBase.BlockLogs():
        for i, text in enumerate(smiles):
            mol = Chem.MolFromSmiles(text) if isinstance(text, str) and text.strip() else None
            if mol is None:
                key = f"\x00invalid:{i}"
            else:
                try:
                    key = MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)
                except Exception:
                    key = f"\x00invalid:{i}"
            groups.setdefault(key, []).append(i)
    return [np.asarray(rows, dtype=np.int64) for rows in groups.values()]


def _scaffold_assignment(
    smiles: Sequence[str], targets: np.ndarray, config: SplitConfig, rng: np.random.Generator
) -> np.ndarray:
    """Whole scaffold groups to splits, big groups first (Chemprop scaffold_balanced)."""
    groups = scaffold_groups(smiles)
    half_valid, half_test = targets[1] / 2, targets[2] / 2
    big = [g for g in groups if len(g) > half_valid or len(g) > half_test]
    small = [g for g in groups if not (len(g) > half_valid or len(g) > half_test)]
    ordered = [big[i] for i in rng.permutation(len(big))]
    ordered += [small[i] for i in rng.permutation(len(small))]
    assignment = np.empty(len(smiles), dtype=np.int64)
    filled = np.zeros(3, dtype=np.int64)
    open_splits = np.array([config.train > 0, config.valid > 0, config.test > 0])
    for group in ordered:
        fits = np.flatnonzero(open_splits & (filled + len(group) <= targets))
        if fits.size:
            k = int(fits[0])
        else:
            k = int(np.argmax(np.where(open_splits, targets - filled, np.iinfo(np.int64).min)))
        assignment[group] = k
        filled[k] += len(group)
    return assignment
