"""Molecule tables: a file of SMILES and 0/1 labels read, validated and held as a MoleculeTable.

Reading is one streaming pass (`toxmodel.csvfile`): each chunk of rows gives up its SMILES and
its label cells (`toxmodel.labels`, 4 bytes a cell) and is dropped, and the file's sha256 comes
from the same pass, so loading holds one copy of the table (its SMILES, labels and lines) plus a
chunk, never the file's bytes, text and parsed rows side by side.

Row numbers in messages and reports are the file's line numbers as an editor shows them (header =
line 1); code keeps 0-based row indices (`MoleculeTable.line_of` maps one to the other).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from toxmodel.csvfile import local_file, open_csv
from toxmodel.duplicates import find_conflicts
from toxmodel.errors import DataError, shorten
from toxmodel.labels import LabelColumns, format_skipped
from toxmodel.sources import describe_source, resolve_source

if TYPE_CHECKING:
    from toxmodel.featurize import Features

log = logging.getLogger(__name__)

_SHOW_INVALID = 3  # reasons quoted when no SMILES of a table parsed


@dataclass(frozen=True, eq=False)
class MoleculeTable:
    """SMILES and multitask 0/1 labels (NaN = missing) exactly as read from one file."""

    smiles: list[str]  # every row as read (whitespace stripped; "" for an empty cell)
    labels: np.ndarray  # float32 (n_rows, n_tasks), 0/1, NaN where missing
    tasks: list[str]
    source: str  # the path or URL given
    content_hash: str  # sha256 of the file's bytes: the feature-cache key
    conflicts: list[str]  # SMILES that occur more than once with conflicting labels
    skipped_columns: dict[str, str] = field(default_factory=dict)  # column -> why not a task
    lines: np.ndarray | None = None  # int64 line each row starts on (header = 1); None: row + 2

    def __len__(self) -> int:
        return len(self.smiles)

    def line_of(self, row: int) -> int:
        """The file line (header = line 1) on which 0-based data row `row` starts."""
        return int(self.lines[row]) if self.lines is not None else int(row) + 2

    def subset(self, rows: np.ndarray | Sequence[int]) -> MoleculeTable:
        """The given rows (in that order) as a new table.

        Its content_hash is derived from the parent's and the row indices, so a subset never
        shares a feature-cache entry with the full table.
        """
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for a table of {len(self)} rows")
        smiles = [self.smiles[i] for i in idx]
        labels = self.labels[idx]
        digest = hashlib.sha256(self.content_hash.encode() + idx.tobytes()).hexdigest()
        return MoleculeTable(
            smiles=smiles,
            labels=labels,
            tasks=list(self.tasks),
            source=self.source,
            content_hash=digest,
            conflicts=find_conflicts(smiles, labels),
            skipped_columns=dict(self.skipped_columns),
            lines=None if self.lines is None else self.lines[idx],
        )


def read_table(path: str | Path, smiles_column: str = "smiles") -> pd.DataFrame:
    """Read a user's table exactly as `load_table` reads it; every cell comes back as text.

    The rules and refusals are `toxmodel.csvfile`'s (gzip by content, UTF-8, the delimiter
    sniffed, names stripped and unique, `smiles_column` present, ragged rows refused); a header
    with no data rows gives an empty frame (load_table refuses it).
    """
    with open_csv(local_file(path), smiles_column) as table:
        columns: list[list[str]] = [[] for _ in table.columns]
        for rows in table.chunks():
            for j, column in enumerate(columns):
                column.extend(record[j] for record in rows.records)
        names = table.columns
    data = {}
    for name, column in zip(names, columns, strict=True):
        cells = np.empty(len(column), dtype=object)
        cells[:] = column
        column.clear()
        data[name] = cells
    return pd.DataFrame(data, columns=names, dtype=object, copy=False)


def load_table(
    source: str | Path | None = None,
    smiles_column: str = "smiles",
    targets: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    *,
    allow_single_class: bool = False,
    progress: bool = False,
) -> MoleculeTable:
    """Read a .csv or .csv.gz of SMILES plus binary task columns into a MoleculeTable.

    The file (a path, a URL, or None for Tox21: `toxmodel.sources`) is read as `read_table`
    reads it, in one streaming pass; which columns are tasks and what their cells may hold is
    `toxmodel.labels`' contract (a stray value is a DataError naming the column, the file line
    and the value, wherever in the file it is). Columns that are not tasks are listed with the
    reason in `skipped_columns` and logged at WARNING.

    Rows are never dropped: an empty SMILES cell becomes "" and is reported as invalid by
    featurization. Duplicate SMILES with conflicting labels are kept and listed in `conflicts`
    (exact string match, not canonicalized). `progress` shows a bar of the bytes read.
    """
    path = resolve_source(source, cache_dir, smiles_column)
    with open_csv(path, smiles_column, progress=progress) as table:
        at = table.columns.index(smiles_column)
        labels = LabelColumns(table.columns, smiles_column, targets, path)
        smiles: list[str] = []
        lines: list[np.ndarray] = []
        for rows in table.chunks():
            smiles.extend(record[at].strip() for record in rows.records)
            lines.append(rows.lines)
            labels.add(rows)
        content_hash = table.content_hash()
    if not smiles:
        raise DataError(f"{path} has a header but no data rows (empty dataset)")
    found = labels.finish(allow_single_class)
    if found.skipped:
        log.warning(
            "%s: %d column(s) not used as tasks: %s",
            path,
            len(found.skipped),
            format_skipped(found.skipped),
        )
    conflicts = find_conflicts(smiles, found.values)
    if conflicts:
        shown = ", ".join(conflicts[:3])
        log.warning(
            "%s: %d SMILES occur more than once with conflicting labels: %s%s",
            path,
            len(conflicts),
            shown,
            ", ..." if len(conflicts) > 3 else "",
        )
    return MoleculeTable(
        smiles=smiles,
        labels=found.values,
        tasks=found.tasks,
        source=describe_source(source),
        content_hash=content_hash,
        conflicts=conflicts,
        skipped_columns=found.skipped,
        lines=np.concatenate(lines),
    )


def check_parsed(table: MoleculeTable, features: Features, listed_in: str | None = None) -> None:
    """Refuse a table none of whose SMILES parsed: there is nothing to split, train or score.

    The DataError names the source, the number of rows and the first reasons by file line;
    `listed_in` (where the caller wrote the invalid-SMILES report) is named when given.
    """
    n = len(table)
    if n == 0 or len(features.valid_rows):
        return
    shown = "; ".join(
        f"line {table.line_of(item.row)} {shorten(item.smiles)!r}: {item.reason}"
        for item in features.invalid[:_SHOW_INVALID]
    )
    more = ", ..." if len(features.invalid) > _SHOW_INVALID else ""
    where = f"; all {n} are listed in {listed_in}" if listed_in else ""
    raise DataError(
        f"{table.source}: none of its {n} SMILES could be parsed, so there is nothing to "
        f"train on ({shown}{more}){where}"
    )
