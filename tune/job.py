"""A tuning job as four stages: prepare, search, finalize, record.

    job = named(job)                         # a fresh name unless continuing one on purpose
    table = load_job_table(job)              # CSV -> checked table
    claim_job(job, table)                    # the record claimed (other data: refused)
    refuse_finished(job)                     # nothing left to continue: refused
    data = prepare_data(job, table=table)    # features (cached) -> split
    data = share_matrices(data)              # one copy in Ray's store: the driver's and trials'
    outcome = search(job, data, parent)      # Ray Tune trials chosen by the Optuna study
    final = finalize(job, data, best)        # retrain seeds / ensemble, score the test split once
    registration = record(job, data, ...)    # MLflow summary, plots, registered model

Every stage reads the typed `JobConfig`; the MLflow parent run is opened before the search and
closed (FINISHED or FAILED) whatever happens.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from toxmodel.metrics import Metrics
from tune import bridge, study, tracking, trials
from tune.config import JobConfig, dump_config, named
from tune.drills import FaultPlan
from tune.errors import JobInterruptedError, JobMismatchError
from tune.features import on_cluster
from tune.finalize import finalize
from tune.flags import CONFIG_FILE
from tune.guard import Watch, watch
from tune.interrupt import StopSignals
from tune.prepare import claim_job, load_job_table, prepare_data
from tune.record import record
from tune.search import (
    Rounds,
    check_ray_address,
    init_ray,
    refuse_impossible_local_request,
    resume_command,
    search,
)
from tune.shared import share_matrices


@dataclass
class JobResult:
    """What a finished job hands back to the CLI."""

    name: str
    experiment_path: str  # the job's folder: a local path or an object-store URI
    trials: pd.DataFrame
    best_trial_id: str
    best_config: dict[str, Any]
    best_valid: dict[str, float]
    test: Metrics
    test_seeds: dict[str, float] = field(default_factory=dict)
    parent_run_id: str = ""
    model_version: str | None = None
    failed_trials: int = 0
    skipped_columns: dict[str, str] = field(default_factory=dict)  # column -> why not a task
    alias_note: str = ""  # what happened to the registered model's alias, and why
    search_seconds: float = 0.0  # wall time of this command's search (SearchOutcome.seconds)
    blend: dict[str, float] = field(default_factory=dict)  # search.trees: FinalModel.blend
    stopped: str = ""  # why the search stopped before its trials ran (SearchOutcome.stopped)


def refuse_finished(job: JobConfig) -> None:
    """A job that finished its trials and registered its model has nothing to continue:
    running it again would only register an identical model version."""
    rounds = Rounds.load(job)
    if rounds.finished and rounds.registered and study.remaining(job) <= 0:
        raise JobMismatchError(
            f"job {job.name!r} already ran its {job.search.num_samples} trials and registered "
            f"models:/{rounds.registered}; nothing to continue. To grow it, pass a larger "
            "--num-samples; for a new search, leave out --resume/--run-name"
        )


def run_job(
    job: JobConfig,
    faults: FaultPlan | None = None,
    progress: bool = True,
    stop_timeout_s: float | None = None,
) -> JobResult:
    """Search, evaluate on the test split, track in MLflow, register the best model.

    A job whose folder exists continues (same data and settings only): an interrupted search is
    restored, a finished one grows to `search.num_samples` trials. SIGINT or SIGTERM stops it
    unfinished and resumable (JobInterruptedError; see `tune.interrupt`). With `stop_timeout_s`
    (the `toxtune` command's, which owns its process) a stop is announced at once (`_announce`),
    one that has not ended by then ends the process (`_give_up`), and a watcher process settles
    the record if the process dies outright (`tune.guard`).
    """
    job = named(job, exists=job.storage.exists)
    stops = StopSignals()
    with stops.routing():
        try:
            return _run(job, faults, progress, stops, stop_timeout_s)
        except KeyboardInterrupt:
            raise JobInterruptedError(
                f"job {job.name!r} stopped by {stops.signal.name} before it finished: its model "
                f"was not registered. Continue it with: {resume_command(job)}",
                stops.signal,
            ) from None


def _announce(job: JobConfig) -> Callable[[signal.Signals], None]:
    """What the `toxtune` command says the moment a stop signal arrives. A signal sent to every
    process of the job (a batch scheduler's cancel) stops its local Ray too, and Ray's core
    worker may then end the driver at once (exit 1) with no word of its own: this line, written
    first, is then what the log says of the stop (if the driver got to it first)."""
    resume = resume_command(job)

    def announce(signum: signal.Signals) -> None:
        _say(
            f"toxtune tune: {signum.name} received: stopping job {job.name!r} unfinished "
            f"(nothing will be registered). Continue it with: {resume}"
        )

    return announce


def _say(line: str) -> None:
    """One whole line on stderr, flushed: written from the stop watch's thread while Ray Tune
    logs its own stop from the main thread, so it goes as one write (print writes the text and
    its newline apart, and Ray's line landed between them)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _give_up(
    job: JobConfig, parent: str, after_s: float, guard: Watch
) -> Callable[[signal.Signals], None]:
    """What a job does when its stop has not ended within `after_s` seconds: a stop
    signal sent to every process of the job (a batch scheduler's cancel) stops the local Ray's
    own processes too, and Ray Tune's cleanup then waits on them. It ends its MLflow runs
    KILLED, says how to continue and exits 128 + the signal, as a job stopped the usual way
    would; the resume is then a killed driver's."""

    def give_up(signum: signal.Signals) -> None:
        tracking.finish_job_run(job.tracking_uri, parent, "KILLED")
        guard.settled()
        _say(
            f"toxtune tune: error: job {job.name!r} stopped by {signum.name} did not finish "
            f"stopping within {after_s:g} s (a signal sent to every process of the job, as a batch "
            "scheduler's cancel does, stops its local Ray too): its MLflow runs ended KILLED, "
            f"nothing was finalized or registered. Continue it with: {resume_command(job)}"
        )
        sys.stdout.flush()
        os._exit(128 + signum)

    return give_up


def _run(
    job: JobConfig,
    faults: FaultPlan | None,
    progress: bool,
    stops: StopSignals,
    stop_timeout_s: float | None,
) -> JobResult:
    check_ray_address(job)
    refuse_impossible_local_request(job)
    job.storage.check_writable()
    tracking.check_tracking(job.tracking_uri)
    tracking.check_artifact_home(job.tracking_uri, job.tracking.experiment_name)
    molecules = load_job_table(job)  # 1. prepare: read and check, claim the record ...
    claim_job(job, molecules)
    refuse_finished(job)
    study.check_job_stores(job, started=bool(Rounds.load(job).names))
    tracking.check_artifact_client(job.tracking_uri, job.tracking.experiment_name)
    if on_cluster(job):  # join the cluster first: its nodes featurize (tune.features)
        init_ray(job)
        stops.route_sigterm()  # ray.init replaced the SIGTERM handler
    data = prepare_data(job, progress=progress, table=molecules)  # ... featurize and split
    job.storage.write_text(job.name, CONFIG_FILE, text=dump_config(job))
    init_ray(job)  # (joined already on a cluster)
    stops.route_sigterm()
    data = share_matrices(data)  # one copy of the matrices for the driver and every trial
    parent = tracking.start_job_run(
        job.tracking_uri,
        job.tracking.experiment_name,
        job.name,
        job.to_dict(),
        resume=bool(Rounds.load(job).names),
    )
    guard = None
    if stop_timeout_s is not None:  # the command's: a driver that dies, a stop that never ends
        ray_session = bridge.local_ray_session_dir()  # (None on a cluster: never ended)
        guard = watch(job.tracking_uri, parent, job.name, resume_command(job), ray_session)
        give_up = _give_up(job, parent, stop_timeout_s, guard)
        stops.give_up_after(give_up, stop_timeout_s, _announce(job))
    status = "FAILED"
    try:
        with tempfile.TemporaryDirectory(prefix="toxtune-job-") as scratch:
            outcome = search(job, data, parent, faults, stops)
            best = trials.best(outcome.trials, job, outcome.seconds, outcome.stopped)
            final = finalize(job, data, best, Path(scratch))
            table = trials.table(outcome.trials)
            registration = record(job, data, table, final, parent, outcome)
        rounds = Rounds.load(job)
        rounds.registered = f"{registration.name}/{registration.version}"
        rounds.save(job)
        status = "FINISHED"
    except (JobInterruptedError, KeyboardInterrupt):
        status = "KILLED"  # stopped on purpose; its trial runs end KILLED too
        raise
    finally:
        stops.stopped_in_time()
        tracking.finish_job_run(job.tracking_uri, parent, status)
        if guard is not None:
            guard.settled()
    return JobResult(
        name=job.name,
        experiment_path=job.storage.uri_of(job.name),
        trials=table,
        best_trial_id=final.trial_id,
        best_config=final.params,
        best_valid=final.valid,
        test=final.test,
        test_seeds=final.test_seeds,
        parent_run_id=parent,
        model_version=registration.version,
        failed_trials=len(outcome.failed),
        skipped_columns=dict(data.table.skipped_columns),
        alias_note=registration.note,
        search_seconds=outcome.seconds,
        blend=final.blend,
        stopped=outcome.stopped,
    )
