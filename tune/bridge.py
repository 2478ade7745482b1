"""The one place that touches Ray Tune's and Optuna's private attributes.

Everything here works around a gap in a public API; each use names the versions it was checked
against. `check()` looks every one of them up on the installed versions and raises, naming the
attribute, when an upgrade removed one (a test calls it), so an upgrade fails loudly here instead
of silently somewhere else. Outside this module, `tune/` uses public Ray and Optuna APIs only.

Checked against: ray 2.60.0, optuna 5.0.0.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

import optuna
import ray
from ray import tune as ray_tune
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)

CHECKED_VERSIONS = {"ray": "2.60.0", "optuna": "5.0.0"}
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
        resampler: Callable[[int], optuna.samplers.BaseSampler] | None = None,
        **kwargs: Any,
    ) -> None:
        self._resampler = resampler  # the sampler for a study holding n trials
        super().__init__(*args, **kwargs)

    def restore(self, checkpoint_path: str) -> None:
        """Ray's saved searcher, with a sampler made afresh for the study as it stands: the
        saved one's random state predates trials asked after the last snapshot, and would
        propose their configurations again (OptunaSearch's private `_sampler`)."""
        super().restore(checkpoint_path)
        if self._resampler is not None:
            self._sampler = self._resampler(len(self._ot_study.trials))
            self._ot_study.sampler = self._sampler

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        if params is not None:
            params["_index"] = ot_trial.number
        return params

    def _attach(self, trial_id: str) -> bool:
        """Make sure `trial_id` maps to a still-running Optuna trial; False: don't tell it."""
        if trial_id in self._completed_trials:
            return False
        if trial_id in self._ot_trials:
            number = self._ot_trials[trial_id].number
            if self._ot_study.trials[number].state.is_finished():
                # A driver snapshot older than the study: the trial already finished there.
                self._completed_trials.add(trial_id)
                return False
            return True
        for frozen in self._ot_study.get_trials(deepcopy=False):
            if frozen.user_attrs.get(RAY_TRIAL_ATTR) == trial_id:
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


def with_console_metrics(trainable: Any, names: list[str]) -> Any:
    """Make Tune's console print only `names` per result (ray 2.60.0: the default output engine
    reads a trainable's private `_progress_metrics`, as Ray Train sets it, and ignores a
    ProgressReporter). Per-task metrics still reach Tune's results and MLflow."""
    trainable._progress_metrics = list(names)
    return trainable


def init_local_ray(num_cpus: int | None, num_gpus: int | None, **kwargs: Any) -> None:
    """A private local Ray whose node address is 127.0.0.1 (ray 2.60.0: the private
    `_node_ip_address` argument of ray.init). Its gRPC servers still listen on every interface,
    behind Ray's token authentication: Ray offers no setting that binds them to loopback."""
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        **kwargs,
    )


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
    for fn, arg in ((ray.init, "_node_ip_address"), (ray_tune.Tuner.restore, "_resume_config")):
        # ray.init takes its private arguments through **kwargs: look for the name it pops.
        if arg not in inspect.signature(fn).parameters and f'"{arg}"' not in inspect.getsource(fn):
            missing.append(f"{fn.__qualname__}({arg}=...)")
    from ray.train._internal import checkpoint_manager, session

    if not hasattr(session, "_TrainingResult"):
        missing.append("ray.train._internal.session._TrainingResult")
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
