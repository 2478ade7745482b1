"""Ray Tune's results, read once: one record per trial across every round of a job.

The trials table, the MLflow status words and the best-checkpoint choice all come from these
records, so they cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from ray import tune as ray_tune
from ray.tune.utils import flatten_dict

from tune import bridge
from tune.config import JobConfig
from tune.errors import SearchError
from tune.study import METRIC, MODE
from tune.tracking import TrialEnding, trial_ending
from tune.trainable import BEST_ROW_FILE, EARLIER_EPOCHS


@dataclass(frozen=True)
class TrialRecord:
    """One trial: its best epoch's row, how far it ran and how it ended, its checkpoint."""

    trial_id: str
    round: str  # the Ray experiment (job name, or <name>-r<k> for a grown job)
    row: dict[str, Any]  # the best epoch's metrics and `config/...` columns
    config: dict[str, Any]
    epochs: int
    status: str  # finished | early_stopped | stopped | failed | ... (the status tag's words)
    finished_reason: str
    checkpoint: ray_tune.Checkpoint | None  # the best epoch's (in the results storage)

    @property
    def score(self) -> float:
        value = self.row.get(METRIC)
        return float(value) if value is not None and np.isfinite(value) else float("nan")


def read_trials(
    job: JobConfig, rounds: list[str], read: Mapping[str, list[TrialRecord]] | None = None
) -> list[TrialRecord]:
    """Every trial of every round that left an experiment state, in Ray's order; a trial that
    never reported is listed too, without metrics. `read`: the records of rounds already read
    (`round_records`), which are not read again."""
    records = []
    read = read or {}
    for name in rounds:
        path = job.storage.uri_of(name)
        if not ray_tune.Tuner.can_restore(path):
            continue
        records += read[name] if name in read else round_records(job, name, analysis(path))
    return records


def analysis(path: str) -> ray_tune.ExperimentAnalysis:
    """Ray's saved state of the round at `path`: its trials, their statuses and checkpoints. No
    result file is read: a trial's record comes from its newest checkpoint (`_best_row`), so
    reading a round costs the same at 10 or 1,000 epochs per trial."""
    return bridge.saved_experiment(path, METRIC, MODE)


def round_records(
    job: JobConfig, name: str, grid: ray_tune.ExperimentAnalysis
) -> list[TrialRecord]:
    """The records of the round `name` from its saved state `grid` (`analysis`)."""
    records = []
    for trial in grid.trials:
        row = _best_row(grid, trial)
        if row is None:
            continue  # never started
        epochs, status, reason = _ending(job, trial.status, trial.last_result or {})
        records.append(
            TrialRecord(
                trial_id=trial.trial_id,
                round=name,
                row=row,
                config=dict(trial.config),
                epochs=epochs,
                status=status,
                finished_reason=reason,
                checkpoint=trial.checkpoint,
            )
        )
    return records


def endings(grid: ray_tune.ExperimentAnalysis, records: list[TrialRecord]) -> list[TrialEnding]:
    """How each trial of the round `grid` ended, for `tracking.settle_trial_runs`; a trial's
    result file is read only if its run lacks epochs."""
    by_id = {t.trial_id: t for t in grid.trials}

    def history(trial: Any) -> list[dict[str, Any]]:
        return bridge.trial_results(grid, trial).to_dict("records")

    return [
        TrialEnding(
            trial_id=r.trial_id,
            status=r.status,
            reason=r.finished_reason,
            epochs=r.epochs,
            best=r.row,
            history=lambda t=by_id[r.trial_id]: history(t),
        )
        for r in records
    ]


def _best_row(grid: ray_tune.ExperimentAnalysis, trial: Any) -> dict[str, Any] | None:
    """The trial's best report (the first with the highest METRIC) with its id and
    `config/...` columns: the copy its newest checkpoint carries (`trainable.BestReport`), or,
    for a trial without one (it failed before its first checkpoint, or an earlier toxtune
    wrote it), found among all its results as Ray's analysis would. None for a trial that
    never started."""
    row = _checkpoint_row(trial.checkpoint)
    if row is None:
        row = _row_among_results(bridge.trial_results(grid, trial))
    if row is None:
        return _from_state(trial)
    row.update(trial_id=trial.trial_id, **flatten_dict({"config": dict(trial.config)}))
    return row


def _checkpoint_row(checkpoint: ray_tune.Checkpoint | None) -> dict[str, Any] | None:
    """The best report a checkpoint carries; None when there is none, or it has no such file."""
    if checkpoint is None:
        return None
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{BEST_ROW_FILE}") as f:
            return dict(json.loads(f.readall()))
    except FileNotFoundError:
        return None


