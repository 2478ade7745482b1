"""RDKit featurization: Morgan/ECFP bits or counts, MACCS keys, 2D descriptors, cached on disk."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import multiprocessing
import os
import struct
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from toxmodel.cpus import available_cpus

log = logging.getLogger(__name__)

MAX_SMILES_LENGTH = 1000  # longer inputs are refused: nothing in Tox21/ToxCast comes close (~350)
MACCS_BITS = 167
# What rows of one molecule share (recorded with each job, so a job is never continued under
# keys that group its rows otherwise).
MOLECULE_KEY = "canonical SMILES without stereo"
COUNT_CLIP = 255  # Morgan counts are stored as uint8
# Bump when the npz layout or the keys change; older files are then recomputed (2: keys;
# 3: stereo-blind keys).
CACHE_FORMAT = 3
_MAX_REASON_CHARS = 300
_GENERIC_REASON = "RDKit could not parse the SMILES"
# Rough single-core seconds per molecule, used to decide when a process pool pays off.
_COST_BASE = 2e-4
_COST_MACCS = 8e-4
_COST_DESCRIPTORS = 1.2e-2
_COST_STANDARDIZE = 4e-4
_POOL_MIN_SECONDS = 0.15  # below this estimated work (~750 SMILES of bits), stay in-process
_TARGET_CHUNKS_PER_WORKER = 8
_MIN_CHUNK, _MAX_CHUNK = 16, 400


@dataclass(frozen=True)
class FeaturizerConfig:
    """Which features to compute; the same settings are stored in every checkpoint."""

    radius: int = 2  # Morgan radius (2 = ECFP4)
    n_bits: int = 2048  # Morgan fingerprint length
    counts: bool = False  # Morgan count vector (clipped to 255) instead of bits
    maccs: bool = False  # append the 167 MACCS keys
    descriptors: bool = False  # append RDKit 2D descriptors (float32)
    standardize: bool = False  # keep the largest fragment and clean up before featurizing

    def key(self) -> str:
        """A stable short hash of the settings, used in cache file names."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class InvalidSmiles:
    """One input row that could not be featurized, and why."""

    row: int  # 0-based index into the SMILES given; reports show the file line (row + 2)
    smiles: str
    reason: str


