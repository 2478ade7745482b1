"""Loading tables: validation messages, the download cache, duplicates, summaries, real data."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from toxmodel import data as data_module
from toxmodel.data import (
    MISSING_VALUES,
    TOX21_TASKS,
    TOX21_URL,
    DataError,
    check_parsed,
    count_duplicates,
    deduplicate,
    default_cache_dir,
    describe,
    load_table,
    read_table,
    resolve_source,
    summarize,
)
from toxmodel.featurize import FeaturizerConfig, featurize

SMALL = "smiles,mol_id,A,B\nCCO,M1,1,0\nc1ccccc1,M2,0,\nCC(=O)O,M3,,1\n"


# ---------------------------------------------------------------- a tiny local HTTP server


@dataclass
class Served:
    """A loopback HTTP server over one folder, counting the requests it answered."""

    root: Path
    port: int
    hits: list[str] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    root = tmp_path / "www"
    root.mkdir()
    state = Served(root=root, port=0)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            state.hits.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _publish(served: Served, name: str, text: str) -> bytes:
    data = gzip.compress(text.encode(), mtime=0) if name.endswith(".gz") else text.encode()
    (served.root / name).write_bytes(data)
    return data


# ---------------------------------------------------------------- loading and validation


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


def test_gzip_reads_like_plain(make_csv: Callable[..., Path]) -> None:
    plain = load_table(make_csv(SMALL, "a.csv"))
    packed = load_table(make_csv(SMALL, "a.csv.gz"))
    assert packed.smiles == plain.smiles
    np.testing.assert_array_equal(packed.labels, plain.labels)
    assert packed.content_hash != plain.content_hash  # hash of the bytes on disk


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


def test_custom_smiles_column_and_stripping(make_csv: Callable[..., Path]) -> None:
    path = make_csv("Drug,y\n  CCO  ,1\n,0\nNA,1\n")
    table = load_table(path, smiles_column="Drug")
    assert table.smiles == ["CCO", "", "NA"]  # empty cell kept as "", text kept verbatim
    assert table.tasks == ["y"]


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tox.csv"
    with pytest.raises(DataError, match="not found") as info:
        load_table(missing)
    assert str(missing) in str(info.value)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="directory"):
        load_table(tmp_path)


def test_empty_file(make_csv: Callable[..., Path]) -> None:
    path = make_csv(b"", "empty.csv")
    with pytest.raises(DataError, match="empty") as info:
        load_table(path)
    assert "empty.csv" in str(info.value)


def test_unreadable_file(make_csv: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_csv(SMALL, "locked.csv")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError, match=r"cannot read data file .*locked\.csv: Permission denied"):
        load_table(path)


def test_blank_file(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"empty.*blank\.csv"):
        load_table(make_csv("\n\n", "blank.csv"))


def test_header_only_is_empty_dataset(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match="no data rows") as info:
        load_table(make_csv("smiles,A\n", "header.csv"))
    assert "header.csv" in str(info.value)


def test_non_utf8_names_file(make_csv: Callable[..., Path]) -> None:
    path = make_csv("smiles,A,note\nCCO,1,caf\u00e9\n".encode("latin-1"), "latin.csv")
    with pytest.raises(DataError, match="not UTF-8") as info:
        load_table(path)
    assert "latin.csv" in str(info.value)


def test_utf8_bom_is_accepted(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv("\ufeffsmiles,A\nCCO,1\nCC,0\n"))
    assert table.smiles == ["CCO", "CC"]


def test_gz_name_without_gzip_content(make_csv: Callable[..., Path]) -> None:
    path = make_csv(b"smiles,A\nC,1\n", "plain.csv")
    fake = path.with_name("fake.csv.gz")
    path.rename(fake)
    with pytest.raises(DataError, match="not gzip-compressed") as info:
        load_table(fake)
    assert "fake.csv.gz" in str(info.value)


def test_truncated_gzip(make_csv: Callable[..., Path]) -> None:
    path = make_csv(SMALL * 20, "cut.csv.gz")
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DataError, match=r"cut\.csv\.gz.*not a valid gzip"):
        load_table(path)


def test_unsupported_extension(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'"):
        load_table(make_csv(b"PK\x03\x04", "book.xlsx"))


def test_ragged_csv(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"ragged\.csv could not be parsed as CSV"):
        load_table(make_csv("smiles,A\nC,1\nCC,0,1,1\n", "ragged.csv"))


def test_missing_smiles_column_lists_columns(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError) as info:
        load_table(make_csv("SMILES,tox\nCCO,1\n"))
    message = str(info.value)
    assert "'smiles'" in message
    assert "available columns: 'SMILES', 'tox'" in message
    assert "did you mean 'SMILES'" in message


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


# ---------------------------------------------------------------- bad cells and odd layouts


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


@pytest.mark.parametrize(("sep", "name"), [(";", "semicolon"), ("\t", "tab")])
def test_semicolon_and_tab_files_are_sniffed(
    make_csv: Callable[..., Path], caplog: pytest.LogCaptureFixture, sep: str, name: str
) -> None:
    text = SMALL.replace(",", sep).replace("CCO", "CCO |r|")  # a comma-free CXSMILES cell
    with caplog.at_level(logging.INFO, logger="toxmodel.data"):
        table = load_table(make_csv(text))
    plain = load_table(make_csv(SMALL, "plain.csv"))
    assert table.tasks == plain.tasks == ["A", "B"]
    np.testing.assert_array_equal(table.labels, plain.labels)
    assert any(f"{name}-separated" in r.getMessage() for r in caplog.records)


def test_semicolon_file_with_commas_inside_cells(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv("smiles;A\nC1CC1 |r,c:1|;1\nCC;0\n"))
    assert table.smiles == ["C1CC1 |r,c:1|", "CC"]


def test_comma_file_is_not_logged(
    make_csv: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="toxmodel.data"):
        load_table(make_csv(SMALL))
    assert not any("separated" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("header", ["smiles,t1,t1", "smiles,t1, t1 ", "smiles,t1,smiles"])
def test_duplicate_column_names_are_refused(make_csv: Callable[..., Path], header: str) -> None:
    name = header.split(",")[-1].strip()
    with pytest.raises(DataError, match=rf"more than once: '{name}' \(columns"):
        load_table(make_csv(f"{header}\nC,1,0\nCC,0,1\n"))


def test_header_cells_are_stripped(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv(" smiles , A \nCCO,1\nCC,0\n"))
    assert table.tasks == ["A"] and table.smiles == ["CCO", "CC"]


def test_ragged_row_names_its_line(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"line 4 has 4 cells but the header has 2"):
        load_table(make_csv("smiles,A\nC,1\n\nCC,0,1,1\n"))


def test_unterminated_quote_names_its_line(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"could not be parsed as CSV \(line 3\)"):
        load_table(make_csv('smiles,A\nC,1\n"CC,0\nCCC,1\n'))


def test_a_cell_over_the_csv_field_limit_is_read_and_reported_invalid(
    make_csv: Callable[..., Path],
) -> None:
    """Issue 25 item 9b: a field over 128 KiB (the csv module's default limit) was `field larger
    than field limit`; a SMILES cell of any length is read, and featurization reports it."""
    long = "C" * (200 * 1024)
    for cell in (long, f'"{long}"'):
        path = make_csv(f"smiles,A\n{cell},1\nCCO,0\nCCN,1\n", "long.csv")
        table = load_table(path)
        assert table.smiles == [long, "CCO", "CCN"]
        assert read_table(path)["smiles"].tolist() == [long, "CCO", "CCN"]  # what predict reads
    invalid = featurize(table.smiles, FeaturizerConfig(n_bits=64), n_jobs=1).invalid
    assert [(i.row, i.reason) for i in invalid] == [
        (0, "SMILES longer than 1000 characters (204800)")
    ]


def test_a_header_cell_over_the_csv_field_limit_is_refused_naming_line_and_column(
    make_csv: Callable[..., Path],
) -> None:
    """Issue 25 item 9b: a 200 KiB header was `_csv.Error: field larger than field limit` from
    data, tune and predict alike."""
    path = make_csv(f"smiles,{'x' * 200 * 1024}\nCCO,1\nCCN,0\n", "wide.csv")
    want = (
        f"{path}: line 1 (the header) names column 2 with 204,800 characters "
        f"('{'x' * 57}...'); no column name is over 1,000: check that line 1 is the header and "
        "that its quotes are balanced"
    )
    for read in (load_table, read_table):
        with pytest.raises(DataError) as err:
            read(path)
        assert str(err.value) == want


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


# ---------------------------------------------------------------- read_table


def test_read_table_reads_like_load_table(make_csv: Callable[..., Path]) -> None:
    text = "\ufeff smiles ;id;A\nCCO;007;1\n;x;NA\nCC;y;0\n"
    frame = read_table(make_csv(text, "in.csv.gz"))  # gzip by content, BOM, semicolons
    assert list(frame.columns) == ["smiles", "id", "A"]
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


# ---------------------------------------------------------------- sources, download and cache


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOXTUNE_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TOXTUNE_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "toxtune"


def test_local_path_passes_through(make_csv: Callable[..., Path]) -> None:
    path = make_csv(SMALL)
    assert resolve_source(str(path)) == path


def test_download_once_with_sidecar(served: Served, tmp_path: Path) -> None:
    payload = _publish(served, "tox.csv.gz", SMALL)
    url = served.url("tox.csv.gz")
    cache = tmp_path / "cache"
    first = resolve_source(url, cache)
    assert first.read_bytes() == payload
    assert first.is_relative_to(cache / "downloads")
    sidecar = first.with_name(first.name + ".sha256")
    assert sidecar.read_text().split()[0] == hashlib.sha256(payload).hexdigest()
    assert resolve_source(url, cache) == first
    assert served.hits == ["/tox.csv.gz"]  # the second call was served from the cache
    assert not list((cache / "downloads").glob("*.part"))
    table = load_table(url, cache_dir=cache)
    assert table.source == url and table.tasks == ["A", "B"]
    assert table.content_hash == hashlib.sha256(payload).hexdigest()


def test_corrupt_cache_is_downloaded_again(served: Served, tmp_path: Path) -> None:
    payload = _publish(served, "tox.csv.gz", SMALL)
    url = served.url("tox.csv.gz")
    path = resolve_source(url, tmp_path)
    path.write_bytes(payload[:10])
    assert resolve_source(url, tmp_path).read_bytes() == payload
    assert len(served.hits) == 2


def test_default_source_is_tox21(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _publish(served, "tox21.csv.gz", SMALL)
    monkeypatch.setattr(data_module, "TOX21_URL", served.url("tox21.csv.gz"))
    assert resolve_source(None, tmp_path).name.endswith("tox21.csv.gz")
    assert resolve_source("default", tmp_path) == resolve_source(None, tmp_path)
    assert load_table(None, cache_dir=tmp_path).source == served.url("tox21.csv.gz")
    assert len(served.hits) == 1


def test_download_without_smiles_is_rejected(served: Served, tmp_path: Path) -> None:
    _publish(served, "bad.csv.gz", "name,A\nx,1\n")
    with pytest.raises(DataError, match="no 'smiles' column"):
        resolve_source(served.url("bad.csv.gz"), tmp_path)
    assert not list((tmp_path / "downloads").iterdir())  # nothing half-written left behind


def test_download_that_is_not_gzip_is_rejected(served: Served, tmp_path: Path) -> None:
    (served.root / "html.csv.gz").write_bytes(b"<html>oops</html>")
    with pytest.raises(DataError, match="not a usable CSV"):
        resolve_source(served.url("html.csv.gz"), tmp_path)


def test_http_error_says_use_data(served: Served, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"404.*--data PATH"):
        resolve_source(served.url("missing.csv.gz"), tmp_path)


def test_no_network_says_use_data(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/tox21.csv.gz"
    with pytest.raises(DataError) as info:
        load_table(url, cache_dir=tmp_path)
    message = str(info.value)
    assert url in message and "--data PATH" in message
    assert not list((tmp_path / "downloads").iterdir())


# ---------------------------------------------------------------- summaries


def test_summarize_lists_invalid_and_counts(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv("smiles,A,B\nCCO,1,0\nC1CC,0,\n,1,1\nc1ccccc1,0,0\n"))
    features = featurize(table.smiles, FeaturizerConfig(n_bits=64), n_jobs=1)
    text = summarize(table, features)
    assert "rows: 4" in text
    assert "valid SMILES: 2" in text and "invalid SMILES: 2" in text
    assert "line 3: 'C1CC'" in text and "unclosed ring" in text  # header = line 1
    assert "line 4: ''" in text and "empty SMILES" in text
    summary = describe(table, features)
    a, b = summary.tasks
    assert (a.labelled, a.positives, a.negatives) == (4, 2, 2)
    assert (b.labelled, b.positives, b.negatives) == (3, 1, 2)
    assert a.positive_rate == pytest.approx(0.5)
    own = summarize(table)  # featurizes on its own (default config) when no features are given
    assert "invalid SMILES: 2" in own and "features per molecule: 2048" in own


# ---------------------------------------------------------------- real data


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


def test_a_quoted_empty_smiles_is_a_row_not_a_blank_line(make_csv: Callable[..., Path]) -> None:
    """pandas writes an empty SMILES of a one-column table as `""`: that row must reach
    prediction (and get its error marker), not vanish like a blank line."""
    from toxmodel.data import read_table

    path = make_csv('smiles\nCCO\n\n""\nc1ccccc1O\n', "one_column.csv")
    frame = read_table(path)
    assert list(frame["smiles"]) == ["CCO", "", "c1ccccc1O"]


# ------------------------------------------------------------------ repeated molecules

# Four spellings of ethanol (two of them salts, which standardize folds in), methanol twice,
# benzene once, an invalid row. Tasks: A conflicts 2-1 for ethanol, B ties 1-1, C agrees.
REPEATS = (
    "smiles,A,B,C\n"
    "CCO,1,1,0\n"  # line 2
    "OCC,1,,0\n"  # line 3
    "bad(,1,0,1\n"  # line 4
    "CO,0,1,\n"  # line 5
    "CCO.[Na+].[Cl-],0,0,\n"  # line 6 (one molecule with CCO only when standardized)
    "c1ccccc1,1,0,1\n"  # line 7
    "OC,0,1,1\n"  # line 8
)


def _keys(table: object, standardize: bool) -> list[str]:
    from toxmodel.featurize import canonical_smiles

    return canonical_smiles(table.smiles, FeaturizerConfig(standardize=standardize))


def test_duplicates_are_counted_by_molecule_not_text(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv(REPEATS))
    assert table.conflicts == []  # no SMILES text repeats
    plain = count_duplicates(_keys(table, False), table.labels)
    assert (plain.shared_rows, plain.molecules, plain.conflicting) == (4, 2, 0)
    standard = count_duplicates(_keys(table, True), table.labels)
    assert (standard.shared_rows, standard.molecules, standard.conflicting) == (5, 2, 1)
    features = featurize(table.smiles, FeaturizerConfig(n_bits=64, standardize=True), n_jobs=1)
    text = describe(table, features).format()
    assert "rows sharing a molecule with another row: 5 (2 molecules" in text
    assert "molecules with conflicting labels: 1" in text


@pytest.mark.parametrize(
    ("policy", "ethanol", "methanol"),
    [
        # ethanol rows: A 1,1,0 -> majority 1 / conflict; B 1,-,0 -> tie / conflict; C 0,0,- -> 0
        ("average", [1, np.nan, 0], [0, 1, 1]),
        ("drop", [np.nan, np.nan, 0], [0, 1, 1]),
    ],
)
def test_duplicates_policies_give_one_row_per_molecule(
    make_csv: Callable[..., Path], policy: str, ethanol: list[float], methanol: list[float]
) -> None:
    table = load_table(make_csv(REPEATS))
    keys = _keys(table, True)
    out = deduplicate(table, keys, policy)
    merged = out.table
    assert merged.smiles == ["CCO", "bad(", "CO", "c1ccccc1"]  # first rows, invalid kept
    assert merged.lines.tolist() == [2, 4, 5, 7]
    assert out.rows.tolist() == [0, 2, 3, 5]
    assert out.members.tolist() == [0, 0, 1, 2, 0, 3, 2]
    assert out.merged == 3
    np.testing.assert_array_equal(merged.labels[0], np.array(ethanol, dtype=np.float32))
    np.testing.assert_array_equal(merged.labels[2], np.array(methanol, dtype=np.float32))
    np.testing.assert_array_equal(merged.labels[1], table.labels[2])  # invalid row untouched
    np.testing.assert_array_equal(merged.labels[3], table.labels[5])
    assert out.cleared == (1 if policy == "average" else 2)
    assert merged.content_hash != table.content_hash
    assert deduplicate(table, keys, "keep").table is table


def test_deduplicate_refuses_an_unknown_policy(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv(REPEATS))
    with pytest.raises(ValueError, match="'median'"):
        deduplicate(table, _keys(table, False), "median")
