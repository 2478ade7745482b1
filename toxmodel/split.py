"""Train/validation/test splits: random, stratified by label, Bemis-Murcko scaffold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

METHODS = ("random", "stratified", "scaffold")
SPLIT_NAMES = ("train", "valid", "test")
COUNT_BLOCK = 16_384  # rows per block when counting labels per split (fits the CPU caches)
_EMPTY_HASH = hash("")  # 0 in CPython: "" is the key of a row without a molecule


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


def split_dataset(
    smiles: Sequence[str],
    labels: np.ndarray,
    config: SplitConfig,
    groups: np.ndarray | Sequence[int] | None = None,
) -> Split:
    """Divide rows into train/valid/test index arrays (each sorted, disjoint, covering all rows).

    `groups` (one int per row; `molecule_groups` makes them) keeps rows that share a group in
    one part: give one group per molecule, and validation and test never score a molecule that
    training saw. None: every row is its own group. Where every group is one row, random and
    stratified give the same split as without groups.

    random: a seeded permutation of the groups, cut at the fractions (a group goes to the part
        its middle row falls in).
    stratified: iterative stratification (Sechidis et al. 2011) of groups over the positives and
        the negatives of every task (rarest first), a group counting its rows' labels, so each
        split gets each task's positives and labelled rows in proportion; groups with no label
        at all fill the remaining room at random. Works for one or many tasks.
    scaffold: Bemis-Murcko scaffold groups (acyclic molecules share the empty scaffold; each
        unparsable SMILES is its own group), joined with `groups` where they overlap, assigned
        whole, Chemprop "scaffold_balanced" style: groups bigger than half the valid/test size
        come first, then the small ones, each part shuffled by the seed; a group goes to train
        if it fits, else valid, else test. No scaffold appears in two splits; sizes are
        approximate.
    """
    validate_split_config(config)
    y = np.asarray(labels)  # no float64 copy unless stratified reads it: 96 MB at 10^6 x 12
    n = len(smiles)
    if y.shape[0] != n:
        raise ValueError(f"{n} SMILES but {y.shape[0]} label rows")
    if n == 0:
        raise ValueError("cannot split an empty dataset")
    group_of = _group_index(groups, n)
    rng = np.random.default_rng(config.seed)
    targets = _target_sizes(n, config)
    if config.method == "random":
        assignment = _random_assignment(group_of, targets, rng)
    elif config.method == "stratified":
        y = np.asarray(y, dtype=np.float64).reshape(n, -1)
        assignment = _stratified_assignment(y, group_of, targets, rng)
    else:
        assignment = _scaffold_assignment(smiles, group_of, targets, config, rng)
    return Split(*(np.flatnonzero(assignment == k).astype(np.int64) for k in range(3)))


def molecule_groups(
    keys: Sequence[str] | np.ndarray,
    rows: np.ndarray | None = None,
    n_rows: int | None = None,
) -> np.ndarray:
    """Group ids (int64, numbered in first-seen row order) for rows keyed by molecule.

    Rows with one key share a group; an empty key (a row with no molecule) is a group of its
    own. With `rows` (ascending) and `n_rows`, the keys are those of rows `rows` of an
    `n_rows`-row table whose other rows have no molecule (a job's valid rows: no list of every
    row's key is built).

    Strings are hashed with Python's own string hash in one sequential pass and the 64-bit
    hashes grouped; every row grouped with an earlier one is then compared with it as text, so
    the groups are exact (a collision falls back to grouping the texts). pandas hashing the
    strings themselves reads them at random: 0.27 s for 10^6 canonical SMILES, 20x its time
    for 10^5. Integer keys (ids this function gave, for a subset of the rows) are renumbered
    without hashing where they keep first-seen order.
    """
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
        return _renumbered(keys.reshape(-1))
    values = keys if isinstance(keys, list) else list(np.asarray(keys, dtype=object).reshape(-1))
    n = len(values) if n_rows is None else n_rows
    at = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64).reshape(-1)
    if len(at) != len(values):
        raise ValueError(f"{len(values)} keys for {len(at)} rows")
    ids = _hashed_groups(values, at, n)
    if ids is None:  # a hash collision, or a key hashing like "": the texts decide
        full = [""] * n
        for row, key in zip(at.tolist(), values, strict=True):
            full[row] = key
        ids = _groups_by_text(full)
    return ids


def _hashed_groups(values: list[str], at: np.ndarray, n: int) -> np.ndarray | None:
    """`molecule_groups` by 64-bit hash (values[i] keys row at[i]); None where the hashes do
    not decide (two different keys with one hash, or a key hashing as "" does)."""
    hashes = np.fromiter(map(hash, values), np.int64, count=len(values))
    blank = np.flatnonzero(hashes == _EMPTY_HASH)  # "": no molecule, each row its own group
    if any(values[i] for i in blank.tolist()):
        return None
    index = np.arange(len(values), dtype=np.int64)  # into values, of the keyed rows
    keyed, keyed_hashes = at, hashes
    if len(blank):
        index, keyed, keyed_hashes = (np.delete(a, blank) for a in (index, at, hashes))
    codes, uniques = pd.factorize(keyed_hashes)  # numbered in first-seen order
    first = np.empty(len(uniques), np.int64)  # each hash's first keyed row (position in keyed)
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)
    later = np.flatnonzero(first[codes] != np.arange(len(codes)))  # rows joining an earlier one
    for i, j in zip(index[later].tolist(), index[first[codes[later]]].tolist(), strict=True):
        if values[i] != values[j]:
            return None
    if len(keyed) == n:  # every row has a molecule: the codes are the ids
        return codes.astype(np.int64)
    opens = np.ones(n, dtype=bool)  # rows opening a group: a key's first row, a row without one
    opens[keyed] = False
    opens[keyed[first]] = True
    ids = np.cumsum(opens, dtype=np.int64) - 1
    ids[keyed] = ids[keyed[first[codes]]]
    return ids


def _groups_by_text(keys: list[str]) -> np.ndarray:
    """`molecule_groups` by the key texts themselves (pandas' string hash table)."""
    values = np.array(keys, dtype=object)
    empty = np.flatnonzero(values == "")
    if len(empty):  # each its own group, in its place: a key no molecule has
        values[empty] = [f"\x00row:{i}" for i in empty]
    codes, _ = pd.factorize(values)
    return codes.astype(np.int64)


def _renumbered(ids: np.ndarray) -> np.ndarray:
    """Integer ids renumbered 0..G-1 in first-seen order: as they are when already so; by a
    table of the ids present when new ids still come in increasing order (a first-seen
    numbering with some rows left out, e.g. a job's invalid rows); otherwise hashed."""
    if _first_seen(ids):
        return ids.astype(np.int64, copy=False)
    low, high = int(ids.min()), int(ids.max())
    if low >= 0 and high < 2 * len(ids):
        present = np.zeros(high + 1, dtype=np.int64)
        present[ids] = 1
        ranked = (np.cumsum(present) - 1)[ids]
        if _first_seen(ranked):
            return ranked
    return pd.factorize(ids)[0].astype(np.int64)


def missing_class_warnings(labels: np.ndarray, split: Split, tasks: Sequence[str]) -> list[str]:
    """One message per (split, task) lacking positives or negatives (its AUC is undefined there).

    Empty splits (a fraction of 0) are skipped.
    """
    y = np.asarray(labels)
    if y.ndim == 1:
        y = y.reshape(-1, 1)
    part = np.zeros(len(y), dtype=np.int8)  # 1 + the split each row is in (0: none)
    for k, name in enumerate(SPLIT_NAMES):
        part[getattr(split, name)] = k + 1
    # positives and negatives per (part, task), a block of rows at a time: no copy of the
    # labels (gathering each split's rows cost 0.35 s at 10^6 rows x 12 tasks, reading column
    # by column 0.12 s)
    positives = np.zeros((len(SPLIT_NAMES) + 1, y.shape[1]), dtype=np.int64)
    negatives = np.zeros_like(positives)
    for start in range(0, len(y), COUNT_BLOCK):
        block, where = y[start : start + COUNT_BLOCK], part[start : start + COUNT_BLOCK]
        for k in range(1, len(positives)):
            rows = block[where == k]
            positives[k] += np.count_nonzero(rows == 1, axis=0)
            negatives[k] += np.count_nonzero(rows == 0, axis=0)
    messages: list[str] = []
    for k, name in enumerate(SPLIT_NAMES):
        size = len(getattr(split, name))
        if size == 0:
            continue
        for j, task in enumerate(tasks):
            pos, neg = int(positives[k + 1, j]), int(negatives[k + 1, j])
            if pos and neg:
                continue
            lacking = "positives" if not pos else "negatives"
            if not pos and not neg:
                lacking = "labels"
            messages.append(
                f"{name} split: task {task!r} has no {lacking} ({pos} positives, "
                f"{neg} negatives in {size} rows); its ROC-AUC is undefined there"
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


def _group_index(groups: np.ndarray | Sequence[int] | None, n: int) -> np.ndarray:
    """Each row's group renumbered 0..G-1 in first-seen row order (so the rows themselves when
    every group is one row)."""
    if groups is None:
        return np.arange(n, dtype=np.int64)
    g = np.asarray(groups).reshape(-1)
    if g.shape[0] != n:
        raise ValueError(f"{n} rows but {g.shape[0]} group ids")
    if g.size and not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"group ids must be integers, got dtype {g.dtype}")
    return _renumbered(g)  # as they are when `molecule_groups` numbered them: no hash


def _first_seen(g: np.ndarray) -> bool:
    """Whether integer ids are 0..G-1 numbered in first-seen row order: the first is 0, none is
    negative, and each is at most one above the largest before it (so a new one is exactly the
    next)."""
    if not g.size:
        return True
    if g[0] != 0 or g.min() < 0:
        return False
    return bool(np.all(g[1:] <= np.maximum.accumulate(g)[:-1] + 1))


def _cut(sizes: np.ndarray, quotas: np.ndarray) -> np.ndarray:
    """Part (0 .. len(quotas) - 1) of each group when groups of `sizes` are laid end to end and
    cut at the cumulative `quotas`: a group goes where its middle falls (a one-row group: where
    it lies)."""
    middle = np.cumsum(sizes) - sizes + (sizes - 1) / 2.0
    bounds = np.cumsum(quotas)
    last = len(quotas) - 1
    return np.minimum(np.searchsorted(bounds, middle, side="right"), last).astype(np.int64)


def _random_assignment(
    group_of: np.ndarray, targets: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    sizes = np.bincount(group_of)
    order = rng.permutation(sizes.size)
    part = np.empty(sizes.size, dtype=np.int64)
    part[order] = _cut(sizes[order], targets)
    return part[group_of]


def _stratified_assignment(
    y: np.ndarray, group_of: np.ndarray, targets: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Iterative stratification of groups over (task, class) pairs: positives and negatives of
    every task, a group carrying the sum of its rows' labels.

    Balancing both classes keeps each task's labelled count, and so its positive rate, in
    proportion even where labels are missing unevenly.
    """
    n_groups = int(group_of.max()) + 1
    sizes = np.bincount(group_of, minlength=n_groups)
    per_row = np.concatenate([y == 1, y == 0], axis=1).astype(np.int64)
    carried = np.zeros((n_groups, per_row.shape[1]), dtype=np.int64)
    np.add.at(carried, group_of, per_row)
    open_splits = targets > 0
    fractions = targets / targets.sum()
    desired = fractions[:, None] * carried.sum(axis=0)[None, :].astype(np.float64)
    capacity = targets.astype(np.float64).copy()
    part = np.full(n_groups, -1, dtype=np.int64)
    remaining = carried > 0
    order = rng.permutation(n_groups)
    counts = carried.sum(axis=0)
    while True:
        active = np.flatnonzero(counts > 0)
        if active.size == 0:
            break
        fewest = active[counts[active] == counts[active].min()]
        task = int(rng.choice(fewest))
        for group in order[remaining[order, task]]:
            want = np.where(open_splits, desired[:, task], -np.inf)
            best = np.flatnonzero(want == want.max())
            if best.size > 1:
                room = capacity[best]
                best = best[room == room.max()]
            k = int(best[0]) if best.size == 1 else int(rng.choice(best))
            part[group] = k
            capacity[k] -= sizes[group]
            desired[k] -= carried[group]
            counts -= np.where(remaining[group], carried[group], 0)
            remaining[group] = False
    rest = order[part[order] < 0]
    if rest.size:
        filled = np.bincount(part[part >= 0], weights=sizes[part >= 0], minlength=targets.size)
        room = np.maximum(targets - filled.astype(np.int64), 0)
        room = _share(int(sizes[rest].sum()), room, open_splits)
        part[rest] = _cut(sizes[rest], room)
    return part[group_of]


def _share(total: int, room: np.ndarray, open_splits: np.ndarray) -> np.ndarray:
    """Split `total` rows over the splits by remaining room (all rows placed, open splits only)."""
    room = np.where(open_splits, room, 0).astype(np.int64)
    if room.sum() >= total:
        out = np.zeros(room.size, dtype=np.int64)
        left = total
        for k in range(room.size):
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
    smiles: Sequence[str],
    group_of: np.ndarray,
    targets: np.ndarray,
    config: SplitConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Whole scaffold groups to splits, big groups first (Chemprop scaffold_balanced).

    A scaffold group and a row group that share a row are one group (union-find): two SMILES of
    one molecule may carry different scaffolds as written (a salt, a tautomer standardized).
    """
    groups = _join(scaffold_groups(smiles), group_of)
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


def _join(scaffolds: list[np.ndarray], group_of: np.ndarray) -> list[np.ndarray]:
    """Row groups of the union of two partitions (connected components), ordered by their first
    row as `scaffold_groups` orders its own; unchanged when every row group is one row."""
    n = group_of.size
    parent = np.arange(n, dtype=np.int64)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def union(rows: np.ndarray) -> None:
        root = find(int(rows[0]))
        for r in rows[1:]:
            other = find(int(r))
            if other != root:
                parent[max(root, other)] = min(root, other)
                root = min(root, other)

    for rows in scaffolds:
        union(rows)
    by_group = np.argsort(group_of, kind="stable")
    for rows in np.split(by_group, np.cumsum(np.bincount(group_of))[:-1]):
        if rows.size > 1:
            union(rows)
    components: dict[int, list[int]] = {}
    for i in range(n):  # a component is first met at its lowest row: first-seen order
        components.setdefault(find(i), []).append(i)
    return [np.asarray(rows, dtype=np.int64) for rows in components.values()]