@dataclass
class Features:
    """A featurized table: compact fingerprint bytes plus optional float descriptors."""

    fingerprint: np.ndarray  # uint8 (n_valid, n_fp)
    descriptors: np.ndarray  # float32 (n_valid, n_desc); n_desc may be 0
    valid_rows: np.ndarray  # int64 indices of the input rows that featurized
    invalid: list[InvalidSmiles]
    config: FeaturizerConfig
    # The molecule key of each valid row: canonical SMILES, without stereo, of the molecule that
    # was featurized (after standardization when it is on); None when built without them.
    canonical: list[str] | None = None

    @property
    def n_features(self) -> int:
        return int(self.fingerprint.shape[1] + self.descriptors.shape[1])

    def __len__(self) -> int:
        return int(self.fingerprint.shape[0])

    def molecule_keys(self) -> list[str]:
        """The molecule key of each valid row (in `valid_rows` order)."""
        if self.canonical is None:
            raise ValueError("these features carry no canonical SMILES (built without them)")
        return self.canonical

    def row_keys(self, n_rows: int) -> list[str]:
        """The molecule key of every input row ("" for a row that did not featurize).

        Rows with one key are one molecule: the featurizer saw the same structure for them.
        """
        keys = [""] * n_rows
        for row, key in zip(self.valid_rows.tolist(), self.molecule_keys(), strict=True):
            keys[row] = key
        return keys

    def take(self, rows: np.ndarray | Sequence[int]) -> Features:
        """The features of a table made of input rows `rows`, in that order (row i of the new
        table is input row rows[i]); invalid rows stay invalid, renumbered to the new table."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        position = {int(r): i for i, r in enumerate(self.valid_rows.tolist())}
        invalid_of = {item.row: item for item in self.invalid}
        new_valid: list[int] = []
        picked: list[int] = []
        invalid: list[InvalidSmiles] = []
        for new_row, old_row in enumerate(idx.tolist()):
            if old_row in position:
                new_valid.append(new_row)
                picked.append(position[old_row])
            elif old_row in invalid_of:
                invalid.append(replace(invalid_of[old_row], row=new_row))
            else:
                raise IndexError(f"row {old_row} was not featurized here")
        pick = np.asarray(picked, dtype=np.int64)
        canonical = None if self.canonical is None else [self.canonical[i] for i in picked]
        return Features(
            fingerprint=self.fingerprint[pick],
            descriptors=self.descriptors[pick],
            valid_rows=np.asarray(new_valid, dtype=np.int64),
            invalid=invalid,
            config=self.config,
            canonical=canonical,
        )


@dataclass(frozen=True)
class DescriptorScaler:
    """Robust (median/IQR) scaling fit on training rows only."""

    center: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, floor: float = 1e-6) -> DescriptorScaler:
        """Median/IQR per column, NaN/inf ignored.

        A column whose IQR is below `floor` (mostly-constant counts such as fr_* descriptors)
        falls back to its standard deviation, and a truly constant or all-missing column gets
        scale 1, so no column is blown up by a near-zero divisor.
        """
        data = np.asarray(x, dtype=np.float64)
        if data.ndim != 2:
            raise ValueError(f"DescriptorScaler.fit expects a 2-D array, got shape {data.shape}")
        n_cols = data.shape[1]
        if data.shape[0] == 0 or n_cols == 0:
            return cls(np.zeros(n_cols, np.float32), np.ones(n_cols, np.float32))
        data = np.where(np.isfinite(data), data, np.nan)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            center = np.nanmedian(data, axis=0)
            q25, q75 = np.nanpercentile(data, [25.0, 75.0], axis=0)
            std = np.nanstd(data, axis=0)
        scale = q75 - q25
        scale = np.where(np.isfinite(scale) & (scale > floor), scale, std)
        scale = np.where(np.isfinite(scale) & (scale > floor), scale, 1.0)
        center = np.where(np.isfinite(center), center, 0.0)
        return cls(center.astype(np.float32), scale.astype(np.float32))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Scaled float32 copy: (x - center) / scale, missing (NaN/inf) -> 0, clipped to +-10."""
        data = np.asarray(x, dtype=np.float64)
        if data.ndim != 2 or data.shape[1] != self.center.shape[0]:
            raise ValueError(
                f"expected {self.center.shape[0]} descriptor columns, got shape {data.shape}"
            )
        with np.errstate(all="ignore"):
            z = (data - self.center.astype(np.float64)) / self.scale.astype(np.float64)
        z = np.where(np.isfinite(data), z, 0.0)
        z = np.nan_to_num(z, nan=0.0, posinf=10.0, neginf=-10.0)
        return np.clip(z, -10.0, 10.0).astype(np.float32)


def descriptor_names() -> tuple[str, ...]:
    """Names of the RDKit 2D descriptors, in the column order of `Features.descriptors`."""
    from rdkit.Chem import Descriptors

    return tuple(name for name, _ in Descriptors._descList)


def fingerprint_width(config: FeaturizerConfig) -> int:
    """Number of uint8 fingerprint columns the config produces."""
    return config.n_bits + (MACCS_BITS if config.maccs else 0)


