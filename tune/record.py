"""Stage 4, record: the job's MLflow record once the search is over, and the registered model.

Contract: `record(...)` logs the dataset fingerprint, search space, cluster, trials table, plots
(the reliability diagram too), the validation/test metrics and the calibration and domain
figures (`test_ece`, `test_ece_uncalibrated`, `test_brier`, `test_brier_uncalibrated`, ...) to
the job's parent run, with the duplicates report when rows were merged and pictures explaining
the test split's most confident true positives per task, then registers the final model (the
alias moves only as `tracking.register_best_model` decides, and the returned note says how).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from toxmodel.checkpoint import load_checkpoint
from toxmodel.featurize import MOLECULE_KEY, write_invalid_report
from tune import study, tracking
from tune.config import JobConfig
from tune.errors import TrackingError
from tune.finalize import FinalModel
from tune.prepare import DUPLICATES_REPORT, INVALID_REPORT, PreparedData
from tune.search import SearchOutcome
from tune.space import build_space, describe
from tune.tracking.explanations import log_explanations
from tune.tracking.registry import tasks_tag

log = logging.getLogger(__name__)

EXPLAIN_PER_TASK = 3  # most confident true positives drawn per task
EXPLAIN_MAX_TASKS = 24  # above this (ToxCast: 617), the tasks with the most test positives


def record(
    job: JobConfig,
    data: PreparedData,
    trials: pd.DataFrame,
    final: FinalModel,
    parent_run_id: str,
    outcome: SearchOutcome,
) -> tracking.Registration:
    """Log the job summary to the parent run and register the final model."""
    with tempfile.TemporaryDirectory(prefix="toxtune-record-") as tmp:
        # Local copies of the data reports to log (the job's own may be in a bucket).
        report = write_invalid_report(
            data.features.invalid, Path(tmp) / INVALID_REPORT, data.table.lines
        )
        duplicates = _local_copy(job, DUPLICATES_REPORT, Path(tmp))
        summary = tracking.JobSummary(
            n_rows=len(data.table.smiles),
            n_valid=len(data.features),
            content_hash=data.table.content_hash,
            source=job.data.source,
            invalid_report=report,
            search_space=describe(build_space(job.search.space)),
            ray_address=job.ray.address or "local",
            cluster=outcome.cluster,
            best_trial_id=final.trial_id,
            best_params=final.params,
            best_valid=final.valid,
            test_metrics=final.test,
            trials=trials,
            study=study.load(job),
            roc_data=(data.labels[data.split.test], final.test_probs, data.table.tasks),
            test_seeds=final.test_seeds,
            skipped_columns=dict(data.table.skipped_columns),
            dataset=tracking.dataset_info(data.table, job.split),
            trust={**final.test_calibration, **final.test_domain, **final.blend},
            reliability_data=(
                data.labels[data.split.test],
                final.test_probs,
                final.test_probs_uncalibrated,
            ),
            calibration=final.calibration,
            duplicates_report=duplicates,
            stopped=outcome.stopped,
        )
        tracking.log_job_summary(job.tracking_uri, parent_run_id, summary)
    explain_confident_positives(job, data, final, parent_run_id)
    return tracking.register_best_model(
        job.tracking_uri,
        parent_run_id,
        final.checkpoint,
        job.model_name,
        job.tracking.alias,
        tags={
            "searcher": job.search.searcher,
            "scheduler": job.search.scheduler,
            "seed": str(job.search.seed),
            **comparison_tags(job, data.table.tasks, data.table.content_hash),
            "trial_id": final.trial_id,
            "val_roc_auc": f"{final.valid.get('val_roc_auc', float('nan')):.6f}",
            "test_roc_auc": f"{final.test.roc_auc:.6f}",
            # members of the registered model: the k fold models of a k-fold job
            "ensemble": str(job.search.folds if job.search.folds > 1 else job.search.ensemble),
            "folds": str(job.search.folds),
            # search.trees: the trees' share of the registered blend (0: the networks alone)
            **({"tree_weight": f"{final.blend['tree_weight']:g}"} if final.blend else {}),
        },
    )


def _local_copy(job: JobConfig, name: str, folder: Path) -> Path | None:
    """The job's report `name` copied into `folder` block by block (never read into memory
    whole: at 10^6 rows the duplicates report holds a line per folded row), or None when the
    job has none."""
    if not job.storage.exists(job.name, name):
        return None
    local = folder / name
    source = job.storage.path(job.name, name)
    with job.storage.fs.open_input_stream(source) as src, local.open("wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
    return local


def comparison_tags(job: JobConfig, tasks: Sequence[str], content_hash: str) -> dict[str, str]:
    """The registered version's `tracking.registry.COMPARABLE_TAGS`: what fixes its validation
    rows and the tasks its validation score averages over (the alias moves only between
    versions that agree on all of them)."""
    s = job.split
    return {
        "data_hash": content_hash,
        "tasks": tasks_tag(tasks),
        "split": f"{s.method}:{s.seed}",
        "split_fractions": "/".join(str(float(f)) for f in (s.train, s.valid, s.test)),
        "duplicates": job.data.duplicates,
        "molecule_key": MOLECULE_KEY,
        # which rows the score is a mean over: the validation split, or every non-test row
        # across a k-fold job's folds (each fold model on its own fold)
        "validation": "split" if job.search.folds == 1 else f"{job.search.folds} folds",
    }


def explain_confident_positives(
    job: JobConfig, data: PreparedData, final: FinalModel, parent_run_id: str
) -> None:
    """Pictures of the test split's most confident true positives per task on the parent run
    (`explanations/<task>/`), for the `EXPLAIN_MAX_TASKS` tasks with the most test positives.
    A picture that cannot be made is a warning: the model is already chosen and scored."""
    test = data.split.test
    labels = data.labels[test]
    tasks = list(data.table.tasks)
    if len(tasks) > EXPLAIN_MAX_TASKS:
        positives = np.nansum(labels == 1, axis=0)
        keep = sorted(np.argsort(-positives, kind="stable")[:EXPLAIN_MAX_TASKS].tolist())
        log.info("explanations for the %d tasks with most test positives", len(keep))
    else:
        keep = list(range(len(tasks)))
    smiles = [data.table.smiles[i] for i in data.features.valid_rows[test]]
    try:
        log_explanations(
            job.tracking_uri,
            parent_run_id,
            load_checkpoint(final.checkpoint),
            smiles,
            labels[:, keep],
            final.test_probs[:, keep],
            [tasks[j] for j in keep],
            per_task=EXPLAIN_PER_TASK,
        )
    except (TrackingError, ValueError, RuntimeError) as exc:
        log.warning("explanation pictures not logged: %s", exc)
