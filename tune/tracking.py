"""MLflow tracking: one parent run per job, one child run per trial, logged from the driver.

All logging happens here, in a Ray Tune callback that runs in the driver process, so trials on
other nodes need neither MLflow access nor the driver's disk. Every call goes through a small
ordered buffer: when the tracking server is unreachable the operations wait and are replayed
once it answers again, so a server restart mid-job loses no result.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune as ray_tune

from toxmodel.metrics import Metrics
from tune.resources import classify_failure, last_error

log = logging.getLogger(__name__)

JOB_TAG, TRIAL_TAG, STATUS_TAG = "toxtune.job", "toxtune.trial_id", "toxtune.status"
PARENT_TAG = "mlflow.parentRunId"
METRIC_PREFIXES = ("train_", "val_", "best_")
EXTRA_METRICS = ("lr", "epoch_seconds", "epoch")
RESULT_TAGS = ("node_ip", "node_id", "device", "gpu_ids", "gpu_fraction", "pid")


class TrackingError(RuntimeError):
    """The tracking backend cannot be used; raised before any trial runs."""


def configure_http_retries() -> None:
    """Fail fast on a dead server (the buffer retries later) instead of MLflow's long backoff."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def check_tracking(uri: str, timeout: float = 10.0) -> None:
    """Refuse an unreachable tracking server or an unusable SQLite path, with what to do."""
    configure_http_retries()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
                if resp.status == 200:
                    return
                problem = f"HTTP {resp.status}"
        except Exception as exc:
            problem = str(exc)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({problem}); start it "
            "(`mlflow server --host 127.0.0.1 --port 5000 ...`) or pass another --tracking-uri"
        )
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"cannot create the MLflow database folder {path.parent}: {exc}"
            ) from exc
        return
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"tracking URI {uri!r}: MLflow 3's file store is deprecated; use sqlite:///PATH "
            "or http://HOST:PORT"
        )


def artifact_root(uri: str) -> str | None:
    """Where a SQLite backend keeps artifacts: beside the database, never the working dir."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: MlflowClient, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(uri)
    location = f"{Path(root).as_uri()}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    _flatten("", config, out)
    return out


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log params once; a resumed run already holding them is left as it is."""
    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])


def start_job_run(
    uri: str, experiment_name: str, job_key: str, config: dict[str, Any], resume: bool
) -> str:
    """The job's parent run: a new one, or (resume) the same run reopened."""
    client = client_for(uri)
    exp_id = ensure_experiment(client, uri, experiment_name)
    if resume:
        runs = client.search_runs(
            [exp_id], filter_string=f"tags.`{JOB_TAG}` = '{job_key}'", max_results=50
        )
        parents = [r for r in runs if PARENT_TAG not in r.data.tags]
        if parents:
            run_id = parents[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "toxtune.resumed", "true")
            return run_id
    run = client.create_run(
        exp_id, run_name=job_key, tags={JOB_TAG: job_key, "toxtune.kind": "job"}
    )
    _log_params(client, run.info.run_id, flat_params(config))
    client.log_dict(run.info.run_id, config, "config.json")
    return run.info.run_id


def finish_job_run(uri: str, parent_run_id: str, status: str) -> None:
    """End the job run; trial runs still open can no longer continue and are marked KILLED."""
    close_orphans(uri, parent_run_id, keep_trial_ids=set())
    try:
        client_for(uri).set_terminated(parent_run_id, status)
    except Exception as exc:
        log.warning("could not end MLflow run %s: %s", parent_run_id, exc)