def featurize(
    smiles: Sequence[str],
    config: FeaturizerConfig,
    n_jobs: int | None = None,
    progress: bool = False,
) -> Features:
    """Featurize SMILES with RDKit; failing rows are reported in `invalid`, never dropped silently.

    The fingerprint block is the Morgan bit (or count, clipped to 255) vector of `config.n_bits`,
    followed by the 167 MACCS keys when `config.maccs`; descriptors are raw float32 RDKit 2D
    descriptors with NaN wherever RDKit gave NaN/inf or failed (DescriptorScaler handles those).

    Salts and mixtures: without `standardize` the whole input (every fragment, counter-ions
    included) is featurized as written. With `standardize=True` the largest organic fragment is
    kept (RDKit LargestFragmentChooser), cleaned up (MolStandardize Cleanup: normalizations,
    metal disconnection) and neutralized (Uncharger), so "CC(=O)[O-].[Na+]" featurizes as acetic
    acid.

    Empty, over-long (> MAX_SMILES_LENGTH characters) or unparsable SMILES are listed in
    `invalid` with RDKit's reason, as is text RDKit would silently truncate (non-ASCII, inner
    whitespace or control characters; a CXSMILES " |...|" block is allowed).

    `n_jobs=None` works in-process for small inputs (a pool costs more than it saves there) and
    uses a process pool over all available cores otherwise; `n_jobs=1` always stays in-process.
    """
    items = list(smiles)
    n = len(items)
    workers = _resolve_jobs(n_jobs, n, config)
    chunk = _chunk_size(n, workers)
    tasks = [(start, items[start : start + chunk], config) for start in range(0, n, chunk)]
    results = _run_chunks(tasks, workers, n, progress)
    return assemble(results, config)


def canonical_smiles(smiles: Sequence[str], config: FeaturizerConfig) -> list[str]:
    """The molecule key of each SMILES: RDKit canonical SMILES of the molecule the featurizer
    would see, so standardized when `config.standardize` is on ("" when invalid), and without
    stereo: Morgan bits do not see it, so stereoisomers are one input to the model and must not
    straddle a split.

    "OCC" and "CCO" share a key, as do "C[C@H](N)C(=O)O" and "C[C@@H](N)C(=O)O"; with
    standardize, so does the salt "CCO.[Na+]". Keys are the same as `Features.row_keys` of
    `featurize(smiles, config)`, which computes them as it goes (and caches them); call this
    only where no features are at hand: it parses every SMILES again (about 0.2 ms a
    molecule, 1.2 ms with standardize, on one core).
    """
    items = list(smiles)
    mols, rows, _ = _parse_all(items, 0, config.standardize)
    keys = [""] * len(items)
    for row, key in zip(rows, _canonical(mols), strict=True):
        keys[row] = key
    return keys


def featurize_cached(
    smiles: Sequence[str],
    config: FeaturizerConfig,
    cache_dir: Path,
    content_hash: str,
    n_jobs: int | None = None,
    progress: bool = False,
    mapped: bool = False,
) -> Features:
    """`featurize()` memoized on disk as cache_dir/features/{hash[:16]}-{config.key()}.npz.

    The file is uncompressed (a hit is one read) and written atomically. It also stores a digest
    of the SMILES list, so a stale or mismatched file is recomputed rather than trusted.

    `mapped`: a hit maps the two matrices read-only from the file instead of reading them, so
    their pages are read only if touched: for callers that need the rows, keys and widths but
    not the features themselves (`toxtune data`'s summary; 2 GB at 10^6 molecules).
    """
    items = list(smiles)
    path = feature_cache_path(cache_dir, content_hash, config)
    digest = smiles_digest(items)
    cached = _read_cache(path, config, digest, mapped)
    if cached is not None:
        log.debug("feature cache hit: %s", path)
        return cached
    features = featurize(items, config, n_jobs=n_jobs, progress=progress)
    try:
        _write_cache(path, features, digest)
    except OSError as exc:
        log.warning("could not write feature cache %s: %s", path, exc)
    return features


def feature_cache_path(cache_dir: Path, content_hash: str, config: FeaturizerConfig) -> Path:
    """Where `featurize_cached` keeps the features of one (file, config) pair."""
    return Path(cache_dir).expanduser() / "features" / f"{content_hash[:16]}-{config.key()}.npz"


def write_invalid_report(
    invalid: Sequence[InvalidSmiles], path: Path, lines: Sequence[int] | None = None
) -> Path:
    """Write the invalid rows as CSV (line,row,smiles,reason); written even when empty.

    `line` is the input file's line as an editor shows it (header = line 1): `lines[row]` when
    the table's line numbers are given (`MoleculeTable.lines`, exact with blank lines or quoted
    multi-line cells), else row + 2. `row` is the 0-based data row, as in `InvalidSmiles.row`.
    """
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["line", "row", "smiles", "reason"])
        for item in invalid:
            line = int(lines[item.row]) if lines is not None else item.row + 2
            writer.writerow([line, item.row, item.smiles, item.reason])
    return out


