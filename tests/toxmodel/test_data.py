"""Loading tables: the MoleculeTable a file gives, read_table's frame, what is refused, real data,
and that a long file is read in one pass holding one copy of its table."""

from __future__ import annotations

import hashlib
import logging
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from toxmodel import csvfile
from toxmodel.data import MoleculeTable, check_parsed, load_table, read_table
from toxmodel.errors import DataError
from toxmodel.featurize import FeaturizerConfig, featurize
from toxmodel.sources import TOX21_TASKS, TOX21_URL
from toxmodel.summary import describe

SMALL = "smiles,mol_id,A,B\nCCO,M1,1,0\nc1ccccc1,M2,0,\nCC(=O)O,M3,,1\n"


def test_load_small_csv_defaults(make_csv: Callable[..., Path]) -> None:
    path = make_csv(SMALL)
    table = load_table(path)
    assert table.tasks == ["A", "B"]  # mol_id is not a task
    assert table.smiles == ["CCO", "c1ccccc1", "CC(=O)O"]
    assert table.labels.dtype == np.float32
    np.testing.assert_array_equal(table.labels, [[1, 0], [0, np.nan], [np.nan, 1]])
    assert table.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert table.source == str(path)
    assert table.conflicts == []
    assert len(table) == 3


def test_custom_smiles_column_and_stripping(make_csv: Callable[..., Path]) -> None:
    path = make_csv("Drug,y\n  CCO  ,1\n,0\nNA,1\n")
    table = load_table(path, smiles_column="Drug")
    assert table.smiles == ["CCO", "", "NA"]  # empty cell kept as "", text kept verbatim
    assert table.tasks == ["y"]


def test_header_only_is_empty_dataset(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match="no data rows") as info:
        load_table(make_csv("smiles,A\n", "header.csv"))
    assert "header.csv" in str(info.value)


