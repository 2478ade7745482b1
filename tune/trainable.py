"""The Ray Tune trainable: one trial trains one `toxmodel` MLP in one process (reused by the next).

The featurized data arrives once through Ray's object store (`tune.with_parameters`; in a job
the matrices themselves travel as the reference the driver shared, `tune.shared`); a trial
never reads the CSV or runs RDKit. Its arrays are read-only views of the node's shared store,
and training reads them in place (`toxmodel.train`), so trials on one node share one copy of
the feature matrix; only the molecules' matrices travel (see `TrialData`).

Each epoch is reported to Tune with its metrics and a checkpoint holding the best epoch's model
so far (`model.pt`, what finalize reads) and the whole training state (`train_state.pt`): a
trial restored after its driver or node died continues from the epoch after its checkpoint, as
if uninterrupted, and never reports an epoch twice.

A k-fold job (`search.folds` > 1, `TrialData.folds`) trains the configuration on the k folds at
once (`toxmodel.folds.fit_folds`) and reports the mean over folds (`_train_folds`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray
import torch
from ray import tune as ray_tune

from toxmodel.checkpoint import save_ensemble
from toxmodel.featurize import DescriptorScaler, Features, FeaturizerConfig
from toxmodel.folds import Folds, FoldScores, fit_folds
from toxmodel.model import MLP, ModelConfig
from toxmodel.split import Split
from toxmodel.train import EpochResult, TrainConfig, fit, load_train_state, save_train_state
from tune import outage, settings
from tune.bridge import PROGRESS_FILE
from tune.shared import with_matrices
from tune.space import to_run_configs

CHECKPOINT_FILE = "model.pt"
STATE_FILE = "train_state.pt"  # beside model.pt: where the trial's training stood
FOLDS_FILE = "folds.json"  # beside model.pt in a k-fold trial's: the epochs it reported so far
# Beside model.pt in every checkpoint: the trial's best report so far (`BestReport`), the row
# its record shows, read there instead of among all its results (tune.trials).
BEST_ROW_FILE = "best_row.json"
FOLD_KEY = "val_roc_auc_fold"  # `val_roc_auc_fold/<i>`: fold i's score in a k-fold trial's epoch
# In a restored trial's first report: its epochs before the checkpoint's, as JSON rows of
# headline metrics, so the driver logs the ones a killed driver never sent (tracking.callback).
EARLIER_EPOCHS = "earlier_epochs"
# The score a trial is ranked by: the searcher, ASHA and the records maximise it (tune.study).
SCORE = "best_val_roc_auc"
ABORT_KEY = "_toxtune_abort"  # set by the retry policy on a trial that must not be retried


class NonRetryableTrialError(RuntimeError):
    """Re-raised at once when a trial that failed for a non-retryable reason is restarted."""


class TrialHook(Protocol):
    """Called by a trial at its start and after each reported epoch (drills inject faults so)."""

    def on_start(self, index: int, share: float) -> None: ...

    def on_epoch(self, index: int, epoch: EpochResult, trial_id: str) -> None: ...


@dataclass
class TrialData:
    """Everything a trial needs, shipped once through the object store."""

    features: Features
    labels: np.ndarray  # float32 (n_valid, n_tasks), aligned with features rows
    split: Split
    tasks: list[str]
    featurizer: FeaturizerConfig
    max_epochs: int
    patience: int
    seed: int
    hooks: tuple[TrialHook, ...] = ()  # none in normal runs; tune.drills.FaultPlan in drills
    # Ray trial id -> study value of the trials the Optuna study already finished. Set on restore
    # after a killed driver: Tune's snapshot can lag the study, and such a trial must not train
    # again (it reports its last epoch, or the study's value, so Tune can complete it).
    finished: Mapping[str, float] = field(default_factory=dict)
    folds: Folds | None = None  # search.folds > 1: train and score on these k folds
    # The matrices' object reference when the driver shared them (`tune.shared`): `features`
    # then holds zero-row matrices and `shared_features` maps the node's copy
    matrices: Any = None

    def __post_init__(self) -> None:
        # A trial trains on the matrices alone. The molecule keys (one Python string per row)
        # and invalid-row reasons would be unpickled privately in every trial (about 100 MB of
        # strings per trial at 10^6 molecules), unlike the arrays, which stay in shared memory.
        if self.features.canonical is not None or self.features.invalid:
            self.features = replace(self.features, canonical=None, invalid=[])

    def shared_features(self) -> Features:
        """The features with their matrices: read in place from the object store when shared."""
        if self.matrices is None:
            return self.features
        return with_matrices(self.features, self.matrices)


def trial_device() -> tuple[str, str, float]:
    """(torch device, Ray-assigned GPU ids, GPU share) for this trial's process."""
    resources = ray.get_runtime_context().get_assigned_resources()
    share = float(resources.get("GPU", 0.0))
    ids = [str(i) for i in ray.get_gpu_ids()]
    device = "cuda:0" if ids and torch.cuda.is_available() else "cpu"
    return device, ",".join(ids), share