def child_runs(client: MlflowClient, parent_run_id: str) -> list[Any]:
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs(
        [exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=5000
    )


def close_orphans(uri: str, parent_run_id: str, keep_trial_ids: set[str]) -> list[str]:
    """Trial runs left RUNNING (by a killed driver) that will not continue become KILLED."""
    client = client_for(uri)
    closed = []
    try:
        for run in child_runs(client, parent_run_id):
            if run.info.status != "RUNNING":
                continue
            if run.data.tags.get(TRIAL_TAG) in keep_trial_ids:
                continue
            client.set_tag(run.info.run_id, STATUS_TAG, "killed")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    except Exception as exc:
        log.warning("could not close orphaned trial runs: %s", exc)
    return closed


def _is_connection_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    needles = ("Connection", "Max retries", "timed out", "Temporary", " 50", "API request")
    return any(n in text for n in needles)


class MlflowTrialCallback(ray_tune.Callback):
    """Logs each trial as a child run of the job's parent run, from the driver."""

    def __init__(self, uri: str, experiment_name: str, parent_run_id: str, max_epochs: int) -> None:
        self.uri, self.experiment_name = uri, experiment_name
        self.parent_run_id, self.max_epochs = parent_run_id, max_epochs
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}
        self._tagged: set[str] = set()
        self._queue: list[tuple[str, Callable[[], None]]] = []
        self.dropped: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _queue=[])
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    def _do(self, what: str, op: Callable[[], None]) -> None:
        self._queue.append((what, op))
        self.flush()

    def flush(self, deadline_s: float = 0.0) -> bool:
        """Replay queued operations in order; True when the queue is empty."""
        end = time.monotonic() + deadline_s
        while self._queue:
            what, op = self._queue[0]
            try:
                op()
            except Exception as exc:
                if _is_connection_error(exc):
                    if time.monotonic() >= end:
                        log.warning("MLflow unreachable; %d operations buffered", len(self._queue))
                        return False
                    time.sleep(2.0)
                    continue
                log.warning("MLflow refused %s: %s", what, exc)
                self.dropped.append(f"{what}: {exc}")
            self._queue.pop(0)
        return True

    def _run_id(self, trial: Any) -> str:
        """The trial's child run: found by tag (resumed/retried trials) or created once."""
        trial_id = trial.trial_id
        if trial_id in self._runs:
            return self._runs[trial_id]
        exp = self.client.get_run(self.parent_run_id).info.experiment_id
        found = self.client.search_runs(
            [exp],
            filter_string=(
                f"tags.`{TRIAL_TAG}` = '{trial_id}' "
                f"and tags.`{PARENT_TAG}` = '{self.parent_run_id}'"
            ),
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            config = {k: v for k, v in trial.config.items() if not k.startswith("_")}
            tags = {
                PARENT_TAG: self.parent_run_id,
                TRIAL_TAG: trial_id,
                "toxtune.trial_index": str(trial.config.get("_index", "")),
                STATUS_TAG: "running",
            }
            run = self.client.create_run(exp, run_name=trial_id, tags=tags)
            run_id = run.info.run_id
            _log_params(self.client, run_id, flat_params(config))
        self._runs[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._do(f"start {trial.trial_id}", lambda: self._start(trial))

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._do(f"restore {trial.trial_id}", lambda: self._start(trial))

    def _start(self, trial: Any) -> None:
        run_id = self._run_id(trial)
        self.client.set_tag(run_id, STATUS_TAG, "running")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        step = int(result.get("training_iteration", 0))
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in result.items()
            if (k.startswith(METRIC_PREFIXES) or k in EXTRA_METRICS)
            and isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(float(v))
        ]
        tags = []
        if trial.trial_id not in self._tagged:
            tags = [RunTag(k, str(result[k])) for k in RESULT_TAGS if k in result]
            self._tagged.add(trial.trial_id)

        def op() -> None:
            run_id = self._run_id(trial)
            for i in range(0, len(metrics), 900):
                self.client.log_batch(
                    run_id, metrics=metrics[i : i + 900], tags=tags if i == 0 else []
                )

        self._do(f"result {trial.trial_id}#{step}", op)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = last_error(trial)
        attempt = trial.run_metadata.num_failures

        def op() -> None:
            run_id = self._run_id(trial)
            self.client.set_tag(run_id, "toxtune.retries", str(attempt))
            self.client.log_text(run_id, text, f"errors/attempt-{attempt}.txt")

        self._do(f"recover {trial.trial_id}", op)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        status = "finished" if last.get("finished_reason") else "early_stopped"

        def op() -> None:
            run_id = self._run_id(trial)
            self.client.set_tag(run_id, STATUS_TAG, status)
            if last.get("finished_reason"):
                self.client.set_tag(run_id, "toxtune.finished_reason", last["finished_reason"])
            self.client.set_terminated(run_id, "FINISHED")

        self._do(f"complete {trial.trial_id}", op)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = last_error(trial) or "unknown error"
        kind = classify_failure(text)

        def op() -> None:
            run_id = self._run_id(trial)
            self.client.set_tag(run_id, STATUS_TAG, "failed")
            self.client.set_tag(run_id, "toxtune.failure_kind", kind)
            self.client.set_tag(run_id, "toxtune.error", text.strip().splitlines()[-1][:500])
            self.client.log_text(run_id, text, "error.txt")
            self.client.set_terminated(run_id, "FAILED")

        self._do(f"error {trial.trial_id}", op)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self._queue:
            self.flush()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if not self.flush(deadline_s=120.0):
            log.error("MLflow stayed unreachable: %d trial updates not logged", len(self._queue))


@dataclass
class JobSummary:
    """What the parent run records once the search is over."""

    n_rows: int
    n_valid: int
    content_hash: str
    source: str
    invalid_report: Path | None
    search_space: dict[str, Any]
    ray_address: str
    cluster: dict[str, float]
    best_trial_id: str
    best_params: dict[str, Any]
    best_valid: dict[str, float]
    test_metrics: Metrics
    trials: pd.DataFrame
    study: Any = None
    roc_data: tuple[np.ndarray, np.ndarray, list[str]] | None = None
    test_seeds: dict[str, float] = field(default_factory=dict)


def log_job_summary(uri: str, parent_run_id: str, summary: JobSummary) -> None:
    """Dataset fingerprint, search space, cluster, best trial, test metrics, tables and plots."""
    client = client_for(uri)
    run = parent_run_id
    tags = {
        "dataset.source": summary.source,
        "dataset.content_hash": summary.content_hash,
        "dataset.rows": str(summary.n_rows),
        "dataset.valid_rows": str(summary.n_valid),
        "dataset.invalid_rows": str(summary.n_rows - summary.n_valid),
        "ray.address": summary.ray_address,
        "ray.nodes": str(int(summary.cluster.get("nodes", 0))),
        "ray.cpus": str(summary.cluster.get("cpus", 0)),
        "ray.gpus": str(summary.cluster.get("gpus", 0)),
        "best_trial_id": summary.best_trial_id,
    }
    client.log_batch(run, tags=[RunTag(k, v) for k, v in tags.items()])
    metrics = {f"best_{k}": v for k, v in summary.best_valid.items()}
    metrics.update(summary.test_metrics.flat("test"))
    metrics.update(summary.test_seeds)
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))]
    for i in range(0, len(batch), 900):
        client.log_batch(run, metrics=batch[i : i + 900])
    client.log_dict(run, summary.search_space, "search_space.json")
    client.log_dict(run, summary.best_params, "best_params.json")
    if summary.invalid_report and Path(summary.invalid_report).exists():
        client.log_artifact(run, str(summary.invalid_report), "dataset")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        summary.trials.to_csv(out / "trials.csv", index=False)
        client.log_artifact(run, str(out / "trials.csv"))
        for name, plot in (
            ("optimization_history.png", _plot_history),
            ("param_importance.png", _plot_importance),
            ("roc_curves.png", _plot_roc),
        ):
            try:
                if plot(summary, out / name):
                    client.log_artifact(run, str(out / name), "plots")
            except Exception as exc:
                log.warning("plot %s skipped: %s", name, exc)


