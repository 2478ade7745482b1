"""Fault injection for drills and tests: a trial hook that raises, diverges, slows or kills.

Normal runs carry no hook: `run_job(job)` trains plain trials. A drill passes a `FaultPlan`
(`run_job(job, faults=plan)`, or `TOXTUNE_FAULT_PLAN` JSON read by the `toxtune` entry point).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from toxmodel.train import EpochResult


@dataclass(frozen=True)
class FaultPlan:
    """Chaos hooks; keys are trial positions in sampling order (0 = the job's first trial)."""

    raise_in: frozenset[int] = frozenset()  # raise a plain exception at epoch 2
    diverge_in: frozenset[int] = frozenset()  # poison the weights with NaN after epoch 1
    slow_epochs_s: float = 0.0  # sleep per epoch, to widen windows for kill tests
    oom_below_share: float = 0.0  # raise CUDA OOM while the trial's GPU share is below this
    kill_in: frozenset[int] = frozenset()  # SIGKILL the trial's own worker process at epoch 2
    marker_dir: str = ""  # kill_in fires once per trial: a marker file here records the kill

    @classmethod
    def from_env(cls) -> FaultPlan | None:
        """A plan from $TOXTUNE_FAULT_PLAN (JSON), for drills through the CLI; else None."""
        raw = os.environ.get("TOXTUNE_FAULT_PLAN")
        if not raw:
            return None
        spec = json.loads(raw)
        for key in ("raise_in", "diverge_in", "kill_in"):
            if key in spec:
                spec[key] = frozenset(spec[key])
        return cls(**spec)

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) != f.default for f in fields(self))

    def on_start(self, index: int, share: float) -> None:
        """Before training: an out-of-memory error while the GPU share is too small."""
        if share < self.oom_below_share:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at GPU share {share})")

    def on_epoch(self, index: int, epoch: EpochResult, trial_id: str) -> None:
        """After an epoch was reported: slow down, raise, kill the worker or poison weights."""
        if self.slow_epochs_s:
            time.sleep(self.slow_epochs_s)
        if index in self.raise_in and epoch.epoch >= 2:
            raise RuntimeError(f"injected fault in trial {trial_id}")
        if index in self.kill_in and epoch.epoch == 2:
            marker = Path(self.marker_dir or tempfile.gettempdir()) / f"toxtune-killed-{index}"
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        if index in self.diverge_in and epoch.epoch == 1:
            with torch.no_grad():
                for p in epoch.model.parameters():
                    p.fill_(float("nan"))