def cpu_threads() -> int:
    """Torch threads = the CPUs Ray gave this trial (at least one)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def train_trial(config: dict[str, Any], data: TrialData) -> None:
    """Train one configuration, reporting every epoch to Tune."""
    if config.get(ABORT_KEY):
        raise NonRetryableTrialError(str(config[ABORT_KEY]))
    context = ray_tune.get_context()
    settings.configure_trial_process()
    index = int(config.get("_index", -1))
    device, gpu_ids, share = trial_device()
    model_config, train_config = to_run_configs(
        config, max_epochs=data.max_epochs, patience=data.patience, seed=data.seed
    )
    node = ray.get_runtime_context()
    static = {
        "device": device,
        "gpu_ids": gpu_ids,
        "gpu_fraction": share,
        "node_id": node.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        "trial_index": index,
    }
    best = {"roc_auc": float("-inf"), "epoch": 0}
    started = time.time()
    trial_id = context.get_trial_id()
    for hook in data.hooks:
        hook.on_start(index, share)

    kept = BestReport(_restored_file(BEST_ROW_FILE, lambda path: json.loads(path.read_text())))

    def report(
        epoch: dict[str, Any], reason: str, checkpoint_dir: str | None = None, **extra: Any
    ) -> None:
        """Report `epoch` to Tune; with `checkpoint_dir` (its files written) as its checkpoint,
        which also gets the trial's best report so far."""
        metrics: dict[str, Any] = {
            "epoch": epoch["epoch"],
            "train_loss": epoch["train_loss"],
            **{k: v for k, v in epoch.items() if k.startswith("val_")},
            SCORE: best["roc_auc"],
            "best_epoch": best["epoch"],
            "lr": epoch["lr"],
            "epoch_seconds": epoch["seconds"],
            "finished_reason": reason,
            "trial_started_at": started,
            "reported_at": time.time(),
            **static,
            **extra,
        }
        kept.offer(metrics)
        checkpoint = None
        if checkpoint_dir is not None:
            kept.write(Path(checkpoint_dir) / BEST_ROW_FILE)
            checkpoint = ray_tune.Checkpoint.from_directory(checkpoint_dir)
        # An unreachable results store is waited out (tune.outage), not a failed trial.
        outage.report_waiting(lambda: ray_tune.report(dict(metrics), checkpoint=checkpoint))

    if data.folds is not None:
        _train_folds(data, model_config, train_config, device, report, best, trial_id, index)
        return
    resume = restored_state()
    if resume is not None:
        # Restored one iteration before its checkpoint's epoch (tune.bridge.NewestCheckpoint):
        # that epoch is reported again, as it was, in case its first report was lost, with the
        # epochs before it for the MLflow run (their results may have died with the driver).
        best.update(roc_auc=float(resume["best_valid"]["roc_auc"]), epoch=resume["best_epoch"])
        earlier = json.dumps(earlier_epochs(resume["history"][:-1]))
        report(resume["history"][-1], str(resume["stop_reason"]), **{EARLIER_EPOCHS: earlier})
    if trial_id in data.finished:
        # The study finished this trial after Ray's last snapshot: it does not train again, and
        # Tune completes it with the last result it got (the study's value when it has none).
        if resume is None:
            ray_tune.report(
                {"best_val_roc_auc": data.finished[trial_id], "finished_reason": "restored"}
            )
        return

    def on_epoch(epoch: EpochResult) -> bool:
        if epoch.is_best:
            best.update(roc_auc=epoch.valid.roc_auc, epoch=epoch.epoch)
        row = {
            "epoch": epoch.epoch,
            "train_loss": epoch.train_loss,
            **epoch.valid.flat("val"),
            "lr": epoch.lr,
            "seconds": epoch.seconds,
        }
        assert epoch.state is not None
        with tempfile.TemporaryDirectory() as tmp:
            epoch.checkpoint(Path(tmp) / CHECKPOINT_FILE, extra={"trial_id": trial_id}, best=True)
            save_train_state(Path(tmp) / STATE_FILE, epoch.state())
            (Path(tmp) / PROGRESS_FILE).write_text(json.dumps({"epoch": epoch.epoch}))
            report(row, epoch.stop_reason, tmp)
        for hook in data.hooks:
            hook.on_epoch(index, epoch, trial_id)
        return False

    fit(
        data.shared_features(),
        data.labels,
        data.split,
        data.tasks,
        model_config,
        train_config,
        device=device,
        callback=on_epoch,
        num_threads=cpu_threads(),
        resume=resume,
    )


