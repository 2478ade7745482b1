"""Stage 1, prepare: CSV -> validated table -> the job's record claimed -> features ->
repeated molecules merged (data.duplicates) -> split, a molecule's rows in one part.

Contract: `load_job_table` + `claim_job` refuse (DataError, JobMismatchError) before anything is
featurized; `prepare_data` then returns the featurized, split data and leaves the job's folder
holding its data fingerprint, the invalid-SMILES report and, when rows were merged, the
duplicates report (every input row folded into another, by file line). Featurization is cached
by content hash and featurizer settings, so a resumed or repeated job does not featurize again;
the molecule keys (canonical SMILES without stereo) come with the features. A job on a Ray
cluster (joined before this stage, see `tune.job`) featurizes in Ray tasks across its nodes and
caches in the job's storage (`tune.features`); a local job uses the driver's process pool and
the local cache folder.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from toxmodel.data import MoleculeTable, check_parsed, load_table
from toxmodel.duplicates import Deduplicated, count_duplicates, deduplicate
from toxmodel.errors import DataError
from toxmodel.featurize import MOLECULE_KEY, Features, featurize_cached, write_invalid_report
from toxmodel.folds import Folds, make_folds
from toxmodel.sources import default_cache_dir
from toxmodel.split import Split, missing_class_warnings, molecule_groups, split_dataset
from toxmodel.trees import fit_bytes
from tune import study
from tune.config import JobConfig
from tune.errors import ConfigError, JobMismatchError
from tune.features import featurize_on_cluster, on_cluster, ray_started
from tune.flags import CONFIG_FILE
from tune.identity import (
    Fingerprint,
    check_continuation,
    read_fingerprint,
    write_fingerprint,
)

log = logging.getLogger(__name__)

INVALID_REPORT = "invalid_smiles.csv"
DUPLICATES_REPORT = "duplicates.csv"  # rows merged into another row of their molecule


@dataclass
class PreparedData:
    """The featurized dataset and its split, computed once per job.

    With data.duplicates average or drop, `table` holds one row per molecule (its first row's
    SMILES and file line; invalid rows each kept), and `features` are indexed by its rows.
    """

    table: MoleculeTable
    features: Features
    labels: np.ndarray  # float32 (n_valid, n_tasks), aligned with features rows
    split: Split
    # search.folds > 1: the rows outside split.test (split.train + split.valid) in k folds
    folds: Folds | None = None
    # Ray's object reference to (fingerprint, descriptors) once `tune.shared.share_matrices`
    # moved them into the object store (features then read that copy); None before
    matrices: Any = None


def load_job_table(job: JobConfig) -> MoleculeTable:
    """The job's molecule table, read and validated (cheap: no featurization yet)."""
    return load_table(
        job.data.source,
        job.data.smiles_column,
        job.data.targets,
        _cache_dir(job),
        allow_single_class=job.data.allow_single_class,
    )


def fingerprint(job: JobConfig, table: MoleculeTable) -> Fingerprint:
    """What a continuation of this job must match (see tune.identity)."""
    return Fingerprint(
        content_hash=table.content_hash,
        tasks=list(table.tasks),
        featurizer=asdict(job.featurizer),
        # search.folds decides what a trial is scored on (one split or the mean over k folds)
        split={**asdict(job.split), "folds": job.search.folds},
        data={"duplicates": job.data.duplicates, "molecule_key": MOLECULE_KEY},
    )


def claim_job(job: JobConfig, table: MoleculeTable) -> None:
    """Make sure this command may write job `job.name`'s record, before any work is done.

    A job folder that exists is continued only on the same data, targets, duplicates policy,
    featurizer and split (JobMismatchError otherwise). A new job must not find a study of its
    name in a shared study database (it would continue another job's trials).
    """
    storage = job.storage
    now = fingerprint(job, table)
    if storage.exists(job.name, CONFIG_FILE):
        saved = read_fingerprint(storage, job.name)
        if saved is None:
            log.warning(
                "job %s has no saved data fingerprint (made by an older toxtune)",
                job.name,
            )
        check_continuation(job.name, saved, now)
    else:
        n = study.count_trials(job)
        if n:
            raise JobMismatchError(
                f"job {job.name!r} is new in {storage.uri} but the study database "
                f"{job.study_storage} already holds a study of that name with {n} trials; "
                "pick another --run-name"
            )
    write_fingerprint(storage, job.name, now)


