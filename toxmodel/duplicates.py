"""Rows that repeat a molecule: finding them, counting them, and folding them into one row.

Contract: `find_conflicts(smiles, labels)` lists SMILES texts seen with a 0 and a 1 for a task;
`count_duplicates(keys, labels)` counts repeated molecules by molecule key (`toxmodel.featurize`
canonical SMILES); `deduplicate(table, keys, policy)` makes one row per molecule as
DUPLICATE_POLICIES says. Each groups rows by key with one hash pass (`pandas.factorize`; ids
from `toxmodel.split.molecule_groups` need none) and counts labels with `np.bincount`, so 10^6
rows take a second and a few arrays of one int a row.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from toxmodel.split import molecule_groups

if TYPE_CHECKING:
    from toxmodel.data import MoleculeTable

# What to do with rows that repeat a molecule (same molecule key): keep them all (the split keeps
# them in one part), or make one row of them, each task's label the majority (a tie: missing)
# or the agreed label (a conflict: missing).
DUPLICATE_POLICIES = ("keep", "average", "drop")


@dataclass(frozen=True)
class _Groups:
    """Rows grouped by key: the group of each row and each group's size."""

    codes: np.ndarray  # int32 group of each row (int64 past 2^31 rows)
    uniques: np.ndarray  # the key of each group, in order of first appearance
    sizes: np.ndarray  # rows per group; 0 for the group of "" (no molecule, never a repeat)

    def conflicting(self, labels: np.ndarray) -> np.ndarray:
        """bool per group: a 0 and a 1 for some task. Only the rows of repeated groups are
        looked at, one task at a time, and a few bytes a row are all it allocates."""
        n_groups = len(self.uniques)
        conflict = np.zeros(n_groups, dtype=bool)
        repeated = (self.sizes > 1)[self.codes]
        if not repeated.any():
            return conflict
        every = bool(repeated.all())
        groups = self.codes if every else self.codes[repeated]
        labels = np.asarray(labels).reshape(len(self.codes), -1)
        for j in range(labels.shape[1]):
            column = labels[:, j] if every else labels[repeated, j]
            positive = np.zeros(n_groups, dtype=bool)
            positive[groups[column == 1]] = True
            negative = np.zeros(n_groups, dtype=bool)
            negative[groups[column == 0]] = True
            conflict |= positive & negative
        return conflict


def _group(keys: Sequence[str] | np.ndarray) -> _Groups:
    """Rows grouped by key: strings ("" = no molecule, in no group of repeats) or integer ids
    (`toxmodel.split.molecule_groups`: a row without a molecule has an id of its own)."""
    integer = isinstance(keys, np.ndarray) and keys.dtype.kind in "iu"
    if integer:  # numbered first-seen already (`molecule_groups`): renumbered only if not
        codes = molecule_groups(keys)
        uniques = np.arange(int(codes.max()) + 1 if len(codes) else 0)
    else:
        codes, uniques = pd.factorize(np.asarray(keys, dtype=object))
    if len(codes) < 2**31:
        codes = codes.astype(np.int32)
    sizes = np.bincount(codes, minlength=len(uniques))
    if not integer:
        sizes[uniques == ""] = 0
    return _Groups(codes, np.asarray(uniques, dtype=object), sizes)


def find_conflicts(smiles: Sequence[str], labels: np.ndarray) -> list[str]:
    """SMILES (non-empty, exact text) seen more than once with a 0 and a 1 for the same task,
    in order of first appearance."""
    if len(smiles) == 0 or np.asarray(labels).size == 0:
        return []
    groups = _group(smiles)
    return [str(s) for s in groups.uniques[groups.conflicting(labels)]]


@dataclass(frozen=True)
class DuplicateCounts:
    """How a table repeats molecules (rows keyed by `toxmodel.featurize` canonical SMILES)."""

    shared_rows: int  # rows whose molecule occurs in another row too
    molecules: int  # molecules that occur in more than one row
    conflicting: int  # of those, molecules with a 0 and a 1 for some task