def _row_among_results(results: pd.DataFrame) -> dict[str, Any] | None:
    """The first result with the highest METRIC (the last result without it); None when
    there is no result, or no result has a METRIC value."""
    if results.empty:
        return None
    if METRIC not in results:
        return dict(results.iloc[-1].to_dict())
    scores = pd.to_numeric(results[METRIC], errors="coerce")
    if scores.isna().all():
        return None
    return dict(results.loc[scores.idxmax()].to_dict())


def _from_state(trial: ray_tune.experiment.Trial) -> dict[str, Any] | None:
    """The row of a trial whose result files Ray's analysis did not find (a trial that failed
    before its first report, or whose results had not reached the storage when it failed):
    its last result from the experiment state, or only its id and configuration. None for a
    trial that never started. A failed trial is never missing from the table."""
    last = trial.last_result or {}
    if not last and trial.status not in ("ERROR", "TERMINATED"):
        return None
    row = {k: v for k, v in last.items() if k != "config"}
    row["trial_id"] = trial.trial_id
    row.update({f"config/{k}": v for k, v in trial.config.items()})
    return row


def _ending(job: JobConfig, status: str, last: dict[str, Any]) -> tuple[int, str, str]:
    """(epochs run, status word, finished reason) of a trial, as its MLflow run says them."""
    if status == "TERMINATED":
        state, reason, epochs = trial_ending(last, job.search.max_epochs)
        return epochs, state, reason
    epochs = int(last.get("training_iteration", 0) or 0)
    reason = str(last.get("finished_reason") or "")
    return epochs, "failed" if status == "ERROR" else status.lower(), reason


def table(records: list[TrialRecord]) -> pd.DataFrame:
    """One row per trial, best first: the best epoch plus `epochs`, `status`, `round`. Failed
    trials come after the others whatever they scored before failing: `best` never picks one,
    so none heads the report's top trials above the trial the job chose."""
    if not records:
        return pd.DataFrame()
    rows = [
        {
            **{k: v for k, v in r.row.items() if k not in ("finished_reason", EARLIER_EPOCHS)},
            "epochs": r.epochs,
            "status": r.status,
            "finished_reason": r.finished_reason,
            "round": r.round,
        }
        for r in records
    ]
    frame = pd.DataFrame(rows)
    if METRIC not in frame:
        return frame
    failed = frame["status"] == "failed"
    order = frame.assign(_failed=failed).sort_values(
        ["_failed", METRIC], ascending=[True, False], na_position="last"
    )
    return order.drop(columns="_failed").reset_index(drop=True)


UNFINISHED = frozenset({"pending", "running", "paused"})  # Ray statuses of a trial still due


def best(
    records: list[TrialRecord], job: JobConfig, seconds: float = 0.0, stopped: str = ""
) -> TrialRecord:
    """The best trial (validation only) that ended without an error and left a checkpoint. A
    trial an interrupted round left unfinished is never chosen (its run is to continue, or was
    run again), nor one that failed, whatever its best epoch scored: the study and its MLflow run
    call it failed, and a configuration that diverged or raised would be trained again for the
    ensemble. `seconds` and `stopped` (the search's; `SearchOutcome`) say why, when none did."""
    scored = [
        r
        for r in records
        if r.checkpoint is not None
        and np.isfinite(r.score)
        and r.status not in UNFINISHED
        and r.status != "failed"
    ]
    if not scored:
        why = ""
        if time_limit_reached(job, seconds):
            why = (
                f": {_time_limit(job)} was reached after {seconds:.0f} s, before any trial "
                "finished an epoch; raise the limit"
            )
        elif stopped:
            why = f": {stopped}; the failed trials' errors are in their MLflow runs"
        raise SearchError(f"no trial of job {job.name} finished with a checkpoint{why}")
    return max(scored, key=lambda r: r.score)


def time_limit_reached(job: JobConfig, seconds: float) -> bool:
    """Whether a search that ran `seconds` (this command's) used up its time limit."""
    limit = job.search.time_limit_s
    return limit is not None and seconds >= limit


def ended_by_time_limit(job: JobConfig, seconds: float, ran: int) -> str:
    """What the end-of-job report says when the time limit ended the search before it ran
    `search.num_samples` trials (`ran` of them ran, `seconds` this command's search took);
    "" when it did not."""
    wanted = job.search.num_samples
    if not time_limit_reached(job, seconds) or ran >= wanted:
        return ""
    return (
        f"{_time_limit(job)} ended the search after {seconds:.0f} s, with {ran} of {wanted} "
        f"trials run; the model is the best of those {ran}"
    )


def _time_limit(job: JobConfig) -> str:
    limit = job.search.time_limit_s
    return f"the search's time limit ({limit:g} s, search.time_limit_s / --time-limit)"