def prepare_data(
    job: JobConfig, progress: bool = True, table: MoleculeTable | None = None
) -> PreparedData:
    """Featurize (cached), merge repeated molecules as data.duplicates says, and split `table`
    (read from the job's source when not given) with each molecule's rows in one part."""
    table = table if table is not None else load_job_table(job)
    features = featurize_job(job, table, progress)
    if not len(features.valid_rows):  # nothing to split: say so, with every row's reason saved
        with job.storage.staged(job.name, INVALID_REPORT) as local:
            write_invalid_report(features.invalid, local, table.lines)
        check_parsed(table, features, job.storage.uri_of(job.name, INVALID_REPORT))
    # the keys hashed once, the valid rows' only: the count and the split read the ids
    ids = molecule_groups(features.molecule_keys(), features.valid_rows, len(table))
    counts = count_duplicates(ids, table.labels)
    if counts.shared_rows:
        log.info(
            "%d rows share a molecule with another row (%d molecules, %d with conflicting "
            "labels); data.duplicates=%s",
            counts.shared_rows,
            counts.molecules,
            counts.conflicting,
            job.data.duplicates,
        )
    if job.data.duplicates != "keep":
        keys = features.row_keys(len(table))
        merged = deduplicate(table, keys, job.data.duplicates)
        _report_merged(job, table, keys, merged)
        features = features.take(merged.rows)
        ids = ids[merged.rows]
        table = merged.table
    every = len(features.valid_rows) == len(table)  # every row featurized: no copies
    labels = table.labels if every else table.labels[features.valid_rows]
    valid_smiles = table.smiles if every else [table.smiles[i] for i in features.valid_rows]
    groups = ids if every else molecule_groups(ids[features.valid_rows])  # renumbered
    split = split_dataset(valid_smiles, labels, job.split, groups=groups)
    with job.storage.staged(job.name, INVALID_REPORT) as local:
        write_invalid_report(features.invalid, local, table.lines)
    check_validation(labels, split, table.tasks, job.split.method)
    for warning in missing_class_warnings(labels, split, table.tasks):
        log.warning(warning)
    folds = job_folds(job, split, labels, groups, valid_smiles, table.tasks)
    if job.search.trees and folds is not None:
        check_trees_memory(folds, features.n_features)
    return PreparedData(table, features, labels, split, folds)


