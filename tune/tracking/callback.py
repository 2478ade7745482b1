"""Trial runs: a Ray Tune callback in the driver logs each trial as a child of the job's run.

Contract: one MLflow run per trial (a retried or resumed trial continues its own run, found by
tag), tagged with its status (`toxtune.status` = running | retrying | finished | early_stopped |
failed, or killed by `close_orphans`), its node and device, its error text when it fails, and
the job's dataset as an input. Each epoch logs the headline metrics, the ones without a `/`
(`train_loss`, `val_loss`, `val_roc_auc`, `val_pr_auc`, `best_val_roc_auc`, `lr`,
`epoch_seconds`, ...); the per-task scores (`val_roc_auc/<task>`, ...) are logged once, when the
trial ends, from its best epoch's row at that epoch's step, so the chart view opens on the
headline curves and a 617-task job writes 10 rows an epoch instead of 1,244.

Trials on other nodes need neither MLflow access nor the driver's disk: all logging happens
here, in the driver.

Resilience: every MLflow call goes through an ordered buffer. When the server is unreachable
(connection refused, timeout, 5xx) the operation stays queued and is replayed on later hooks
(`on_step_end` runs every loop step) and, with a deadline, at `on_experiment_end`; so a server
restart mid-job loses no result. Replays are safe because every operation is idempotent: metrics
carry the timestamp taken when the result arrived (MLflow drops exact duplicates), params are
logged only when missing, dataset inputs are deduplicated by MLflow, runs are looked up by tag
before one is made. MLflow's own HTTP retries are turned down meanwhile
(`backend.fast_fail_http`).
"""

from __future__ import annotations

import logging
import numbers
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from ray import tune as ray_tune

from tune.resources import classify_failure, last_error
from tune.tracking.backend import (
    MAX_BACKOFF_S,
    client_for,
    fast_fail_http,
    is_transient,
    server_alive,
)
from tune.tracking.names import KIND_TAG, PARENT_TAG, STATUS_TAG, TRIAL_TAG, flat_params, safe_key
from tune.tracking.provenance import DatasetInfo, log_dataset, source_tags
from tune.tracking.runs import log_params

log = logging.getLogger(__name__)

METRIC_PREFIXES = ("train_", "val_", "best_")
EXTRA_METRICS = ("lr", "epoch_seconds")
RESULT_TAGS = ("node_ip", "node_id", "device", "gpu_ids", "gpu_fraction")
FLUSH_AT_END_S = 120.0
BATCH = 1000  # MLflow's limit on metrics per log_batch
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def trial_ending(last: Mapping[str, Any], max_epochs: int) -> tuple[str, str, int]:
    """(status, finished_reason, epochs run) of a trial that completed, from its last result.

    `finished`: it stopped itself (max_epochs, patience); `early_stopped`: the scheduler did.
    """
    reason = str(last.get("finished_reason") or "")
    epochs = int(last.get("training_iteration", 0) or 0)
    if not reason and max_epochs and epochs >= max_epochs:
        reason = "max_epochs"
    return ("finished" if reason else "early_stopped"), reason, epochs


def result_metrics(result: Mapping[str, Any], step: int, now: int) -> list[Metric]:
    """The numeric metrics of a Tune result (booleans, ids and bookkeeping left out)."""
    return [
        Metric(safe_key(k), float(v), now, step)
        for k, v in result.items()
        if isinstance(k, str)
        and (k.startswith(METRIC_PREFIXES) or k in EXTRA_METRICS)
        and isinstance(v, numbers.Real)
        and not isinstance(v, bool | np.bool_)
    ]


def is_best_row(result: Mapping[str, Any]) -> bool:
    """The trial's best epoch so far (the checkpointed one): `epoch == best_epoch` as the
    trainable reports them; a trainable that reports no `best_epoch` counts its latest row."""
    return "best_epoch" not in result or result.get("best_epoch") == result.get("epoch")