@dataclass
class FeatureChunk:
    """What one worker sends back for a slice of the input: global row ids plus the feature
    blocks of its valid rows (`assemble` joins chunks into `Features`).

    Bit blocks travel packed (8 bits a byte, little-endian) to keep inter-process (and
    inter-node) traffic small.
    """

    valid_rows: np.ndarray
    morgan: np.ndarray  # packed bits (n, ceil(n_bits / 8)), or uint8 counts (n, n_bits)
    maccs: np.ndarray  # packed MACCS bits (n, 21), or (n, 0)
    descriptors: np.ndarray
    invalid: list[InvalidSmiles]
    canonical: list[str]  # molecule key per valid row


def _per_molecule_cost(config: FeaturizerConfig) -> float:
    cost = _COST_BASE
    cost += _COST_MACCS if config.maccs else 0.0
    cost += _COST_DESCRIPTORS if config.descriptors else 0.0
    cost += _COST_STANDARDIZE if config.standardize else 0.0
    return cost


def _resolve_jobs(n_jobs: int | None, n: int, config: FeaturizerConfig) -> int:
    """Worker count: explicit n_jobs capped by the input size, or a cost-based default."""
    if n_jobs is not None:
        if n_jobs < 1:
            raise ValueError(f"n_jobs must be >= 1 or None, got {n_jobs}")
        return max(1, min(n_jobs, n))
    if n * _per_molecule_cost(config) < _POOL_MIN_SECONDS:
        return 1
    return max(1, min(available_cpus(), n))


