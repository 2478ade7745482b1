"""The one place that touches Ray Tune's and Optuna's private attributes.

Everything here works around a gap in a public API; each use names the versions it was checked
against. `check()` looks every one of them up on the installed versions and raises, naming the
attribute, when an upgrade removed one (a test calls it), so an upgrade fails loudly here instead
of silently somewhere else. Outside this module, `tune/` uses public Ray and Optuna APIs only.

Checked against: ray 2.60.0, optuna 5.0.0 and 5.1.0.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import optuna
import pandas as pd
import pyarrow.fs as pafs
import ray
from ray import tune as ray_tune
from ray.tune.search.optuna import OptunaSearch

from tune import storage

log = logging.getLogger(__name__)

CHECKED_VERSIONS = {"ray": "2.60.0", "optuna": "5.0.0, 5.1.0"}
RAY_TRIAL_ATTR = "ray_trial_id"  # the study's user attribute naming a trial's Ray trial id


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch over a persistent study that survives the driver.

    Trials are tagged with their Ray trial id in the study, so a restored driver can re-attach
    results to the right Optuna trial even when Ray's searcher snapshot predates it. Uses
    OptunaSearch's private `_ot_trials`, `_completed_trials` and `_ot_study` (ray 2.60.0) and a
    FrozenTrial's `_trial_id` (optuna 5.0.0): OptunaSearch has no public re-attach hook.
    """

    def __init__(
        self,
        *args: Any,
        resampler: Callable[..., optuna.samplers.BaseSampler] | None = None,
        **kwargs: Any,
    ) -> None:
        self._resampler = resampler  # a sampler made for the study as it stands now
        self._reports = StudyReports()
        self._running: set[str] = set()  # trials this driver saw RUNNING in the study
        super().__init__(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles the searcher (tuner.pkl, each snapshot); the report thread stays, and
        what this driver saw of the study is not trusted by the next one."""
        state = self.__dict__.copy()
        state.pop("_reports", None)
        state.pop("_running", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reports = StudyReports()
        self._running = set()

    def save(self, checkpoint_path: str) -> None:
        """OptunaSearch.save pickles `__dict__` as it is: without the report thread. Tune
        saves the searcher with each experiment snapshot and at the end of the search: the
        study then holds every epoch reported so far."""
        import pickle

        self._reports.wait()
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        """Ray's saved searcher, with a sampler made afresh for the study as it stands: the
        saved one's random state predates trials asked after the last snapshot, and would
        propose their configurations again (OptunaSearch's private `_sampler`)."""
        super().restore(checkpoint_path)
        if self._resampler is None:
            return
        if inspect.signature(self._resampler).parameters:
            # pickled by an earlier toxtune (`partial(make_sampler, search)`): it takes the
            # count, read here from the whole study once
            self._sampler = self._resampler(len(self._ot_study.trials))
        else:  # `study.fresh_sampler`: counts the study's trials without reading them
            self._sampler = self._resampler()
        self._ot_study.sampler = self._sampler

    def suggest(self, trial_id: str) -> dict | None:
        """Ray's suggest, the study's changed trials read once and the parameters written once
        (`one_pass_sampling`); the trial tagged with its Ray id."""
        try:
            with one_pass_sampling(self._ot_study):
                params = super().suggest(trial_id)
                self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ATTR, trial_id)
        finally:  # a trial asked in the block holds the block's view of the study
            if trial_id in self._ot_trials:
                self._ot_trials[trial_id].storage = self._ot_study._storage
        ot_trial = self._ot_trials[trial_id]
        self._running.add(trial_id)  # just asked: RUNNING in the study
        if params is not None:
            params["_index"] = ot_trial.number
        return params

    def _attach(self, trial_id: str) -> bool:
        """Make sure `trial_id` maps to a still-running Optuna trial; False: don't tell it.

        Called for every result, so a trial is looked up in the study once per driver: one
        trial's row (`storage.get_trial`), not `study.trials`, which reads and copies every
        trial with all its intermediate values (57 ms per result at 64 trials x 30 epochs in
        SQLite, growing with both; `benchmarks/driver.py`)."""
        if trial_id in self._completed_trials:
            return False
        if trial_id in self._running:
            return True
        if trial_id in self._ot_trials:
            ot_trial = self._ot_trials[trial_id]
            if ot_trial.storage.get_trial(ot_trial._trial_id).state.is_finished():
                # A driver snapshot older than the study: the trial already finished there.
                self._completed_trials.add(trial_id)
                return False
            self._running.add(trial_id)
            return True
        for frozen in self._ot_study.get_trials(deepcopy=False):
            if frozen.user_attrs.get(RAY_TRIAL_ATTR) == trial_id:
                if frozen.state != optuna.trial.TrialState.RUNNING:
                    self._completed_trials.add(trial_id)
                    return False
                self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, frozen._trial_id)
                self._running.add(trial_id)
                return True
        log.warning("trial %s is unknown to the Optuna study; its result is not told", trial_id)
        return False

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """The epoch's value goes to the study as an intermediate value, off the Tune loop
        (`StudyReports`): a database write per result, over a fresh connection on a server,
        stalled the loop at tens of trials in flight (`benchmarks/driver.py`)."""
        if self._attach(trial_id):
            trial = self._ot_trials[trial_id]
            self._reports.put(trial, float(result[self.metric]), int(result["training_iteration"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        """Told in the loop, as before, once the trial's queued epochs are in the study: the
        study is what a resume trusts, so a finished trial is in it before Tune goes on. The
        result a trial ends on (its last epoch, or the one ASHA stopped it at) reaches the
        searcher here instead of through `on_trial_result` (ray 2.60.0), so it is queued as
        the trial's last intermediate value first: the study then holds every epoch MLflow
        does (it lacked the last one before). A trial that errored is told without its result:
        Ray's OptunaSearch tells a result-bearing trial COMPLETE with that value even when it
        errored, so the study called finished (and the history plot drew) a trial that the
        trial table and MLflow call failed; without the result it is FAIL."""
        if self._attach(trial_id):
            if result and not error and self.metric in result and "training_iteration" in result:
                self.on_trial_result(trial_id, result)
            self._reports.wait()
            super().on_trial_complete(trial_id, None if error else result, error)


class StudyReports:
    """A thread that writes queued intermediate values to the study, in order.

    What is queued when the thread comes round is written in one transaction (`_write_batch`):
    a commit per value could not keep up with 170 results a second from 32 trials in flight
    (benchmarks/driver.py: 2,010 of 6,064 values still queued when the search ended). If the
    batch fails, its values are written one by one, each retried: a value the study keeps
    refusing for REPORT_PATIENCE_S is logged and dropped (an intermediate value is a curve
    point; the trial's final value is told in the loop). `wait()` returns once everything
    queued so far is written; the searcher waits so before each snapshot of its state and at
    the end of the search (`StudySearch.save`). Values still queued when a driver is killed
    are lost; the restored trial reports its checkpoint's epoch again, and a step the study
    already holds is overwritten with the same value.
    """

    REPORT_PATIENCE_S = 60.0
    MAX_BATCH = 2000

    def __init__(self) -> None:
        self._queue: deque[tuple[Any, float, int]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # transactions written (what a test checks)

    def put(self, trial: Any, value: float, step: int) -> None:
        with self._cond:
            self._queue.append((trial, value, step))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="toxtune-study-reports", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def wait(self) -> None:
        with self._cond:
            while self._queue or self._busy:
                self._cond.wait(timeout=1.0)
                if self._thread is None or not self._thread.is_alive():
                    return

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait(timeout=30.0)
                    if not self._queue:
                        return  # idle: the next put starts a new thread
                batch = [
                    self._queue.popleft() for _ in range(min(len(self._queue), self.MAX_BATCH))
                ]
                self._busy = True
            try:
                try:
                    _write_batch(batch)
                    self.batches += 1
                except Exception as exc:
                    log.debug("study batch of %d failed (%s); one by one", len(batch), exc)
                    for trial, value, step in batch:
                        self._report(trial, value, step)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _report(self, trial: Any, value: float, step: int) -> None:
        give_up = time.monotonic() + self.REPORT_PATIENCE_S
        delay = 0.5
        while True:
            try:
                trial.report(value, step)
                return
            except optuna.exceptions.UpdateFinishedTrialError:
                log.warning("study trial %d finished before its epoch %d", trial.number, step)
                return
            except Exception as exc:
                if time.monotonic() > give_up:
                    log.error("study trial %d: epoch %d not recorded: %s", trial.number, step, exc)
                    return
                log.warning(
                    "study trial %d: epoch %d waits for the study: %s", trial.number, step, exc
                )
                time.sleep(delay)
                delay = min(delay * 2, 8.0)


def _write_batch(batch: list[tuple[Any, float, int]]) -> None:
    """Write (optuna.Trial, value, step) intermediate values in one transaction of the trials'
    RDB storage: what `Trial.report` writes, in three statements a batch (the trials' states,
    the steps already stored, the new rows) instead of two queries and an insert a value
    (optuna's `_set_trial_intermediate_value_without_commit`): on PostgreSQL 1.0-1.3 ms of
    driver CPU a value before, 0.06 ms in batches of 64 (RESULTS "The study's intermediate
    values in three statements a batch"). A later value for a step replaces
    an earlier one, as a report does. Raises (nothing written) if a trial cannot take a value,
    e.g. because it already finished. Uses optuna 5's `_CachedStorage._backend`,
    `_rdb.storage._create_scoped_session` and the `_rdb.models` of trials and their
    intermediate values (no public batch write)."""
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    backend = getattr(batch[0][0].storage, "_backend", batch[0][0].storage)
    values = {(trial._trial_id, step): value for trial, value, step in batch}  # last one wins
    trial_ids = sorted({trial_id for trial_id, _ in values})
    rows = models.TrialIntermediateValueModel
    with _create_scoped_session(backend.scoped_session) as session:
        states = dict(
            session.query(models.TrialModel.trial_id, models.TrialModel.state).filter(
                models.TrialModel.trial_id.in_(trial_ids)
            )
        )
        for trial_id in trial_ids:
            if trial_id not in states:
                raise KeyError(f"study trial id {trial_id} not found")
            backend.check_trial_is_updatable(trial_id, states[trial_id])
        stored = {
            (row.trial_id, row.step): row
            for row in session.query(rows).filter(
                rows.trial_id.in_(trial_ids), rows.step.in_(sorted({s for _, s in values}))
            )
        }
        new = []
        for (trial_id, step), value in values.items():
            stored_value, value_type = rows.intermediate_value_to_stored_repr(value)
            row = stored.get((trial_id, step))
            if row is None:
                new.append(
                    {
                        "trial_id": trial_id,
                        "step": step,
                        "intermediate_value": stored_value,
                        "intermediate_value_type": value_type,
                    }
                )
            else:
                row.intermediate_value, row.intermediate_value_type = stored_value, value_type
        if new:  # one executemany, not an INSERT ... RETURNING a row
            session.execute(sqlalchemy.insert(rows), new)


class _SamplingStorage:
    """The study's storage as one new trial's ask sees it (`one_pass_sampling`): the
    study's trials read once, every later read a filter of that reading; the trial's parameter
    and attribute writes held for one transaction; everything else goes to the storage
    itself."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self._trials: dict[int, list[Any]] = {}
        self.held: list[tuple[int, str, float, Any]] = []
        self.held_attrs: list[tuple[str, int, str, Any]] = []

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states: Any = None) -> list[Any]:
        if study_id not in self._trials:
            self._trials[study_id] = _read_changed_trials(self._storage, study_id)
        trials = self._trials[study_id]
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def set_trial_param(self, trial_id: int, name: str, value: float, distribution: Any) -> None:
        self.held.append((trial_id, name, value, distribution))

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.held_attrs.append(("TrialUserAttributeModel", trial_id, key, value))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.held_attrs.append(("TrialSystemAttributeModel", trial_id, key, value))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def _store_held(storage: Any, sampling: _SamplingStorage) -> None:
    """What one ask sampled and tagged, in one transaction: the parameters in one insert,
    each checked as Optuna's `_set_trial_param_without_commit` checks it (the trial still
    running, the distribution compatible with the study's for that name), then the
    attributes."""
    from optuna import distributions
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import insert

    backend = storage._backend
    sampled = sorted({trial_id for trial_id, *_ in sampling.held})
    tagged = [trial_id for _, trial_id, *_ in sampling.held_attrs]
    if not (sampled or tagged):
        return
    with storage._lock:
        study_id, _ = storage._trial_id_to_study_id_and_number[(sampled or tagged)[0]]
        known = storage._studies[study_id].param_distribution
        with _create_scoped_session(backend.scoped_session, True) as session:
            for trial_id in sampled:  # the attribute writes check their trial themselves
                trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
                backend.check_trial_is_updatable(trial_id, trial.state)
            rows = []
            for trial_id, name, value, distribution in sampling.held:
                previous = known.get(name)
                if previous is None:  # a name this driver has not stored: the study's own
                    record = (
                        session.query(models.TrialParamModel)
                        .join(models.TrialModel)
                        .filter(models.TrialModel.study_id == study_id)
                        .filter(models.TrialParamModel.param_name == name)
                        .first()
                    )
                    if record is not None:
                        previous = distributions.json_to_distribution(record.distribution_json)
                if previous is not None:
                    distributions.check_distribution_compatibility(previous, distribution)
                rows.append(
                    {
                        "trial_id": trial_id,
                        "param_name": name,
                        "param_value": value,
                        "distribution_json": distributions.distribution_to_json(distribution),
                    }
                )
            if rows:
                session.execute(insert(models.TrialParamModel), rows)
            for model, trial_id, key, value in sampling.held_attrs:
                backend._set_trial_attr_without_commit(
                    session, getattr(models, model), trial_id, key, value
                )
        for _, name, _, distribution in sampling.held:
            known.setdefault(name, distribution)


def _read_changed_trials(storage: Any, study_id: int) -> list[Any]:
    """The study's trials, sorted by number, as Optuna's cached storage reads them
    (`_CachedStorage.get_all_trials`: finished trials once, unfinished ones afresh each time),
    except that a trial the cache last read RUNNING (not queued: a trial read WAITING lacks
    the parameters its ask gives it) and the study still holds RUNNING is not read again:
    first one query of the unfinished trials' states, then only the trials that changed or
    are new read in full (their parameters, attributes and intermediate values).

    A running trial's record changes after its ask only by its intermediate values (the
    report thread's) and its end (the tell, in the Tune loop, which also asks): a sampler
    reads a running trial's parameters, never its intermediate values (Optuna 5's TPE uses
    them for pruned trials only, which are read in full once they end). So the ask proposes
    what Optuna's own read would make it propose (a test compares them), without reading
    every running trial with all its epochs for each new trial: at 64 trials in flight that
    read was two thirds of a proposal (RESULTS "A new trial's cost to the driver")."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import or_

    backend = storage._backend
    with storage._lock:
        if study_id not in storage._studies:  # the first read: everything
            return storage.get_all_trials(study_id, deepcopy=False)
        known = storage._studies[study_id]
        table = models.TrialModel
        after = table.trial_id > known.last_finished_trial_id
        with _create_scoped_session(backend.scoped_session) as session:
            rows = (
                session.query(table.trial_id, table.state)
                .filter(table.study_id == study_id)
                .filter(
                    or_(table.trial_id.in_(known.unfinished_trial_ids), after)
                    if known.unfinished_trial_ids
                    else after
                )
                .all()
            )
        running = optuna.trial.TrialState.RUNNING
        read_running = {  # a trial read WAITING (queued) was read without its parameters
            trial_id
            for trial_id in known.unfinished_trial_ids
            if known.trials[storage._trial_id_to_study_id_and_number[trial_id][1]].state == running
        }
        changed = {
            trial_id for trial_id, state in rows if trial_id not in read_running or state != running
        }
        if changed:
            # Optuna's `_read_trials_from_remote_storage`, over the changed trials only
            trials = backend._get_trials(
                study_id,
                states=None,
                included_trial_ids=changed,
                trial_id_greater_than=max(changed),
            )
            storage._add_trials_to_cache(study_id, trials)
            for trial in trials:
                if not trial.state.is_finished():
                    known.unfinished_trial_ids.add(trial._trial_id)
                    continue
                known.last_finished_trial_id = max(known.last_finished_trial_id, trial._trial_id)
                known.unfinished_trial_ids.discard(trial._trial_id)
        return sorted(known.trials.values(), key=lambda t: t.number)


@contextlib.contextmanager
def one_pass_sampling(study: optuna.Study) -> Iterator[None]:
    """Ask a new trial and sample its parameters (Ray's suggest, in the Tune loop) reading the
    study's trials once, and of those only the ones that changed since the last ask
    (`_read_changed_trials`), and storing the parameters, TPE's note of them and the attributes
    set in the block in one transaction (`_store_held`).

    Optuna 5's TPE (constant liar, its default: running trials' parameters count against a new
    proposal) reads every trial afresh from the database for each parameter it samples alone
    and once more for the rest, `Study.ask` once more for trials queued to run, and the cached
    storage reads every unfinished trial, with all its intermediate values, each time; and
    each `suggest_*` commits its parameter on its own (a trial lookup and an insert each), as
    does each attribute. At 64 trials in flight that was a
    quarter to a third of a second of the Tune loop per new trial (RESULTS "A new trial's cost
    to the driver"). Within one ask the study's other trials do not change (the driver is the
    study's one writer, and its report thread adds only intermediate values, which the sampler
    does not read) and a trial's own parameters are read from Optuna's in-process cache, so the
    proposal is Optuna's own (a test compares them). A sampling that raises stores what it
    sampled, as Optuna would have. A trial asked in the block holds the block's view of the
    storage: give it back the study's after (`trial.storage = study._storage`).

    Uses optuna 5's `Study._storage`, `Trial.storage`, `_CachedStorage._backend`, `._lock`,
    `._studies[...].param_distribution`, `._trial_id_to_study_id_and_number`,
    `RDBStorage._set_trial_attr_without_commit` and the tables' models (`TrialModel`,
    `TrialParamModel`, the attribute models) to write (no public batch write or read snapshot),
    and to read `_CachedStorage._add_trials_to_cache`, `._studies[...].unfinished_trial_ids`,
    `.last_finished_trial_id`, `.trials` and `RDBStorage._get_trials`."""
    from optuna.storages import RDBStorage

    storage = study._storage
    backend = getattr(storage, "_backend", None)
    if not isinstance(backend, RDBStorage):
        yield  # an in-memory study: nothing to save
        return
    sampling = _SamplingStorage(storage)
    study._storage = sampling
    try:
        yield
    finally:
        study._storage = storage
        _store_held(storage, sampling)


def with_console_metrics(trainable: Any, names: list[str]) -> Any:
    """Make Tune's console print only `names` per result (ray 2.60.0: the default output engine
    reads a trainable's private `_progress_metrics`, as Ray Train sets it, and ignores a
    ProgressReporter). Per-task metrics still reach Tune's results and MLflow."""
    trainable._progress_metrics = list(names)
    return trainable


def init_local_ray(num_cpus: int | None, num_gpus: int | None, **kwargs: Any) -> None:
    """A private local Ray whose node address is 127.0.0.1 (ray 2.60.0: the private
    `_node_ip_address` argument of ray.init). Its gRPC servers still listen on every interface,
    behind Ray's token authentication: Ray offers no setting that binds them to loopback.

    `address="local"`: without it ray.init joins a cluster someone started on this machine with
    `ray start` (and then refuses num_cpus); a job that names no cluster gets its own Ray."""
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        **kwargs,
    )


def local_ray_session_dir() -> str | None:
    """The session folder of the Ray this process started itself, or None when it joined a
    cluster or started none (ray 2.60.0: the private `ray._private.worker._global_node`, the
    node ray.init made; `head` is False for a node it only connected to). Every process of that
    Ray holds its log files open under this folder (`tune.guard` finds its leftovers by it)."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not node.head:
        return None
    return str(node.get_session_dir_path())


def restore_tuner(path: str, trainable: Any, callbacks: list[Any]) -> ray_tune.Tuner:
    """Restore an interrupted experiment with this driver's callbacks.

    ray 2.60.0: `Tuner.restore` keeps the RunConfig pickled with the experiment, whose callbacks
    hold the killed driver's MLflow run and error budget; the public API cannot replace them,
    so the restored tuner's private `_local_tuner._run_config.callbacks` is set. The private
    `_resume_config=None` keeps Tune from reading a resume config that predates the study.
    """
    tuner = ray_tune.Tuner.restore(
        path,
        trainable=trainable,
        resume_unfinished=True,
        resume_errored=False,
        _resume_config=None,
    )
    tuner._local_tuner._run_config.callbacks = list(callbacks)
    return tuner


class _ResultsUnread(ray_tune.ExperimentAnalysis):
    """Ray's own analysis of a run toxtune drives: its trials, without their result files."""

    def _fetch_trial_dataframes(self) -> dict[str, Any]:
        return {}


def saved_experiment(path: str, metric: str, mode: str) -> ray_tune.ExperimentAnalysis:
    """Ray's saved state of the experiment at `path`: its trials (statuses, configurations,
    last results, checkpoints) without reading any trial's result file."""
    return _ResultsUnread(path, default_metric=metric, default_mode=mode)


def trial_results(grid: ray_tune.ExperimentAnalysis, trial: Any) -> pd.DataFrame:
    """Every result `trial` of `grid` reported, one row each, as Ray's analysis reads them
    (its result file, columns flattened with "/"); empty when it has none."""
    try:
        return grid._fetch_trial_dataframe(trial)
    except FileNotFoundError:
        return pd.DataFrame()


# Where ray 2.60.0 builds the analyses toxtune never reads: `Tuner.restore` (for a
# `get_results()` before `fit()`) and the end of every `tune.run` (the grid `fit()` returns).
RAY_ANALYSES = ("ray.tune.tune", "ray.tune.impl.tuner_internal")


@contextlib.contextmanager
def ray_results_unread() -> Iterator[None]:
    """Keep Ray's own `ExperimentAnalysis` builds from reading every trial's result file.

    Each parses every result of every trial (pandas' json_normalize), so a resume grew with the
    results per trial (benchmarks/RESULTS.md, "Resume at scale"); toxtune reads a round's
    results once, after `fit()`, for its end check and records (`trials.analysis`), and never
    uses the grid `fit()` returns (its results then have no `metrics_dataframe`). Only the
    names Ray's modules build with are replaced, for the block; `ray.tune.ExperimentAnalysis`
    stays the real one.
    """
    modules = [importlib.import_module(name) for name in RAY_ANALYSES]
    saved = [module.ExperimentAnalysis for module in modules]
    for module in modules:
        module.ExperimentAnalysis = _ResultsUnread
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.ExperimentAnalysis = original


PROGRESS_FILE = "progress.json"  # in each trial checkpoint: {"epoch": N}, written by the trial


class NewestCheckpoint(ray_tune.Callback):
    """Restore every trial from the newest checkpoint that exists in its folder, one Tune
    iteration before that checkpoint's epoch: the trial replays that epoch's report first
    (`tune.trainable`), so an epoch whose report Tune never passed on is not missing either.

    Ray's experiment snapshot can lag the checkpoints on storage (ray 2.60.0: `num_to_keep`
    deletes an old checkpoint as soon as a new one is registered, while the snapshot naming the
    new one is still being uploaded), so a driver killed in between leaves a snapshot naming a
    deleted checkpoint, and Tune then fails the trial ("Could not recover from checkpoint")
    instead of continuing it; and a stop signal can end the run after a checkpoint was
    registered but before its result reached the callbacks. Applied on a restored run's first
    step and to each trial Tune is about to retry. Sets the checkpoint manager's private
    `_latest_checkpoint_result` (no public way to re-point a trial) with
    `ray.train._internal.session._TrainingResult`.
    """

    def __init__(self) -> None:
        self._started = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._started:
            return
        self._started = True
        from ray.tune.experiment import Trial

        for trial in trials:
            if trial.status not in (Trial.TERMINATED, Trial.ERROR):
                _repoint(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _repoint(trial)


class StopWitness(ray_tune.Callback):
    """Tell `note` about the SIGINT (or SIGUSR1) that Ray Tune catches to end a run.

    ray 2.60.0: `tune.run` installs its own SIGINT handler (`_setup_signal_catching`) and then
    returns from `fit()` as though the search had ended, with no public word that it was
    stopped. A stop that lands between two trials leaves every started trial ended, so only the
    signal tells an interrupted round from a finished one. The controller, which calls this
    callback's `setup`, is built after that handler is installed: `setup` wraps the handler so
    the signal is noted, then handed on. Tune leaves its handler installed after a run that
    was not stopped, where it would swallow a Ctrl-C during finalize: run `fit()` inside
    `handlers_restored()`, which puts back the handlers it found.
    """

    SIGNALS = ("SIGINT", "SIGUSR1")

    def __init__(self, note: Callable[[int], None]) -> None:
        self.note = note

    @contextlib.contextmanager
    def handlers_restored(self) -> Iterator[None]:
        """Run the block (a `fit()`), then reinstall the SIGINT and SIGUSR1 handlers from before."""
        import signal

        main = threading.current_thread() is threading.main_thread()
        nums = [getattr(signal, n) for n in self.SIGNALS if hasattr(signal, n)]
        before = {n: signal.getsignal(n) for n in nums} if main else {}
        try:
            yield
        finally:
            for signum, handler in before.items():
                if handler is not None:
                    signal.signal(signum, handler)

    def setup(self, **info: Any) -> None:
        import signal

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            handler = signal.getsignal(signum)
            if not callable(handler) or getattr(handler, "_toxtune_witness", False):
                continue

            def witness(sig: int, frame: Any, handler: Callable[..., Any] = handler) -> None:
                self.note(sig)
                handler(sig, frame)

            witness._toxtune_witness = True  # type: ignore[attr-defined]
            signal.signal(signum, witness)


def _repoint(trial: Any) -> None:
    from ray.train._internal.session import _TrainingResult

    fs, folder = trial.storage.storage_filesystem, trial.storage.trial_fs_path
    newest = _newest_checkpoint(fs, folder)
    manager = trial.run_metadata.checkpoint_manager
    if newest is None:
        if manager.latest_checkpoint_result is not None:
            log.warning("trial %s: no checkpoint left in %s; it starts over", trial, folder)
            manager._latest_checkpoint_result = None
        return
    with fs.open_input_stream(f"{newest}/{PROGRESS_FILE}") as f:
        epoch = int(json.loads(f.readall())["epoch"])
    log.info("trial %s continues from %s (epoch %d)", trial.trial_id, newest, epoch)
    manager._latest_checkpoint_result = _TrainingResult(
        checkpoint=ray_tune.Checkpoint(newest, filesystem=fs),
        metrics={"training_iteration": epoch - 1},
    )


def _newest_checkpoint(fs: Any, folder: str) -> str | None:
    """The path of the newest complete `checkpoint_<n>` folder under `folder` (one holding the
    trial's progress file), or None."""
    import pyarrow.fs as pafs

    try:
        entries = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return None
    found = sorted(
        (e.path for e in entries if e.base_name.startswith("checkpoint_")),
        key=lambda path: int(path.rsplit("_", 1)[-1]) if path.rsplit("_", 1)[-1].isdigit() else -1,
    )
    for path in reversed(found):
        if fs.get_file_info(f"{path}/{PROGRESS_FILE}").type == pafs.FileType.File:
            return path
    return None


def snapshots_by_time_only() -> None:
    """Let `TUNE_GLOBAL_CHECKPOINT_S` alone decide when Tune snapshots the experiment.

    ray 2.60.0: with `CheckpointConfig(num_to_keep=k)` the driver also forces a snapshot, and
    waits for its upload, whenever any trial has saved k checkpoints since the last one
    (`_ExperimentCheckpointManager.on_trial_checkpoint`), so that the snapshot never names a
    checkpoint `num_to_keep` deleted. With many trials saving an epoch each, that is a forced,
    waited-for upload at nearly every loop step, whatever the period says
    (`benchmarks/driver.py`). toxtune does not need it: `NewestCheckpoint` restores every
    unfinished trial from the newest checkpoint that exists, whatever the snapshot names. The
    private method is replaced with one that records nothing. Idempotent.
    """
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    def on_trial_checkpoint(self: Any, trial: Any) -> None:
        return None

    on_trial_checkpoint._toxtune = True  # type: ignore[attr-defined]
    _ExperimentCheckpointManager.on_trial_checkpoint = on_trial_checkpoint


def consistent_experiment_uploads() -> None:
    """Make Tune upload each experiment snapshot from a folder of its own, made when the upload
    starts, so no save can change a file under an upload.

    The race it closes (ray 2.60.0, seen as a "Last sync command failed ... FileNotFoundError"
    traceback naming a hidden `.<uuid>-tmp-...` file in `driver_artifacts`): on every snapshot
    `_ExperimentCheckpointManager.sync_up_experiment_state` first saves the experiment
    (`TuneController.save_to_dir`: the experiment-state JSON rewritten in place, then
    `SearchGenerator.save_to_dir` -> `Searcher.save_to_dir` writing `.<uuid>-tmp-searcher-state-*`
    and `tune.utils._atomic_save` writing `.<uuid>-tmp-search_gen_state-*`, each renamed into
    place) into the driver's staging folder, and only then asks `_FilesystemSyncer.sync_up`
    whether the previous upload is still running. That upload, a background thread running
    pyarrow's `copy_files` over the same folder, lists the folder and then copies what it
    listed: a temporary file renamed meanwhile is gone, and a JSON being rewritten is uploaded
    torn. `TUNE_GLOBAL_CHECKPOINT_S=0` made it a save per loop step.

    Patched: `_FilesystemSyncer._sync_up_command` (private) builds the upload from a sibling
    folder filled in the driver's thread, after the save: hard links to the saved files (a
    rename replaces the name, never the linked file; Tune's loggers only append), a copy of the
    experiment-state JSON (rewritten in place), and no hidden temporary files; a file the last
    successful upload sent and unchanged since is left out (`upload_copy`), so a snapshot sends
    what changed, not every ended trial's logs again. Idempotent.

    What the syncer notes for that (the files sent, the last upload's command, which holds
    them) stays out of its pickled state (`__getstate__` wrapped): every trial's copy of the
    storage shares the driver's syncer and is pickled into each experiment snapshot and sent to
    each trial's process, so a note of every file sent so far made the snapshot grow with the
    square of the trials (37.7 MB at 200 trials; RESULTS "The syncer's note kept out of the
    snapshot, ..."). A copy elsewhere starts with no note: its first upload sends every file.
    """
    from ray.train._internal import storage

    syncer = storage._FilesystemSyncer
    if getattr(syncer._sync_up_command, "_toxtune", False):
        return
    original = syncer._sync_up_command
    getstate = syncer.__getstate__

    def _sync_up_command(self: Any, local_path: str, uri: str, exclude: Any = None) -> Any:
        if not os.path.isdir(local_path):
            return original(self, local_path, uri, exclude)
        previous = getattr(self, "_toxtune_upload_dir", None)
        if previous:  # Tune asks for a new upload only once the last one has ended
            shutil.rmtree(previous, ignore_errors=True)
        sent = self.__dict__.setdefault("_toxtune_sent", {})
        uploaded = sent.get((local_path, uri), {})
        frozen, copied = upload_copy(local_path, uploaded)
        self._toxtune_upload_dir = frozen
        upload, kwargs = original(self, frozen, uri, exclude)

        def upload_and_note(**kw: Any) -> None:
            upload(**kw)
            sent[(local_path, uri)] = {**uploaded, **copied}  # once it is in the storage

        upload_and_note._toxtune = True  # type: ignore[attr-defined]
        return upload_and_note, kwargs

    def state_without_notes(self: Any) -> dict[str, Any]:
        state = getstate(self)
        for key in [k for k in state if k.startswith("_toxtune")]:
            del state[key]
        command = state.get("_current_cmd")
        if command and getattr(command[0], "_toxtune", False):
            state["_current_cmd"] = None  # retried only by the driver's own syncer
        return state

    _sync_up_command._toxtune = True  # type: ignore[attr-defined]
    syncer._sync_up_command = _sync_up_command
    syncer.__getstate__ = state_without_notes


def metric_statistics_only(metrics: Collection[str]) -> None:
    """Keep Ray Tune's running statistics of `metrics` only, not of every metric a trial reports.

    ray 2.60.0: `Trial.update_last_result` keeps, for every number in every result, its max,
    min, mean and last-5 and last-10 means with the last ten values
    (`_TrainingRunMetadata.update_metric`), and each trial's state in every experiment snapshot
    carries them: a trial's state was 52 KB with them, 18 KB without (RESULTS "The syncer's
    note kept out of the snapshot, and Ray's statistics of one metric"). Only
    `ExperimentAnalysis.get_best_trial` reads them, for the metric it is asked about; toxtune
    never calls it, and its search metric keeps them. The method is wrapped in the driver; the
    set is the last one given.
    """
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    update = _TrainingRunMetadata.update_metric
    original = getattr(update, "_toxtune_original", update)
    keep = frozenset(metrics)

    def update_metric(self: Any, metric: str, value: Any, step: int | None = 1) -> None:
        if metric in keep:
            original(self, metric, value, step=step)

    update_metric._toxtune_original = original  # type: ignore[attr-defined]
    _TrainingRunMetadata.update_metric = update_metric


def object_store_uploads() -> None:
    """Upload to an S3 bucket one request a file: no folders, no multipart for a small file.

    ray 2.60.0: a trial saving a checkpoint (`StorageContext.persist_current_checkpoint`) and
    the driver uploading a snapshot (`_upload_to_fs_path`) first make the destination folder,
    which pyarrow's S3 filesystem answers with two bucket checks and an empty marker object for
    each level of the path, then copy each file as a multipart upload (three requests, however
    small the file). With its deletion, a checkpoint of two files cost the bucket about 20
    requests (RESULTS "Requests a checkpoint costs the bucket"). Both private functions are wrapped:
    for an S3 bucket (and a local checkpoint, no exclusions) the files alone are uploaded
    (`storage.upload_files`), otherwise Ray's own run. In the driver and in each trial
    process; idempotent.
    """
    from ray.train._internal import storage as ray_storage

    if getattr(ray_storage._upload_to_fs_path, "_toxtune", False):
        return
    upload = ray_storage._upload_to_fs_path
    persist = ray_storage.StorageContext.persist_current_checkpoint

    def _upload_to_fs_path(
        local_path: str, fs: Any, fs_path: str, exclude: list[str] | None = None
    ) -> None:
        if exclude or not isinstance(fs, pafs.S3FileSystem):
            return upload(local_path, fs, fs_path, exclude)
        storage.upload_files(local_path, fs, fs_path)

    def persist_current_checkpoint(self: Any, checkpoint: Any) -> Any:
        fs = self.storage_filesystem
        if not isinstance(fs, pafs.S3FileSystem) or not isinstance(
            checkpoint.filesystem, pafs.LocalFileSystem
        ):
            return persist(self, checkpoint)
        self._check_validation_file()  # as Ray's does: the storage is still the job's
        storage.upload_files(checkpoint.path, fs, self.checkpoint_fs_path)
        return checkpoint.__class__(filesystem=fs, path=self.checkpoint_fs_path)

    _upload_to_fs_path._toxtune = True  # type: ignore[attr-defined]
    ray_storage._upload_to_fs_path = _upload_to_fs_path
    ray_storage.StorageContext.persist_current_checkpoint = persist_current_checkpoint


# Deletions at once. One: in a bucket it takes every deletion queued so far as one batch
# (`storage.delete_folders`: a listing a checkpoint, one request per 1,000 objects), about 100
# checkpoints a second here where pyarrow's `delete_dir` one at a time managed 4.7 with 25-ms
# round trips (RESULTS "Checkpoint deletions in batches"). Four threads of `delete_dir` were
# tried before, but a resume drill on the team stack hung once in CI with them, in a way not
# understood.
DELETION_THREADS = 1


class CheckpointDeletions(ray_tune.Callback):
    """Delete the checkpoints `CheckpointConfig(num_to_keep=...)` drops in a thread of its own
    (`DELETION_THREADS`, taking them in the order Tune drops them); the experiment's end waits
    for every one. In an S3 bucket the thread takes every deletion queued so far (up to
    `storage.DELETE_BATCH`) and deletes them together (`storage.delete_folders`): a listing a
    checkpoint, and one request for the objects of them all. Elsewhere Ray's own deletion, one
    checkpoint at a time.

    ray 2.60.0: `_CheckpointManager.register_checkpoint` deletes a trial's oldest checkpoint
    synchronously in the Tune loop (`_delete_fs_path`), one storage round trip per checkpoint
    saved; on object storage that was 21 % of the driver's loop at 64 trials in flight
    (`benchmarks/driver.py`, py-spy). Nothing reads a dropped checkpoint again (Tune's own
    bookkeeping forgets it before the deletion; `NewestCheckpoint` restores from the newest
    one that exists), so a deletion can wait. A driver killed with deletions queued leaves
    those old checkpoints behind in the trial folders (space only; a later run ignores them).
    Replaces the module attribute `checkpoint_manager._delete_fs_path` from `setup` to
    `on_experiment_end`.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Any, str] | None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks with the experiment; the queue and threads stay."""
        return {"_queue": None}

    def setup(self, **info: Any) -> None:
        from ray.train._internal import checkpoint_manager, storage

        self._queue, self._ray_delete = queue.Queue(), storage._delete_fs_path  # logs a failure
        for _ in range(DELETION_THREADS):
            threading.Thread(target=self._run, args=(self._queue,), daemon=True).start()
        checkpoint_manager._delete_fs_path = self.enqueue

    def _delete(self, batch: list[tuple[Any, str]]) -> None:
        """Delete a batch of checkpoints; each failure is logged and the others go on."""
        in_buckets: dict[bytes, list[tuple[Any, str]]] = {}
        for fs, fs_path in batch:
            if isinstance(fs, pafs.S3FileSystem):
                in_buckets.setdefault(storage.filesystem_options(fs), []).append((fs, fs_path))
                continue
            try:  # Tune's `_delete_fs_path` asks whether the path is a folder before its own
                # try: a checkpoint already gone (lost with a killed driver) raises there
                self._ray_delete(fs=fs, fs_path=fs_path)
            except Exception as exc:  # space only: the search must go on
                log.warning("could not delete the dropped checkpoint %s: %s", fs_path, exc)
        for group in in_buckets.values():
            failed = storage.delete_folders(group[0][0], [path for _, path in group])
            for path, why in failed.items():
                log.warning("could not delete the dropped checkpoint %s: %s", path, why)

    def enqueue(self, fs: Any, fs_path: str) -> None:
        """What Tune's checkpoint manager calls instead of deleting `fs_path` itself."""
        assert self._queue is not None, "CheckpointDeletions.setup was not called"
        self._queue.put((fs, fs_path))

    def _run(self, jobs: queue.Queue[tuple[Any, str] | None]) -> None:
        """Delete what is queued, a batch at a time, until None. Nothing raises out of a batch
        (`_delete` logs each failure): a dead thread would leave `wait` waiting for ever."""
        while True:
            batch, stop = take_batch(jobs, storage.DELETE_BATCH)
            try:
                if batch:
                    self._delete(batch)
            except Exception as exc:  # space only: the search must go on
                log.warning("could not delete %d dropped checkpoints: %s", len(batch), exc)
            finally:
                for _ in batch:
                    jobs.task_done()
            if stop:
                return

    def wait(self) -> None:
        """Return once every deletion queued so far is done."""
        if self._queue is not None:
            self._queue.join()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Wait for the deletions, then give Tune its own deletion back."""
        from ray.train._internal import checkpoint_manager

        if self._queue is None:
            return
        self.wait()
        if checkpoint_manager._delete_fs_path == self.enqueue:
            checkpoint_manager._delete_fs_path = self._ray_delete
        for _ in range(DELETION_THREADS):
            self._queue.put(None)
        self._queue = None


def take_batch(jobs: queue.Queue[Any], limit: int) -> tuple[list[Any], bool]:
    """The next item of `jobs` (waiting for one) and every item queued behind it, up to
    `limit` in all; and whether the end (None) was taken. None is not counted as a task."""
    batch: list[Any] = []
    item = jobs.get()
    while item is not None:
        batch.append(item)
        if len(batch) >= limit:
            return batch, False
        try:
            item = jobs.get_nowait()
        except queue.Empty:
            return batch, False
    return batch, True


REWRITTEN_IN_PLACE = ("experiment_state",)  # TuneController.save_to_dir: open("w"), no rename


FileState = tuple[int, int, int]  # inode, size, modification time (ns)


def upload_copy(
    folder: str, uploaded: Mapping[str, FileState] | None = None
) -> tuple[str, dict[str, FileState]]:
    """A sibling of `folder` holding what it holds now: hard links (a copy where the file is
    rewritten in place or links fail), hidden files left out, and left out too each file
    whose state is the one `uploaded` gives for its relative path (sent by an earlier
    upload, unchanged since). Returns its path and the state of each file it holds.

    So an experiment snapshot uploads what changed since the last one: the state, the
    searcher's, and the logs of trials that reported, not every ended trial's whole history
    again (a snapshot's cost grew with the job's results so far; RESULTS "Snapshots that
    grow with the job")."""
    uploaded = uploaded or {}
    parent, name = os.path.split(os.path.normpath(folder))
    target = os.path.join(parent, f".{name}-upload-{uuid.uuid4().hex[:8]}")
    os.makedirs(target)
    copied: dict[str, FileState] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_root = os.path.relpath(root, folder)
        out = os.path.join(target, rel_root)
        for file in files:
            if file.startswith("."):  # a save's temporary file, renamed any moment
                continue
            src, dst = os.path.join(root, file), os.path.join(out, file)
            rel = os.path.normpath(os.path.join(rel_root, file))
            try:
                st = os.stat(src)
                state = (st.st_ino, st.st_size, st.st_mtime_ns)
                if uploaded.get(rel) == state:
                    continue
                os.makedirs(out, exist_ok=True)
                if file.startswith(REWRITTEN_IN_PLACE):
                    shutil.copyfile(src, dst)
                else:
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copyfile(src, dst)
            except FileNotFoundError:  # removed since it was listed: not part of this state
                continue
            copied[rel] = state  # a later change (an append) makes it differ: sent again
    return target, copied


def stop_retrying(trial: Any) -> None:
    """Fail `trial` for good on its next start (ray 2.60.0: no public per-trial retry limit,
    so the live trial's `max_failures` is lowered to the failures it already had)."""
    trial.max_failures = trial.run_metadata.num_failures


def check() -> None:
    """Raise RuntimeError naming each private attribute above that this Ray/Optuna lacks.

    Instances are inspected where that is cheap; otherwise the attribute's assignment is looked
    for in the source of the class that sets it.
    """
    from ray.tune.experiment import Trial
    from ray.tune.experimental import output
    from ray.tune.impl.tuner_internal import TunerInternal

    missing = []
    search = OptunaSearch(metric="m", mode="max")
    for attr in ("_ot_trials", "_completed_trials", "_ot_study", "_sampler"):
        if not hasattr(search, attr):
            missing.append(f"ray.tune.search.optuna.OptunaSearch.{attr}")
    frozen = optuna.trial.create_trial(value=0.0, params={}, distributions={})
    if not hasattr(frozen, "_trial_id"):
        missing.append("optuna.trial.FrozenTrial._trial_id")
    from optuna.storages import _cached_storage
    from optuna.storages._rdb import storage as rdb_storage

    if not callable(getattr(rdb_storage, "_create_scoped_session", None)):
        missing.append("optuna.storages._rdb.storage._create_scoped_session")
    from optuna.storages._rdb import models as rdb_models

    wanted = {
        "TrialModel": ("trial_id", "study_id", "state", "find_or_raise_by_id"),
        "TrialParamModel": ("trial_id", "param_name", "param_value", "distribution_json"),
        "TrialUserAttributeModel": ("trial_id", "key", "value_json"),
        "TrialSystemAttributeModel": ("trial_id", "key", "value_json"),
        "TrialIntermediateValueModel": (
            "trial_id",
            "step",
            "intermediate_value",
            "intermediate_value_type",
            "intermediate_value_to_stored_repr",
        ),
    }
    for name, attrs in wanted.items():
        model = getattr(rdb_models, name, None)
        missing += [
            f"optuna.storages._rdb.models.{name}.{a}" for a in attrs if not hasattr(model, a)
        ]
    cached_init = inspect.getsource(_cached_storage._CachedStorage.__init__)
    for attr in ("_backend", "_lock", "_studies", "_trial_id_to_study_id_and_number"):
        if f"self.{attr}" not in cached_init:
            missing.append(f"optuna.storages._CachedStorage.{attr}")
    for attr in ("param_distribution", "unfinished_trial_ids", "last_finished_trial_id", "trials"):
        if not hasattr(_cached_storage._StudyInfo(), attr):
            missing.append(f"optuna.storages._cached_storage._StudyInfo.{attr}")
    if not callable(getattr(_cached_storage._CachedStorage, "_add_trials_to_cache", None)):
        missing.append("optuna.storages._CachedStorage._add_trials_to_cache")
    for attr in ("_set_trial_attr_without_commit", "_get_trials", "check_trial_is_updatable"):
        if not callable(getattr(rdb_storage.RDBStorage, attr, None)):
            missing.append(f"optuna.storages.RDBStorage.{attr}")
    if "self.storage = " not in inspect.getsource(optuna.trial.Trial.__init__):
        missing.append("optuna.trial.Trial.storage")
    if "self._storage = " not in inspect.getsource(optuna.study.Study.__init__):
        missing.append("optuna.study.Study._storage")
    for fn, arg in ((ray.init, "_node_ip_address"), (ray_tune.Tuner.restore, "_resume_config")):
        # ray.init takes its private arguments through **kwargs: look for the name it pops.
        if arg not in inspect.signature(fn).parameters and f'"{arg}"' not in inspect.getsource(fn):
            missing.append(f"{fn.__qualname__}({arg}=...)")
    from ray._private import node as ray_node
    from ray._private import worker as ray_worker

    if not hasattr(ray_worker, "_global_node"):
        missing.append("ray._private.worker._global_node")
    if "self.head = " not in inspect.getsource(ray_node.Node.__init__) or not callable(
        getattr(ray_node.Node, "get_session_dir_path", None)
    ):
        missing.append("ray._private.node.Node.head / get_session_dir_path")
    for name in RAY_ANALYSES:
        if getattr(importlib.import_module(name), "ExperimentAnalysis", None) is not (
            ray_tune.ExperimentAnalysis
        ):
            missing.append(f"{name}.ExperimentAnalysis")
    if "self._fetch_trial_dataframes()" not in inspect.getsource(
        ray_tune.ExperimentAnalysis.__init__
    ):
        missing.append("ray.tune.ExperimentAnalysis._fetch_trial_dataframes")
    if not callable(getattr(ray_tune.ExperimentAnalysis, "_fetch_trial_dataframe", None)):
        missing.append("ray.tune.ExperimentAnalysis._fetch_trial_dataframe")
    from ray.train._internal import checkpoint_manager, session

    if not hasattr(session, "_TrainingResult"):
        missing.append("ray.train._internal.session._TrainingResult")
    from ray.train._internal import storage
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    if "_should_force_sync_up = True" not in inspect.getsource(
        _ExperimentCheckpointManager.on_trial_checkpoint
    ) and not getattr(_ExperimentCheckpointManager.on_trial_checkpoint, "_toxtune", False):
        missing.append("_ExperimentCheckpointManager.on_trial_checkpoint (forced snapshots)")
    if "_upload_to_fs_path," not in inspect.getsource(storage._FilesystemSyncer):
        missing.append("ray.train._internal.storage._FilesystemSyncer: _upload_to_fs_path")
    persist = storage.StorageContext.persist_current_checkpoint
    if not getattr(storage._upload_to_fs_path, "_toxtune", False) and not all(
        text in inspect.getsource(persist)
        for text in ("self._check_validation_file()", "self.checkpoint_fs_path", "__class__(")
    ):
        missing.append("ray.train._internal.storage.StorageContext.persist_current_checkpoint")
    constructor, args = pafs.S3FileSystem(region="us-east-1").__reduce__()
    if not (callable(constructor) and len(args) == 1 and "allow_delayed_open" in args[0]):
        missing.append("pyarrow S3FileSystem.__reduce__ as (constructor, (options,))")
    if not callable(getattr(storage._FilesystemSyncer, "_sync_up_command", None)):
        missing.append("ray.train._internal.storage._FilesystemSyncer._sync_up_command")
    if "cmd, kwargs = self._current_cmd" not in inspect.getsource(storage._FilesystemSyncer.retry):
        missing.append("_FilesystemSyncer.retry running a (function, kwargs) sync command")
    from ray.train._internal.syncer import _BackgroundSyncer  # the base, never patched
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    if "self.run_metadata.update_metric(" not in inspect.getsource(Trial.update_last_result):
        missing.append("ray.tune.experiment.Trial.update_last_result: run_metadata.update_metric")
    if not callable(getattr(_TrainingRunMetadata, "update_metric", None)):
        missing.append("ray.tune.trainable.metadata._TrainingRunMetadata.update_metric")
    getstate = inspect.getsource(_BackgroundSyncer.__getstate__)
    if "self.__dict__.copy()" not in getstate:  # state_without_notes edits the copy it returns
        missing.append("ray.train._internal.syncer._BackgroundSyncer.__getstate__")

    run_source = inspect.getsource(importlib.import_module("ray.tune.tune").run)
    handler_at = run_source.find("_setup_signal_catching()")
    if not 0 <= handler_at < run_source.find("TuneController("):
        missing.append("ray.tune.tune.run: _setup_signal_catching() before TuneController(")
    if "_delete_fs_path(fs=" not in inspect.getsource(
        checkpoint_manager._CheckpointManager.register_checkpoint
    ) or not callable(getattr(storage, "_delete_fs_path", None)):
        missing.append("ray.train._internal.checkpoint_manager: _delete_fs_path(fs=, fs_path=)")
    if "self._latest_checkpoint_result" not in inspect.getsource(checkpoint_manager):
        missing.append("ray.train._internal.checkpoint_manager: _latest_checkpoint_result")
    for where, text in (
        (TunerInternal.__init__, "self._run_config"),
        (ray_tune.Tuner.__init__, "self._local_tuner"),
        (Trial.__init__, "self.max_failures"),
        (output, "_progress_metrics"),
    ):
        if text not in inspect.getsource(where):
            missing.append(f"{getattr(where, '__qualname__', where.__name__)}: {text}")
    if missing:
        raise RuntimeError(
            f"toxtune was written against {CHECKED_VERSIONS}; this ray {ray.__version__} / "
            f"optuna {optuna.__version__} lacks: {', '.join(missing)} (see tune/bridge.py)"
        )