def test_conflicting_duplicates_reported_not_dropped(
    make_csv: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    text = "smiles,A,B\nCCO,1,0\nCCO,0,0\nCC,1,1\nCC,1,\nC,0,1\n"
    with caplog.at_level(logging.WARNING, logger="toxmodel.data"):
        table = load_table(make_csv(text))
    assert len(table) == 5
    assert table.conflicts == ["CCO"]  # CC repeats with consistent labels
    assert any("1 SMILES occur more than once" in r.getMessage() for r in caplog.records)


def test_subset(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv("smiles,A\nCCO,1\nCCO,0\nCC,1\n"))
    assert table.conflicts == ["CCO"]
    part = table.subset(np.array([2, 0]))
    assert part.smiles == ["CC", "CCO"]
    np.testing.assert_array_equal(part.labels[:, 0], [1, 1])
    assert part.conflicts == []
    assert part.tasks == table.tasks and part.source == table.source
    assert part.content_hash != table.content_hash  # never shares a feature-cache entry
    assert table.subset([2, 0]).content_hash == part.content_hash
    with pytest.raises(IndexError):
        table.subset([3])


def test_line_numbers_count_blank_lines_and_multiline_cells(
    make_csv: Callable[..., Path],
) -> None:
    text = 'smiles,A,note\nCCO,1,ok\n\n"C1CC",0,"two\nlines"\nCC,0,\nCCC,1,x\n'
    table = load_table(make_csv(text), targets=["A"])
    assert table.lines.tolist() == [2, 4, 6, 7]
    assert [table.line_of(i) for i in range(4)] == [2, 4, 6, 7]
    assert table.subset([3, 1]).line_of(0) == 7
    summary = describe(table, featurize(table.smiles, FeaturizerConfig(n_bits=64), n_jobs=1))
    assert summary.invalid[0][:2] == (4, "C1CC")
    bad = text.replace("CCC,1,x", "CCC,yes,x")
    with pytest.raises(DataError, match=r"line 7: 'yes'"):
        load_table(make_csv(bad), targets=["A"])


def test_check_parsed_refuses_a_table_none_of_whose_smiles_parsed(
    make_csv: Callable[..., Path],
) -> None:
    """Issue 25 item 9a: such a file went on to `ValueError: cannot split an empty dataset`."""
    path = make_csv('smiles,A\nxx,1\n"",0\nC1CC,1\nzz,0\n', "unparsable.csv")
    table = load_table(path)
    features = featurize(table.smiles, FeaturizerConfig(n_bits=64), n_jobs=1)
    with pytest.raises(DataError) as err:
        check_parsed(table, features, "report.csv")
    assert str(err.value) == (
        f"{path}: none of its 4 SMILES could be parsed, so there is nothing to train on "
        "(line 2 'xx': SMILES Parse Error: syntax error while parsing: xx; line 3 '': empty "
        "SMILES; line 4 'C1CC': SMILES Parse Error: unclosed ring for input: 'C1CC', ...); "
        "all 4 are listed in report.csv"
    )
    with pytest.raises(DataError, match=r"nothing to train on \(.*'C1CC', \.\.\.\)$"):
        check_parsed(table, features)  # no report: the reasons end the message
    one_valid = load_table(make_csv("smiles,A\nxx,1\nCCO,0\n", "one.csv"))
    check_parsed(one_valid, featurize(one_valid.smiles, FeaturizerConfig(n_bits=64), n_jobs=1))


def test_read_table_reads_like_load_table(make_csv: Callable[..., Path]) -> None:
    text = "\ufeff smiles ;id;A\nCCO;007;1\n;x;NA\nCC;y;0\n"
    frame = read_table(make_csv(text, "in.csv.gz"))  # gzip by content, BOM, semicolons
    assert list(frame.columns) == ["smiles", "id", "A"]
    assert {str(t) for t in frame.dtypes} == {"object"}  # text as written, no inferred types
    assert frame.to_dict("list") == {
        "smiles": ["CCO", "", "CC"],
        "id": ["007", "x", "y"],
        "A": ["1", "NA", "0"],
    }
    table = load_table(make_csv(text, "in.csv.gz"))
    assert table.smiles == ["CCO", "", "CC"] and table.tasks == ["A"]


def test_read_table_header_only_is_an_empty_frame(make_csv: Callable[..., Path]) -> None:
    frame = read_table(make_csv("smiles,name\n"))
    assert list(frame.columns) == ["smiles", "name"] and len(frame) == 0


def test_read_table_refusals(make_csv: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        read_table(make_csv(b"", "zero.csv"))
    with pytest.raises(DataError, match="directory"):
        read_table(tmp_path)
    with pytest.raises(DataError, match="not found"):
        read_table(tmp_path / "missing.csv")
    with pytest.raises(DataError, match=r"no SMILES column 'smiles'.*'Drug'"):
        read_table(make_csv("Drug,A\nC,1\n"))
    assert read_table(make_csv("Drug,A\nC,1\n"), smiles_column="Drug")["Drug"].tolist() == ["C"]
    with pytest.raises(DataError, match=r"more than once: 'A'"):
        read_table(make_csv("smiles,A,A\nC,1,1\n"))


def test_a_quoted_empty_smiles_is_a_row_not_a_blank_line(make_csv: Callable[..., Path]) -> None:
    """pandas writes an empty SMILES of a one-column table as `""`: that row must reach
    prediction (and get its error marker), not vanish like a blank line."""
    from toxmodel.data import read_table

    path = make_csv('smiles\nCCO\n\n""\nc1ccccc1O\n', "one_column.csv")
    frame = read_table(path)
    assert list(frame["smiles"]) == ["CCO", "", "c1ccccc1O"]


def test_tox21_real(tox21_path: Path) -> None:
    table = load_table(tox21_path)
    assert len(table) == 7831
    assert table.tasks == TOX21_TASKS
    assert table.labels.shape == (7831, 12)
    assert np.isnan(table.labels).any()
    assert set(np.unique(table.labels[~np.isnan(table.labels)])) == {0.0, 1.0}
    assert table.content_hash == hashlib.sha256(tox21_path.read_bytes()).hexdigest()
    assert table.skipped_columns == {}  # no id, empty or one-class columns
    assert table.line_of(0) == 2 and table.line_of(7830) == 7832
    assert TOX21_URL.endswith("tox21.csv.gz")


def test_tox21_moleculenet_layout_with_mol_id(
    tox21_path: Path, make_csv: Callable[..., Path]
) -> None:
    import pandas as pd

    frame = pd.read_csv(tox21_path).iloc[:200]  # the first 100 rows lack NR-AR positives
    frame["mol_id"] = [f"TOX{i}" for i in range(200)]
    frame = frame[[*TOX21_TASKS, "mol_id", "smiles"]]  # the column order of the MoleculeNet file
    table = load_table(make_csv(frame, "tox21.csv.gz"))
    assert table.tasks == TOX21_TASKS
    assert table.skipped_columns == {"mol_id": "id column"}


def test_toxcast_real(toxcast_path: Path) -> None:
    table = load_table(toxcast_path)
    assert len(table.tasks) == 617  # every assay has positives and negatives
    assert table.skipped_columns == {}
    assert table.labels.shape == (len(table), 617)
    assert len(table) > 8000


# ------------------------------------------------------------------ long files


def _long_file(n: int, last_b: str = "1") -> str:
    """n rows of `mol_id,smiles,A,B,note`: ids unique, SMILES repeating, labels 0/1/missing."""
    smiles = [  # Tox21's length on average (45 characters)
        "CCOc1ccc2nc(S(N)(=O)=O)sc2c1",
        "CC(C)(C)c1cc(C(C)(C)C)c(O)c(C(C)(C)C)c1O",
        "O=C(O)Cc1ccccc1Nc1c(Cl)cccc1Cl",
        "CN1C(=O)N(C)c2nc[nH]c2C1=O",
        "CCCCCCCCCCCCCCCCCC(=O)OC[C@H](O)COP(=O)(O)OCC[N+](C)(C)C",
        "Clc1ccc(C(c2ccc(Cl)cc2)C(Cl)(Cl)Cl)cc1",
        "CC(=O)Nc1ccc(O)cc1",
    ]
    rows = ["mol_id,smiles,A,B,note"]
    for i in range(n):
        a, b = ("0", "1", "")[i % 3], ("1", "0", "NA", "0")[i % 4]
        rows.append(f"M{i:07d},{smiles[i % len(smiles)]},{a},{b},n{i % 7}")
    rows[-1] = rows[-1].rsplit(",", 3)[0] + f",{rows[-1].split(',')[2]},{last_b},x"
    return "\n".join(rows) + "\n"


def _table_bytes(table: MoleculeTable) -> int:
    """The table as it sits in memory: its SMILES (strings and list), labels and lines."""
    text = sys.getsizeof(table.smiles) + sum(sys.getsizeof(s) for s in table.smiles)
    return text + table.labels.nbytes + table.lines.nbytes


def test_a_bad_label_on_the_last_line_of_a_long_file_is_named_precisely(
    make_csv: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23 item 5, at test size: chunks of ~1,000 rows, the stray cell in the last one."""
    monkeypatch.setattr(csvfile, "CHUNK_CELLS", 5000)
    n = 20_000
    path = make_csv(_long_file(n, last_b="inactive"), "long.csv")
    for targets in (None, ["A", "B"]):
        with pytest.raises(DataError) as info:
            load_table(path, targets=targets)
        message = str(info.value)
        assert str(path) in message and "'B'" in message
        assert f"1 row holds another value: line {n + 1}: 'inactive'" in message


def test_chunk_size_does_not_change_the_table(
    make_csv: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_csv(_long_file(500) + '\nM9,"CC\nO",1,0,x\n', "chunks.csv")
    tables = []
    for cells in (1 << 18, 7, 64):
        monkeypatch.setattr(csvfile, "CHUNK_CELLS", cells)
        tables.append(load_table(path))
    first = tables[0]
    assert first.tasks == ["A", "B"] and first.skipped_columns["mol_id"] == "id column"
    assert first.lines.tolist()[-2:] == [501, 503]  # a blank line, then a two-line cell
    for table in tables[1:]:
        assert table.smiles == first.smiles and table.tasks == first.tasks
        np.testing.assert_array_equal(table.labels, first.labels)
        np.testing.assert_array_equal(table.lines, first.lines)
        assert table.content_hash == first.content_hash
        assert table.skipped_columns == first.skipped_columns


def test_loading_holds_one_copy_of_the_table(
    make_csv: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23 item 5: loading held the file's bytes, its text, the parsed rows and a frame at
    once (7x the table). What loading allocates beyond the table it returns grows by less than
    one table per row added: the memory Python traces at its peak, at two sizes, per row."""
    monkeypatch.setattr(csvfile, "CHUNK_CELLS", 2000)  # chunks of 400 rows, as at 10^6 rows
    peaks, sizes = [], []
    for n in (10_000, 30_000):
        path = make_csv(_long_file(n), f"big{n}.csv")
        load_table(path)  # imports and caches warm
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            table = load_table(path)
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
        finally:
            tracemalloc.stop()
        sizes.append(_table_bytes(table))
    per_row_peak = (peaks[1] - peaks[0]) / 20_000
    per_row_table = (sizes[1] - sizes[0]) / 20_000
    assert per_row_peak < 2.0 * per_row_table, (per_row_peak, per_row_table)


def test_a_progress_bar_counts_the_bytes_read(
    make_csv: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_csv(_long_file(2000), "bar.csv")
    load_table(path, progress=True)
    assert "read" in capsys.readouterr().err
    load_table(path)
    assert capsys.readouterr().err == ""
