"""Label columns: which columns are tasks, missing and stray cells, one-class tasks, and that a
column read chunk by chunk names its first stray cells wherever they are."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from toxmodel import csvfile
from toxmodel.data import load_table
from toxmodel.errors import DataError
from toxmodel.featurize import FeaturizerConfig, featurize
from toxmodel.labels import MISSING_VALUES, label_value
from toxmodel.summary import describe

SMALL = "smiles,mol_id,A,B\nCCO,M1,1,0\nc1ccccc1,M2,0,\nCC(=O)O,M3,,1\n"


def test_default_targets_skip_ids_and_non_binary(make_csv: Callable[..., Path]) -> None:
    path = make_csv(
        {
            "compound_id": [0, 1, 1],
            "smiles": ["C", "CC", "CCC"],
            "weight": [16.0, 30.1, 44.1],
            "note": ["x", "y", "z"],
            "tox": [1, 0, 1],
            "flag": [True, False, True],
        }
    )
    table = load_table(path)
    assert table.tasks == ["tox", "flag"]
    np.testing.assert_array_equal(table.labels[:, 1], [1, 0, 1])
    assert list(table.skipped_columns) == ["compound_id", "weight", "note"]
    assert table.skipped_columns["compound_id"] == "id column"
    assert (
        "not binary" in table.skipped_columns["weight"]
        and "'16.0'" in table.skipped_columns["weight"]
    )


def test_explicit_targets_and_order(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv(SMALL), targets=["B", "A"])
    assert table.tasks == ["B", "A"]
    np.testing.assert_array_equal(table.labels[0], [0, 1])


def test_missing_target_named(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"\['NR-XYZ'\] not found") as info:
        load_table(make_csv(SMALL), targets=["A", "NR-XYZ"])
    assert "'B'" in str(info.value)  # lists what is available


def test_smiles_column_cannot_be_target(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match="cannot be a target"):
        load_table(make_csv(SMALL), targets=["smiles"])


def test_non_binary_target_shows_values(make_csv: Callable[..., Path]) -> None:
    path = make_csv("smiles,act\nC,1\nCC,2\nCCC,active\nCCCC,0\n")
    with pytest.raises(DataError) as info:
        load_table(path, targets=["act"])
    message = str(info.value)
    assert "'act' is not binary" in message
    assert "line 3: '2'" in message and "line 4: 'active'" in message
    assert "2 rows" in message


def test_all_missing_target_named(make_csv: Callable[..., Path]) -> None:
    path = make_csv("smiles,A,Empty\nC,1,\nCC,0,\n")
    with pytest.raises(DataError, match="task 'Empty' has no labels"):
        load_table(path, targets=["A", "Empty"])


def test_all_empty_extra_column_is_skipped_and_reported(
    make_csv: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    path = make_csv("smiles,A,notes\nC,1,\nCC,0,\nCCC,1, \n")
    with caplog.at_level(logging.WARNING, logger="toxmodel.data"):
        table = load_table(path)
    assert table.tasks == ["A"]
    assert table.skipped_columns == {"notes": "no values"}
    assert any("notes" in r.getMessage() and "no values" in r.getMessage() for r in caplog.records)


def test_no_binary_columns(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"no binary \(0/1\) label columns.*--targets"):
        load_table(make_csv("smiles,logP\nC,1.5\nCC,2.5\n"))


def _tox21_like(cells: dict[int, str] | None = None, n: int = 12) -> str:
    """smiles + NR-AR + SR-MMP; SR-MMP alternates 0/1 except the given {data row: text}."""
    rows = ["smiles,NR-AR,SR-MMP"]
    for i in range(n):
        rows.append(f"{'C' * (i + 1)},{i % 2},{(cells or {}).get(i, str((i + 1) % 2))}")
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("spelling", [*MISSING_VALUES, "n/A", "NONE", " na ", "Null"])
def test_missing_spellings_are_missing_labels(make_csv: Callable[..., Path], spelling: str) -> None:
    table = load_table(make_csv(_tox21_like({3: spelling})))
    assert table.tasks == ["NR-AR", "SR-MMP"]
    assert np.isnan(table.labels[3, 1]) and np.sum(np.isnan(table.labels)) == 1
    assert table.skipped_columns == {}


@pytest.mark.parametrize("value", ["?", "2", "inactive", "0.5"])
def test_stray_cell_in_a_binary_column_names_column_line_and_value(
    make_csv: Callable[..., Path], value: str
) -> None:
    path = make_csv(_tox21_like({3: value}))
    with pytest.raises(DataError) as info:
        load_table(path)  # auto-detected targets: SR-MMP used to vanish silently
    message = str(info.value)
    assert "'SR-MMP'" in message and f"line 5: {value!r}" in message and str(path) in message
    with pytest.raises(DataError, match=rf"'SR-MMP' is not binary.*line 5: '{value}'"):
        load_table(path, targets=["SR-MMP"])


def test_binary_spellings_are_labels(make_csv: Callable[..., Path]) -> None:
    path = make_csv("smiles,A\nC,1.0\nCC,0.0\nCCC,TRUE\nCCCC,false\nCCCCC, 1 \n")
    np.testing.assert_array_equal(load_table(path).labels[:, 0], [1, 0, 1, 0, 1])


def test_mostly_non_binary_column_is_skipped_with_reason(
    make_csv: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    path = make_csv(
        "smiles,mol_id,rings,activity,tox\n"
        "C,M1,0,inactive,0\nCC,M2,1,active,1\nCCC,M3,2,inactive,0\nCCCC,M4,3,1,1\n"
    )
    with caplog.at_level(logging.WARNING, logger="toxmodel.data"):
        table = load_table(path)
    assert table.tasks == ["tox"]
    skipped = table.skipped_columns
    assert list(skipped) == ["mol_id", "rings", "activity"]
    assert skipped["mol_id"] == "id column"
    assert "not binary" in skipped["rings"] and "'2'" in skipped["rings"]
    assert "3 of 4" in skipped["activity"] and "'inactive'" in skipped["activity"]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "mol_id" in warned and "rings" in warned and "activity" in warned
    text = describe(table, featurize(table.smiles, FeaturizerConfig(n_bits=64), n_jobs=1)).format()
    assert "columns not used as tasks: 3" in text and "mol_id: id column" in text


def test_one_class_task_is_an_error_with_counts(make_csv: Callable[..., Path]) -> None:
    path = make_csv("smiles,A,Neg,Pos\nC,1,0,1\nCC,0,0,\nCCC,1,,1\nCCCC,0,0,1\n")
    for targets in (None, ["A", "Neg", "Pos"]):
        with pytest.raises(DataError) as info:
            load_table(path, targets=targets)
        message = str(info.value)
        assert "'Neg' (0 positives, 3 negatives)" in message
        assert "'Pos' (3 positives, 0 negatives)" in message
        assert "'A'" not in message and "allow_single_class" in message


def test_allow_single_class_drops_and_reports(make_csv: Callable[..., Path]) -> None:
    path = make_csv("smiles,A,Neg\nC,1,0\nCC,0,0\nCCC,1,\n")
    table = load_table(path, allow_single_class=True)
    assert table.tasks == ["A"] and table.labels.shape == (3, 1)
    assert table.skipped_columns == {"Neg": "one class only (0 positives, 2 negatives)"}
    text = describe(table, featurize(table.smiles, FeaturizerConfig(n_bits=64), n_jobs=1)).format()
    assert "Neg: one class only (0 positives, 2 negatives)" in text
    with pytest.raises(DataError, match="every task has one class only"):
        load_table(path, targets=["Neg"], allow_single_class=True)


def test_label_spellings() -> None:
    assert [label_value(t) for t in ("0", "1", " 1.0 ", "TRUE", "false")] == [0, 1, 1, 1, 0]
    assert all(np.isnan(label_value(t)) for t in MISSING_VALUES)
    assert [label_value(t) for t in ("2", "0.5", "yes", "-1")] == [None] * 4


def test_stray_cells_spread_over_chunks_are_counted_and_the_first_named(
    make_csv: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 3 rows: the count, the first five lines and the examples span them all."""
    monkeypatch.setattr(csvfile, "CHUNK_CELLS", 9)
    rows = ["smiles,A,B,kind"]
    for i in range(60):
        b = "?" if i % 9 == 4 else str(i % 2)  # rows 4, 13, 22, ...: lines 6, 15, 24, ...
        rows.append(f"{'C' * (i % 5 + 1)},{(i + 1) % 2},{b},k{i % 4}")
    path = make_csv("\n".join(rows) + "\n", "spread.csv")
    with pytest.raises(DataError) as info:
        load_table(path)
    message = str(info.value)
    shown = ", ".join(f"line {6 + 9 * k}: '?'" for k in range(5))
    assert f"'B' holds 0/1 labels in most rows, but 7 rows hold other values: {shown}, ..." in (
        message
    )
    table = load_table(path, targets=["A"])
    assert table.labels.shape == (60, 1)
    table = load_table(make_csv("\n".join(r.replace("?", "1") for r in rows) + "\n", "ok.csv"))
    assert table.tasks == ["A", "B"]
    assert table.skipped_columns == {
        "kind": "not binary (0/1): 60 of 60 values are other, e.g. 'k0', 'k1', 'k2'"
    }
