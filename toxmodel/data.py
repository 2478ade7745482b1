"""Molecule tables from CSV: reading, the Tox21 download and cache, validation, and a summary.

Row numbers in messages and reports are the file's line numbers as an editor shows them (header =
line 1); code keeps 0-based row indices (`MoleculeTable.line_of` maps one to the other).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import tempfile
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from toxmodel.featurize import Features

log = logging.getLogger(__name__)

TOX21_URL = "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/tox21.csv.gz"
TOX21_TASKS: list[str] = [
    "NR-AR",
    "NR-AR-LBD",
    "NR-AhR",
    "NR-Aromatase",
    "NR-ER",
    "NR-ER-LBD",
    "NR-PPAR-gamma",
    "SR-ARE",
    "SR-ATAD5",
    "SR-HSE",
    "SR-MMP",
    "SR-p53",
]
DOWNLOAD_TIMEOUT_S = 20.0
# Missing-label spellings in label columns, compared case-insensitively after stripping
# whitespace (SMILES cells are kept verbatim).
MISSING_VALUES = ["", "NA", "N/A", "n/a", "na", "NaN", "nan", "null", "NULL", "None", "-"]
ID_COLUMNS = {"id", "mol_id", "molecule_id", "compound_id", "cas", "name", "index", "inchikey"}
_UNSUPPORTED_SUFFIXES = {".xlsx", ".xls", ".parquet", ".sdf", ".zip", ".json", ".pkl", ".feather"}
_SHOW_VALUES = 5
# A header cell longer than this is no column name (a broken header line or quote), and would
# be echoed in every message naming it; data cells of any length are read.
MAX_COLUMN_NAME = 1000
_SHOW_INVALID = 3  # reasons quoted when no SMILES of a table parsed
_FIELD_LIMIT_LOCK = threading.Lock()  # the csv module's field size limit is process-wide
_MISSING = frozenset(v.lower() for v in MISSING_VALUES)
_BOOLEANS = {"false": 0.0, "true": 1.0}
_DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}  # sniffed in this order of preference
# What to do with rows that repeat a molecule (same molecule key): keep them all (the split keeps
# them in one part), or make one row of them, each task's label the majority (a tie: missing)
# or the agreed label (a conflict: missing).
DUPLICATE_POLICIES = ("keep", "average", "drop")


class DataError(ValueError):
    """Bad input data; the message names the file, column or rows at fault."""


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


def default_cache_dir() -> Path:
    """$TOXTUNE_CACHE_DIR, else ~/.cache/toxtune (downloads and feature files live here)."""
    env = os.environ.get("TOXTUNE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "toxtune"


def is_url(source: str | Path | None) -> bool:
    """True for http(s) URLs, which resolve_source downloads into the cache."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def resolve_source(
    source: str | Path | None,
    cache_dir: Path | None = None,
    smiles_column: str = "smiles",
) -> Path:
    """A local file for `source`: None/"default" is Tox21; URLs are downloaded once into the cache.

    Downloads go to a temp file, are checked (decompresses, parses, has `smiles_column` and rows),
    get a sha256 sidecar and are renamed into place atomically. A cached copy whose sha256 no
    longer matches its sidecar is downloaded again.
    """
    if source is None or (isinstance(source, str) and source.strip().lower() == "default"):
        source = TOX21_URL
    if is_url(source):
        return _cached_download(str(source), Path(cache_dir or default_cache_dir()), smiles_column)
    return _local_file(source)