def _chunk_size(n: int, workers: int) -> int:
    if workers <= 1:
        return max(1, min(n, 2048))
    return int(
        min(_MAX_CHUNK, max(_MIN_CHUNK, math.ceil(n / (workers * _TARGET_CHUNKS_PER_WORKER))))
    )


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork on Linux (workers inherit the loaded RDKit and start in milliseconds), else default.

    The workers only run RDKit and numpy, so forking a parent that has other threads is safe.
    """
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _run_chunks(
    tasks: list[tuple[int, list[Any], FeaturizerConfig]], workers: int, n: int, progress: bool
) -> list[FeatureChunk]:
    """Run every chunk, in a fork pool when workers > 1; a broken pool falls back to in-process."""
    from tqdm.auto import tqdm

    with tqdm(total=n, unit="mol", desc="featurize", disable=not progress, leave=False) as bar:
        if workers > 1 and len(tasks) > 1 and not multiprocessing.current_process().daemon:
            try:
                with ProcessPoolExecutor(
                    max_workers=min(workers, len(tasks)), mp_context=_pool_context()
                ) as ex:
                    return _collect(ex.map(_featurize_chunk, tasks), bar)
            except (BrokenProcessPool, OSError) as exc:
                log.warning("featurization worker pool failed (%s); continuing in-process", exc)
                bar.reset()
        return _collect((_featurize_chunk(task) for task in tasks), bar)


def _collect(chunks: Iterable[FeatureChunk], bar: Any) -> list[FeatureChunk]:
    results: list[FeatureChunk] = []
    for chunk in chunks:
        results.append(chunk)
        bar.update(len(chunk.valid_rows) + len(chunk.invalid))
    return results


def assemble(results: Sequence[FeatureChunk], config: FeaturizerConfig) -> Features:
    """Join chunks, given in input order, into one `Features`: the bit blocks unpacked into one
    uint8 matrix, invalid rows and molecule keys in row order. Chunks made by `featurize_chunk`
    over consecutive slices assemble to exactly what `featurize` returns for the whole list.

    Each chunk is unpacked into its own rows of the matrix, so the peak is the matrix and one
    chunk, not two matrices (at 10^6 molecules and 1,024 bits, 1 GB less)."""
    n_valid = sum(len(r.valid_rows) for r in results)
    fingerprint = np.empty((n_valid, fingerprint_width(config)), np.uint8)
    n_desc = len(descriptor_names()) if config.descriptors else 0
    descriptors = np.zeros((0, n_desc), np.float32)
    valid_rows = np.zeros(0, np.int64)
    if results:
        start = 0
        for r in results:  # each chunk straight into its rows: no second matrix-sized array
            rows = slice(start, start + len(r.valid_rows))
            if config.counts:
                fingerprint[rows, : config.n_bits] = r.morgan
            else:
                fingerprint[rows, : config.n_bits] = _unpack(r.morgan, config.n_bits)
            if config.maccs:
                fingerprint[rows, config.n_bits :] = _unpack(r.maccs, MACCS_BITS)
            start = rows.stop
        descriptors = np.concatenate([r.descriptors for r in results], axis=0)
        valid_rows = np.concatenate([r.valid_rows for r in results]).astype(np.int64)
    invalid = [item for r in results for item in r.invalid]
    canonical = [key for r in results for key in r.canonical]
    return Features(fingerprint, descriptors, valid_rows, invalid, config, canonical)


def _unpack(packed: np.ndarray, n_bits: int) -> np.ndarray:
    return np.unpackbits(packed, axis=1, count=n_bits, bitorder="little")


def _featurize_chunk(task: tuple[int, list[Any], FeaturizerConfig]) -> FeatureChunk:
    """`featurize_chunk` on a (start, smiles, config) task (runs in a pool worker)."""
    start, smiles, config = task
    return featurize_chunk(smiles, start, config)


def featurize_chunk(smiles: Sequence[Any], start: int, config: FeaturizerConfig) -> FeatureChunk:
    """Parse, optionally standardize and featurize one slice of the input, whose first item is
    input row `start` (row ids in the chunk are global). Pure: a chunk depends only on its
    arguments, so any process or machine may compute it, and again after a failure."""
    mols, rows, invalid = _parse_all(list(smiles), start, config.standardize)
    morgan = _morgan(mols, config)
    maccs = _maccs_packed(mols) if config.maccs else np.zeros((len(mols), 0), np.uint8)
    n_desc = len(descriptor_names()) if config.descriptors else 0
    descriptors = _descriptors(mols) if n_desc else np.zeros((len(mols), 0), np.float32)
    return FeatureChunk(
        np.asarray(rows, np.int64), morgan, maccs, descriptors, invalid, _canonical(mols)
    )


def _canonical(mols: list[Any]) -> list[str]:
    """Canonical SMILES without stereo of each molecule (the molecule key: stereoisomers have
    the same Morgan bits); "" where RDKit fails."""
    from rdkit import Chem, rdBase

    keys: list[str] = []
    with rdBase.BlockLogs():
        for mol in mols:
            try:
                keys.append(Chem.MolToSmiles(mol, isomericSmiles=False))
            except Exception:
                keys.append("")
    return keys


def _parse_all(
    smiles: list[Any], start: int, standardize: bool
) -> tuple[list[Any], list[int], list[InvalidSmiles]]:
    from rdkit import Chem, rdBase

    mols: list[Any] = []
    rows: list[int] = []
    invalid: list[InvalidSmiles] = []
    standardizer = _Standardizer() if standardize else None
    with rdBase.BlockLogs():
        for offset, raw in enumerate(smiles):
            row = start + offset
            text, problem = _check_text(raw)
            if problem:
                invalid.append(InvalidSmiles(row, text, problem))
                continue
            mol = Chem.MolFromSmiles(text)
            if mol is None:
                invalid.append(InvalidSmiles(row, text, _parse_failure_reason(text)))
                continue
            if mol.GetNumAtoms() == 0:
                invalid.append(InvalidSmiles(row, text, "SMILES has no atoms"))
                continue
            if standardizer is not None:
                mol, problem = standardizer(mol)
                if mol is None:
                    invalid.append(InvalidSmiles(row, text, problem))
                    continue
            mols.append(mol)
            rows.append(row)
    return mols, rows, invalid


def _check_text(raw: Any) -> tuple[str, str]:
    """Normalize one input cell to text; the second item is a reason when it cannot be used."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return "", "empty SMILES"
    if not isinstance(raw, str):
        return str(raw), f"SMILES must be text, got {type(raw).__name__}"
    text = raw.strip()
    if not text:
        return text, "empty SMILES"
    if len(text) > MAX_SMILES_LENGTH:
        return text, f"SMILES longer than {MAX_SMILES_LENGTH} characters ({len(text)})"
    if not text.isascii():
        pos, char = next((i, c) for i, c in enumerate(text) if not c.isascii())
        return text, f"SMILES contains the non-ASCII character {char!r} at position {pos}"
    body = text.split(" |", 1)[0]  # a CXSMILES extension block follows one space
    if any(c.isspace() for c in body) or any(not c.isprintable() for c in text):
        pos = next(i for i, c in enumerate(text) if c.isspace() or not c.isprintable())
        return text, (
            f"SMILES contains whitespace or a control character at position {pos} "
            "(RDKit would silently ignore the rest)"
        )
    return text, ""


