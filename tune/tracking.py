"""MLflow tracking: one parent run per job, one child run per trial, logged from the driver.

All trial logging happens in `MlflowTrialCallback`, a Ray Tune callback that runs in the driver
process, so trials on other nodes need neither MLflow access nor the driver's disk.

Resilience: every MLflow call the callback makes goes through an ordered buffer. When the server
is unreachable (connection refused, timeout, 5xx) the operation stays queued and is replayed on
later hooks (`on_step_end` runs every loop step) and, with a deadline, at `on_experiment_end`; so
a server restart mid-job loses no result. Replays are safe because every operation is
idempotent: metrics carry the timestamp taken when the result arrived (MLflow drops exact
duplicates), params are logged only when missing, runs are looked up by tag before one is made.
While the callback talks to the server, MLflow's own HTTP retries are turned down
(`MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`, `..._TIMEOUT=10`, unless the user set them): MLflow 3 reads
them from the environment on every request and has no per-client setting, and its defaults
(7 retries with exponential backoff, 120 s timeout) would stall the Tune loop for minutes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import re
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune as ray_tune

from tune import plots
from tune.errors import TrackingError
from tune.resources import classify_failure, last_error

if TYPE_CHECKING:
    import optuna
    from mlflow.entities import Run

    from toxmodel.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = [
    "JobSummary",
    "MlflowTrialCallback",
    "Registration",
    "TrackingError",
    "check_tracking",
    "close_orphans",
    "default_tracking_uri",
    "finish_job_run",
    "log_job_summary",
    "register_best_model",
    "start_job_run",
    "trial_ending",
]

JOB_TAG, TRIAL_TAG, STATUS_TAG = "toxtune.job", "toxtune.trial_id", "toxtune.status"
KIND_TAG, PARENT_TAG = "toxtune.kind", "mlflow.parentRunId"
METRIC_PREFIXES = ("train_", "val_", "best_")
EXTRA_METRICS = ("lr", "epoch_seconds")
RESULT_TAGS = ("node_ip", "node_id", "device", "gpu_ids", "gpu_fraction")
ALIAS_METRIC_TAG = "val_roc_auc"

# MLflow's HTTP settings while the callback logs (see the module docstring).
FAST_FAIL_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
MAX_BACKOFF_S = 15.0
FLUSH_AT_END_S = 120.0
_BATCH = 1000  # MLflow's limit on metrics per log_batch
_KEY_BAD = re.compile(r"[^/\w.\- :]")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --------------------------------------------------------------------------------------------
# URIs, clients, experiments


def default_tracking_uri(root: Path) -> str:
    """`sqlite:///<root>/mlflow.db` with an absolute path: the embedded default backend."""
    return f"sqlite:///{Path(root).expanduser().resolve() / 'mlflow.db'}"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> Path | None:
    """Where a SQLite backend keeps artifacts: `mlartifacts/` beside the database, never cwd."""
    path = _sqlite_path(uri)
    return path.expanduser().resolve().parent / "mlartifacts" if path else None


def client_for(uri: str) -> MlflowClient:
    """A client bound to `uri` for tracking and registry (no global MLflow state)."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def fast_fail_http(settings: Mapping[str, str] = FAST_FAIL_HTTP) -> Iterator[None]:
    """Temporarily turn MLflow's HTTP retries down; variables the user set are left alone."""
    saved = {k: os.environ.get(k) for k in settings}
    for key, value in settings.items():
        if saved[key] is None:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def check_tracking(uri: str, timeout: float = 10) -> None:
    """Refuse an unreachable tracking server or an unusable SQLite path, saying what to do.

    Called before any trial runs, so a typo in the URI costs seconds, not a search.
    """
    if _is_http(uri):
        health = f"{uri.rstrip('/')}/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout) as resp:
                status = resp.status
        except Exception as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({exc}); start it "
                f"(e.g. `mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri "
                f"sqlite:///mlflow.db`) or pass another --tracking-uri"
            ) from exc
        if status != 200:
            raise TrackingError(
                f"MLflow tracking server {uri} answered HTTP {status} on /health; "
                "check that it is an MLflow server and healthy, or pass another --tracking-uri"
            )
        try:
            with fast_fail_http({**FAST_FAIL_HTTP, "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}):
                client_for(uri).search_experiments(max_results=1)
        except Exception as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is up but refused an API call ({exc}); check "
                "its credentials (MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN) and version"
            ) from exc
        return
    path = _sqlite_path(uri)
    if path is not None:
        folder = path.expanduser().resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"tracking URI {uri}: cannot create the database folder {folder} ({exc}); "
                "choose a writable path with --tracking-uri sqlite:///PATH/mlflow.db"
            ) from exc
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise TrackingError(
                f"tracking URI {uri}: {path} is not writable; choose a writable path with "
                "--tracking-uri sqlite:///PATH/mlflow.db"
            )
        return
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"tracking URI {uri!r}: MLflow 3's file store is refused; use sqlite:///PATH/mlflow.db "
            "or http://HOST:PORT"
        )


