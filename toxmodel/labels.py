"""Which columns of a table are binary task labels, read chunk by chunk into one float32 matrix.

Contract: `LabelColumns(columns, smiles_column, targets, path)` takes the header, `add(rows)`
each chunk of rows as `toxmodel.csvfile` reads them, and `finish(allow_single_class)` returns
the tasks, their labels (float32 (n_rows, n_tasks), 0/1, NaN where missing) and the columns
skipped with why. In label columns the spellings in MISSING_VALUES (any case, whitespace
stripped) are missing labels; 0/1, 0.0/1.0 and true/false are labels; anything else is an
error naming the column, the file line and the value.

`targets=None` takes every column besides the SMILES column whose non-missing cells are mostly
(more than half) 0/1; a stray other value in such a column is the error above. Columns that are
not tasks (id-like names such as mol_id, no values at all, or mostly other values) are skipped
with the reason. Requested `targets` must exist and hold only labels. A task whose labelled rows
are all 0 or all 1 is an error naming it and its counts; `allow_single_class=True` drops it into
the skipped columns instead.

Why chunk by chunk: a cell's text is classified once and dropped; a column keeps 4 bytes a row,
its counts and the first few cells that are not labels (what the messages quote), so a table of
10^6 rows never holds its label columns as text.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from toxmodel.csvfile import Rows
from toxmodel.errors import DataError, shorten

# Missing-label spellings in label columns, compared case-insensitively after stripping
# whitespace (SMILES cells are kept verbatim).
MISSING_VALUES = ["", "NA", "N/A", "n/a", "na", "NaN", "nan", "null", "NULL", "None", "-"]
ID_COLUMNS = {"id", "mol_id", "molecule_id", "compound_id", "cas", "name", "index", "inchikey"}
SHOW_VALUES = 5  # cells that are not labels quoted per column
_SHOW_EXAMPLES = 3  # distinct other values quoted for a column skipped as not binary
_MISSING = frozenset(v.lower() for v in MISSING_VALUES)
_BOOLEANS = {"false": 0.0, "true": 1.0}


@dataclass(frozen=True)
class Labels:
    """The task columns of a table."""

    tasks: list[str]
    values: np.ndarray  # float32 (n_rows, n_tasks): 0/1, NaN where missing
    skipped: dict[str, str]  # column -> why it is not a task


def id_reason(name: str) -> str | None:
    """Why a column is never taken as a task by its name alone, or None."""
    lowered = name.strip().lower()
    if lowered.startswith("unnamed:"):
        return "no column name"
    if lowered in ID_COLUMNS or lowered.endswith("_id"):
        return "id column"
    return None


@functools.lru_cache(maxsize=4096)
def label_value(text: str) -> float | None:
    """0.0/1.0 for a label cell (0, 1, 0.0, 1.0, true, false), NaN when missing, else None."""
    key = text.strip().lower()
    if key in _MISSING:
        return math.nan
    if key in _BOOLEANS:
        return _BOOLEANS[key]
    try:
        value = float(key)
    except ValueError:
        return None
    return value if value in (0.0, 1.0) else None


@dataclass
class _Column:
    """One candidate label column: its counts and the first few cells that are not labels."""

    name: str
    index: int  # position in the header
    present: int = 0  # cells that are not a missing-value spelling
    other: int = 0  # present cells that are not a 0/1 label
    positives: int = 0
    negatives: int = 0
    shown: list[tuple[int, str]] = field(default_factory=list)  # (line, text), first few others
    examples: list[str] = field(default_factory=list)  # distinct other values, first few

    def note_others(self, cells: np.ndarray, other: np.ndarray, lines: np.ndarray) -> None:
        """Keep the first cells of a chunk's column that are not labels, for the messages."""
        if len(self.shown) < SHOW_VALUES:
            for row in np.flatnonzero(other)[: SHOW_VALUES - len(self.shown)].tolist():
                self.shown.append((int(lines[row]), str(cells[row])))
        if len(self.examples) < _SHOW_EXAMPLES:
            for value in pd.unique(cells[other])[:_SHOW_EXAMPLES].tolist():
                if len(self.examples) < _SHOW_EXAMPLES and value not in self.examples:
                    self.examples.append(str(value))

    def bad_cells(self) -> str:
        """'2 rows hold other values: line 3: '2', line 9: 'inactive'' (the first few shown)."""
        shown = ", ".join(f"line {line}: {shorten(text)!r}" for line, text in self.shown)
        more = ", ..." if self.other > len(self.shown) else ""
        what = "row holds another value" if self.other == 1 else "rows hold other values"
        return f"{self.other} {what}: {shown}{more}"

    def not_binary_reason(self) -> str:
        return (
            f"not binary (0/1): {self.other} of {self.present} values are other, e.g. "
            f"{', '.join(repr(shorten(v)) for v in self.examples)}"
        )


