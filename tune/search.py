"""Stage 2, search: Ray Tune over the job's Optuna study, round by round, resumable.

Contract: `search(job, data, parent_run_id, faults)` runs trials until the study holds
`search.num_samples` finished trials, then returns every trial's record. A job's folder keeps
`toxtune_done.json` (the rounds run so far and whether the last one ended): an interrupted round
is restored (finished trials kept, unfinished ones rerun, the study reloaded), and a finished
job asked for more trials grows in a new round (`<name>-r2`, ...) that learns from all earlier
trials. This is the one module that builds Tuners; Ray/Optuna internals it needs are in
`tune.bridge`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune as ray_tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.stopper import CombinedStopper

from tune import bridge, study, tracking
from tune.cluster import check_cluster_storage
from tune.cluster.submission import CONTINUE_ENV
from tune.config import JobConfig, RayConfig
from tune.drills import FaultPlan
from tune.errors import ClusterError, ConfigError, JobInterruptedError, SearchError
from tune.faults import ErrorBudget, PendingWatch, RetryPolicy
from tune.interrupt import StopSignals
from tune.prepare import PreparedData
from tune.resources import TrialShape, gpu_fraction, local_request_problem
from tune.shared import without_matrices
from tune.space import build_space
from tune.study import METRIC, MODE
from tune.trainable import TrialData, train_trial
from tune.trials import TrialRecord, analysis, endings, read_trials, round_records

log = logging.getLogger(__name__)

# What the console prints per finished trial; every metric still goes to Tune's results and
# MLflow (per-task scores would print 24 rows per trial on Tox21, 1,234 on ToxCast).
CONSOLE_METRICS = (
    "epoch",
    "val_roc_auc",
    "val_pr_auc",
    "best_val_roc_auc",
    "best_epoch",
    "device",
)
DONE_FILE = "toxtune_done.json"
PROGRESS_EVERY_S = 30.0  # one console summary line per this many seconds
ENDED_LINES = 10  # ended trials' lines per interval; the best trial's line is always printed


class ProgressLine(ray_tune.Callback):
    """The search's console: one summary line per interval and a line per ended trial (bounded).

    Tune's own console (verbose=1) prints a trial's config and result as tables at every start
    and end and a status table every 30 s; with tens of trials in flight that is a screen a
    second. Here: `search 2:30 | 64 running, 0 pending, 12 done, 1 failed | 23,040 results,
    153/s | best best_val_roc_auc 0.8123 (trial ab12cd34)` every `every_s`, and each ended
    trial's CONSOLE_METRICS in one line. Under ASHA with tens of trials in flight, trials end
    several a second; so at most `ended_lines` such lines per interval, and beyond them only
    the line of a trial that ends as the best so far. The interval's line counts the rest
    (`| 57 more trials ended`); every trial's run is in MLflow either way.
    """

    def __init__(self, every_s: float = PROGRESS_EVERY_S, ended_lines: int = ENDED_LINES) -> None:
        self.every_s, self.ended_lines = every_s, ended_lines
        self._start = self._last = time.monotonic()
        self._results = self._last_results = 0
        self._best: tuple[float, str] | None = None
        self._ended_shown = self._ended_unshown = 0  # in the current interval

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._results += 1
        value = result.get(METRIC)
        if isinstance(value, int | float) and (self._best is None or value > self._best[0]):
            self._best = (float(value), str(trial.trial_id))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._print(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        is_best = self._best is not None and self._best[1] == str(trial.trial_id)
        if self._ended_shown >= self.ended_lines and not is_best:
            self._ended_unshown += 1
            return
        self._ended_shown += 1
        last = trial.last_result or {}
        shown = "  ".join(
            f"{k} {last[k]:.4f}" if isinstance(last[k], float) else f"{k} {last[k]}"
            for k in CONSOLE_METRICS
            if k in last
        )
        epochs = last.get("training_iteration", 0)
        print(f"trial {trial.trial_id} ended after {epochs} epochs: {shown}", flush=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._print(trials)

    def _print(self, trials: list) -> None:
        now = time.monotonic()
        status = [str(t.status) for t in trials]
        rate = (self._results - self._last_results) / max(now - self._last, 1e-9)
        minutes, seconds = divmod(int(now - self._start), 60)
        best = f" | best {METRIC} {self._best[0]:.4f} (trial {self._best[1]})" if self._best else ""
        unshown = f" | {self._ended_unshown} more trials ended" if self._ended_unshown else ""
        print(
            f"search {minutes}:{seconds:02d} | {status.count('RUNNING')} running, "
            f"{status.count('PENDING')} pending, {status.count('TERMINATED')} done, "
            f"{status.count('ERROR')} failed | {self._results:,} results, {rate:.0f}/s{best}"
            f"{unshown}",
            flush=True,
        )
        self._last, self._last_results = now, self._results
        self._ended_shown = self._ended_unshown = 0


@dataclass
class Rounds:
    """The Ray experiments of a job so far, and whether the last one ended."""

    names: list[str] = field(default_factory=list)
    finished: bool = False
    registered: str = ""  # "model/version" once the record stage registered the job's model
    # The job folder's URI when its last round started: Ray's saved state names files there.
    location: str = ""

    @classmethod
    def load(cls, job: JobConfig) -> Rounds:
        text = job.storage.read_text(job.name, DONE_FILE)
        if text is None:
            return cls()
        raw = json.loads(text)
        return cls(
            list(raw["rounds"]),
            bool(raw.get("finished", False)),
            str(raw.get("registered", "")),
            str(raw.get("location", "")),
        )

    def save(self, job: JobConfig) -> None:
        text = json.dumps(
            {
                "rounds": self.names,
                "finished": self.finished,
                "registered": self.registered,
                "location": self.location,
            }
        )
        job.storage.write_text(job.name, DONE_FILE, text=text)

    @property
    def interrupted(self) -> bool:
        return bool(self.names) and not self.finished


@dataclass
class SearchOutcome:
    """What the search leaves for the later stages."""

    rounds: list[str]
    trials: list[TrialRecord]
    failed: dict[str, str]  # trial id -> failure kind, for trials that failed for good
    cluster: dict[str, float]
    seconds: float = 0.0  # wall time of this command's search
    stopped: str = ""  # why the search stopped before its trials ran (`ErrorBudget.spent`)


def check_ray_address(job: JobConfig, timeout_s: float = 10.0) -> None:
    """A `host:port` cluster address must answer before anything else is done: `ray.init`
    retries an unreachable one for minutes without a word."""
    address = job.ray.address
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ClusterError(
            f"ray.address {address}: no Ray cluster answers there ({exc}); give the head "
            "node's GCS address (HOST:6379), or 'auto' inside the cluster"
        ) from exc


def refuse_impossible_local_request(job: JobConfig) -> None:
    """A local job (no cluster address) whose trials could never start is refused before Ray
    starts, naming what it asked for and what this machine has."""
    if job.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    problem = local_request_problem(
        job.resources.cpus_per_trial,
        job.resources.gpus_per_trial,
        job.ray.num_cpus,
        job.ray.num_gpus,
        torch.cuda.device_count(),
        os.cpu_count() or 1,
    )
    if problem:
        raise ConfigError(problem)


def search(
    job: JobConfig,
    data: PreparedData,
    parent_run_id: str,
    faults: FaultPlan | None = None,
    stops: StopSignals | None = None,
) -> SearchOutcome:
    """Restore an interrupted round, run a new one for any trials still due, read the results.

    JobInterruptedError when a stop signal ended a round with trials unfinished (they stay
    resumable: the study keeps them RUNNING and Ray's state keeps their checkpoints).
    """
    started = time.monotonic()
    stops = stops or StopSignals()
    init_ray(job)
    stops.route_sigterm()  # ray.init replaced the SIGTERM handler
    bridge.consistent_experiment_uploads()  # no save can break Tune's upload of its state
    bridge.snapshots_by_time_only()  # TUNE_GLOBAL_CHECKPOINT_S decides (tune/settings.py)
    bridge.object_store_uploads()  # a snapshot's files to a bucket, one request each
    bridge.metric_statistics_only({METRIC})  # Ray's per-metric statistics, in every snapshot
    if job.ray.address or os.environ.get("RAY_ADDRESS"):
        # Every node must see the results folder: refuse before any trial runs (names the node).
        check_cluster_storage(job.storage.uri)
    try:
        return _rounds(job, data, parent_run_id, faults, stops, started)
    finally:
        study.release_connections()  # the searcher's kept ones, however the search ended


def _rounds(
    job: JobConfig,
    data: PreparedData,
    parent_run_id: str,
    faults: FaultPlan | None,
    stops: StopSignals,
    started: float,
) -> SearchOutcome:
    """`search`'s rounds: the interrupted one restored, a new one for the trials still due."""
    rounds = Rounds.load(job)
    dataset = tracking.dataset_info(data.table, job.split)
    witness = bridge.StopWitness(stops.note)  # a stop Tune catches still stops the job
    callbacks = [*driver_callbacks(job, parent_run_id, dataset), witness]
    budget = next(c for c in callbacks if isinstance(c, ErrorBudget))
    watch = next(c for c in callbacks if isinstance(c, PendingWatch))
    # Each round this command ran is read once, by its end check; its trial records come from
    # that same reading of Ray's saved state (`read_trials` reads only the other rounds).
    read: dict[str, list[TrialRecord]] = {}
    if rounds.interrupted and _restorable(job, rounds):
        name = rounds.names[-1]
        log.info("restoring interrupted search %s", name)
        found = study.load(job)
        finished = study.finished_ray_ids(found) if found is not None else {}
        trainable = _trainable(job, data, _trial_data(job, data, faults, finished))
        with witness.handlers_restored(), bridge.ray_results_unread():
            bridge.restore_tuner(job.storage.uri_of(name), trainable, callbacks).fit()
        grid = _all_ended(job, name, stops)
        read[name] = round_records(job, name, grid)
        # trials that ended just before the kill: Tune does not complete them again
        tracking.settle_trial_runs(job.tracking_uri, parent_run_id, endings(grid, read[name]))
    remaining = study.remaining(job)
    if remaining > 0:
        first_run = not rounds.names
        name = job.name if first_run else f"{job.name}-r{len(rounds.names) + 1}"
        rounds.names.append(name)
        rounds.finished = False
        rounds.location = job.storage.uri_of(job.name)
        rounds.save(job)
        tuner, _ = _tuner(job, data, name, remaining, first_run, callbacks, faults)
        study.fail_stale_trials(job)
        with witness.handlers_restored(), bridge.ray_results_unread():
            tuner.fit()
        read[name] = round_records(job, name, _all_ended(job, name, stops))
    if watch.problem:
        raise SearchError(watch.problem)
    # Every Tune run has ended: a study trial still RUNNING is an orphan of a killed driver
    # (suggested after Tune's last snapshot), never to finish.
    study.fail_stale_trials(job)
    rounds.finished = True
    rounds.save(job)
    stopped = budget.spent()
    if stopped:
        log.error("search stopped early: %s: %s", stopped, budget.failed)
    records = read_trials(job, rounds.names, read)
    seconds = time.monotonic() - started
    return SearchOutcome(rounds.names, records, budget.failed, cluster_size(), seconds, stopped)


def _restorable(job: JobConfig, rounds: Rounds) -> bool:
    """Whether the interrupted round can be restored from Ray's saved state, which names the
    job's files by absolute path. A job folder copied or moved since (a new location) is not
    restored: its unfinished trials are failed in the study and run again as new trials, so
    nothing is written into the original folder or its study."""
    path = job.storage.uri_of(rounds.names[-1])
    here = job.storage.uri_of(job.name)
    if rounds.location and rounds.location != here:
        log.warning(
            "job %s was started at %s and is now at %s: Ray's saved state names files in the "
            "old place, so its unfinished trials run again here as new trials",
            job.name,
            rounds.location,
            here,
        )
        return False
    return ray_tune.Tuner.can_restore(path)


def _all_ended(job: JobConfig, name: str, stops: StopSignals) -> ray_tune.ExperimentAnalysis:
    """Ray's saved state of the round `name`, read once (`trials.analysis`) for this check and
    the round's trial records; JobInterruptedError when the round returned after a stop
    signal, or with trials that neither finished nor failed.

    A stop between two trials leaves every started trial ended but trials still due: the
    signal (`bridge.StopWitness`) is what tells. Ray Tune returns with trials unfinished only
    after a stop signal (its time limit and stoppers end every trial). The
    grid `fit()` returns cannot tell: Tune ends the trials in memory after saving its state, so
    the saved experiment state, which a resume reads, is what is checked.
    """
    saved = analysis(job.storage.uri_of(name))
    unfinished = [t for t in saved.trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished or stops.stopped:
        raise JobInterruptedError(
            f"job {job.name!r} stopped by {stops.signal.name} during its search, with "
            f"{len(unfinished)} trial(s) unfinished: nothing was finalized or registered. "
            f"Continue it with: {resume_command(job)}",
            stops.signal,
        )
    return saved


def resume_command(job: JobConfig) -> str:
    """The command that continues `job` from where it stands. A submitted job names the
    `toxtune submit --resume` its submitter gave it (`CONTINUE_ENV` in its driver's
    environment): run where the user works, it ships the data again and runs on the cluster,
    where `toxtune tune --resume` would run the search on that machine."""
    submitted = os.environ.get(CONTINUE_ENV, "")
    if submitted:
        return submitted
    where = "" if job.ray.storage_path == RayConfig().storage_path else job.ray.storage_path
    command = f"toxtune tune --resume {shlex.quote(job.name)}"
    return command + (f" --storage-path {shlex.quote(where)}" if where else "")


def _asked(job: JobConfig) -> str:
    r = job.resources
    return f"{r.cpus_per_trial:g} CPU and {r.gpus_per_trial} GPU"


def driver_callbacks(
    job: JobConfig, parent_run_id: str, dataset: tracking.DatasetInfo | None
) -> list[Any]:
    """The driver's bookkeeping for a round: MLflow trial runs, retries, the error budget, the
    pending watch, checkpoint re-pointing and deletion (`benchmarks/driver.py` measures this
    same list)."""
    return [
        tracking.MlflowTrialCallback(
            job.tracking_uri,
            job.tracking.experiment_name,
            parent_run_id,
            job.search.max_epochs,
            dataset=dataset,
        ),
        RetryPolicy(job.resources.cpus_per_trial),
        ErrorBudget(job.faults.max_failed_trials),
        PendingWatch(job.resources.pending_timeout_s, _asked(job)),
        bridge.NewestCheckpoint(),
        bridge.CheckpointDeletions(),  # num_to_keep's deletions off the loop
        ProgressLine(),
        # Each trial's result.json and progress.csv (Ray's automatic loggers are off:
        # tune.settings.TUNE_ENV): a trial's whole history, which `trials.read_trials` reads
        # only for a trial whose checkpoints do not carry its best report.
        JsonLoggerCallback(),
        CSVLoggerCallback(),
    ]


def _tuner(
    job: JobConfig,
    data: PreparedData,
    name: str,
    num_samples: int,
    first_run: bool,
    callbacks: list[Any],
    faults: FaultPlan | None,
) -> tuple[ray_tune.Tuner, Any]:
    trainable = _trainable(job, data, _trial_data(job, data, faults))
    return build_tuner(job, trainable, name, num_samples, first_run, callbacks)


def build_tuner(
    job: JobConfig,
    trainable: Any,
    name: str,
    num_samples: int,
    first_run: bool,
    callbacks: list[Any],
) -> tuple[ray_tune.Tuner, Any]:
    """The round's Tuner over `trainable`: the job's study as searcher, its scheduler, storage,
    retries and checkpoint policy, and `callbacks`; also returns the study."""
    s = job.search
    searcher, found = study.make_searcher(job, build_space(s.space), first_run)
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=s.max_epochs,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
        if s.scheduler == "asha"
        else FIFOScheduler()
    )
    stoppers = [c for c in callbacks if isinstance(c, ray_tune.Stopper)]
    tuner = ray_tune.Tuner(
        trainable,
        tune_config=ray_tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
            scheduler=scheduler,
            num_samples=num_samples,
            time_budget_s=s.time_limit_s,
            # A trial's process (torch imported, data fetched) serves the next trial: start-up
            # is a third of a short trial otherwise (benchmarks/RESULTS.md, utilisation).
            reuse_actors=True,
        ),
        run_config=ray_tune.RunConfig(
            name=name,
            storage_path=job.storage.uri,
            failure_config=ray_tune.FailureConfig(max_failures=job.faults.max_retries),
            # Each epoch's checkpoint holds the best model so far and the training state; the
            # newest two are kept, so the one a lagging experiment snapshot names still exists.
            checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            stop=CombinedStopper(*stoppers),
            verbose=0,  # the console is ProgressLine's: a line per interval and per trial end
        ),
    )
    return tuner, found


