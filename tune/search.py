"""The search: Optuna (TPE or random) over Ray Tune with ASHA or FIFO, resumable and growable.

`run_job(job)` is the product's main job: featurize once, search, evaluate the best trial on the
untouched test split, log everything to MLflow and register the best model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import ray
from ray import tune as ray_tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from toxmodel.checkpoint import Predictor, load_checkpoint, save_ensemble
from toxmodel.data import MoleculeTable, load_table
from toxmodel.featurize import Features, featurize_cached, write_invalid_report
from toxmodel.metrics import Metrics, evaluate
from toxmodel.split import Split, missing_class_warnings, split_dataset
from toxmodel.train import FitResult, fit
from tune import tracking
from tune.config import CONFIG_FILE, JobConfig, dump_config, named
from tune.errors import JobMismatchError, SearchError
from tune.identity import Fingerprint, check_continuation, read_fingerprint, write_fingerprint
from tune.resources import (
    TrialShape,
    classify_failure,
    gpu_fraction,
    is_retryable,
    last_error,
    next_gpu_share,
)
from tune.space import Param, build_space, default_point, describe, sample, to_run_configs
from tune.trainable import ABORT_KEY, CHECKPOINT_FILE, FaultPlan, TrialData, train_trial

log = logging.getLogger(__name__)

METRIC, MODE = "best_val_roc_auc", "max"
# What the console prints per finished trial; every metric still goes to Tune's results and
# MLflow (per-task scores would print 24 rows per trial on Tox21, 1,234 on ToxCast).
CONSOLE_METRICS = ("epoch", "val_roc_auc", "val_pr_auc", "best_val_roc_auc", "best_epoch", "device")
DONE_FILE = "toxtune_done.json"
ENSEMBLE_DIR = "ensemble"  # under the experiment folder: the registered ensemble checkpoint


@dataclass
class PreparedData:
    """The featurized dataset and its split, computed once per job."""

    table: MoleculeTable
    features: Features
    labels: np.ndarray
    split: Split
    invalid_report: Path
    warnings: list[str]


@dataclass
class JobResult:
    """What a finished job hands back to the CLI."""

    name: str
    experiment_path: Path
    trials: pd.DataFrame
    best_trial_id: str
    best_config: dict[str, Any]
    best_valid: dict[str, float]
    test: Metrics
    test_seeds: dict[str, float] = field(default_factory=dict)
    parent_run_id: str = ""
    model_version: str | None = None
    skipped_columns: dict[str, str] = field(default_factory=dict)  # column -> why not a task
    alias_note: str = ""  # what happened to the registered model's alias, and why
    failed_trials: int = 0


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
        split=asdict(job.split),
    )


def prepare_data(
    job: JobConfig, progress: bool = True, table: MoleculeTable | None = None
) -> PreparedData:
    """CSV -> featurized arrays -> split (cached on disk by content hash and settings)."""
    cache_dir = _cache_dir(job)
    table = table if table is not None else load_job_table(job)
    features = featurize_cached(
        table.smiles, job.featurizer, cache_dir, table.content_hash, progress=progress
    )
    labels = table.labels[features.valid_rows]
    split = split_dataset([table.smiles[i] for i in features.valid_rows], labels, job.split)
    job.storage_root.mkdir(parents=True, exist_ok=True)
    report = write_invalid_report(
        features.invalid, job.storage_root / job.name / "invalid_smiles.csv", table.lines
    )
    warnings = missing_class_warnings(labels, split, table.tasks)
    for w in warnings:
        log.warning(w)
    return PreparedData(table, features, labels, split, report, warnings)


def _cache_dir(job: JobConfig) -> Path:
    from toxmodel.data import default_cache_dir

    return Path(job.data.cache_dir).expanduser() if job.data.cache_dir else default_cache_dir()


def claim_job(job: JobConfig, table: MoleculeTable) -> None:
    """Make sure this command may write job `job.name`'s record, before any work is done.

    A job folder that exists is continued only on the same data, targets, featurizer and split
    (JobMismatchError otherwise). A new job must not find a study of its name in a shared study
    database (another job's trials would be continued).
    """
    root = experiment_path(job)
    now = fingerprint(job, table)
    job.storage_root.mkdir(parents=True, exist_ok=True)
    if (root / CONFIG_FILE).exists():
        saved = read_fingerprint(root)
        if saved is None:
            log.warning("job %s has no saved data fingerprint (made by an older toxtune)", job.name)
        check_continuation(job.name, saved, now)
    else:
        try:
            study = optuna.load_study(study_name=job.name, storage=job.study_storage)
        except KeyError:
            study = None
        if study is not None and study.trials:
            raise JobMismatchError(
                f"job {job.name!r} is new here ({root} does not exist) but the study database "
                f"{job.study_storage} already holds a study of that name with "
                f"{len(study.trials)} trials; pick another --run-name"
            )
    write_fingerprint(root, now)


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch over a persistent study that survives the driver.

    Trials are tagged with their Ray trial id in the study, so a restored driver can re-attach
    results to the right Optuna trial even when Ray's searcher snapshot predates it.
    """

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr("ray_trial_id", trial_id)
        if params is not None:
            params["_index"] = ot_trial.number
        return params

    def _attach(self, trial_id: str) -> bool:
        """Make sure `trial_id` maps to a still-running Optuna trial; False: don't tell it."""
        if trial_id in self._completed_trials:
            return False
        if trial_id in self._ot_trials:
            number = self._ot_trials[trial_id]._trial_id
            if self._ot_study._storage.get_trial(number).state.is_finished():
                # A driver snapshot older than the study: the trial already finished there.
                self._completed_trials.add(trial_id)
                return False
            return True
        for frozen in self._ot_study.get_trials(deepcopy=False):
            if frozen.user_attrs.get("ray_trial_id") == trial_id:
                if frozen.state != optuna.trial.TrialState.RUNNING:
                    self._completed_trials.add(trial_id)
                    return False
                self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, frozen._trial_id)
                return True
        log.warning("trial %s is unknown to the Optuna study; its result is not told", trial_id)
        return False

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._attach(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if self._attach(trial_id):
            super().on_trial_complete(trial_id, result, error)


class SpaceSampler:
    """Define-by-run space for Optuna; a class (not a lambda) so Ray can pickle the searcher."""

    def __init__(self, space: dict[str, Param]) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> None:
        sample(trial, self.space)


def fail_stale_trials(study: optuna.Study, keep: set[str]) -> int:
    """Mark study trials left RUNNING by a killed driver (and not being resumed) as failed."""
    n = 0
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if frozen.user_attrs.get("ray_trial_id") not in keep:
            study._storage.set_trial_state_values(frozen._trial_id, optuna.trial.TrialState.FAIL)
            n += 1
    return n


def finished_in_study(study: optuna.Study) -> frozenset[str]:
    """Ray trial ids of the study's finished trials (complete, pruned or failed)."""
    return frozenset(
        str(t.user_attrs["ray_trial_id"])
        for t in study.get_trials(deepcopy=False)
        if t.state.is_finished() and "ray_trial_id" in t.user_attrs
    )


def make_searcher(
    job: JobConfig, space: dict[str, Param], first_run: bool
) -> tuple[StudySearch, optuna.Study]:
    sampler: optuna.samplers.BaseSampler
    if job.search.searcher == "optuna":
        sampler = optuna.samplers.TPESampler(seed=job.search.seed, n_startup_trials=5)
    else:
        sampler = optuna.samplers.RandomSampler(seed=job.search.seed)
    storage = optuna.storages.RDBStorage(job.study_storage)
    study = optuna.create_study(
        storage=storage, study_name=job.name, direction="maximize", load_if_exists=True
    )
    point = default_point(space) if job.search.evaluate_default and first_run else None
    if job.search.evaluate_default and first_run and point is None:
        log.warning("the default point lies outside search.space; not evaluating it first")
    searcher = StudySearch(
        space=SpaceSampler(space),
        metric=METRIC,
        mode=MODE,
        points_to_evaluate=[point] if point and len(study.trials) == 0 else None,
        sampler=sampler,
        study_name=job.name,
        storage=storage,
    )
    return searcher, study


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


class RetryPolicy(ray_tune.Callback):
    """Retry only retryable failures; give an out-of-memory trial a larger GPU share."""

    def __init__(self, cpus: float) -> None:
        self.cpus = cpus

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = last_error(trial)
        kind = classify_failure(text)
        if kind == "gpu_oom":
            share = float(trial.placement_group_factory.required_resources.get("GPU", 0.0))
            new = next_gpu_share(share) if share else 0.0
            log.warning("trial %s ran out of GPU memory; retrying with %.2f GPU", trial, new)
            trial.update_resources({"cpu": self.cpus, "gpu": new})
        elif not is_retryable(kind):
            # Restarting would fail the same way: fail it on its next start instead.
            trial.max_failures = trial.run_metadata.num_failures
            trial.set_config({**trial.config, ABORT_KEY: f"{kind}: {text[-2000:]}"})


class ErrorBudget(ray_tune.Callback, ray_tune.Stopper):
    """Stop the whole job after `limit` trials failed for good."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.failed: dict[str, str] = {}

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed[trial.trial_id] = classify_failure(last_error(trial))

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return len(self.failed) >= self.limit


def _tuner(
    job: JobConfig,
    data: PreparedData,
    name: str,
    num_samples: int,
    first_run: bool,
    callbacks: list[Any],
    budget: ErrorBudget,
    faults: FaultPlan,
) -> tuple[ray_tune.Tuner, optuna.Study]:
    space = build_space(job.search.space)
    searcher, study = make_searcher(job, space, first_run)
    limited = ConcurrencyLimiter(searcher, max_concurrent=job.search.max_concurrent)
    s = job.search
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
    trainable = _trainable(job, data, _trial_data(job, data, faults))
    tuner = ray_tune.Tuner(
        trainable,
        tune_config=ray_tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=limited,
            scheduler=scheduler,
            num_samples=num_samples,
            time_budget_s=s.time_limit_s,
            # A trial's process (torch imported, data fetched) serves the next trial: start-up
            # is a third of a short trial otherwise (benchmarks/RESULTS.md, utilisation).
            reuse_actors=True,
        ),
        run_config=ray_tune.RunConfig(
            name=name,
            storage_path=str(job.storage_root),
            failure_config=ray_tune.FailureConfig(max_failures=job.faults.max_retries),
            checkpoint_config=ray_tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
            ),
            callbacks=[*callbacks, budget],
            stop=budget,
            verbose=1,
        ),
    )
    return tuner, study


def _trainable(job: JobConfig, data: PreparedData, trial_data: TrialData) -> Any:
    """`train_trial` with the shared data (one object-store copy) and its resources."""
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(train_trial, data=trial_data), resources_for(job, data)
    )
    # Tune's console reporter reads the columns to print from this attribute (Ray Train sets
    # it the same way); a ProgressReporter is ignored by the default output engine.
    trainable._progress_metrics = list(CONSOLE_METRICS)
    return trainable


def _trial_data(
    job: JobConfig, data: PreparedData, faults: FaultPlan, finished: frozenset[str] = frozenset()
) -> TrialData:
    return TrialData(
        features=data.features,
        labels=data.labels,
        split=data.split,
        tasks=data.table.tasks,
        featurizer=job.featurizer,
        max_epochs=job.search.max_epochs,
        patience=job.search.patience,
        seed=job.search.seed,
        faults=faults,
        finished=finished,
    )


def init_ray(job: JobConfig) -> None:
    """Join `ray.address` (or RAY_ADDRESS), else start a private local Ray on 127.0.0.1."""
    if ray.is_initialized():
        return
    address = job.ray.address
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return
    ray.init(
        num_cpus=job.ray.num_cpus,
        num_gpus=job.ray.num_gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        **kwargs,
    )


def cluster_size() -> dict[str, float]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return {"nodes": len(nodes), "cpus": total.get("CPU", 0.0), "gpus": total.get("GPU", 0.0)}


def experiment_path(job: JobConfig) -> Path:
    return job.storage_root / job.name


def run_job(job: JobConfig, faults: FaultPlan | None = None, progress: bool = True) -> JobResult:
    """Search, evaluate on the test split, track in MLflow, register the best model.

    A job whose experiment folder exists continues: an interrupted search is restored (finished
    trials kept, unfinished ones rerun, the Optuna study reloaded from its database); a finished
    one grows to `search.num_samples` trials that learn from all earlier ones.
    """
    faults = faults or FaultPlan.from_env()
    # Snapshot the experiment every step, so a killed driver resumes from its latest state.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    job = named(job, exists=lambda name: (job.storage_root / name).exists())
    tracking.check_tracking(job.tracking_uri)
    table = load_job_table(job)
    claim_job(job, table)
    data = prepare_data(job, progress=progress, table=table)
    root = experiment_path(job)
    root.mkdir(parents=True, exist_ok=True)
    (root / CONFIG_FILE).write_text(dump_config(job))
    init_ray(job)

    done = json.loads((root / DONE_FILE).read_text()) if (root / DONE_FILE).exists() else None
    rounds: list[str] = done["rounds"] if done else []
    interrupted = rounds and not done.get("finished", False) if done else False
    resuming = bool(rounds)
    parent = tracking.start_job_run(
        job.tracking_uri, job.tracking.experiment_name, job.name, job.to_dict(), resume=resuming
    )
    callback = tracking.MlflowTrialCallback(
        job.tracking_uri, job.tracking.experiment_name, parent, job.search.max_epochs
    )
    budget = ErrorBudget(job.faults.max_failed_trials)
    callbacks = [callback, RetryPolicy(job.resources.cpus_per_trial)]

    status = "FAILED"
    try:
        study: optuna.Study
        if interrupted and ray_tune.Tuner.can_restore(str(job.storage_root / rounds[-1])):
            log.info("restoring interrupted search %s", rounds[-1])
            _, study = _tuner(job, data, rounds[-1], 1, False, callbacks, budget, faults)
            trial_data = _trial_data(job, data, faults, finished_in_study(study))
            tuner = ray_tune.Tuner.restore(
                str(job.storage_root / rounds[-1]),
                trainable=_trainable(job, data, trial_data),
                resume_unfinished=True,
                resume_errored=False,
                _resume_config=None,
            )
            tuner._local_tuner._run_config.callbacks = [*callbacks, budget]
            tuner.fit()
        remaining = _remaining(job, rounds)
        if remaining > 0:
            name = job.name if not rounds else f"{job.name}-r{len(rounds) + 1}"
            rounds.append(name)
            _write_done(root, rounds, finished=False)
            tuner, study = _tuner(
                job, data, name, remaining, not resuming, callbacks, budget, faults
            )
            fail_stale_trials(study, keep=set())
            tuner.fit()
        # Every Tune run has ended: a study trial still RUNNING is an orphan of the killed driver
        # (suggested after Tune's last snapshot), never to finish.
        fail_stale_trials(optuna.load_study(study_name=job.name, storage=job.study_storage), set())
        _write_done(root, rounds, finished=True)
        result = _finish(job, data, rounds, parent, budget)
        status = "FINISHED"
        return result
    finally:
        tracking.finish_job_run(job.tracking_uri, parent, status)


def _remaining(job: JobConfig, rounds: list[str]) -> int:
    storage = optuna.storages.RDBStorage(job.study_storage)
    try:
        study = optuna.load_study(study_name=job.name, storage=storage)
    except KeyError:
        return job.search.num_samples
    finished = [t for t in study.trials if t.state != optuna.trial.TrialState.RUNNING]
    return job.search.num_samples - len(finished)


def _write_done(root: Path, rounds: list[str], finished: bool) -> None:
    (root / DONE_FILE).write_text(json.dumps({"rounds": rounds, "finished": finished}))


def _trial_ending(job: JobConfig, status: str, last: dict[str, Any]) -> dict[str, Any]:
    """How a trial ended, in the words of its MLflow status tag."""
    epochs = int(last.get("training_iteration", 0) or 0)
    reason = str(last.get("finished_reason") or "")
    if status == "TERMINATED":
        state, reason, epochs = tracking.trial_ending(last, job.search.max_epochs)
    else:
        state = "failed" if status == "ERROR" else status.lower()
    return {"epochs": epochs, "status": state, "finished_reason": reason}


def collect_trials(job: JobConfig, rounds: list[str]) -> pd.DataFrame:
    """One row per trial across all rounds of the job, best first.

    A row holds the trial's best epoch (the one its checkpoint keeps); `epochs`, `status` and
    `finished_reason` say how far it ran and how it ended.
    """
    frames = []
    for name in rounds:
        path = job.storage_root / name
        if not ray_tune.Tuner.can_restore(str(path)):
            continue
        grid = ray_tune.ExperimentAnalysis(str(path), default_metric=METRIC, default_mode=MODE)
        frame = grid.dataframe(metric=METRIC, mode=MODE)
        if frame.empty:
            continue
        endings = pd.DataFrame(
            [
                {"trial_id": t.trial_id, **_trial_ending(job, t.status, t.last_result or {})}
                for t in grid.trials
            ]
        )
        frame = frame.drop(columns=["finished_reason"], errors="ignore")
        frame = frame.merge(endings, on="trial_id", how="left")
        frame["round"] = name
        frames.append(frame)
    if not frames:
        return pd.DataFrame()
    trials = pd.concat(frames, ignore_index=True)
    return trials.sort_values(METRIC, ascending=False, na_position="last")


def _best_checkpoint(job: JobConfig, rounds: list[str]) -> tuple[str, dict[str, Any], Path]:
    """(trial id, config, checkpoint file) of the best trial that left a checkpoint."""
    best: tuple[float, str, dict[str, Any], Path] | None = None
    for name in rounds:
        path = job.storage_root / name
        if not ray_tune.Tuner.can_restore(str(path)):
            continue
        analysis = ray_tune.ExperimentAnalysis(str(path), default_metric=METRIC, default_mode=MODE)
        for trial in analysis.trials:
            result = trial.last_result or {}
            score = result.get(METRIC)
            if score is None or not np.isfinite(score) or trial.checkpoint is None:
                continue
            if best is None or score > best[0]:
                ckpt = Path(trial.checkpoint.path) / CHECKPOINT_FILE
                best = (float(score), trial.trial_id, dict(trial.config), ckpt)
    if best is None:
        raise SearchError(f"no trial of job {job.name} finished with a checkpoint")
    return best[1], best[2], best[3]


def _finish(
    job: JobConfig, data: PreparedData, rounds: list[str], parent: str, budget: ErrorBudget
) -> JobResult:
    trials = collect_trials(job, rounds)
    if budget.stop_all():
        log.error("error budget spent: %d trials failed (%s)", len(budget.failed), budget.failed)
    trial_id, config, ckpt = _best_checkpoint(job, rounds)
    test_rows = data.split.test
    s = job.search
    # Seed offsets: 0..final_seeds-1 for the spread, 1..ensemble-1 for the ensemble (offset 0 is
    # the best trial itself); each is trained once.
    spread = range(s.final_seeds) if s.final_seeds > 1 else range(0)
    retrained = _retrain(job, data, config, sorted({*spread, *range(1, s.ensemble)}))
    seeds = _seed_spread(data, [retrained[k] for k in spread]) if spread else {}
    if s.ensemble > 1:
        members = [retrained[k] for k in range(1, s.ensemble)]
        ckpt = _save_ensemble(job, load_checkpoint(ckpt), members, trial_id)
    probs, test = _score_test(load_checkpoint(ckpt), data)
    # Validation scores of the checkpointed (best) epoch, not of the trial's last epoch.
    best_row = trials.loc[trials["trial_id"] == trial_id].iloc[0]
    best_valid = {k: float(v) for k, v in best_row.items() if k.startswith("val_")}
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    space = build_space(job.search.space)
    summary = tracking.JobSummary(
        n_rows=len(data.table.smiles),
        n_valid=len(data.features),
        content_hash=data.table.content_hash,
        source=job.data.source,
        invalid_report=data.invalid_report,
        search_space=describe(space),
        ray_address=job.ray.address or "local",
        cluster=cluster_size(),
        best_trial_id=trial_id,
        best_params=clean,
        best_valid=best_valid,
        test_metrics=test,
        trials=trials,
        study=_load_study(job),
        roc_data=(data.labels[test_rows], probs, data.table.tasks),
        test_seeds=seeds,
        skipped_columns=dict(data.table.skipped_columns),
    )
    tracking.log_job_summary(job.tracking_uri, parent, summary)
    registration = tracking.register_best_model(
        job.tracking_uri,
        parent,
        ckpt,
        job.model_name,
        job.tracking.alias,
        tags={
            "searcher": job.search.searcher,
            "scheduler": job.search.scheduler,
            "seed": str(job.search.seed),
            "split": f"{job.split.method}:{job.split.seed}",
            "data_hash": data.table.content_hash,
            "trial_id": trial_id,
            "val_roc_auc": f"{best_valid.get('val_roc_auc', float('nan')):.6f}",
            "test_roc_auc": f"{test.roc_auc:.6f}",
            "ensemble": str(s.ensemble),
        },
    )
    return JobResult(
        name=job.name,
        experiment_path=experiment_path(job),
        trials=trials,
        best_trial_id=trial_id,
        best_config=clean,
        best_valid=best_valid,
        test=test,
        test_seeds=seeds,
        parent_run_id=parent,
        skipped_columns=dict(data.table.skipped_columns),
        model_version=registration.version,
        alias_note=registration.note,
        failed_trials=len(budget.failed),
    )


def _score_test(predictor: Predictor, data: PreparedData) -> tuple[np.ndarray, Metrics]:
    """Predict the untouched test split from SMILES, as a user of the model would."""
    test_rows = data.split.test
    smiles = [data.table.smiles[i] for i in data.features.valid_rows[test_rows]]
    probs = predictor.predict(smiles)[predictor.tasks].to_numpy(dtype=np.float32)
    return probs, evaluate(data.labels[test_rows], probs, data.table.tasks)


def _retrain(
    job: JobConfig, data: PreparedData, config: dict[str, Any], offsets: list[int]
) -> dict[int, FitResult]:
    """The best configuration retrained with seed `search.seed + k` for each offset k.

    Runs in the driver, on its CPU, after the search.
    """
    results = {}
    for k in offsets:
        seed = job.search.seed + k
        model_config, train_config = to_run_configs(
            config, job.search.max_epochs, job.search.patience, seed
        )
        results[k] = fit(
            data.features, data.labels, data.split, data.table.tasks, model_config, train_config
        )
        log.info("retrained seed %d: val ROC-AUC %.4f", seed, results[k].best_valid.roc_auc)
    return results


def _seed_spread(data: PreparedData, results: list[FitResult]) -> dict[str, float]:
    """Test mean and std of single models over seeds.

    One seed's test score says little on a small split; the spread says how much of the
    search's winning margin is noise.
    """
    scores: dict[str, list[float]] = {"roc_auc": [], "pr_auc": []}
    for result in results:
        _, metrics = _score_test(result.predictor(), data)
        scores["roc_auc"].append(metrics.roc_auc)
        scores["pr_auc"].append(metrics.pr_auc)
    out = {"test_seeds": float(len(results))}
    for name, values in scores.items():
        out[f"test_{name}_mean"] = float(np.mean(values))
        out[f"test_{name}_std"] = float(np.std(values, ddof=1))
    return out


def _save_ensemble(job: JobConfig, best: Predictor, others: list[FitResult], trial_id: str) -> Path:
    """The best trial's model plus the retrained ones, as one checkpoint (chosen on validation:
    its configuration won the search; the members differ only by seed)."""
    members = [(best.model, best.model_config)] + [(r.model, r.model_config) for r in others]
    return save_ensemble(
        experiment_path(job) / ENSEMBLE_DIR / CHECKPOINT_FILE,
        members,
        best.featurizer,
        best.tasks,
        best.n_inputs,
        best.scaler,
        extra={"trial_id": trial_id, "members": len(members), "seed": job.search.seed},
    )


def _load_study(job: JobConfig) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=job.name, storage=job.study_storage)
    except KeyError:
        return None


def wait_seconds(start: float) -> float:
    return time.monotonic() - start


__all__ = ["JobResult", "PreparedData", "SearchError", "prepare_data", "replace", "run_job"]
