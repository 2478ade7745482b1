"""A delimited text file read in one streaming pass: its header, then its rows chunk by chunk.

Contract of `open_csv(path, smiles_column)` (each failure is a DataError naming the file):
- `path` is a local file; a missing path, a directory, an unreadable or a 0-byte file fails.
- gzip is recognised by its content, whatever the name; a .gz name on plain bytes and names
  such as .xlsx or .parquet are refused.
- The text is UTF-8, with or without a byte-order mark.
- The delimiter (comma, semicolon or tab) is sniffed from the header line: the one that yields
  `smiles_column`, else the one that yields most columns; a non-comma choice is logged at INFO.
- Header names are stripped of surrounding whitespace; an empty one becomes "Unnamed: i"
  (0-based position); a name that occurs twice, or one over MAX_COLUMN_NAME characters, is
  refused. `smiles_column` must be present (None: any header).
- Cells are str exactly as written (quotes removed, "" when empty; no missing-value or number
  conversion). Blank lines are skipped; a row with more cells than the header is refused with
  its line number, a shorter row is padded with "". Quoted cells may span lines.

Why streaming: the bytes are read once, and their sha256 (`CsvFile.content_hash`, the feature
cache's key) comes from that same pass; no more than one chunk of rows (about CHUNK_CELLS cells)
is held as text at a time, so a reader that keeps only what it needs of each chunk (the SMILES
and 4-byte labels, say) never holds the file's bytes, its text and its table side by side.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import hashlib
import io
import itertools
import logging
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from toxmodel.errors import DataError, shorten

log = logging.getLogger(__name__)

CHUNK_CELLS = 1 << 18  # cells per chunk of rows (about 15 MB of short strings)
# A header cell longer than this is no column name (a broken header line or quote), and would
# be echoed in every message naming it; data cells of any length are read.
MAX_COLUMN_NAME = 1000
# The csv module refuses fields over 128 KiB by default ("field larger than field limit"); a
# SMILES cell of any length is read (featurization reports it). The limit is process-wide: it is
# raised once to the largest value every platform's C long holds, never lowered.
FIELD_LIMIT = 2**31 - 1
_FIELD_LIMIT_LOCK = threading.Lock()
_UNSUPPORTED_SUFFIXES = {".xlsx", ".xls", ".parquet", ".sdf", ".zip", ".json", ".pkl", ".feather"}
_DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}  # sniffed in this order of preference
_GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = 1 << 20  # bytes read from disk at a time


@dataclass(frozen=True)
class Rows:
    """A chunk of data rows, each padded to the header's width, and the line each starts on."""

    records: list[list[str]]
    lines: np.ndarray  # int64, the file line (header = 1) on which each record starts

    def __len__(self) -> int:
        return len(self.records)


