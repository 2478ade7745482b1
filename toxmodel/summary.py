"""What `toxtune data` prints about a table: sizes, invalid SMILES, repeated molecules, skipped
columns and the label balance per task.

Contract: `describe(table, features)` counts; `DataSummary.format()` is the text, whose length
does not grow with the rows: it quotes at most `max_invalid` invalid rows (the summary keeps no
more than SHOW_INVALID of them) and says how many more there are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from toxmodel.duplicates import DuplicateCounts, count_duplicates
from toxmodel.errors import shorten
from toxmodel.split import molecule_groups

if TYPE_CHECKING:
    from toxmodel.data import MoleculeTable
    from toxmodel.featurize import Features

SHOW_INVALID = 50  # invalid rows a summary keeps to quote


@dataclass(frozen=True)
class TaskSummary:
    """Label counts of one task."""

    task: str
    labelled: int
    positives: int
    negatives: int

    @property
    def positive_rate(self) -> float:
        return self.positives / self.labelled if self.labelled else float("nan")


@dataclass(frozen=True)
class DataSummary:
    """What `toxtune data` prints: sizes, invalid SMILES, repeated molecules, skipped columns,
    label balance."""

    source: str
    rows: int
    valid: int
    invalid: list[tuple[int, str, str]]  # the first few: (file line, header = 1; smiles; reason)
    tasks: list[TaskSummary]
    conflicts: int
    n_features: int | None
    skipped_columns: dict[str, str] = field(default_factory=dict)  # column -> why not a task
    duplicates: DuplicateCounts | None = None  # by molecule key; None: features without keys
    standardized: bool = False  # molecule keys were taken after standardization

    @property
    def n_invalid(self) -> int:
        return self.rows - self.valid

    def format(self, max_invalid: int = SHOW_INVALID) -> str:
        """Human-readable multi-line text."""
        lines = [
            f"source: {self.source}",
            f"rows: {self.rows}",
            f"valid SMILES: {self.valid}",
            f"invalid SMILES: {self.n_invalid}",
        ]
        shown = self.invalid[:max_invalid]
        for line, smiles, reason in shown:
            lines.append(f"  line {line}: {shorten(smiles)!r}: {reason}")
        if self.n_invalid > len(shown):
            more = self.n_invalid - len(shown)
            lines.append(f"  ... and {more} more (write them all with --invalid-report)")
        if self.n_features is not None:
            lines.append(f"features per molecule: {self.n_features}")
        if self.conflicts:
            lines.append(f"duplicate SMILES with conflicting labels: {self.conflicts}")
        if self.duplicates is not None:
            d = self.duplicates
            how = "canonical SMILES without stereo"
            how = f"standardized {how}" if self.standardized else how
            lines.append(
                f"rows sharing a molecule with another row: {d.shared_rows} "
                f"({d.molecules} molecules, by {how})"
            )
            lines.append(f"molecules with conflicting labels: {d.conflicting}")
        if self.skipped_columns:
            lines.append(f"columns not used as tasks: {len(self.skipped_columns)}")
            skipped = list(self.skipped_columns.items())
            lines.extend(f"  {name}: {why}" for name, why in skipped[:max_invalid])
            if len(skipped) > max_invalid:
                lines.append(f"  ... and {len(skipped) - max_invalid} more")
        width = max([len("task"), *(len(t.task) for t in self.tasks)])
        lines.append(f"tasks: {len(self.tasks)}")
        lines.append(
            f"  {'task':<{width}}  {'labelled':>8}  {'positives':>9}  {'negatives':>9}  "
            f"{'pos rate':>8}"
        )
        for t in self.tasks:
            lines.append(
                f"  {t.task:<{width}}  {t.labelled:>8}  {t.positives:>9}  {t.negatives:>9}  "
                f"{t.positive_rate:>8.3f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def describe(table: MoleculeTable, features: Features | None = None) -> DataSummary:
    """Counts behind `summarize`; SMILES are featurized (Morgan bits) when no features are given.

    Repeated molecules are counted by the features' molecule keys (canonical SMILES without
    stereo, after standardization when the features were made with it).
    """
    if features is None:
        from toxmodel.featurize import FeaturizerConfig, featurize

        features = featurize(table.smiles, FeaturizerConfig())
    labels = table.labels
    tasks = [
        TaskSummary(
            task=task,
            labelled=int(np.sum(~np.isnan(labels[:, j]))),
            positives=int(np.sum(labels[:, j] == 1)),
            negatives=int(np.sum(labels[:, j] == 0)),
        )
        for j, task in enumerate(table.tasks)
    ]
    duplicates = None
    if features.canonical is not None:
        # the keys hashed as a job hashes them (`molecule_groups`), the valid rows' only
        ids = molecule_groups(features.molecule_keys(), features.valid_rows, len(table))
        duplicates = count_duplicates(ids, labels)
    return DataSummary(
        source=table.source,
        rows=len(table),
        valid=len(features.valid_rows),
        invalid=[
            (table.line_of(i.row), i.smiles, i.reason) for i in features.invalid[:SHOW_INVALID]
        ],
        tasks=tasks,
        conflicts=len(table.conflicts),
        n_features=features.n_features,
        skipped_columns=dict(table.skipped_columns),
        duplicates=duplicates,
        standardized=features.config.standardize,
    )


def summarize(table: MoleculeTable, features: Features | None = None) -> str:
    """A printable dataset summary: rows, invalid SMILES by file line, skipped columns, labels."""
    return describe(table, features).format()