def _parse_failure_reason(text: str) -> str:
    """Re-parse a failed SMILES while capturing RDKit's error log to recover the reason."""
    from rdkit import Chem, rdBase

    messages = ""
    capture_cls = getattr(rdBase, "CaptureErrorLog", None)  # RDKit >= 2026.09
    if capture_cls is not None:
        with rdBase.BlockLogs(), capture_cls() as capture:
            Chem.MolFromSmiles(text)
        try:
            messages = str(capture.messages)
        except UnicodeDecodeError:  # RDKit may cut a long log inside a multi-byte character
            messages = ""
    if not messages.strip():
        with rdBase.BlockLogs():
            mol = Chem.MolFromSmiles(text, sanitize=False)
            if mol is not None:
                try:
                    Chem.SanitizeMol(mol)
                except Exception as exc:
                    messages = str(exc)
    return _clean_reason(messages, text)


def _clean_reason(messages: str, text: str) -> str:
    """One readable line from RDKit's log: timestamps, input echoes and caret markers dropped."""
    lines: list[str] = []
    for line in messages.splitlines():
        entry = line.strip()
        if entry.startswith("[") and "] " in entry[:12]:
            entry = entry.split("] ", 1)[1].strip()
        if not entry or entry == text or set(entry) <= {"~", "^", " "}:
            continue
        if "check for mistakes" in entry or entry in lines:
            continue
        lines.append(entry)
    specific = [line for line in lines if "Failed parsing SMILES" not in line]
    reason = "; ".join(specific or lines) or _GENERIC_REASON
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[: _MAX_REASON_CHARS - 3] + "..."
    return reason


class _Standardizer:
    """Largest organic fragment -> MolStandardize cleanup -> neutralize (one per chunk)."""

    def __init__(self) -> None:
        from rdkit.Chem.MolStandardize import rdMolStandardize

        self._chooser = rdMolStandardize.LargestFragmentChooser(preferOrganic=True)
        self._uncharger = rdMolStandardize.Uncharger()
        self._cleanup = rdMolStandardize.Cleanup

    def __call__(self, mol: Any) -> tuple[Any | None, str]:
        try:
            out = self._chooser.choose(mol)
            out = self._cleanup(out)
            out = self._uncharger.uncharge(out)
        except Exception as exc:
            return None, f"standardization failed: {exc}"
        if out is None or out.GetNumAtoms() == 0:
            return None, "standardization left no atoms"
        return out, ""


def _morgan(mols: list[Any], config: FeaturizerConfig) -> np.ndarray:
    """Packed Morgan bits, or Morgan counts clipped to 255, for `mols`."""
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=config.radius, fpSize=config.n_bits)
    if not config.counts:
        return _pack_bitvects(gen.GetFingerprints(mols) if mols else [], config.n_bits)
    out = np.zeros((len(mols), config.n_bits), np.uint8)
    rows: list[int] = []
    cols: list[int] = []
    vals: list[int] = []
    for i, fp in enumerate(gen.GetCountFingerprints(mols) if mols else []):
        elements = fp.GetNonzeroElements()
        cols.extend(elements.keys())
        vals.extend(elements.values())
        rows.extend([i] * len(elements))
    out[rows, cols] = np.minimum(np.asarray(vals, np.int64), COUNT_CLIP)
    return out