class LabelColumns:
    """The label columns of one table, filled chunk by chunk (see the module docstring)."""

    def __init__(
        self,
        columns: Sequence[str],
        smiles_column: str,
        targets: Sequence[str] | None,
        path: Path | str,
    ) -> None:
        self.path = path
        self.smiles_column = smiles_column
        self.targets = None
        if targets is not None:
            self.targets = _requested(columns, smiles_column, targets, path)
        self.skipped: dict[str, str] = {}  # by its header alone or by its values
        self.single_class: dict[str, str] = {}  # tasks dropped for one class (when allowed)
        self._columns: list[_Column] = []
        names = self.targets if self.targets is not None else columns
        for name in names:
            if self.targets is None:
                if name == smiles_column:
                    continue
                why = id_reason(name)
                if why is not None:
                    self.skipped[name] = why
                    continue
            self._columns.append(_Column(name, list(columns).index(name)))
        self._order = [c for c in columns if c != smiles_column]  # how skipped columns are listed
        self._indices = [c.index for c in self._columns]
        self._blocks: list[np.ndarray] = []  # int8 (rows, columns read): 0/1, -1 otherwise
        self.rows = 0

    def add(self, rows: Rows) -> None:
        """Classify a chunk's label cells: each distinct text once, in one pass over the chunk;
        keep them as 1-byte codes, count them, note the first few that are not labels."""
        self.rows += len(rows)
        if not self._columns:
            return
        cells = np.array(rows.records, dtype=object)[:, self._indices]
        codes, uniques = pd.factorize(cells.ravel())
        parsed = [label_value(str(u)) for u in uniques]
        lookup = np.array([-1 if v is None or v != v else v for v in parsed], dtype=np.int8)
        is_other = np.array([v is None for v in parsed], dtype=bool)
        values = lookup[codes].reshape(cells.shape)
        other = is_other[codes].reshape(cells.shape)
        self._blocks.append(values)
        positives, negatives = (values == 1).sum(axis=0), (values == 0).sum(axis=0)
        labelled, others = (values >= 0).sum(axis=0), other.sum(axis=0)
        for j, column in enumerate(self._columns):
            column.positives += int(positives[j])
            column.negatives += int(negatives[j])
            column.present += int(labelled[j] + others[j])
            if others[j]:
                column.other += int(others[j])
                column.note_others(cells[:, j], other[:, j], rows.lines)

    def finish(self, allow_single_class: bool = False) -> Labels:
        """The tasks and their labels; DataError naming the column, line and value at fault."""
        tasks = self._check_targets() if self.targets is not None else self._infer_tasks()
        tasks = self._check_classes(tasks, allow_single_class)
        keep = [self._columns.index(c) for c in tasks]
        values = np.empty((self.rows, len(keep)), dtype=np.float32)
        at = 0
        for i, block in enumerate(self._blocks):  # each block released once copied
            part = block[:, keep]
            values[at : at + len(part)] = part
            values[at : at + len(part)][part < 0] = np.nan
            at += len(part)
            self._blocks[i] = np.empty((0, 0), dtype=np.int8)
        self._blocks = []
        return Labels([c.name for c in tasks], values, {**self._skipped(), **self.single_class})

    def _skipped(self) -> dict[str, str]:
        """The columns skipped by header or values, in header order."""
        return {name: self.skipped[name] for name in self._order if name in self.skipped}

    def _check_targets(self) -> list[_Column]:
        for column in self._columns:
            if column.other:
                raise DataError(
                    f"{self.path}: target column {column.name!r} is not binary (0/1): "
                    f"{column.bad_cells()}"
                )
            if not column.present:
                raise DataError(
                    f"{self.path}: task {column.name!r} has no labels (every value is missing)"
                )
        return list(self._columns)

    def _infer_tasks(self) -> list[_Column]:
        tasks: list[_Column] = []
        for column in self._columns:
            if column.present == 0:
                self.skipped[column.name] = "no values"
            elif column.other * 2 >= column.present:  # mostly not 0/1: another kind of column
                self.skipped[column.name] = column.not_binary_reason()
            elif column.other:
                raise DataError(
                    f"{self.path}: column {column.name!r} holds 0/1 labels in most rows, but "
                    f"{column.bad_cells()}. Use 0 or 1, or an empty cell (or NA, n/a, ...) for "
                    "a missing label; if it is not a label column, name the label columns with "
                    "--targets"
                )
            else:
                tasks.append(column)
        if not tasks:
            skipped = format_skipped(self._skipped()) or "no other columns"
            raise DataError(
                f"{self.path}: no binary (0/1) label columns found besides "
                f"{self.smiles_column!r} (skipped: {skipped}); name the label columns with "
                "--targets"
            )
        return tasks

    def _check_classes(self, tasks: list[_Column], allow_single_class: bool) -> list[_Column]:
        """Refuse (or, when allowed, skip) tasks whose labels are all 0 or all 1."""
        single = {
            c.name: f"{c.positives} positives, {c.negatives} negatives"
            for c in tasks
            if not (c.positives and c.negatives)
        }
        if not single:
            return tasks
        shown = ", ".join(f"{task!r} ({counts})" for task, counts in list(single.items())[:10])
        shown += f", ... ({len(single)} in all)" if len(single) > 10 else ""
        if not allow_single_class:
            raise DataError(
                f"{self.path}: task(s) with one class only, which a classifier can neither "
                f"learn nor be scored on: {shown}. Fix the labels, leave the column(s) out of "
                "the targets, or load with allow_single_class to skip such tasks"
            )
        keep = [c for c in tasks if c.name not in single]
        if not keep:
            raise DataError(f"{self.path}: every task has one class only: {shown}")
        self.single_class = {task: f"one class only ({c})" for task, c in single.items()}
        return keep


