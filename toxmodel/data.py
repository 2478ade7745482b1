"""Molecule tables from CSV: the Tox21 download and cache, validation, and a dataset summary."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
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
# Missing-label spellings in label columns (SMILES cells are kept verbatim).
MISSING_VALUES = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "-"]
ID_COLUMNS = {"id", "mol_id", "molecule_id", "compound_id", "cas", "name", "index", "inchikey"}
_UNSUPPORTED_SUFFIXES = {".xlsx", ".xls", ".parquet", ".sdf", ".zip", ".json", ".pkl", ".feather"}
_SHOW_VALUES = 5


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

    def __len__(self) -> int:
        return len(self.smiles)

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
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"data path is a directory, not a CSV file: {path}")
    return path


def load_table(
    source: str | Path | None = None,
    smiles_column: str = "smiles",
    targets: Sequence[str] | None = None,
    cache_dir: Path | None = None,
) -> MoleculeTable:
    """Read a .csv or .csv.gz of SMILES plus binary task columns into a MoleculeTable.

    `targets=None` takes every column (other than the SMILES column and id-like columns such as
    mol_id) whose non-missing values are all 0/1. Rows are never dropped: an empty SMILES cell
    becomes "" and is reported as invalid by featurization. Duplicate SMILES with conflicting
    labels are kept and listed in `conflicts` (exact string match, not canonicalized).
    """
    path = resolve_source(source, cache_dir, smiles_column)
    raw = _read_bytes(path)
    frame = _parse_csv(raw, path, smiles_column)
    if smiles_column not in frame.columns:
        raise DataError(_missing_smiles_message(path, smiles_column, list(frame.columns)))
    if len(frame) == 0:
        raise DataError(f"{path} has a header but no data rows (empty dataset)")
    tasks = _select_targets(frame, smiles_column, targets, path)
    labels = np.column_stack([_binary_column(frame[t], t, path) for t in tasks])
    labels = labels.astype(np.float32)
    smiles = [str(s).strip() for s in frame[smiles_column].fillna("").tolist()]
    conflicts = find_conflicts(smiles, labels)
    if conflicts:
        shown = ", ".join(conflicts[:3])
        log.warning(
            "%s: %d SMILES occur more than once with conflicting labels (all rows kept): %s%s",
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
    """What `toxtune data` prints: sizes, invalid SMILES and per-task label balance."""

    source: str
    rows: int
    valid: int
    invalid: list[tuple[int, str, str]]  # (row, smiles, reason)
    tasks: list[TaskSummary]
    conflicts: int
    n_features: int | None

    def format(self, max_invalid: int = 50) -> str:
        """Human-readable multi-line text."""
        lines = [
            f"source: {self.source}",
            f"rows: {self.rows}",
            f"valid SMILES: {self.valid}",
            f"invalid SMILES: {len(self.invalid)}",
        ]
        for row, smiles, reason in self.invalid[:max_invalid]:
            shown = smiles if len(smiles) <= 60 else smiles[:57] + "..."
            lines.append(f"  row {row}: {shown!r}: {reason}")
        if len(self.invalid) > max_invalid:
            more = len(self.invalid) - max_invalid
            lines.append(f"  ... and {more} more (write them all with --invalid-report)")
        if self.n_features is not None:
            lines.append(f"features per molecule: {self.n_features}")
        if self.conflicts:
            lines.append(f"duplicate SMILES with conflicting labels: {self.conflicts}")
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
    """Counts behind `summarize`; SMILES are featurized (Morgan bits) when no features are given."""
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
    return DataSummary(
        source=table.source,
        rows=len(table.smiles),
        valid=len(features.valid_rows),
        invalid=[(i.row, i.smiles, i.reason) for i in features.invalid],
        tasks=tasks,
        conflicts=len(table.conflicts),
        n_features=features.n_features,
    )


def summarize(table: MoleculeTable, features: Features | None = None) -> str:
    """A printable dataset summary: rows, valid/invalid SMILES (listed), per-task label counts."""
    return describe(table, features).format()


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
            frame = _parse_csv(raw, Path(name), smiles_column)
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


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    if not raw:
        raise DataError(f"data file is empty: {path}")
    return raw


def _parse_csv(raw: bytes, path: Path, smiles_column: str) -> pd.DataFrame:
    """Decompress (gzip by magic bytes), decode UTF-8 and parse; failures name the file."""
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
    try:
        header = pd.read_csv(io.StringIO(text), nrows=0)
        columns = [str(c) for c in header.columns]
        na_values = {c: MISSING_VALUES for c in columns if c.strip() != smiles_column}
        frame = pd.read_csv(
            io.StringIO(text),
            keep_default_na=False,
            na_values=na_values,
            dtype={c: str for c in columns if c.strip() == smiles_column},
        )
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"data file is empty: {path}") from exc
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{path} could not be parsed as CSV: {exc}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _missing_smiles_message(path: Path, smiles_column: str, columns: list[str]) -> str:
    shown = ", ".join(repr(c) for c in columns[:20]) + (", ..." if len(columns) > 20 else "")
    hint = [c for c in columns if c.lower() == smiles_column.lower()]
    extra = f" (did you mean {hint[0]!r}? pass --smiles-column)" if hint else ""
    return f"{path}: no SMILES column {smiles_column!r}{extra}; available columns: {shown}"


def _is_id_column(name: str) -> bool:
    lowered = name.strip().lower()
    return lowered in ID_COLUMNS or lowered.endswith("_id") or lowered.startswith("unnamed:")


def _select_targets(
    frame: pd.DataFrame, smiles_column: str, targets: Sequence[str] | None, path: Path
) -> list[str]:
    """The task columns: the requested ones (validated) or every binary non-id column."""
    if targets is not None:
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
    tasks = [
        str(c)
        for c in frame.columns
        if c != smiles_column and not _is_id_column(str(c)) and _looks_binary(frame[c])
    ]
    if not tasks:
        others = [c for c in frame.columns if c != smiles_column]
        raise DataError(
            f"{path}: no binary (0/1) label columns found besides {smiles_column!r} "
            f"(columns: {others[:30]}); name the label columns with --targets"
        )
    return tasks


def _column_values(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values with NaN for missing or non-numeric cells, mask of non-missing cells)."""
    if column.dtype.kind in "fiub":
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        return values, ~np.isnan(values)
    present = column.notna().to_numpy()
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return values, present


def _looks_binary(column: pd.Series) -> bool:
    values, present = _column_values(column)
    return bool(np.all((values[present] == 0) | (values[present] == 1)))


def _binary_column(column: pd.Series, name: str, path: Path) -> np.ndarray:
    """Float 0/1/NaN values of one task; DataError naming it when not binary or all missing."""
    values, present = _column_values(column)
    bad = present & ~((values == 0) | (values == 1))
    if bad.any():
        offending = pd.unique(column[bad].astype(str))[:_SHOW_VALUES]
        raise DataError(
            f"{path}: target column {name!r} is not binary (0/1): {int(bad.sum())} rows hold "
            f"other values, e.g. {', '.join(repr(v) for v in offending)} "
            f"(first at data row {int(np.flatnonzero(bad)[0])})"
        )
    if not present.any():
        raise DataError(f"{path}: task {name!r} has no labels (every value is missing)")
    return np.where(present, values, np.nan)