def count_duplicates(keys: Sequence[str] | np.ndarray, labels: np.ndarray) -> DuplicateCounts:
    """Repeated molecules among rows keyed by `keys` ("" = no molecule, never a repeat), or by
    the integer ids `toxmodel.split.molecule_groups` gives for such keys (read without hashing:
    a job hashes its 10^6 keys once, for this count and its split)."""
    if len(keys) == 0:
        return DuplicateCounts(0, 0, 0)
    groups = _group(keys)
    repeated = groups.sizes > 1
    return DuplicateCounts(
        shared_rows=int(groups.sizes[repeated].sum()),
        molecules=int(repeated.sum()),
        conflicting=int(groups.conflicting(labels).sum()),
    )


@dataclass(frozen=True)
class Deduplicated:
    """A table with one row per molecule, and where each of its rows came from."""

    table: MoleculeTable
    rows: np.ndarray  # int64: the input row each output row was taken from (its first row)
    members: np.ndarray  # int64: the output row each input row went into
    merged: int  # input rows folded into an earlier row of their molecule
    cleared: int  # (row, task) labels set missing: a tie (average) or a conflict (drop)


def deduplicate(table: MoleculeTable, keys: Sequence[str], policy: str) -> Deduplicated:
    """One row per molecule (`keys[i]` is row i's molecule key; "" rows are kept as they are).

    The output row of a molecule is its first input row (SMILES and file line); its labels are,
    per task: "average", the majority of the molecule's labels (a tie becomes missing); "drop",
    the label its rows agree on (a 0 and a 1 become missing). Rows without a key (invalid
    SMILES) are kept one by one, so the invalid-SMILES report keeps every line. "keep" returns
    the table unchanged. The new content_hash is derived from the old one, the policy and the
    rows, so the table never shares a feature-cache entry with its source.
    """
    if policy not in DUPLICATE_POLICIES:
        raise ValueError(
            f"unknown duplicates policy {policy!r}; choose one of {list(DUPLICATE_POLICIES)}"
        )
    n = len(table)
    if len(keys) != n:
        raise ValueError(f"{n} rows but {len(keys)} molecule keys")
    if policy == "keep":
        identity = np.arange(n, dtype=np.int64)
        return Deduplicated(table, identity, identity, 0, 0)
    first: dict[str, int] = {}
    members = np.empty(n, dtype=np.int64)
    rows: list[int] = []
    for i, key in enumerate(keys):
        out = first.setdefault(key, len(rows)) if key else len(rows)
        if out == len(rows):
            rows.append(i)
        members[i] = out
    labels = table.labels
    positives = np.zeros((len(rows), labels.shape[1]))
    negatives = np.zeros((len(rows), labels.shape[1]))
    for j in range(labels.shape[1]):
        positives[:, j] = np.bincount(members, weights=labels[:, j] == 1, minlength=len(rows))
        negatives[:, j] = np.bincount(members, weights=labels[:, j] == 0, minlength=len(rows))
    if policy == "average":
        merged = np.where(positives > negatives, 1.0, np.where(negatives > positives, 0.0, np.nan))
    else:
        merged = np.where(negatives == 0, 1.0, np.where(positives == 0, 0.0, np.nan))
    merged[(positives == 0) & (negatives == 0)] = np.nan
    cleared = int(np.sum(((positives > 0) | (negatives > 0)) & np.isnan(merged)))
    idx = np.asarray(rows, dtype=np.int64)
    out_labels = merged.astype(np.float32)
    kept = table.subset(idx)  # the first row of each molecule, then its merged labels
    result = dataclasses.replace(
        kept,
        labels=out_labels,
        content_hash=hashlib.sha256(
            table.content_hash.encode() + f"duplicates={policy}".encode() + idx.tobytes()
        ).hexdigest(),
        conflicts=find_conflicts(kept.smiles, out_labels),
        lines=np.asarray([table.line_of(i) for i in idx], dtype=np.int64),
    )
    return Deduplicated(result, idx, members, n - len(rows), cleared)