def read_table(path: str | Path, smiles_column: str = "smiles") -> pd.DataFrame:
    """Read a user's table exactly as `load_table` reads it; every cell comes back as text.

    Contract (each failure is a DataError naming the file):
    - `path` is a local file; a missing path, a directory, an unreadable or a 0-byte file fails.
    - gzip is recognised by its content, whatever the name; a .gz name on plain bytes and names
      such as .xlsx or .parquet are refused.
    - The text is UTF-8, with or without a byte-order mark.
    - The delimiter (comma, semicolon or tab) is sniffed from the header line: the one that
      yields `smiles_column`, else the one that yields most columns; a non-comma choice is
      logged at INFO.
    - Header names are stripped of surrounding whitespace; an empty one becomes "Unnamed: i"
      (0-based position); a name that occurs twice is refused. `smiles_column` must be present.
    - Cells are str exactly as written (quotes removed, "" when empty; no missing-value or number
      conversion). Blank lines are skipped; a row with more cells than the header is refused
      with its line number, a shorter row is padded with "". Quoted cells may span lines.
    - A header with no data rows gives an empty frame (load_table refuses it).
    """
    path = _local_file(path)
    parsed = _parse(_decode(_read_bytes(path), path), path, smiles_column)
    _require_smiles(parsed.frame, path, smiles_column)
    return parsed.frame


def load_table(
    source: str | Path | None = None,
    smiles_column: str = "smiles",
    targets: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    *,
    allow_single_class: bool = False,
) -> MoleculeTable:
    """Read a .csv or .csv.gz of SMILES plus binary task columns into a MoleculeTable.

    The file is read by `read_table`. In label columns the spellings in MISSING_VALUES (any case)
    are missing labels; 0/1, 0.0/1.0 and true/false are labels; anything else is an error that
    names the column, the file line and the value.

    `targets=None` takes every column besides the SMILES column whose non-missing cells are
    mostly (more than half) 0/1; a stray other value in such a column is the error above. Columns
    that are not tasks (id-like names such as mol_id, no values at all, or mostly other values)
    are listed with the reason in `skipped_columns` and logged at WARNING. Requested `targets`
    must exist and hold only labels.

    A task whose labelled rows are all 0 or all 1 is an error naming it and its counts; with
    `allow_single_class=True` such tasks are dropped and listed in `skipped_columns` instead.

    Rows are never dropped: an empty SMILES cell becomes "" and is reported as invalid by
    featurization. Duplicate SMILES with conflicting labels are kept and listed in `conflicts`
    (exact string match, not canonicalized).
    """
    path = resolve_source(source, cache_dir, smiles_column)
    raw = _read_bytes(path)
    parsed = _parse(_decode(raw, path), path, smiles_column)
    frame = parsed.frame
    _require_smiles(frame, path, smiles_column)
    if len(frame) == 0:
        raise DataError(f"{path} has a header but no data rows (empty dataset)")
    tasks, labels, skipped = _label_columns(frame, smiles_column, targets, parsed.lines, path)
    tasks, labels, skipped = _check_classes(tasks, labels, skipped, allow_single_class, path)
    if skipped:
        log.warning(
            "%s: %d column(s) not used as tasks: %s", path, len(skipped), _format_skipped(skipped)
        )
    smiles = [s.strip() for s in frame[smiles_column].tolist()]
    conflicts = find_conflicts(smiles, labels)
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
        labels=labels,
        tasks=tasks,
        source=_describe_source(source),
        content_hash=hashlib.sha256(raw).hexdigest(),
        conflicts=conflicts,
        skipped_columns=skipped,
        lines=parsed.lines,
    )


def find_conflicts(smiles: Sequence[str], labels: np.ndarray) -> list[str]:
    """SMILES (non-empty, exact text) seen more than once with a 0 and a 1 for the same task."""
    if len(smiles) == 0 or labels.size == 0:
        return []
    frame = pd.DataFrame(np.asarray(labels, dtype=np.float32))
    frame["__smiles__"] = list(smiles)
    frame = frame[frame["__smiles__"].duplicated(keep=False) & (frame["__smiles__"] != "")]
    if frame.empty:
        return []
    grouped = frame.groupby("__smiles__", sort=False)
    spread = grouped.max() - grouped.min()
    return [str(s) for s in spread.index[(spread > 0).any(axis=1).to_numpy()]]