def _trainable(job: JobConfig, data: PreparedData, trial_data: TrialData) -> Any:
    """`train_trial` with the shared data (one object-store copy) and its resources."""
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(train_trial, data=trial_data), resources_for(job, data)
    )
    return bridge.with_console_metrics(trainable, list(CONSOLE_METRICS))


def _trial_data(
    job: JobConfig,
    data: PreparedData,
    faults: FaultPlan | None,
    finished: Mapping[str, float] | None = None,
) -> TrialData:
    shared = data.matrices is not None  # the matrices travel as their reference
    return TrialData(
        features=without_matrices(data.features) if shared else data.features,
        labels=data.labels,
        split=data.split,
        tasks=data.table.tasks,
        featurizer=job.featurizer,
        max_epochs=job.search.max_epochs,
        patience=job.search.patience,
        seed=job.search.seed,
        hooks=(faults,) if faults else (),
        finished=dict(finished or {}),
        folds=data.folds,
        matrices=data.matrices,
    )


def resources_for(job: JobConfig, data: PreparedData) -> Any:
    """Per-trial resources: fixed, or (`auto`) sized from the trial's GPU-memory estimate."""
    cpus = job.resources.cpus_per_trial
    gpus = job.resources.gpus_per_trial
    if gpus != "auto":
        return {"cpu": cpus, "gpu": float(gpus)}
    memory = _gpu_memory_bytes(job)

    def sized(config: dict[str, Any]) -> dict[str, float]:
        shape = TrialShape(
            n_rows=len(data.features),
            fp_bytes_per_row=data.features.fingerprint.shape[1],
            n_descriptors=data.features.descriptors.shape[1],
            n_tasks=data.labels.shape[1],
            hidden=tuple(int(config[f"width_{i}"]) for i in range(int(config["n_layers"]))),
            batch_size=int(config["batch_size"]),
            members=job.search.folds,
        )
        return {"cpu": cpus, "gpu": gpu_fraction(shape, memory)}

    return sized


def _gpu_memory_bytes(job: JobConfig) -> int:
    if job.resources.gpu_memory_gb:
        return int(job.resources.gpu_memory_gb * 2**30)
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    raise SearchError(
        "resources.gpus_per_trial is 'auto' but no GPU is visible to the driver; "
        "set resources.gpu_memory_gb to the memory of one worker GPU"
    )


def init_ray(job: JobConfig) -> None:
    """Join `ray.address` (or RAY_ADDRESS), else start a private local Ray (node address
    127.0.0.1, no dashboard; see `bridge.init_local_ray`)."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
    if job.ray.address:
        ray.init(address=job.ray.address, **kwargs)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        bridge.init_local_ray(job.ray.num_cpus, job.ray.num_gpus, **kwargs)


def cluster_size() -> dict[str, float]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return {
        "nodes": len(nodes),
        "cpus": total.get("CPU", 0.0),
        "gpus": total.get("GPU", 0.0),
    }
