"""Reading a table file in one pass: encodings, gzip, delimiters, header names, odd rows, the
line each row starts on, chunks, and the content hash."""

from __future__ import annotations

import gzip
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from toxmodel import csvfile
from toxmodel.csvfile import open_csv
from toxmodel.data import load_table, read_table
from toxmodel.errors import DataError
from toxmodel.featurize import FeaturizerConfig, featurize

SMALL = "smiles,mol_id,A,B\nCCO,M1,1,0\nc1ccccc1,M2,0,\nCC(=O)O,M3,,1\n"


def test_gzip_reads_like_plain(make_csv: Callable[..., Path]) -> None:
    plain = load_table(make_csv(SMALL, "a.csv"))
    packed = load_table(make_csv(SMALL, "a.csv.gz"))
    assert packed.smiles == plain.smiles
    np.testing.assert_array_equal(packed.labels, plain.labels)
    assert packed.content_hash != plain.content_hash  # hash of the bytes on disk


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

    def denied(self: Path, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(DataError, match=r"cannot read data file .*locked\.csv: Permission denied"):
        load_table(path)


def test_blank_file(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"empty.*blank\.csv"):
        load_table(make_csv("\n\n", "blank.csv"))


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


@pytest.mark.parametrize(("sep", "name"), [(";", "semicolon"), ("\t", "tab")])
def test_semicolon_and_tab_files_are_sniffed(
    make_csv: Callable[..., Path], caplog: pytest.LogCaptureFixture, sep: str, name: str
) -> None:
    text = SMALL.replace(",", sep).replace("CCO", "CCO |r|")  # a comma-free CXSMILES cell
    with caplog.at_level(logging.INFO, logger="toxmodel.csvfile"):
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
    with caplog.at_level(logging.INFO, logger="toxmodel.csvfile"):
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


def test_non_utf8_names_the_first_bad_byte_and_its_offset(make_csv: Callable[..., Path]) -> None:
    """The offset is in the file's (decompressed) bytes, however far in: the decoder reads by
    blocks, and the message must not name a block's offset."""
    head = "smiles,A\n" + "C" * 1_200_000 + ",1\n"  # past the first blocks read
    for name in ("late.csv", "late.csv.gz"):
        path = make_csv(head.encode() + b"caf\xe9,0\n", name)
        with pytest.raises(DataError) as info:
            load_table(path)
        offset = len(head.encode()) + 3
        assert f"invalid byte 0xe9 at offset {offset}" in str(info.value), name


def test_chunks_give_the_rows_lines_and_hash_whatever_their_size(
    make_csv: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows arrive in chunks of about CHUNK_CELLS cells; the rows, the lines they start on and
    the hash of the bytes must not depend on where a chunk ends."""
    text = "smiles,A,note\n" + 'CCO,1,ok\n\n"C1CC",0,"two\nlines"\nCC,0\r\nCCC,1,x\n' * 7
    for name in ("c.csv", "c.csv.gz"):
        path = make_csv(text, name)
        seen = []
        for cells in (1 << 18, 3, 5, 7):
            monkeypatch.setattr(csvfile, "CHUNK_CELLS", cells)
            with open_csv(path) as table:
                chunks = list(table.chunks())
                digest = table.content_hash()
            records = [r for chunk in chunks for r in chunk.records]
            lines = np.concatenate([chunk.lines for chunk in chunks]).tolist()
            seen.append((records, lines, digest))
            if cells < 10:
                assert max(len(chunk) for chunk in chunks) <= 2  # several chunks, not one
        assert all(s == seen[0] for s in seen)
        records, lines, digest = seen[0]
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
        assert len(records) == 28 and records[2] == ["CC", "0", ""]  # padded short row
        assert lines[:5] == [2, 4, 6, 7, 8]  # a blank line and a two-line cell counted
        assert lines[-1] == 7 + 6 * 6


def test_a_gzip_file_is_hashed_as_stored_and_read_as_text(make_csv: Callable[..., Path]) -> None:
    path = make_csv(SMALL, "small.csv.gz")
    with open_csv(path) as table:
        assert table.columns == ["smiles", "mol_id", "A", "B"]
        rows = [r for chunk in table.chunks() for r in chunk.records]
        assert table.content_hash() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rows[1] == ["c1ccccc1", "M2", "0", ""]
    assert gzip.decompress(path.read_bytes()).decode() == SMALL