def _complete_trials(study: Any) -> list[Any]:
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def _plot_history(summary: JobSummary, path: Path) -> bool:
    if summary.study is None or not _complete_trials(summary.study):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = _complete_trials(summary.study)
    x = [t.number for t in trials]
    y = [t.value for t in trials]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(x, y, s=16, label="trial")
    ax.plot(x, np.maximum.accumulate(y), color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel="best validation ROC-AUC", title="Optimisation history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_importance(summary: JobSummary, path: Path) -> bool:
    if summary.study is None or len(_complete_trials(summary.study)) < 3:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    importance = optuna.importance.get_param_importances(summary.study)
    if not importance:
        return False
    names, values = zip(*sorted(importance.items(), key=lambda kv: kv[1]), strict=True)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    ax.barh(names, values)
    ax.set(xlabel="importance (fANOVA)", title="Hyperparameter importance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_roc(summary: JobSummary, path: Path) -> bool:
    if summary.roc_data is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p, tasks = summary.roc_data
    cols = 4
    rows = max(1, math.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax, (j, task) in zip(axes.flat, enumerate(tasks), strict=False):
        keep = ~np.isnan(y[:, j])
        if len(set(y[keep, j])) < 2:
            ax.set_title(f"{task}: one class")
            continue
        fpr, tpr, _ = roc_curve(y[keep, j], p[keep, j])
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], ls="--", color="grey")
        ax.set_title(f"{task} AUC {roc_auc_score(y[keep, j], p[keep, j]):.3f}", fontsize=9)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.suptitle("Test ROC curves of the best model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def register_best_model(
    uri: str,
    parent_run_id: str,
    checkpoint_path: Path,
    model_name: str,
    alias: str = "champion",
    tags: dict[str, str] | None = None,
) -> Any:
    """Log the checkpoint as a pyfunc model, register it, move `alias` if it is the new best.

    The alias moves when the new version's `val_roc_auc` tag beats the current holder's (or
    when there is no holder): the champion is always the best model validated so far.
    """
    from tune.serving import log_pyfunc_model

    client = client_for(uri)
    tags = dict(tags or {})
    model_uri = log_pyfunc_model(uri, parent_run_id, checkpoint_path)
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(
            model_name, description="toxtune: multitask toxicity MLP from SMILES"
        )
    version = client.create_model_version(
        model_name, source=model_uri, run_id=parent_run_id, tags=tags
    )
    _wait_ready(client, model_name, version.version)
    try:
        holder = client.get_model_version_by_alias(model_name, alias)
        current = float(holder.tags.get("val_roc_auc", "nan"))
    except MlflowException:
        current = float("nan")
    new = float(tags.get("val_roc_auc", "nan"))
    if math.isnan(current) or (not math.isnan(new) and new >= current):
        client.set_registered_model_alias(model_name, alias, version.version)
    return client.get_model_version(model_name, version.version)


def _wait_ready(client: MlflowClient, name: str, version: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.get_model_version(name, version).status == "READY":
            return
        time.sleep(0.5)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