def ensure_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """The experiment's id; a new one on SQLite keeps its artifacts under `mlartifacts/`."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            log.warning("MLflow experiment %r was deleted; restoring it", name)
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = artifact_root(uri)
    location = (root / re.sub(r"[^\w.-]+", "_", name)).as_uri() if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# --------------------------------------------------------------------------------------------
# Small helpers


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]


def flat_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} with MLflow-safe keys and values."""
    out: dict[str, str] = {}
    _flatten("", config, out)
    return {safe_key(k): v for k, v in out.items()}


def safe_key(key: str) -> str:
    """A metric/param name MLflow accepts: odd characters become `_`, no empty segments."""
    key = _KEY_BAD.sub("_", str(key))
    key = "/".join(p if p not in ("", ".", "..") else "_" for p in key.split("/"))
    return key[:250]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log params once; those already there (a resumed/retried run) are left as they are."""
    existing = client.get_run(run_id).data.params
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed:
        log.warning("run %s: params changed since first logged, kept the old: %s", run_id, changed)
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])


def _search_all(client: MlflowClient, exp_ids: list[str], filter_string: str) -> list[Run]:
    """Every run matching the filter (all pages)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            exp_ids,
            filter_string=filter_string,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def child_runs(client: MlflowClient, parent_run_id: str) -> list[Run]:
    """All trial runs of a job run."""
    exp = client.get_run(parent_run_id).info.experiment_id
    return _search_all(client, [exp], f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def is_transient(exc: BaseException) -> bool:
    """An error worth retrying later: server down/overloaded, timeout, SQLite lock."""
    if isinstance(
        exc,
        requests.exceptions.ConnectionError
        | requests.exceptions.Timeout
        | ConnectionError
        | TimeoutError,
    ):
        return True
    if isinstance(exc, requests.exceptions.HTTPError):
        response = exc.response
        return response is None or response.status_code >= 500 or response.status_code == 429
    text = str(exc)
    if isinstance(exc, MlflowException):
        if exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        if text.startswith("API request to"):  # rest_utils: connection error / retries spent
            return True
    return "database is locked" in text


def _retrying(what: str, fn: Callable[[], Any], deadline_s: float = 60.0) -> Any:
    """Run `fn`, retrying transient failures until `deadline_s` passes."""
    end = time.monotonic() + deadline_s
    delay = 1.0
    while True:
        try:
            with fast_fail_http():
                return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > end:
                raise
            log.warning("MLflow unavailable during %s (%s); retrying in %.0fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)


def _error_summary(text: str) -> str:
    """The exception line of a traceback (its last unindented line), for a tag."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if not line[:1].isspace() and not line.startswith(("Traceback", "Failure # ")):
            return line.strip()
    return lines[-1].strip() if lines else "unknown error"


# --------------------------------------------------------------------------------------------
# The job (parent) run


def start_job_run(
    tracking_uri: str,
    experiment_name: str,
    job_key: str,
    config: dict[str, Any],
    resume: bool,
) -> str:
    """The job's parent run id: a new run, or (resume) the latest run of `job_key` reopened.

    The run is tagged `toxtune.job=<job_key>`; its params are the flattened config and the
    config itself is logged as `config.json` and `config.yaml`. A resumed run keeps its first
    params (MLflow params are immutable) and gets the new config as `config/resume-<n>.json`.
    """
    client = client_for(tracking_uri)
    exp_id = ensure_experiment(client, tracking_uri, experiment_name)
    plain = _jsonable(config)
    if resume:
        parents = [
            r
            for r in _search_all(client, [exp_id], f"tags.`{KIND_TAG}` = 'job'")
            if r.data.tags.get(JOB_TAG) == job_key and PARENT_TAG not in r.data.tags
        ]
        if parents:
            run = parents[0]
            run_id = run.info.run_id
            count = int(run.data.tags.get("toxtune.resumes", "0")) + 1
            client.update_run(run_id, status="RUNNING")
            client.log_batch(
                run_id,
                tags=[RunTag("toxtune.resumes", str(count)), RunTag(STATUS_TAG, "running")],
            )
            _log_params(client, run_id, flat_params(plain))
            client.log_dict(run_id, plain, f"config/resume-{count}.json")
            return run_id
    run = client.create_run(
        exp_id,
        run_name=job_key,
        tags={JOB_TAG: job_key, KIND_TAG: "job", STATUS_TAG: "running"},
    )
    run_id = run.info.run_id
    _log_params(client, run_id, flat_params(plain))
    client.log_dict(run_id, plain, "config.json")
    client.log_dict(run_id, plain, "config.yaml")
    return run_id


def close_orphans(tracking_uri: str, parent_run_id: str, keep_trial_ids: set[str]) -> list[str]:
    """Trial runs left RUNNING (e.g. by a killed driver) that will not continue become KILLED.

    Returns the ids of the runs it ended; those of trials in `keep_trial_ids` stay open.
    """
    client = client_for(tracking_uri)
    closed = []
    for run in _retrying("close_orphans", lambda: child_runs(client, parent_run_id)):
        if run.info.status != "RUNNING" or run.data.tags.get(TRIAL_TAG) in keep_trial_ids:
            continue
        run_id = run.info.run_id
        _retrying("close_orphans", lambda rid=run_id: client.set_tag(rid, STATUS_TAG, "killed"))
        _retrying("close_orphans", lambda rid=run_id: client.set_terminated(rid, "KILLED"))
        closed.append(run_id)
    return closed


def finish_job_run(tracking_uri: str, parent_run_id: str, status: str) -> None:
    """End the job run with `status` (FINISHED, FAILED, KILLED); trial runs still open are
    ended KILLED first. Errors are logged, not raised: this runs in `finally` blocks."""
    status = status.upper()
    client = client_for(tracking_uri)
    try:
        close_orphans(tracking_uri, parent_run_id, keep_trial_ids=set())
        _retrying(
            "finish_job_run",
            lambda: client.set_tag(parent_run_id, STATUS_TAG, status.lower()),
        )
        _retrying("finish_job_run", lambda: client.set_terminated(parent_run_id, status))
    except Exception as exc:
        log.error("could not end MLflow run %s as %s: %s", parent_run_id, status, exc)


# --------------------------------------------------------------------------------------------
# The trial callback


@dataclass
class _Op:
    what: str
    fn: Callable[[], None]
    attempts: int = 0


def trial_ending(last: Mapping[str, Any], max_epochs: int) -> tuple[str, str, int]:
    """(status, finished_reason, epochs run) of a trial that completed, from its last result.

    `finished`: it stopped itself (max_epochs, patience); `early_stopped`: the scheduler did.
    """
    reason = str(last.get("finished_reason") or "")
    epochs = int(last.get("training_iteration", 0) or 0)
    if not reason and max_epochs and epochs >= max_epochs:
        reason = "max_epochs"
    return ("finished" if reason else "early_stopped"), reason, epochs


class MlflowTrialCallback(ray_tune.Callback):
    """Logs each trial as a child run of the job's parent run, from the driver.

    Child runs are tagged `mlflow.parentRunId` and `toxtune.trial_id`; a retried or resumed
    trial continues its own run (looked up by tag), so there is one run per trial. Statuses:
    `toxtune.status` = running | retrying | finished | early_stopped | failed (| killed, set by
    `close_orphans`). A completed trial counts as finished when its last result has a
    `finished_reason` or reached `max_epochs`; otherwise the scheduler stopped it early.
    """

    def __init__(
        self, tracking_uri: str, experiment: str, parent_run_id: str, max_epochs: int
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment  # informational: children go to the parent's experiment
        self.parent_run_id = parent_run_id
        self.max_epochs = max_epochs
        self.dropped: list[str] = []  # operations MLflow refused for good (logged as warnings)
        self.deferrals = 0  # times an operation waited for an unreachable server
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}
        self._status: dict[str, str] = {}
        self._tagged: set[str] = set()
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

    def _server_alive(self) -> bool:
        if not _is_http(self.tracking_uri):
            return True
        try:
            url = f"{self.tracking_uri.rstrip('/')}/health"
            with urllib.request.urlopen(url, timeout=3) as resp:
                return resp.status == 200
        except Exception:
            return False

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
                    alive = self._server_alive()
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
        else:
            tags = {
                PARENT_TAG: self.parent_run_id,
                TRIAL_TAG: trial_id,
                KIND_TAG: "trial",
                STATUS_TAG: "running",
                "toxtune.trial_name": str(trial),
            }
            run = self.client.create_run(self._exp_id(), run_name=trial_id, tags=tags)
            run_id, status = run.info.run_id, run.info.status
        config = {k: v for k, v in dict(trial.config).items() if not str(k).startswith("_")}
        _log_params(self.client, run_id, flat_params(config))
        self._runs[trial_id] = run_id
        self._status[trial_id] = status
        return run_id

    def _open(self, trial: Any) -> None:
        run_id = self._run_id(trial)
        if self._status.get(trial.trial_id) != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
            self._status[trial.trial_id] = "RUNNING"
        self.client.set_tag(run_id, STATUS_TAG, "running")

    def _close(self, trial: Any, status: str, tags: dict[str, str]) -> None:
        run_id = self._run_id(trial)
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(run_id, status)
        self._status[trial.trial_id] = status

    # -- Tune hooks ---------------------------------------------------------------------------

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
        metrics = [
            Metric(safe_key(k), float(v), now, step)
            for k, v in result.items()
            if isinstance(k, str)
            and (k.startswith(METRIC_PREFIXES) or k in EXTRA_METRICS)
            and isinstance(v, numbers.Real)
            and not isinstance(v, bool | np.bool_)
        ]
        tags: list[RunTag] = []
        if trial.trial_id not in self._tagged:
            tags = [RunTag(k, str(result[k])[:500]) for k in RESULT_TAGS if k in result]
            self._tagged.add(trial.trial_id)

        size = _BATCH - len(RESULT_TAGS)
        chunks = [metrics[i : i + size] for i in range(0, len(metrics), size)] or [[]]

        def op() -> None:
            run_id = self._run_id(trial)
            for n, chunk in enumerate(chunks):
                if chunk or (tags and n == 0):
                    self.client.log_batch(run_id, metrics=chunk, tags=tags if n == 0 else [])

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


# --------------------------------------------------------------------------------------------
# The job summary


@dataclass
class JobSummary:
    """What the parent run records once the search is over.

    `cluster` holds nodes/cpus/gpus. `best_valid` maps validation metric names (`val_roc_auc`,
    `val_roc_auc/<task>`, ...; the `val_` prefix is added when missing) to values, logged as
    `best_val_*`. `test_metrics` is a `toxmodel.metrics.Metrics` or a mapping such as
    {"roc_auc": .., "roc_auc/<task>": ..}, logged as `test_*`. `study` (an Optuna study) feeds
    the history and importance plots; `roc_data` is (y_true, y_prob, tasks) of the best model
    on the test split, for the ROC plot. `test_seeds` holds extra metrics logged as named.
    """

    n_rows: int
    n_valid: int
    content_hash: str
    source: str
    invalid_report: Path | None
    search_space: dict[str, Any]
    ray_address: str
    cluster: dict[str, float]
    best_trial_id: str
    best_valid: dict[str, float]
    test_metrics: Metrics | Mapping[str, float]
    trials: pd.DataFrame
    best_params: dict[str, Any] = field(default_factory=dict)
    study: optuna.Study | None = None
    roc_data: tuple[np.ndarray, np.ndarray, list[str]] | None = None
    test_seeds: dict[str, float] = field(default_factory=dict)
    skipped_columns: dict[str, str] = field(default_factory=dict)  # column -> why not a task


def _summary_metrics(summary: JobSummary) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in summary.best_valid.items():
        name = key if key.startswith("val_") else f"val_{key}"
        out[f"best_{name}"] = float(value)
    if hasattr(summary.test_metrics, "flat"):
        test = summary.test_metrics.flat("test")
    else:
        test = {
            (k if k.startswith("test_") else f"test_{k}"): v
            for k, v in dict(summary.test_metrics).items()
        }
    out.update({k: float(v) for k, v in test.items()})
    out.update({k: float(v) for k, v in summary.test_seeds.items()})
    return out


def log_job_summary(tracking_uri: str, parent_run_id: str, summary: JobSummary) -> None:
    """Dataset fingerprint, search space, cluster, best trial, metrics, tables and plots.

    Plots (optimisation history, parameter importance, test ROC curves) go under `plots/`;
    one that cannot be drawn is skipped with a `toxtune.note.<plot>` tag saying why.
    """
    client = client_for(tracking_uri)
    run = parent_run_id
    tags = {
        "dataset.source": str(summary.source),
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
    if summary.skipped_columns:
        tags["dataset.skipped_columns"] = json.dumps(summary.skipped_columns)
    client.log_batch(run, tags=[RunTag(k, v[:8000]) for k, v in tags.items()])
    now = int(time.time() * 1000)
    batch = [Metric(safe_key(k), v, now, 0) for k, v in _summary_metrics(summary).items()]
    for i in range(0, len(batch), _BATCH):
        client.log_batch(run, metrics=batch[i : i + _BATCH])
    client.log_dict(run, _jsonable(summary.search_space), "search_space.json")
    client.log_dict(run, _jsonable(summary.best_params), "best_params.json")
    client.log_dict(run, _jsonable(summary.cluster), "cluster.json")
    if summary.invalid_report and Path(summary.invalid_report).is_file():
        client.log_artifact(run, str(summary.invalid_report), "dataset")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        summary.trials.to_csv(out / "trials.csv", index=False)
        client.log_artifact(run, str(out / "trials.csv"))
        for name, draw in (
            ("optimization_history", lambda path: plots.history(summary.study, path)),
            ("param_importance", lambda path: plots.importance(summary.study, path)),
            ("roc_curves", lambda path: plots.roc_curves(summary.roc_data, path)),
        ):
            path = out / f"{name}.png"
            try:
                skipped = draw(path)
            except Exception as exc:
                skipped = f"failed: {type(exc).__name__}: {exc}"
            if skipped:
                log.info("plot %s skipped: %s", name, skipped)
                client.set_tag(run, f"toxtune.note.{name}", skipped[:8000])
            else:
                client.log_artifact(run, str(path), "plots")


# --------------------------------------------------------------------------------------------
# Model registration


@dataclass(frozen=True)
class Registration:
    """A registered model version and what happened to the alias, in words a user reads."""

    name: str
    version: str
    alias: str
    alias_moved: bool
    note: str  # e.g. "@champion moved to version 3" or why it stayed


COMPARABLE_TAGS = ("data_hash", "split")  # scores are comparable only when these agree


def register_best_model(
    tracking_uri: str,
    parent_run_id: str,
    checkpoint_path: Path,
    model_name: str,
    alias: str = "champion",
    tags: dict[str, str] | None = None,
) -> Registration:
    """Log the checkpoint as a pyfunc model under the job run, register it, maybe move `alias`.

    `tags` become the version's tags (searcher, seed, split, data_hash, trial_id, ...). The
    alias moves to the new version when there is no holder, or when the holder was scored on the
    same data and split (`data_hash`, `split` tags) and the new version's `val_roc_auc` is at
    least the holder's (ties go to the newer model). A holder scored on other data or another
    split is never displaced: validation scores are not comparable across them, so the new
    version is registered without the alias, and the returned note says why.
    """
    from tune.serving import log_pyfunc_model

    client = client_for(tracking_uri)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    info = log_pyfunc_model(tracking_uri, parent_run_id, Path(checkpoint_path))
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        with contextlib.suppress(MlflowException):  # created concurrently
            client.create_registered_model(
                model_name, description="toxtune: multitask toxicity MLP from SMILES"
            )
    # MLflow's SQLite registry resolves a `models:/<id>` source through the *global* tracking
    # URI (a TODO in its sqlalchemy_store); give it the logged model's storage location instead.
    source = info.model_uri
    if _sqlite_path(tracking_uri) is not None:
        source = client.get_logged_model(info.model_id).artifact_location
    version = client.create_model_version(
        model_name, source=source, run_id=parent_run_id, tags=tags, model_id=info.model_id
    )
    _wait_ready(client, model_name, version.version)
    moved, note = _alias_decision(client, model_name, alias, tags)
    if moved:
        client.set_registered_model_alias(model_name, alias, version.version)
        note = f"@{alias} moved to version {version.version}" + (f" ({note})" if note else "")
    client.set_model_version_tag(model_name, version.version, "toxtune.alias_note", note)
    return Registration(model_name, str(version.version), alias, moved, note)


def _alias_decision(
    client: MlflowClient, model_name: str, alias: str, tags: Mapping[str, str]
) -> tuple[bool, str]:
    """(move the alias?, why) for a new version with `tags` against the alias's holder."""
    try:
        holder = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return True, ""
    where = f"@{alias} stays on version {holder.version}"
    differs = [k for k in COMPARABLE_TAGS if holder.tags.get(k) != tags.get(k)]
    if differs:
        shown = ", ".join(
            f"{k} {holder.tags.get(k)!r} there, {tags.get(k)!r} here" for k in differs
        )
        return False, (
            f"{where}: it was scored on other data or another split ({shown}), so the two "
            "validation scores are not comparable; move it by hand if this model should serve"
        )
    holder_score, new_score = (
        _score(holder.tags.get(ALIAS_METRIC_TAG)),
        _score(tags.get(ALIAS_METRIC_TAG)),
    )
    if holder_score is None:
        return True, f"version {holder.version} had no validation score"
    if new_score is not None and new_score >= holder_score:
        return (
            True,
            f"val ROC-AUC {new_score:.4f} >= {holder_score:.4f} of version {holder.version}",
        )
    shown_new = "none" if new_score is None else f"{new_score:.4f}"
    return False, f"{where}: its val ROC-AUC {holder_score:.4f} beats this version's {shown_new}"


def _score(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _wait_ready(client: MlflowClient, name: str, version: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.get_model_version(name, version).status == "READY":
            return
        time.sleep(0.5)
    raise TrackingError(f"model {name} version {version} did not become READY in {timeout:.0f}s")