def _pack_bitvects(fps: Sequence[Any], n_bits: int) -> np.ndarray:
    """ExplicitBitVects -> packed little-endian bytes via their hex text (no per-bit loop)."""
    from rdkit import DataStructs

    n_bytes = (n_bits + 7) // 8
    if not fps:
        return np.zeros((0, n_bytes), np.uint8)
    hex_text = "".join(DataStructs.BitVectToFPSText(fp) for fp in fps)
    return np.frombuffer(bytes.fromhex(hex_text), np.uint8).reshape(len(fps), n_bytes)


def _maccs_packed(mols: list[Any]) -> np.ndarray:
    from rdkit.Chem import MACCSkeys

    return _pack_bitvects([MACCSkeys.GenMACCSKeys(m) for m in mols], MACCS_BITS)


def _descriptors(mols: list[Any]) -> np.ndarray:
    """Raw RDKit 2D descriptors as float32; failures, NaN, inf and float32 overflow become NaN."""
    from rdkit import rdBase
    from rdkit.Chem import Descriptors

    names = descriptor_names()
    out = np.full((len(mols), len(names)), np.nan, np.float64)
    with rdBase.BlockLogs(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, mol in enumerate(mols):
            try:
                values = Descriptors.CalcMolDescriptors(mol, missingVal=float("nan"))
            except Exception:
                continue
            out[i] = [_as_float(values.get(name)) for name in names]
    with np.errstate(over="ignore", invalid="ignore"):
        result = out.astype(np.float32)
    result[~np.isfinite(result)] = np.nan
    return result


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return float("nan")


def smiles_digest(smiles: Sequence[Any]) -> str:
    """SHA-256 of the SMILES list, in order (what a feature cache must have been made from)."""
    hasher = hashlib.sha256()
    for item in smiles:
        hasher.update(str(item).encode("utf-8", "surrogatepass"))
        hasher.update(b"\x00")
    return hasher.hexdigest()


def _read_cache(
    path: Path, config: FeaturizerConfig, digest: str, mapped: bool = False
) -> Features | None:
    """The cached features, or None when the file is absent, stale or unreadable; `mapped`:
    the matrices as read-only memory maps of the file (`_mapped_member`)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
            if (
                meta.get("format") != CACHE_FORMAT
                or meta.get("smiles_digest") != digest
                or meta.get("config") != asdict(config)
            ):
                log.info("feature cache %s does not match these inputs; recomputing", path)
                return None
            invalid = [InvalidSmiles(int(r), s, why) for r, s, why in meta["invalid"]]
            matrices = {
                name: _mapped_member(path, name) if mapped else data[name]
                for name in ("fingerprint", "descriptors")
            }
            return Features(
                **matrices,
                valid_rows=data["valid_rows"].astype(np.int64, copy=False),
                invalid=invalid,
                config=config,
                canonical=None if meta["canonical"] is None else list(map(str, meta["canonical"])),
            )
    except Exception as exc:
        log.warning("feature cache %s is unreadable (%s); recomputing", path, exc)
        return None


def _mapped_member(path: Path, name: str) -> np.ndarray:
    """Array `name` of an uncompressed .npz (what `_write_cache` writes), as a read-only memory
    map of the file: the zip entry's local header gives where its .npy starts, the .npy header
    the array's dtype, shape and order."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: {name} is compressed, it cannot be mapped")
    with path.open("rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: no zip entry header at {info.header_offset}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {name} holds Python objects")
    if math.prod(shape) == 0:  # nothing to map (mmap refuses zero bytes)
        empty = np.zeros(shape, dtype)
        empty.flags.writeable = False
        return empty
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def _write_cache(path: Path, features: Features, digest: str) -> None:
    """Atomic npz write: a temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": CACHE_FORMAT,
        "smiles_digest": digest,
        "config": asdict(features.config),
        "invalid": [[item.row, item.smiles, item.reason] for item in features.invalid],
        "canonical": features.canonical,
    }
    meta_bytes = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                fingerprint=features.fingerprint,
                descriptors=features.descriptors,
                valid_rows=features.valid_rows,
                meta=meta_bytes,
            )
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