def earlier_epochs(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """Training history rows as the epochs' own reports named their headline metrics (no
    per-task scores), with the running `best_val_roc_auc`."""
    rows, best = [], float("-inf")
    for h in history:
        roc_auc = float(h.get("val_roc_auc", float("nan")))
        best = max(best, roc_auc) if np.isfinite(roc_auc) else best
        row = {k: float(v) for k, v in h.items() if k.startswith("val_") and "/" not in k}
        row.update(
            epoch=int(h["epoch"]),
            train_loss=float(h["train_loss"]),
            lr=float(h["lr"]),
            epoch_seconds=float(h["seconds"]),
        )
        if np.isfinite(best):
            row["best_val_roc_auc"] = best
        rows.append(row)
    return rows


class BestReport:
    """A trial's best report so far: the first with the highest `SCORE` (the row
    Ray's analysis picks among all results with the job's metric and mode), kept in each
    checkpoint so the trial's record is read from one small file at any number of epochs."""

    def __init__(self, restored: dict[str, Any] | None = None) -> None:
        self.row = restored

    def offer(self, metrics: dict[str, Any]) -> None:
        value = float(metrics.get(SCORE, math.nan))
        if math.isnan(value):
            return
        if self.row is None or value > float(self.row[SCORE]):
            self.row = {k: v for k, v in metrics.items() if k != EARLIER_EPOCHS}

    def write(self, path: Path) -> None:
        if self.row is not None:
            path.write_text(json.dumps(self.row))


def restored_state() -> dict[str, Any] | None:
    """The training state of the checkpoint Tune restored this trial from, if any."""
    return _restored_file(STATE_FILE, load_train_state)


def _restored_file(name: str, read: Callable[[Path], Any]) -> Any:
    """`read` of the file `name` in the checkpoint Tune restored this trial from; None when
    the trial was not restored or that checkpoint has no such file."""
    checkpoint = ray_tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / name
        return read(path) if path.is_file() else None


def _train_folds(
    data: TrialData,
    model_config: ModelConfig,
    train_config: TrainConfig,
    device: str,
    report: Any,
    best: dict[str, Any],
    trial_id: str,
    index: int,
) -> None:
    """Train one configuration on the k folds of `data.folds` at once, reporting every epoch.

    Reported: `val_roc_auc` the mean over folds of this epoch's score (a fold that stopped
    early counts with its best), `val_roc_auc_std` their spread, `val_roc_auc_fold/<i>` each
    fold's; the other `val_*` metrics are means over folds likewise, `train_loss` the mean over
    the folds that trained; `best_val_roc_auc` is `FoldScores.best_mean`, the mean of the folds'
    best scores: the score of the k fold models kept, which is what the searcher sees and what
    each checkpoint's `model.pt` holds (the k models as one ensemble, each with its own
    descriptor scaler); `best_epoch` the last epoch that changed one of them.

    Restore: `fit_many` cannot continue a fused run from saved optimiser states, so a k-fold
    trial restored from a checkpoint of epoch E reports epoch E again as it was (Tune restores
    one iteration before it, see `tune.bridge.NewestCheckpoint`; its earlier epochs travel
    with it for MLflow, as in a plain trial), then trains again from epoch 1 and reports from
    epoch E + 1 on: epochs 1..E are replayed without reports, so none is reported twice. The
    replay costs E epochs, and it continues the interrupted run exactly only where training is
    deterministic (on the CPU it is: same seeds, same order); on a GPU the epochs after E may
    differ slightly from those the uninterrupted run would have given.
    """
    assert data.folds is not None
    k = data.folds.k
    rows: list[dict[str, Any]] = []
    done = 0
    restored = restored_fold_state()
    if restored is not None:
        rows = list(restored["rows"])
        done = int(rows[-1]["epoch"])
        best.update(roc_auc=float(restored["best_val_roc_auc"]), epoch=restored["best_epoch"])
        earlier = json.dumps(earlier_epochs(rows[:-1]))
        report(rows[-1], str(restored["reason"]), **{EARLIER_EPOCHS: earlier})
    if trial_id in data.finished:
        if restored is None:
            ray_tune.report(
                {"best_val_roc_auc": data.finished[trial_id], "finished_reason": "restored"}
            )
        return
    if restored is not None and restored["reason"]:
        return  # its last epoch was reported: every fold had stopped
    kept: dict[int, tuple[MLP, DescriptorScaler | None, int]] = {}
    kept_valid: dict[int, dict[str, float]] = {}
    now_valid: dict[int, dict[str, float]] = {}

    def on_epoch(scores: FoldScores, results: Mapping[int, EpochResult]) -> None:
        for f, r in results.items():
            now_valid[f] = r.valid.flat("val")
            if r.is_best or f not in kept:
                scaler = r.context.scaler if r.context is not None else None
                kept[f] = (copy.deepcopy(r.model).cpu().eval(), scaler, r.epoch)
                kept_valid[f] = now_valid[f]
        if scores.epoch <= done:
            return  # replayed after a restore: reported before it
        if math.isfinite(scores.best_mean) and scores.best_mean > best["roc_auc"]:
            best.update(roc_auc=scores.best_mean, epoch=scores.epoch)
        row = fold_row(
            scores, results, [now_valid[f] if f in results else kept_valid[f] for f in range(k)]
        )
        reason = fold_stop_reason(scores, results)
        rows.append(row)
        first = next(iter(results.values()))
        with tempfile.TemporaryDirectory() as tmp:
            save_folds_checkpoint(
                Path(tmp) / CHECKPOINT_FILE,
                first,
                [kept[f] for f in range(k)],
                {"trial_id": trial_id, "epoch": best["epoch"], "val_roc_auc": scores.best_mean},
            )
            state = {
                "rows": rows,
                "best_val_roc_auc": best["roc_auc"],
                "best_epoch": best["epoch"],
                "reason": reason,
            }
            (Path(tmp) / FOLDS_FILE).write_text(json.dumps(state))
            (Path(tmp) / PROGRESS_FILE).write_text(json.dumps({"epoch": scores.epoch}))
            report(row, reason, tmp)
        for hook in data.hooks:
            hook.on_epoch(index, first, trial_id)

    fit_folds(
        data.shared_features(),
        data.labels,
        data.folds,
        data.tasks,
        model_config,
        train_config,
        device=device,
        callback=on_epoch,
        num_threads=cpu_threads(),
    )


def fold_row(
    scores: FoldScores, results: Mapping[int, EpochResult], valid: list[dict[str, float]]
) -> dict[str, Any]:
    """One k-fold epoch as `report` takes it: means over folds (`valid`: each fold's validation
    metrics of this epoch, or of its best epoch for a fold that stopped), the spread and each
    fold's score."""
    trained = list(results.values())
    row: dict[str, Any] = {
        "epoch": scores.epoch,
        "train_loss": float(np.mean([r.train_loss for r in trained])),
        "lr": float(np.mean([r.lr for r in trained])),
        "seconds": float(max(r.seconds for r in trained)),
    }
    for key in valid[0]:
        values = np.array([v.get(key, np.nan) for v in valid], dtype=np.float64)
        finite = values[np.isfinite(values)]
        row[key] = float(finite.mean()) if finite.size else float("nan")
    row["val_roc_auc"] = scores.mean
    row["val_roc_auc_std"] = scores.std
    row.update({f"{FOLD_KEY}/{i}": float(v) for i, v in enumerate(scores.scores)})
    return row


def fold_stop_reason(scores: FoldScores, results: Mapping[int, EpochResult]) -> str:
    """ "" while a fold trains on; once every fold has stopped, max_epochs if one ran out of
    epochs, else early_stopping."""
    going = [
        t and not (f in results and results[f].stop_reason) for f, t in enumerate(scores.training)
    ]
    if any(going):
        return ""
    reasons = {r.stop_reason for r in results.values() if r.stop_reason}
    return "max_epochs" if "max_epochs" in reasons else (min(reasons) if reasons else "max_epochs")


def save_folds_checkpoint(
    path: Path,
    like: EpochResult,
    kept: list[tuple[MLP, DescriptorScaler | None, int]],
    extra: dict[str, Any],
) -> Path:
    """The k fold models kept so far as one ensemble checkpoint, each with its own descriptor
    scaler (fitted on its fold's training rows); one shared None when there are no descriptors."""
    assert like.context is not None
    c = like.context
    scalers = [s for _, s, _ in kept]
    shared = all(s is None for s in scalers)
    return save_ensemble(
        path,
        [(m, m.config) for m, _, _ in kept],
        c.featurizer,
        c.tasks,
        c.n_inputs,
        None,
        extra={**extra, "folds": len(kept), "fold_epochs": [e for _, _, e in kept]},
        member_scalers=None if shared else scalers,
    )


def restored_fold_state() -> dict[str, Any] | None:
    """The reported epochs of the k-fold checkpoint Tune restored this trial from, if any."""
    return _restored_file(FOLDS_FILE, lambda path: json.loads(path.read_text()))