def _error_summary(text: str) -> str:
    """The exception line of a traceback (its last unindented line), for a tag."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if not line[:1].isspace() and not line.startswith(("Traceback", "Failure # ")):
            return line.strip()
    return lines[-1].strip() if lines else "unknown error"


@dataclass
class _Op:
    what: str
    fn: Callable[[], None]
    attempts: int = 0


class MlflowTrialCallback(ray_tune.Callback):
    """Logs each trial as a child run of the job's parent run, from the driver.

    Child runs are tagged `mlflow.parentRunId` and `toxtune.trial_id`. A completed trial counts
    as finished when its last result has a `finished_reason` or reached `max_epochs`; otherwise
    the scheduler stopped it early. `dataset` (see `provenance.dataset_info`) is logged as the
    input of the parent run when the search starts and of every trial run.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        parent_run_id: str,
        max_epochs: int,
        dataset: DatasetInfo | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment  # informational: children go to the parent's experiment
        self.parent_run_id = parent_run_id
        self.max_epochs = max_epochs
        self.dataset = dataset
        self.dropped: list[str] = []  # operations MLflow refused for good (logged as warnings)
        self.deferrals = 0  # times an operation waited for an unreachable server
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}
        self._status: dict[str, str] = {}
        self._tagged: set[str] = set()
        self._best: dict[str, list[Metric]] = {}  # trial -> per-task metrics of its best row
        # trial -> the last step its run holds: a restored trial's older steps are not re-logged
        self._logged: dict[str, int] = {}
        self._queue: deque[_Op] = deque()
        self._retry_at = 0.0
        self._backoff = 1.0

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks with the experiment; the client and queue stay behind."""
        state = self.__dict__.copy()
        state.update(_client=None, _queue=deque())
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    @property
    def pending(self) -> int:
        """Operations waiting for the server."""
        return len(self._queue)

    # -- the buffer ---------------------------------------------------------------------------

    def _submit(self, what: str, fn: Callable[[], None]) -> None:
        self._queue.append(_Op(what, fn))
        self.flush()

    def flush(self, timeout_s: float = 0.0) -> bool:
        """Replay queued operations in order; True when none is left.

        With `timeout_s` 0 it makes one attempt (skipped while backing off) and returns; with
        more it keeps retrying, with backoff, until the queue is empty or the time is up.
        """
        end = time.monotonic() + timeout_s
        while self._queue:
            if self._retry_at > end:
                return False
            time.sleep(max(0.0, self._retry_at - time.monotonic()))
            op = self._queue[0]
            try:
                with fast_fail_http():
                    op.fn()
            except Exception as exc:
                if is_transient(exc):
                    alive = server_alive(self.tracking_uri)
                    op.attempts += alive  # a dead server is no fault of the operation
                    if not alive or op.attempts < 5:
                        self.deferrals += 1
                        self._retry_at = time.monotonic() + self._backoff
                        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
                        log.warning(
                            "MLflow unavailable (%s); %d operations buffered",
                            exc,
                            len(self._queue),
                        )
                        continue
                log.warning("MLflow refused %s: %s", op.what, exc)
                self.dropped.append(f"{op.what}: {exc}")
            self._queue.popleft()
            self._backoff = 1.0
            self._retry_at = 0.0
        return True

    # -- runs ---------------------------------------------------------------------------------

    def _exp_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self.client.get_run(self.parent_run_id).info.experiment_id
        return self._experiment_id

    def _run_id(self, trial: Any) -> str:
        """The trial's child run: found by tag (retried/resumed trials) or created once."""
        trial_id = str(trial.trial_id)
        if trial_id in self._runs:
            return self._runs[trial_id]
        found = self.client.search_runs(
            [self._exp_id()],
            filter_string=(
                f"tags.`{TRIAL_TAG}` = '{trial_id}' "
                f"and tags.`{PARENT_TAG}` = '{self.parent_run_id}'"
            ),
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        if found:
            run_id, status = found[0].info.run_id, found[0].info.status
            history = self.client.get_metric_history(run_id, "train_loss")
            self._logged[trial_id] = max((m.step for m in history), default=0)
        else:
            tags = {
                **source_tags(),
                PARENT_TAG: self.parent_run_id,
                TRIAL_TAG: trial_id,
                KIND_TAG: "trial",
                STATUS_TAG: "running",
                "toxtune.trial_name": str(trial),
            }
            run = self.client.create_run(self._exp_id(), run_name=trial_id, tags=tags)
            run_id, status = run.info.run_id, run.info.status
        config = {k: v for k, v in dict(trial.config).items() if not str(k).startswith("_")}
        log_params(self.client, run_id, flat_params(config))
        if self.dataset is not None:
            log_dataset(self.client, run_id, self.dataset)
        self._runs[trial_id] = run_id
        self._status[trial_id] = status
        return run_id

    def _open(self, trial: Any) -> None:
        run_id = self._run_id(trial)
        if self._status.get(trial.trial_id) != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
            self._status[trial.trial_id] = "RUNNING"
        self.client.set_tag(run_id, STATUS_TAG, "running")

    def _log_metrics(self, run_id: str, metrics: list[Metric], tags: list[RunTag]) -> None:
        size = BATCH - len(tags)
        for i in range(0, max(len(metrics), 1), size):
            chunk = metrics[i : i + size]
            if chunk or (tags and i == 0):
                self.client.log_batch(run_id, metrics=chunk, tags=tags if i == 0 else [])

    def _close(self, trial: Any, status: str, tags: dict[str, str]) -> None:
        """Log the best row's per-task scores (once), the ending tags, and end the run."""
        run_id = self._run_id(trial)
        self._log_metrics(run_id, self._best.get(trial.trial_id, []), [])
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(run_id, status)
        self._status[trial.trial_id] = status
        self._best.pop(trial.trial_id, None)

    # -- Tune hooks ---------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        """The search starts: the parent run gets the dataset input now, not only at the end."""
        dataset = self.dataset
        if dataset is not None:
            self._submit(
                "dataset of the job run",
                lambda: log_dataset(self.client, self.parent_run_id, dataset),
            )

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._tagged.discard(trial.trial_id)  # a retry may run on another node
        self._submit(f"start {trial.trial_id}", lambda: self._open(trial))

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._tagged.discard(trial.trial_id)
        self._submit(f"restore {trial.trial_id}", lambda: self._open(trial))

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        step = int(result.get("training_iteration", 0))
        now = int(time.time() * 1000)  # fixed now, so a replay is an exact (dropped) duplicate
        per_task = {k: v for k, v in result.items() if "/" in str(k)}
        headline = result_metrics({k: v for k, v in result.items() if k not in per_task}, step, now)
        if is_best_row(result):
            self._best[trial.trial_id] = result_metrics(per_task, step, now)
        tags: list[RunTag] = []
        if trial.trial_id not in self._tagged:
            tags = [RunTag(k, str(result[k])[:500]) for k in RESULT_TAGS if k in result]
            self._tagged.add(trial.trial_id)

        def op() -> None:
            run_id = self._run_id(trial)
            # A step logged before the trial was restored is not logged twice.
            seen = step <= self._logged.get(trial.trial_id, 0)
            self._log_metrics(run_id, [] if seen else headline, tags)
            self._logged[trial.trial_id] = max(step, self._logged.get(trial.trial_id, 0))

        self._submit(f"result {trial.trial_id}#{step}", op)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A failed attempt that Tune will retry: its error is kept, the run stays open."""
        text = _ANSI.sub("", last_error(trial)) or "unknown error (no error file)"
        attempt = int(trial.run_metadata.num_failures)
        tags = {
            STATUS_TAG: "retrying",
            "toxtune.retries": str(attempt),
            "toxtune.last_failure_kind": classify_failure(text),
        }

        def op() -> None:
            run_id = self._run_id(trial)
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.log_text(run_id, text, f"errors/attempt-{attempt}.txt")

        self._submit(f"recover {trial.trial_id}", op)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status, reason, epochs = trial_ending(trial.last_result or {}, self.max_epochs)
        tags = {STATUS_TAG: status, "toxtune.epochs": str(epochs)}
        if reason:
            tags["toxtune.finished_reason"] = reason
        self._submit(f"complete {trial.trial_id}", lambda: self._close(trial, "FINISHED", tags))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """The trial failed for good: run FAILED, error tags and the full error text."""
        latest = _ANSI.sub("", last_error(trial)) or "unknown error (no error file)"
        full = latest
        path = getattr(trial, "error_file", None)
        if path and Path(path).is_file():
            full = _ANSI.sub("", Path(path).read_text(encoding="utf-8", errors="replace")) or latest
        attempt = int(trial.run_metadata.num_failures)
        tags = {
            STATUS_TAG: "failed",
            "toxtune.error": _error_summary(latest)[:500],
            "toxtune.failure_kind": classify_failure(latest),
            "toxtune.retries": str(max(attempt - 1, 0)),
        }

        def op() -> None:
            run_id = self._run_id(trial)
            self.client.log_text(run_id, full, "error.txt")
            self.client.log_text(run_id, latest, f"errors/attempt-{attempt}.txt")
            self._close(trial, "FAILED", tags)

        self._submit(f"error {trial.trial_id}", op)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self._queue:
            self.flush()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if not self.flush(timeout_s=FLUSH_AT_END_S):
            log.error(
                "MLflow at %s stayed unreachable: %d trial updates were not logged",
                self.tracking_uri,
                len(self._queue),
            )
