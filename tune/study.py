"""The job's Optuna study: sampler, persistent storage, and its bookkeeping across drivers.

The study lives in a database (`tracking.study_storage`, by default `optuna.db` beside the
results) under the job's name, so a killed driver resumes it and a larger `--num-samples` grows
it. Each study trial carries its Ray trial id (user attribute `ray_trial_id`).
"""

from __future__ import annotations

import logging

import optuna
from sqlalchemy.pool import NullPool

from tune.bridge import RAY_TRIAL_ATTR, StudySearch
from tune.config import JobConfig
from tune.space import Param, default_point, sample

log = logging.getLogger(__name__)

METRIC, MODE = "best_val_roc_auc", "max"


class SpaceSampler:
    """Define-by-run space for Optuna; a class (not a lambda) so Ray can pickle the searcher."""

    def __init__(self, space: dict[str, Param]) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> None:
        sample(trial, self.space)


def rdb(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage for `url`. A server database (PostgreSQL, MySQL) is reached without a
    connection pool: each call opens and closes its connection, so the many short looks a job
    and its searcher take never pile up idle connections on a team's shared server (its
    `max_connections` is finite; pooled engines are only released at garbage collection)."""
    if url.startswith("sqlite:"):
        return optuna.storages.RDBStorage(url)
    return optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": NullPool})


def load(job: JobConfig) -> optuna.Study | None:
    """The job's study, or None when it has none yet."""
    try:
        return optuna.load_study(study_name=job.name, storage=rdb(job.study_storage))
    except KeyError:
        return None


def count_trials(job: JobConfig) -> int:
    found = load(job)
    return len(found.trials) if found is not None else 0


def remaining(job: JobConfig) -> int:
    """Trials still to run for the study to reach `search.num_samples` finished trials."""
    found = load(job)
    if found is None:
        return job.search.num_samples
    done = [t for t in found.trials if t.state != optuna.trial.TrialState.RUNNING]
    return job.search.num_samples - len(done)


def make_searcher(
    job: JobConfig, space: dict[str, Param], first_run: bool
) -> tuple[StudySearch, optuna.Study]:
    """Ray's searcher over the job's persistent study (created on the first run)."""
    sampler: optuna.samplers.BaseSampler
    if job.search.searcher == "optuna":
        sampler = optuna.samplers.TPESampler(seed=job.search.seed, n_startup_trials=5)
    else:
        sampler = optuna.samplers.RandomSampler(seed=job.search.seed)
    storage = rdb(job.study_storage)
    found = optuna.create_study(
        storage=storage, study_name=job.name, direction="maximize", load_if_exists=True
    )
    point = default_point(space) if job.search.evaluate_default and first_run else None
    if job.search.evaluate_default and first_run and point is None:
        log.warning("the default point lies outside search.space; not evaluating it first")
    searcher = StudySearch(
        space=SpaceSampler(space),
        metric=METRIC,
        mode=MODE,
        points_to_evaluate=[point] if point and len(found.trials) == 0 else None,
        sampler=sampler,
        study_name=job.name,
        storage=storage,
    )
    return searcher, found


def fail_stale_trials(found: optuna.Study, keep: set[str] = frozenset()) -> int:  # type: ignore[assignment]
    """Mark study trials left RUNNING by a killed driver (and not being resumed) as failed."""
    n = 0
    for frozen in found.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if frozen.user_attrs.get(RAY_TRIAL_ATTR) not in keep:
            found.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
            n += 1
    return n


def finished_ray_ids(found: optuna.Study) -> frozenset[str]:
    """Ray trial ids of the study's finished trials (complete, pruned or failed)."""
    return frozenset(
        str(t.user_attrs[RAY_TRIAL_ATTR])
        for t in found.get_trials(deepcopy=False)
        if t.state.is_finished() and RAY_TRIAL_ATTR in t.user_attrs
    )