@dataclass(frozen=True)
class DuplicateCounts:
    """How a table repeats molecules (rows keyed by `toxmodel.featurize` canonical SMILES)."""

    shared_rows: int  # rows whose molecule occurs in another row too
    molecules: int  # molecules that occur in more than one row
    conflicting: int  # of those, molecules with a 0 and a 1 for some task


def count_duplicates(keys: Sequence[str], labels: np.ndarray) -> DuplicateCounts:
    """Repeated molecules among rows keyed by `keys` ("" = no molecule, never a repeat)."""
    frame = pd.DataFrame(np.asarray(labels, dtype=np.float32).reshape(len(keys), -1))
    frame["__key__"] = list(keys)
    frame = frame[frame["__key__"].duplicated(keep=False) & (frame["__key__"] != "")]
    if frame.empty:
        return DuplicateCounts(0, 0, 0)
    grouped = frame.groupby("__key__", sort=False)
    spread = grouped.max() - grouped.min()
    return DuplicateCounts(
        shared_rows=len(frame),
        molecules=int(grouped.ngroups),
        conflicting=int((spread > 0).any(axis=1).sum()),
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
    labels = table.labels.astype(np.float64)
    positives = np.zeros((len(rows), labels.shape[1]))
    negatives = np.zeros((len(rows), labels.shape[1]))
    np.add.at(positives, members, labels == 1)
    np.add.at(negatives, members, labels == 0)
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
    invalid: list[tuple[int, str, str]]  # (file line, header = 1; smiles; reason)
    tasks: list[TaskSummary]
    conflicts: int
    n_features: int | None
    skipped_columns: dict[str, str] = field(default_factory=dict)  # column -> why not a task
    duplicates: DuplicateCounts | None = None  # by molecule key; None: features without keys
    standardized: bool = False  # molecule keys were taken after standardization

    def format(self, max_invalid: int = 50) -> str:
        """Human-readable multi-line text."""
        lines = [
            f"source: {self.source}",
            f"rows: {self.rows}",
            f"valid SMILES: {self.valid}",
            f"invalid SMILES: {len(self.invalid)}",
        ]
        for line, smiles, reason in self.invalid[:max_invalid]:
            shown = _short(smiles)
            lines.append(f"  line {line}: {shown!r}: {reason}")
        if len(self.invalid) > max_invalid:
            more = len(self.invalid) - max_invalid
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
        duplicates = count_duplicates(features.row_keys(len(table)), labels)
    return DataSummary(
        source=table.source,
        rows=len(table.smiles),
        valid=len(features.valid_rows),
        invalid=[(table.line_of(i.row), i.smiles, i.reason) for i in features.invalid],
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


def check_parsed(table: MoleculeTable, features: Features, listed_in: str | None = None) -> None:
    """Refuse a table none of whose SMILES parsed: there is nothing to split, train or score.

    The DataError names the source, the number of rows and the first reasons by file line;
    `listed_in` (where the caller wrote the invalid-SMILES report) is named when given.
    """
    n = len(table)
    if n == 0 or len(features.valid_rows):
        return
    shown = "; ".join(
        f"line {table.line_of(item.row)} {_short(item.smiles)!r}: {item.reason}"
        for item in features.invalid[:_SHOW_INVALID]
    )
    more = ", ..." if len(features.invalid) > _SHOW_INVALID else ""
    where = f"; all {n} are listed in {listed_in}" if listed_in else ""
    raise DataError(
        f"{table.source}: none of its {n} SMILES could be parsed, so there is nothing to "
        f"train on ({shown}{more}){where}"
    )


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_source(source: str | Path | None) -> str:
    if source is None or (isinstance(source, str) and source.strip().lower() == "default"):
        return TOX21_URL
    return str(source)


def _cached_download(url: str, cache_dir: Path, smiles_column: str) -> Path:
    """The cached copy of `url`, downloaded (again) when absent or failing its sha256 check."""
    folder = cache_dir.expanduser() / "downloads"
    name = Path(urlparse(url).path).name or "data.csv"
    url_key = hashlib.sha256(url.encode()).hexdigest()[:12]
    target = folder / f"{url_key}-{name}"
    sidecar = target.with_name(target.name + ".sha256")
    if target.is_file() and sidecar.is_file():
        parts = sidecar.read_text(encoding="utf-8", errors="replace").split()
        expected = parts[0] if parts else ""
        if _sha256_file(target) == expected:
            return target
        log.warning("cached download %s is corrupt (sha256 mismatch); downloading again", target)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            _download(url, fh)
        raw = tmp.read_bytes()
        try:
            frame = _parse(_decode(raw, Path(name)), Path(name), smiles_column).frame
        except DataError as exc:
            raise DataError(f"download from {url} is not a usable CSV: {exc}") from exc
        if smiles_column not in frame.columns or len(frame) == 0:
            raise DataError(
                f"download from {url} has no '{smiles_column}' column or no rows "
                f"(columns: {list(frame.columns)[:10]})"
            )
        digest = hashlib.sha256(raw).hexdigest()
        _atomic_write_text(sidecar, f"{digest}  {target.name}\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("downloaded %s to %s", url, target)
    return target


def _download(url: str, fh: Any) -> None:
    """Stream `url` into `fh`; any network failure becomes a DataError pointing at --data."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            while block := response.read(1 << 20):
                fh.write(block)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = exc.reason if type(exc) is urllib.error.URLError else exc
        raise DataError(
            f"could not download {url} ({reason}). Without network access, pass a local "
            f"CSV/CSV.GZ file with `--data PATH` (for Tox21: a copy of {TOX21_URL})."
        ) from exc


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            hasher.update(block)
    return hasher.hexdigest()


def _local_file(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"data path is a directory, not a CSV file: {path}")
    return path


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    if not raw:
        raise DataError(f"data file is empty: {path}")
    return raw


def _decode(raw: bytes, path: Path) -> str:
    """Decompress (gzip by magic bytes) and decode UTF-8 (BOM dropped); failures name the file."""
    suffix = path.suffix.lower()
    if suffix in _UNSUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}'; expected .csv or .csv.gz")
    data = raw
    if raw[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path} is not a valid gzip file ({exc})") from exc
    elif suffix == ".gz":
        raise DataError(f"{path} has a .gz name but is not gzip-compressed")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); re-save the file as UTF-8"
        ) from exc
    if not text.strip():
        raise DataError(f"data file is empty: {path}")
    return text


@dataclass(frozen=True)
class _Parsed:
    """A table as text and the file line (header = 1) on which each of its rows starts."""

    frame: pd.DataFrame
    lines: np.ndarray  # int64, one per row


def _parse(text: str, path: Path, smiles_column: str) -> _Parsed:
    """Split the text into header and rows (see `read_table` for the rules)."""
    _allow_fields_up_to(len(text) + 1)
    delimiter = _sniff_delimiter(text, smiles_column)
    if delimiter != ",":
        name = _DELIMITERS[delimiter]
        log.info("%s: reading as %s-separated (sniffed from the header line)", path, name)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 1
    try:
        for record in reader:
            # A blank line is no row; a quoted empty cell (`""`, what pandas writes for an empty
            # SMILES in a one-column file) is a row whose SMILES is empty, reported as invalid.
            if record and (len(record) > 1 or record[0].strip() or record[0] == ""):
                if header is None:
                    header = record
                else:
                    rows.append(record)
                    lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path} could not be parsed as CSV (line {start}): {exc}") from exc
    if header is None:
        raise DataError(f"data file is empty: {path}")
    names = _header_names(header, path)
    for record, line in zip(rows, lines, strict=True):
        if len(record) > len(names):
            raise DataError(
                f"{path} could not be parsed as CSV: line {line} has {len(record)} cells but "
                f"the header has {len(names)}"
            )
        record.extend([""] * (len(names) - len(record)))
    frame = pd.DataFrame(rows, columns=names, dtype=object)
    return _Parsed(frame, np.asarray(lines, dtype=np.int64))


def _allow_fields_up_to(size: int) -> None:
    """Let the csv module read fields of up to `size` characters.

    Its default limit (128 KiB) turned a long header name or cell into `field larger than field
    limit`. The whole text is in memory already and no field is longer than it, so the limit
    guards nothing here. It is process-wide: raised here (under a lock, so two readers never
    lower each other's), never lowered.
    """
    with _FIELD_LIMIT_LOCK:
        if csv.field_size_limit() < size:
            csv.field_size_limit(size)


def _sniff_delimiter(text: str, smiles_column: str) -> str:
    """Comma, semicolon or tab: the one whose header cells include the SMILES column, else the
    one giving most cells (ties go to the earlier in _DELIMITERS)."""
    header = next((line for line in io.StringIO(text, newline="") if line.strip()), "")
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
                f"({_short(name)!r}); no column name is over {MAX_COLUMN_NAME:,}: check that "
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


def _require_smiles(frame: pd.DataFrame, path: Path, smiles_column: str) -> None:
    if smiles_column not in frame.columns:
        raise DataError(_missing_smiles_message(path, smiles_column, list(frame.columns)))


def _missing_smiles_message(path: Path, smiles_column: str, columns: list[str]) -> str:
    shown = ", ".join(repr(c) for c in columns[:20]) + (", ..." if len(columns) > 20 else "")
    hint = [c for c in columns if c.lower() == smiles_column.lower()]
    extra = f" (did you mean {hint[0]!r}? pass --smiles-column)" if hint else ""
    return f"{path}: no SMILES column {smiles_column!r}{extra}; available columns: {shown}"


def _id_reason(name: str) -> str | None:
    """Why a column is never taken as a task by its name alone, or None."""
    lowered = name.strip().lower()
    if lowered.startswith("unnamed:"):
        return "no column name"
    if lowered in ID_COLUMNS or lowered.endswith("_id"):
        return "id column"
    return None


@dataclass(frozen=True)
class _Cells:
    """One label column read cell by cell."""

    values: np.ndarray  # float64: 0/1, NaN where missing or not a label
    present: np.ndarray  # bool: not a missing-value spelling
    other: np.ndarray  # bool: present but not a 0/1 label


def _cells(column: pd.Series) -> _Cells:
    """Classify each cell once per distinct text: 0/1 label, missing, or other."""
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    parsed = [_label_value(str(u)) for u in uniques] + [math.nan]  # code -1: a NaN object
    values = np.array([math.nan if v is None else v for v in parsed], dtype=np.float64)[codes]
    other = np.array([v is None for v in parsed], dtype=bool)[codes]
    return _Cells(values, other | ~np.isnan(values), other)


def _label_value(text: str) -> float | None:
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


def _label_columns(
    frame: pd.DataFrame,
    smiles_column: str,
    targets: Sequence[str] | None,
    lines: np.ndarray,
    path: Path,
) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """The task columns, their float32 labels (NaN = missing) and the columns skipped, with why."""
    if targets is not None:
        tasks = _requested_targets(frame, smiles_column, targets, path)
        columns = [_target_labels(frame[t], t, lines, path) for t in tasks]
        return tasks, np.column_stack(columns).astype(np.float32), {}
    tasks: list[str] = []
    columns: list[np.ndarray] = []
    skipped: dict[str, str] = {}
    for name in frame.columns:
        if name == smiles_column:
            continue
        why = _id_reason(name)
        if why is None:
            cells = _cells(frame[name])
            n_present, n_other = int(cells.present.sum()), int(cells.other.sum())
            if n_present == 0:
                why = "no values"
            elif n_other * 2 >= n_present:  # mostly not 0/1: some other kind of column
                why = _not_binary_reason(frame[name], cells)
            elif n_other:
                raise DataError(
                    f"{path}: column {name!r} holds 0/1 labels in most rows, but "
                    f"{_bad_cells(frame[name], cells, lines)}. Use 0 or 1, or an empty cell "
                    "(or NA, n/a, ...) for a missing label; if it is not a label column, name "
                    "the label columns with --targets"
                )
            else:
                tasks.append(name)
                columns.append(cells.values)
                continue
        skipped[name] = why
    if not tasks:
        raise DataError(
            f"{path}: no binary (0/1) label columns found besides {smiles_column!r} "
            f"(skipped: {_format_skipped(skipped) or 'no other columns'}); name the label "
            "columns with --targets"
        )
    return tasks, np.column_stack(columns).astype(np.float32), skipped


def _requested_targets(
    frame: pd.DataFrame, smiles_column: str, targets: Sequence[str], path: Path
) -> list[str]:
    """The requested target names, checked against the header."""
    if isinstance(targets, str):
        targets = [targets]
    requested = [str(t).strip() for t in targets]
    if not requested:
        raise DataError(f"{path}: an empty list of target columns was given")
    missing = [t for t in requested if t not in frame.columns]
    if missing:
        available = [c for c in frame.columns if c != smiles_column]
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


def _target_labels(column: pd.Series, name: str, lines: np.ndarray, path: Path) -> np.ndarray:
    """Labels of a requested target; DataError naming it when not binary or all missing."""
    cells = _cells(column)
    if cells.other.any():
        raise DataError(
            f"{path}: target column {name!r} is not binary (0/1): "
            f"{_bad_cells(column, cells, lines)}"
        )
    if not cells.present.any():
        raise DataError(f"{path}: task {name!r} has no labels (every value is missing)")
    return cells.values


def _bad_cells(column: pd.Series, cells: _Cells, lines: np.ndarray) -> str:
    """'2 rows hold other values: line 3: '2', line 9: 'inactive'' (the first few shown)."""
    rows = np.flatnonzero(cells.other)
    shown = ", ".join(f"line {lines[r]}: {_short(column.iat[r])!r}" for r in rows[:_SHOW_VALUES])
    more = ", ..." if len(rows) > _SHOW_VALUES else ""
    what = "row holds another value" if len(rows) == 1 else "rows hold other values"
    return f"{len(rows)} {what}: {shown}{more}"


def _not_binary_reason(column: pd.Series, cells: _Cells) -> str:
    examples = pd.unique(column[cells.other].astype(str))[:3]
    return (
        f"not binary (0/1): {int(cells.other.sum())} of {int(cells.present.sum())} values are "
        f"other, e.g. {', '.join(repr(_short(v)) for v in examples)}"
    )


def _check_classes(
    tasks: list[str],
    labels: np.ndarray,
    skipped: dict[str, str],
    allow_single_class: bool,
    path: Path,
) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """Refuse (or, when allowed, drop into `skipped`) tasks whose labels are all 0 or all 1."""
    positives = np.sum(labels == 1, axis=0)
    negatives = np.sum(labels == 0, axis=0)
    single = {
        task: f"{positives[j]} positives, {negatives[j]} negatives"
        for j, task in enumerate(tasks)
        if not (positives[j] and negatives[j])
    }
    if not single:
        return tasks, labels, skipped
    shown = ", ".join(f"{task!r} ({counts})" for task, counts in list(single.items())[:10])
    shown += f", ... ({len(single)} in all)" if len(single) > 10 else ""
    if not allow_single_class:
        raise DataError(
            f"{path}: task(s) with one class only, which a classifier can neither learn nor be "
            f"scored on: {shown}. Fix the labels, leave the column(s) out of the targets, or "
            "load with allow_single_class to skip such tasks"
        )
    keep = [j for j, task in enumerate(tasks) if task not in single]
    if not keep:
        raise DataError(f"{path}: every task has one class only: {shown}")
    skipped = {**skipped, **{task: f"one class only ({c})" for task, c in single.items()}}
    return [tasks[j] for j in keep], labels[:, keep], skipped


def _format_skipped(skipped: dict[str, str], limit: int = 10) -> str:
    items = list(skipped.items())
    text = "; ".join(f"{name!r}: {why}" for name, why in items[:limit])
    return text + (f"; ... ({len(items)} in all)" if len(items) > limit else "")