def format_skipped(skipped: dict[str, str], limit: int = 10) -> str:
    """ "'mol_id': id column; 'notes': no values" (the first `limit`, then how many in all)."""
    items = list(skipped.items())
    text = "; ".join(f"{name!r}: {why}" for name, why in items[:limit])
    return text + (f"; ... ({len(items)} in all)" if len(items) > limit else "")


def _requested(
    columns: Sequence[str], smiles_column: str, targets: Sequence[str], path: Path | str
) -> list[str]:
    """The requested target names, checked against the header."""
    if isinstance(targets, str):
        targets = [targets]
    requested = [str(t).strip() for t in targets]
    if not requested:
        raise DataError(f"{path}: an empty list of target columns was given")
    missing = [t for t in requested if t not in columns]
    if missing:
        available = [c for c in columns if c != smiles_column]
        raise DataError(
            f"{path}: target column(s) {missing} not found; available columns: "
            f"{available[:30]}{' ...' if len(available) > 30 else ''}"
        )
    if smiles_column in requested:
        raise DataError(f"{path}: the SMILES column {smiles_column!r} cannot be a target")
    duplicates = sorted({t for t in requested if requested.count(t) > 1})
    if duplicates:
        raise DataError(f"{path}: target column(s) listed twice: {duplicates}")
    return requested
