"""How the search survives failed trials: retry only what a retry can fix, and stop the job
once too many trials have failed for good."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from ray import tune as ray_tune

from tune.bridge import stop_retrying
from tune.resources import classify_failure, is_retryable, last_error, next_gpu_share
from tune.trainable import ABORT_KEY

log = logging.getLogger(__name__)


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
            stop_retrying(trial)
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

    def spent(self) -> str:
        """Why the budget stopped the search, in the words the end-of-job report and the job's
        MLflow run use; "" while it has not."""
        if not self.stop_all():
            return ""
        kinds = Counter(self.failed.values()).most_common()
        said = ", ".join(f"{n} {kind}" for kind, n in kinds)
        return (
            f"the error budget (faults.max_failed_trials = {self.limit}) was spent: "
            f"{len(self.failed)} trials failed for good ({said})"
        )


class PendingWatch(ray_tune.Callback, ray_tune.Stopper):
    """Stop the job when no trial has started within `limit_s` while trials wait for resources.

    On a cluster, pending can be legitimate for a while (the autoscaler adds nodes), so this is
    a bound, not a check; `problem` then names what the trials asked for and what the cluster
    has, for the error the search raises.
    """

    def __init__(self, limit_s: float, asked: str) -> None:
        self.limit_s = limit_s
        self.asked = asked
        self.since: float | None = None
        self.started = False
        self.problem = ""

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.started or self.problem:
            return
        if any(t.status != "PENDING" for t in trials):
            self.started = True
            return
        now = time.monotonic()
        self.since = self.since if self.since is not None else now
        if trials and now - self.since > self.limit_s:
            import ray

            have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            self.problem = (
                f"no trial started within {self.limit_s:.0f} s (resources.pending_timeout_s): "
                f"each trial asks for {self.asked}, the cluster has {have or 'no CPUs/GPUs'} "
                "in all. Lower --cpus-per-trial/--gpus-per-trial, or add nodes"
            )
            log.error(self.problem)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return bool(self.problem)