def check_trees_memory(folds: Folds, columns: int, available: int | None = None) -> None:
    """Refuse a `search.trees` job whose trees would not fit in this driver's memory: they are
    trained in finalize, after the whole search, one fold at a time on float32 inputs
    (`toxmodel.trees.fit_bytes`), so running out there would lose the search's hours."""
    if available is None:
        available = int(psutil.virtual_memory().available)
    train, valid = max((s.train.size, s.valid.size) for s in folds.splits)
    need = fit_bytes(train, valid, columns)
    if need > available:
        raise ConfigError(
            f"search.trees needs about {_size(need)} to train one fold's trees after "
            f"the search ({train:,} training and {valid:,} validation rows x {columns:,} input "
            f"columns as float32, with LightGBM's copies); this machine has "
            f"{_size(available)} available. Set search.trees: false, use fewer "
            "fingerprint bits, or run the job's driver on a machine with more memory"
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def job_folds(
    job: JobConfig,
    split: Split,
    labels: np.ndarray,
    groups: np.ndarray,
    smiles: list[str],
    tasks: list[str],
) -> Folds | None:
    """The k folds of `search.folds` > 1 (None for 1): the rows outside the test split, divided
    by the split's method and seed, a molecule's rows (and under scaffold a scaffold's
    molecules) in one fold; every fold's validation part must be scorable."""
    k = job.search.folds
    if k == 1:
        return None
    try:
        folds = make_folds(
            np.concatenate([split.train, split.valid]),
            k,
            method=job.split.method,
            seed=job.split.seed,
            labels=labels,
            groups=groups,
            smiles=smiles,
            test=split.test,
        )
    except ValueError as exc:
        raise ConfigError(f"search.folds {k}: {exc}") from exc
    for i, fold in enumerate(folds.splits):
        try:
            check_validation(labels, fold, tasks, job.split.method)
        except DataError as exc:
            raise DataError(f"search.folds {k}, fold {i}: {exc}") from exc
    log.info(
        "%d folds of the %d non-test rows (%s, seed %d): %s rows each",
        k,
        folds.rows.size,
        job.split.method,
        job.split.seed,
        "/".join(str(len(f.valid)) for f in folds.splits),
    )
    return folds


def featurize_job(job: JobConfig, table: MoleculeTable, progress: bool = True) -> Features:
    """The table's features: in Ray tasks cached in the job's storage when the job runs on a
    cluster Ray has joined, else in the driver's process pool cached in the local folder."""
    if on_cluster(job) and ray_started():
        return featurize_on_cluster(table.smiles, job.featurizer, job.storage, progress=progress)
    return featurize_cached(
        table.smiles,
        job.featurizer,
        _cache_dir(job),
        table.content_hash,
        progress=progress,
    )


def _report_merged(
    job: JobConfig, table: MoleculeTable, keys: list[str], merged: Deduplicated
) -> None:
    """Log what merging did and write every folded row (line, row, smiles, molecule, kept_line)
    to the job's duplicates report, so no input row goes missing without a trace."""
    log.warning(
        "data.duplicates=%s: %d rows -> %d (%d rows merged into an earlier row of their "
        "molecule; %d task labels left missing: %s); listed in %s",
        job.data.duplicates,
        len(table),
        len(merged.table),
        merged.merged,
        merged.cleared,
        "ties" if job.data.duplicates == "average" else "conflicts",
        DUPLICATES_REPORT,
    )
    with (
        job.storage.staged(job.name, DUPLICATES_REPORT) as local,
        Path(local).open("w", newline="", encoding="utf-8") as fh,
    ):
        writer = csv.writer(fh)
        writer.writerow(["line", "row", "smiles", "molecule", "kept_line"])
        for row, out in enumerate(merged.members.tolist()):
            kept = int(merged.rows[out])
            if kept != row:
                line, kept_line = table.line_of(row), table.line_of(kept)
                writer.writerow([line, row, table.smiles[row], keys[row], kept_line])


def check_validation(labels: np.ndarray, split: Split, tasks: list[str], method: str) -> None:
    """Refuse a split whose validation part holds both classes of no task at all: every trial
    would score NaN and the search could choose nothing (seen with a task of 2 positives, or a
    scaffold split of a handful of molecules)."""
    valid = labels[split.valid]
    counts = [
        (int(np.sum(valid[:, j] == 1)), int(np.sum(valid[:, j] == 0))) for j in range(len(tasks))
    ]
    if any(pos and neg for pos, neg in counts):
        return
    totals = [
        (int(np.sum(labels[:, j] == 1)), int(np.sum(labels[:, j] == 0))) for j in range(len(tasks))
    ]
    shown = "; ".join(
        f"{task!r}: {pos} positives, {neg} negatives in validation ({tp} and {tn} in all)"
        for task, (pos, neg), (tp, tn) in list(zip(tasks, counts, totals, strict=True))[:10]
    )
    raise DataError(
        f"the {method} split leaves no task with both classes in its {len(split.valid)} "
        f"validation rows, so no trial could be scored: {shown}. More labelled rows of the rare "
        "class, a larger split.valid, or split.method stratified would help"
    )


def _cache_dir(job: JobConfig) -> Path:
    return Path(job.data.cache_dir).expanduser() if job.data.cache_dir else default_cache_dir()