def local_file(source: str | Path) -> Path:
    """`source` as a path to an existing file (DataError: missing, or a directory)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"data path is a directory, not a CSV file: {path}")
    return path


def open_csv(
    path: str | Path,
    smiles_column: str | None = "smiles",
    *,
    name: str | None = None,
    progress: bool = False,
) -> CsvFile:
    """The file at `path`, open at its first data row (see the module docstring).

    `name` is what messages and the type checks call the file when `path` is a temporary copy
    (a download); `progress` shows a bar of the bytes read on stderr.
    """
    return CsvFile(local_file(path), smiles_column, name=name, progress=progress)


class CsvFile:
    """An open table file: `columns` now, `chunks()` once, then `content_hash()`."""

    def __init__(
        self,
        path: Path,
        smiles_column: str | None,
        *,
        name: str | None = None,
        progress: bool = False,
    ) -> None:
        self.path = path
        self.shown = Path(name) if name else path  # how messages name the file
        suffix = self.shown.suffix.lower()
        if suffix in _UNSUPPORTED_SUFFIXES:
            raise DataError(
                f"{self.shown}: unsupported file type '{suffix}'; expected .csv or .csv.gz"
            )
        _allow_long_fields()
        self._stack = contextlib.ExitStack()
        try:
            self._open(suffix, progress)
            self.columns = self._read_header(smiles_column)
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> CsvFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file and let its buffers go (the reader object may outlive the read)."""
        self._stack.close()
        self._text = self._bytes = self._raw = self._reader = None  # type: ignore[assignment]

    def _open(self, suffix: str, progress: bool) -> None:
        try:
            fh = self._stack.enter_context(self.path.open("rb"))
        except OSError as exc:
            raise _unreadable(self.shown, exc) from exc
        from tqdm.auto import tqdm

        size = self.path.stat().st_size
        bar = self._stack.enter_context(
            tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                desc="read",
                disable=not progress,
                leave=False,
            )
        )
        self._raw = _HashingReader(fh, self.shown, bar)
        self._bytes = io.BufferedReader(self._raw, _BLOCK)
        magic = self._bytes.peek(len(_GZIP_MAGIC))[: len(_GZIP_MAGIC)]
        if not magic:
            raise DataError(f"data file is empty: {self.shown}")
        self._gzip = magic == _GZIP_MAGIC
        if not self._gzip and suffix == ".gz":
            raise DataError(f"{self.shown} has a .gz name but is not gzip-compressed")
        stream: IO[bytes] = gzip.GzipFile(fileobj=self._bytes) if self._gzip else self._bytes
        self._text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
        self._line = 1  # the line the next record starts on

    def _read_header(self, smiles_column: str | None) -> list[str]:
        with self._translated():
            head: list[str] = []
            for line in self._text:  # the delimiter is sniffed from the first non-blank line
                head.append(line)
                if line.strip():
                    break
            delimiter = _sniff_delimiter(head[-1] if head else "", smiles_column)
            if delimiter != ",":
                how = _DELIMITERS[delimiter]
                log.info("%s: reading as %s-separated (sniffed from its header)", self.shown, how)
            self._reader = csv.reader(
                itertools.chain(head, self._text), delimiter=delimiter, strict=True
            )
            header = None
            for record in self._reader:
                self._line = self._reader.line_num + 1
                if _is_row(record):
                    header = record
                    break
        if header is None:
            raise DataError(f"data file is empty: {self.shown}")
        names = _header_names(header, self.shown)
        if smiles_column is not None and smiles_column not in names:
            raise DataError(missing_smiles_message(self.shown, smiles_column, names))
        return names

    def chunks(self) -> Iterator[Rows]:
        """The data rows in file order, about CHUNK_CELLS cells a chunk (read once)."""
        width = len(self.columns)
        per_chunk = max(1, CHUNK_CELLS // width)
        records: list[list[str]] = []
        lines: list[int] = []
        with self._translated():
            for record in self._reader:
                # A blank line is no row; a quoted empty cell (`""`, what pandas writes for an
                # empty SMILES in a one-column file) is a row whose SMILES is empty.
                if _is_row(record):
                    if len(record) > width:
                        raise DataError(
                            f"{self.shown} could not be parsed as CSV: line {self._line} has "
                            f"{len(record)} cells but the header has {width}"
                        )
                    if len(record) < width:
                        record.extend([""] * (width - len(record)))
                    records.append(record)
                    lines.append(self._line)
                    if len(records) >= per_chunk:
                        yield Rows(records, np.asarray(lines, dtype=np.int64))
                        records, lines = [], []
                self._line = self._reader.line_num + 1
        if records:
            yield Rows(records, np.asarray(lines, dtype=np.int64))

    def content_hash(self) -> str:
        """sha256 of the file's bytes (compressed as on disk), once every row has been read."""
        while self._bytes.read(_BLOCK):  # anything after the text (gzip padding)
            pass
        return self._raw.sha.hexdigest()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """CSV, gzip and UTF-8 failures met while reading, as DataErrors naming the file."""
        try:
            yield
        except csv.Error as exc:
            raise DataError(
                f"{self.shown} could not be parsed as CSV (line {self._line}): {exc}"
            ) from exc
        except UnicodeDecodeError as exc:
            offset, byte = _first_non_utf8(self.path, self._gzip)
            raise DataError(
                f"{self.shown} is not UTF-8 text (invalid byte 0x{byte:02x} at offset {offset}); "
                "re-save the file as UTF-8"
            ) from exc
        except (OSError, EOFError, zlib.error) as exc:
            if not self._gzip:
                raise _unreadable(self.shown, exc) from exc
            raise DataError(f"{self.shown} is not a valid gzip file ({exc})") from exc


class _HashingReader(io.RawIOBase):
    """The file's bytes as read from disk, hashed (and counted on the bar) on the way."""

    def __init__(self, fh: IO[bytes], shown: Path, bar: Any) -> None:
        self._fh, self._shown, self._bar = fh, shown, bar  # no link back: no cycle to collect
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            n = self._fh.readinto(buffer)  # type: ignore[attr-defined]
        except OSError as exc:
            raise _unreadable(self._shown, exc) from exc
        if n:
            self.sha.update(memoryview(buffer)[:n])
            self._bar.update(n)
        return n or 0


def _unreadable(shown: Path, exc: BaseException) -> DataError:
    reason = getattr(exc, "strerror", None) or exc
    return DataError(f"cannot read data file {shown}: {reason}")


def _is_row(record: list[str]) -> bool:
    return bool(record) and (len(record) > 1 or bool(record[0].strip()) or record[0] == "")


def _allow_long_fields() -> None:
    with _FIELD_LIMIT_LOCK:
        if csv.field_size_limit() < FIELD_LIMIT:
            csv.field_size_limit(FIELD_LIMIT)


def _sniff_delimiter(header: str, smiles_column: str | None) -> str:
    """Comma, semicolon or tab: the one whose header cells include the SMILES column, else the
    one giving most cells (ties go to the earlier in _DELIMITERS)."""
    header = header.rstrip("\r\n")
    best, best_key = ",", (False, 0)
    for delimiter in _DELIMITERS:
        cells = [c.strip() for c in next(csv.reader([header], delimiter=delimiter), [])]
        key = (smiles_column in cells, len(cells))
        if key > best_key:
            best, best_key = delimiter, key
    return best


def _header_names(header: list[str], path: Path) -> list[str]:
    """Stripped column names ("Unnamed: i" when empty); a repeated name, or one longer than
    MAX_COLUMN_NAME characters, is a DataError."""
    names = [cell.strip() or f"Unnamed: {i}" for i, cell in enumerate(header)]
    for i, name in enumerate(names, start=1):
        if len(name) > MAX_COLUMN_NAME:
            raise DataError(
                f"{path}: line 1 (the header) names column {i} with {len(name):,} characters "
                f"({shorten(name)!r}); no column name is over {MAX_COLUMN_NAME:,}: check that "
                "line 1 is the header and that its quotes are balanced"
            )
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(names, start=1):
        positions.setdefault(name, []).append(i)
    repeated = {name: where for name, where in positions.items() if len(where) > 1}
    if repeated:
        shown = "; ".join(
            f"{name!r} (columns {', '.join(map(str, where))})" for name, where in repeated.items()
        )
        raise DataError(
            f"{path}: the header names a column more than once: {shown}; give each column "
            "its own name"
        )
    return names


def missing_smiles_message(path: Path | str, smiles_column: str, columns: list[str]) -> str:
    """'no SMILES column', the columns there are, and a near miss in case."""
    shown = ", ".join(repr(c) for c in columns[:20]) + (", ..." if len(columns) > 20 else "")
    hint = [c for c in columns if c.lower() == smiles_column.lower()]
    extra = f" (did you mean {hint[0]!r}? pass --smiles-column)" if hint else ""
    return f"{path}: no SMILES column {smiles_column!r}{extra}; available columns: {shown}"


def _first_non_utf8(path: Path, compressed: bool) -> tuple[int, int]:
    """(offset, value) of the first byte of the (decompressed) file that is not UTF-8: read
    again, only when decoding failed, since the text decoder's position is per buffer."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as fh:
        stream: IO[bytes] = gzip.GzipFile(fileobj=fh) if compressed else fh
        block = b""
        while True:
            pending = decoder.getstate()[0]
            block = stream.read(_BLOCK)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                data = pending + block
                return offset - len(pending) + exc.start, data[exc.start]
            if not block:
                return offset, 0
            offset += len(block)
