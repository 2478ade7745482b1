"""The Ray Tune trainable: one trial trains one `toxmodel` MLP in one process (reused by the next).

The featurized data arrives once through Ray's object store (`tune.with_parameters`); a trial
never reads the CSV or runs RDKit. Each epoch is reported to Tune with its metrics, and the
trial's best epoch so far is reported with a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune as ray_tune

from toxmodel.featurize import Features, FeaturizerConfig
from toxmodel.split import Split
from toxmodel.train import EpochResult, fit
from tune.space import to_run_configs

CHECKPOINT_FILE = "model.pt"
ABORT_KEY = "_toxtune_abort"  # set by the retry policy on a trial that must not be retried


class NonRetryableTrialError(RuntimeError):
    """Re-raised at once when a trial that failed for a non-retryable reason is restarted."""


@dataclass(frozen=True)
class FaultPlan:
    """Chaos hooks for fault-injection tests and drills; empty in normal runs.

    Keys are trial positions in sampling order (0 = the first trial of the job).
    """

    raise_in: frozenset[int] = frozenset()  # raise a plain exception at epoch 2
    diverge_in: frozenset[int] = frozenset()  # poison the weights with NaN after epoch 1
    slow_epochs_s: float = 0.0  # sleep per epoch, to widen windows for kill tests
    oom_below_share: float = 0.0  # raise CUDA OOM while the trial's GPU share is below this
    kill_in: frozenset[int] = frozenset()  # SIGKILL the trial's own worker process at epoch 2
    marker_dir: str = ""  # kill_in fires once per trial: a marker file here records the kill

    @classmethod
    def from_env(cls) -> FaultPlan:
        """A plan from $TOXTUNE_FAULT_PLAN (JSON), for drills through the CLI; else none."""
        raw = os.environ.get("TOXTUNE_FAULT_PLAN")
        if not raw:
            return cls()
        spec = json.loads(raw)
        for key in ("raise_in", "diverge_in", "kill_in"):
            if key in spec:
                spec[key] = frozenset(spec[key])
        return cls(**spec)


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
    faults: FaultPlan = field(default_factory=FaultPlan)
    # Ray trial ids the Optuna study already finished. Set on restore after a killed driver:
    # Tune's snapshot can lag the study by a trial, and such a trial must not train again.
    finished: frozenset[str] = frozenset()


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
    if context.get_trial_id() in data.finished:
        return  # Tune then completes it with the result it last recorded
    # Ray logs an INFO line per saved checkpoint; with one per best epoch it floods the console.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
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
    faults = data.faults
    started = time.time()
    if share < faults.oom_below_share:
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at GPU share {share})")

    def on_epoch(epoch: EpochResult) -> bool:
        if faults.slow_epochs_s:
            time.sleep(faults.slow_epochs_s)
        if epoch.is_best:
            best.update(roc_auc=epoch.valid.roc_auc, epoch=epoch.epoch)
        metrics: dict[str, Any] = {
            "epoch": epoch.epoch,
            "train_loss": epoch.train_loss,
            **epoch.valid.flat("val"),
            "best_val_roc_auc": best["roc_auc"],
            "best_epoch": best["epoch"],
            "lr": epoch.lr,
            "epoch_seconds": epoch.seconds,
            "finished_reason": epoch.stop_reason,
            "trial_started_at": started,
            "reported_at": time.time(),
            **static,
        }
        if epoch.is_best:
            with tempfile.TemporaryDirectory() as tmp:
                epoch.checkpoint(
                    Path(tmp) / CHECKPOINT_FILE, extra={"trial_id": context.get_trial_id()}
                )
                ray_tune.report(metrics, checkpoint=ray_tune.Checkpoint.from_directory(tmp))
        else:
            ray_tune.report(metrics)
        if index in faults.raise_in and epoch.epoch >= 2:
            raise RuntimeError(f"injected fault in trial {context.get_trial_id()}")
        if index in faults.kill_in and epoch.epoch == 2:
            marker = Path(faults.marker_dir or tempfile.gettempdir()) / f"toxtune-killed-{index}"
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        if index in faults.diverge_in and epoch.epoch == 1:
            with torch.no_grad():
                for p in epoch.model.parameters():
                    p.fill_(float("nan"))
        return False

    fit(
        data.features,
        data.labels,
        data.split,
        data.tasks,
        model_config,
        train_config,
        device=device,
        callback=on_epoch,
        num_threads=cpu_threads(),
    )
