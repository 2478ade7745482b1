"""Trial runs: a Ray Tune callback in the driver logs each trial as a child of the job's run.

Contract: one MLflow run per trial (a retried or resumed trial continues its own run, found
among the job's trial runs, which each driver lists once), tagged with its status
(`toxtune.status` = running | retrying | finished | early_stopped | stopped | failed, or killed by
`close_orphans`), its node and device, its error text when it fails, and the job's dataset as an
input. Each epoch logs the headline metrics, the ones without a `/` (`train_loss`, `val_loss`,
`val_roc_auc`, `val_pr_auc`, `best_val_roc_auc`, `lr`, `epoch_seconds`, ...); the per-task
scores (`val_roc_auc/<task>`, ...) are logged once, when the trial ends, from its best epoch's
row at that epoch's step, so the chart view opens on the headline curves and a 617-task job
writes 10 rows an epoch instead of 1,244.

Trials on other nodes need neither MLflow access nor the driver's disk: all logging happens
here, in the driver.

Off the Tune loop: a Tune hook only queues its operation; a sender thread sends the queue, each
trial's operations in order, so the driver's loop never waits for MLflow. The epochs that
arrive between two sends (or while a request is in flight) go together: each trial's queued
results are one `log_batch` request (MLflow's batch is per run), and they may pass another
trial's start or end in the queue, never their own trial's. A trial's start and end go with
its epochs: once its run is made, its params join the first request the send makes for it (at
once when no epoch is queued yet), and a trial that completed ends in that same request (its
best row's per-task scores and ending tags beside its last epochs) and one that ends the run.
Under ASHA a trial that stops at its grace period lives a few seconds, so at many trials in
flight its run costs the server four requests instead of six. A request costs a team's
server about 8 ms of CPU and an epoch in it about 1 ms more (`benchmarks/mlflow_server.py`),
so the sender paces itself by the trials it sends for: every SEND_EVERY_S with a few trials in
flight, every trials / REQUESTS_PER_S seconds with more (at most MAX_SEND_EVERY_S, how far the
MLflow charts may lag behind the trials), so that requests per second stay near
REQUESTS_PER_S however many trials report, and each carries more epochs
(`benchmarks/driver.py`).

Resilience: every MLflow call goes through that ordered buffer. When the server is unreachable
(connection refused, timeout, 5xx) the operation stays queued and is replayed later, with
backoff, and with a deadline at `on_experiment_end`, which waits for the queue; so a server
restart mid-job loses no result. Replays are safe because every operation is idempotent: metrics
carry the timestamp taken when the result arrived (MLflow drops exact duplicates), params are
logged only when missing, dataset inputs are deduplicated by MLflow, a run whose creation was
tried before is looked up by tag before one is made, and a restored trial's steps its run
already holds are not logged again. MLflow's own HTTP retries are turned down meanwhile
(`backend.fast_fail_http`). A driver killed outright loses what was still queued; the restored
trial's first report carries the epochs before its checkpoint's
(`tune.trainable.EARLIER_EPOCHS`), and the steps its run lacks are logged from them, so its
metric history has every epoch once. A trial that had ended by Tune's last snapshot is not run
or completed again: `settle_trial_runs`, after the restored round, gives its run the epochs it
lacks (from the trial's result file) and its closing.
"""

from __future__ import annotations

import itertools
import json
import logging
import numbers
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from ray import tune as ray_tune

from tune.resources import classify_failure, last_error
from tune.tracking.backend import (
    MAX_BACKOFF_S,
    client_for,
    end_run_quietly,
    fast_fail_http,
    is_transient,
    retrying,
    server_alive,
)
from tune.tracking.names import KIND_TAG, PARENT_TAG, STATUS_TAG, TRIAL_TAG, flat_params, safe_key
from tune.tracking.provenance import DatasetInfo, log_dataset, source_tags
from tune.tracking.runs import PARAMS_PER_BATCH, child_runs, new_params
from tune.trainable import EARLIER_EPOCHS

log = logging.getLogger(__name__)

METRIC_PREFIXES = ("train_", "val_", "best_")
EXTRA_METRICS = ("lr", "epoch_seconds")
RESULT_TAGS = ("node_ip", "node_id", "device", "gpu_ids", "gpu_fraction")
FLUSH_AT_END_S = 120.0
# The sender's pace: one request per trial with new epochs per send, however fast they come
# (without it, at 32 trials in flight each result was a request of its own: py-spy), and sends
# spaced so that those requests stay near REQUESTS_PER_S a second (`send_interval`).
SEND_EVERY_S = 1.0  # the shortest interval between two sends
REQUESTS_PER_S = 8.0
MAX_SEND_EVERY_S = 10.0  # the longest: how far the MLflow charts may lag behind the trials
BATCH = 1000  # MLflow's limit on metrics per log_batch
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def send_interval(trials: int) -> float:
    """Seconds from one send to the next after a send for `trials` trials' results: with
    one request per trial a send, `trials / REQUESTS_PER_S` keeps the request rate near
    REQUESTS_PER_S, within [SEND_EVERY_S, MAX_SEND_EVERY_S]."""
    return min(max(trials / REQUESTS_PER_S, SEND_EVERY_S), MAX_SEND_EVERY_S)


def trial_ending(last: Mapping[str, Any], max_epochs: int) -> tuple[str, str, int]:
    """(status, finished_reason, epochs run) of a trial that completed, from its last result.

    `finished`: it stopped itself (max_epochs, patience); `early_stopped`: the scheduler did
    (ASHA acts on a reported epoch); `stopped`: the search ended (its time limit, the error
    budget, a stop signal) before the trial's first epoch.
    """
    reason = str(last.get("finished_reason") or "")
    epochs = int(last.get("training_iteration", 0) or 0)
    if not reason and max_epochs and epochs >= max_epochs:
        reason = "max_epochs"
    if not reason and epochs == 0:
        return "stopped", reason, epochs
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


def ending_tags(status: str, epochs: int, reason: str) -> dict[str, str]:
    """The tags an ended trial's run carries: its status word, epochs run, finished reason."""
    tags = {STATUS_TAG: status, "toxtune.epochs": str(epochs)}
    if reason:
        tags["toxtune.finished_reason"] = reason
    return tags


def log_batched(
    client: MlflowClient,
    run_id: str,
    metrics: list[Metric],
    tags: list[RunTag],
    params: Sequence[Param] = (),
) -> int:
    """`metrics`, `tags` and `params` in as few `log_batch` requests as MLflow's limits allow
    (1,000 entries, 100 params; the tags and params with the first); returns the requests."""
    first, more = list(params[:PARAMS_PER_BATCH]), list(params[PARAMS_PER_BATCH:])
    size = BATCH - len(tags) - len(first)
    sent = 0
    for i in range(0, max(len(metrics), 1), size):
        chunk = metrics[i : i + size]
        if chunk or (i == 0 and (tags or first)):
            client.log_batch(
                run_id, metrics=chunk, tags=tags if i == 0 else [], params=first if i == 0 else []
            )
            sent += 1
    for i in range(0, len(more), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=more[i : i + PARAMS_PER_BATCH])
        sent += 1
    return sent


def end_run(
    client: MlflowClient, run_id: str, status: str, tags: dict[str, str], metrics: list[Metric]
) -> None:
    """Log a trial's last metrics and its ending tags together, and end its run with `status`
    (quietly: no console lines a trial)."""
    log_batched(client, run_id, metrics, [RunTag(k, v) for k, v in tags.items()])
    end_run_quietly(client, run_id, status)


@dataclass(frozen=True)
class TrialEnding:
    """How a trial ended, as Ray's saved state says: what its MLflow run must show."""

    trial_id: str
    status: str  # finished | early_stopped | stopped | failed (the status tag's words)
    reason: str  # its finished_reason, or ""
    epochs: int
    best: Mapping[str, Any]  # its best report: the per-task scores are logged from it
    history: Callable[[], list[Mapping[str, Any]]]  # every report, read only when needed


# The MLflow run status of each status word a trial ends with (`trial_ending`, or failed).
ENDED = {
    "finished": "FINISHED",
    "early_stopped": "FINISHED",
    "stopped": "KILLED",
    "failed": "FAILED",
}


def settle_trial_runs(
    tracking_uri: str, parent_run_id: str, endings: list[TrialEnding]
) -> list[str]:
    """End the trial runs a killed driver left open although Ray's saved state has their
    trials ended: the driver died with their last epochs and their closing still queued, and
    a restored round never completes those trials again. Open is RUNNING, or KILLED by the
    driver's watcher (`tune.guard`) or a stop that gave up, which end every open run so: a
    trial Ray has ended was not stopped by them. Each gets the epochs its run lacks,
    its best report's per-task scores, its ending tags and status, as `on_trial_complete`
    would have logged them. Returns the ids of the runs it ended; errors are logged, not
    raised (the trials' results are safe in the job's storage)."""
    ended = {e.trial_id: e for e in endings if e.status in ENDED}
    if not ended:
        return []
    client = client_for(tracking_uri)
    settled = []
    try:
        for run in retrying("settle_trial_runs", lambda: child_runs(client, parent_run_id)):
            ending = ended.get(run.data.tags.get(TRIAL_TAG, ""))
            if run.info.status not in ("RUNNING", "KILLED") or ending is None:
                continue
            retrying("settle_trial_runs", lambda r=run, e=ending: _settle(client, r, e))
            settled.append(run.info.run_id)
    except Exception as exc:
        log.error("could not end the trial runs of MLflow run %s: %s", parent_run_id, exc)
    return settled


def _settle(client: MlflowClient, run: Run, ending: TrialEnding) -> None:
    run_id = run.info.run_id
    history = client.get_metric_history(run_id, "train_loss")
    done = max((m.step for m in history), default=0)
    now = int(time.time() * 1000)
    metrics: list[Metric] = []
    for row in _reports(ending.history()) if done < ending.epochs else []:
        step = int(row.get("training_iteration") or row["epoch"])
        if step > done:
            headline = {k: v for k, v in row.items() if "/" not in str(k)}
            metrics += result_metrics(headline, step, now)
    best_step = int(ending.best.get("training_iteration") or ending.best.get("epoch") or 0)
    if not any("/" in k for k in run.data.metrics):  # its closing never began
        per_task = {k: v for k, v in ending.best.items() if "/" in str(k)}
        metrics += result_metrics(per_task, best_step, now)
    metrics = [m for m in metrics if np.isfinite(m.value)]
    tags = ending_tags(ending.status, ending.epochs, ending.reason)
    end_run(client, run_id, ENDED[ending.status], tags, metrics)


def _started(run: Run) -> int:
    return int(run.info.start_time or 0)


def _reports(rows: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A trial's reports with the earlier epochs a restored trial's first report carries."""
    out: list[Mapping[str, Any]] = []
    for row in rows:
        earlier = row.get(EARLIER_EPOCHS)
        if isinstance(earlier, str) and earlier:
            out += json.loads(earlier)
        out.append(row)
    return out


@dataclass(frozen=True)
class _Closing:
    """How a completed trial's run ends: its MLflow status, ending tags and best row's
    per-task scores, sent with the trial's last queued epochs."""

    status: str
    tags: dict[str, str]
    best: list[Metric]


@dataclass
class _Op:
    """One queued MLflow operation: `fn`, or (`trial` set) one epoch's metrics and tags, which
    the sender batches with the trial's other queued epochs, or the trial's (re)start
    (`opening`) or end (`closing`), which go with them. `of`: the trial id an `fn` is about (a
    failure, ...), or None for the job's own (which no result may pass)."""

    what: str
    fn: Callable[[], None] | None = None
    of: str | None = None
    attempts: int = 0
    trial: Any = None
    step: int = 0
    metrics: list[Metric] = field(default_factory=list)
    tags: list[RunTag] = field(default_factory=list)
    opening: bool = False
    closing: _Closing | None = None


MAX_RESULTS_PER_SEND = 20_000  # queued epochs one take holds at most (one request per trial)


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
        self._earlier: dict[str, Run] | None = None  # see _earlier_runs
        self._creating: set[str] = set()  # trials whose run this driver asked MLflow to make
        self._unsent: dict[str, list[Param]] = {}  # trial -> params its run lacks, sent next
        self._opened: set[str] = set()  # runs made running and tagged so, not yet opened
        self.requests = 0  # log_batch requests sent for trials (params, epochs, closings)
        self._queue: deque[_Op] = deque()
        self._sent_for: set[str] = set()  # the trials the last flush sent results for
        self._retry_at = 0.0
        self._backoff = 1.0
        self._threads()

    def _threads(self) -> None:
        self._wake = threading.Condition()  # guards _queue; notified on each new operation
        self._sending = threading.Lock()  # one sender at a time: the thread or a flush
        self._sender: threading.Thread | None = None
        self._stop = False

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks with the experiment; the client, queue and thread stay."""
        state = self.__dict__.copy()
        for key in ("_wake", "_sending", "_sender", "_stop"):
            state.pop(key)
        state.update(
            _client=None, _queue=deque(), _earlier=None, _creating=set(), _opened=set(), _unsent={}
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._threads()

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

    def _submit(self, op: _Op) -> None:
        """Queue `op` for the sender thread (started on first use); returns at once."""
        with self._wake:
            self._queue.append(op)
            if self._sender is None or not self._sender.is_alive():
                self._stop = False
                self._sender = threading.Thread(
                    target=self._send_forever, name="toxtune-mlflow-sender", daemon=True
                )
                self._sender.start()
            self._wake.notify()

    def _send_forever(self) -> None:
        """The sender thread: send what is queued, then wait `send_interval` of the trials it
        sent for, so that a trial's epochs that arrive meanwhile go as one request; sleep while
        nothing is due."""
        sent_at, interval = float("-inf"), SEND_EVERY_S
        while True:
            with self._wake:
                while not self._stop:
                    due = max(self._retry_at, sent_at + interval)
                    if self._queue and due <= time.monotonic():
                        break
                    self._wake.wait(timeout=due - time.monotonic() if self._queue else None)
                if self._stop:
                    return
            sent_at = time.monotonic()
            self.flush()
            interval = send_interval(len(self._sent_for))

    def _stop_sender(self, timeout_s: float) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._sender is not None:
            self._sender.join(timeout=timeout_s)

    def flush(self, timeout_s: float = 0.0) -> bool:
        """Send queued operations in order; True when none is left.

        With `timeout_s` 0 it makes one attempt (skipped while backing off) and returns; with
        more it keeps retrying, with backoff, until the queue is empty or the time is up.
        """
        end = time.monotonic() + timeout_s
        if not self._sending.acquire(timeout=max(timeout_s, 0.0) or -1):
            return False
        self._sent_for = set()
        try:
            while self._queue:
                if self._retry_at > end:
                    return False
                time.sleep(max(0.0, self._retry_at - time.monotonic()))
                ops = self._take()
                failed = self._send(ops)
                with self._wake:
                    self._queue.extendleft(reversed(failed))
                if failed:
                    self._defer(failed[0])
                else:
                    self._backoff = 1.0
                    self._retry_at = 0.0
            return True
        finally:
            self._sending.release()

    def _take(self) -> list[_Op]:
        """The head operation when it is not a result; else the queued results (batched)
        that may go now, with the starts and closings of their trials: each trial's in order,
        none past an earlier operation of its own trial or of the job's (a trial's results may
        pass another trial's operation), nothing of a trial past its closing."""
        with self._wake:
            if self._queue[0].trial is None:
                return [self._queue.popleft()]
            taken: list[_Op] = []
            kept: deque[_Op] = deque()
            held: set[str] = set()  # trials whose next results wait behind a kept operation
            for i, op in enumerate(self._queue):
                trial = str(op.trial.trial_id) if op.trial is not None else op.of
                if op.trial is not None and trial not in held:
                    taken.append(op)
                    if op.closing is not None:  # the trial's last: nothing of it goes after
                        held.add(trial)
                    if len(taken) == MAX_RESULTS_PER_SEND:
                        kept.extend(itertools.islice(self._queue, i + 1, None))
                        break
                    continue
                kept.append(op)
                if trial is None:  # the job's own: nothing later passes it
                    kept.extend(itertools.islice(self._queue, i + 1, None))
                    break
                held.add(trial)
            self._queue = kept
            return taken

    def _send(self, ops: list[_Op]) -> list[_Op]:
        """Send `ops`; return those to retry (in order) after a transient failure.

        Results go as one request per trial; a request MLflow refuses for good is retried one
        epoch at a time, so only the epoch it refuses is dropped."""
        if ops[0].trial is None:
            return self._attempt([ops[0]], ops[0].fn)  # type: ignore[arg-type]
        groups: dict[str, list[_Op]] = {}
        for op in ops:
            groups.setdefault(str(op.trial.trial_id), []).append(op)
        self._sent_for.update(groups)
        retry: list[_Op] = []
        for group in groups.values():
            if retry:  # the server is down: keep the rest, in order, for later
                retry += group
                continue
            retry += self._attempt(group, self._results_fn(group))
        kept = {id(op) for op in retry}
        return [op for op in ops if id(op) in kept]

    def _attempt(self, ops: list[_Op], fn: Callable[[], None]) -> list[_Op]:
        """Run `fn` for `ops`: [] when done (or refused for good), `ops` to retry later."""
        try:
            with fast_fail_http():
                fn()
            return []
        except Exception as exc:
            if is_transient(exc):
                alive = server_alive(self.tracking_uri)
                ops[0].attempts += alive  # a dead server is no fault of the operation
                if not alive or ops[0].attempts < 5:
                    log.warning(
                        "MLflow unavailable (%s); %d operations buffered",
                        exc,
                        len(self._queue) + len(ops),
                    )
                    return ops
            if len(ops) > 1:  # find the one MLflow refuses
                return [op for op in ops if self._attempt([op], self._results_fn([op]))]
            log.warning("MLflow refused %s: %s", ops[0].what, exc)
            self.dropped.append(f"{ops[0].what}: {exc}")
            return []

    def _defer(self, op: _Op) -> None:
        self.deferrals += 1
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    # -- runs ---------------------------------------------------------------------------------

    def _exp_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self.client.get_run(self.parent_run_id).info.experiment_id
        return self._experiment_id

    def _earlier_runs(self) -> dict[str, Run]:
        """The job's trial runs made before this driver's first trial started (a resumed job's),
        by trial id: listed once, so a new trial's run is created without a search."""
        if self._earlier is None:
            self._earlier = {}
            for run in sorted(child_runs(self.client, self.parent_run_id), key=_started):
                self._earlier.setdefault(run.data.tags.get(TRIAL_TAG, ""), run)
        return self._earlier

    def _run_id(self, trial: Any) -> str:
        """The trial's child run: one made before (a resumed job's, or one whose creation
        this driver tried before, its answer lost) or made now, once. The params it lacks wait
        in `_unsent` for the first request to the run (`_log_results`' batch, or
        `_run_with_params`)."""
        trial_id = str(trial.trial_id)
        if trial_id in self._runs:
            return self._runs[trial_id]
        earlier = self._earlier_runs().get(trial_id)
        found = [earlier] if earlier is not None else []
        if not found and trial_id in self._creating:  # it may exist: look for it by tag
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
            self._opened.discard(trial_id)
        else:
            tags = {
                **source_tags(),
                PARENT_TAG: self.parent_run_id,
                TRIAL_TAG: trial_id,
                KIND_TAG: "trial",
                STATUS_TAG: "running",
                "toxtune.trial_name": str(trial),
            }
            self._creating.add(trial_id)
            run = self.client.create_run(self._exp_id(), run_name=trial_id, tags=tags)
            run_id, status = run.info.run_id, run.info.status
            self._opened.add(trial_id)  # made running, tagged running
        config = {k: v for k, v in dict(trial.config).items() if not str(k).startswith("_")}
        existing = found[0].data.params if found else {}
        self._unsent[trial_id] = new_params(run_id, flat_params(config), existing)
        if self.dataset is not None:
            log_dataset(self.client, run_id, self.dataset)
        self._runs[trial_id] = run_id
        self._status[trial_id] = status
        return run_id

    def _open(self, trial: Any) -> str:
        """The trial (re)starts: its run is running and tagged so (a run made now is already)."""
        run_id = self._run_id(trial)
        if trial.trial_id in self._opened:
            self._opened.discard(trial.trial_id)
            return run_id
        if self._status.get(trial.trial_id) != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
            self._status[trial.trial_id] = "RUNNING"
        self.client.set_tag(run_id, STATUS_TAG, "running")
        return run_id

    def _run_with_params(self, trial: Any) -> str:
        """The trial's run, its params sent now if they were waiting (a failure's fn, which
        sends no batch of its own)."""
        run_id = self._run_id(trial)
        if self._unsent.get(trial.trial_id):
            log_batched(self.client, run_id, [], [], self._unsent[trial.trial_id])
        self._unsent.pop(trial.trial_id, None)
        return run_id

    def _results_fn(self, ops: list[_Op]) -> Callable[[], None]:
        return lambda: self._log_results(ops)

    def _log_results(self, ops: list[_Op]) -> None:
        """One trial's queued operations in one request (more only past MLflow's limits): its
        (re)start (the run made, and its params), its epochs, and its closing, then one end.

        A step its run already holds (logged before the trial was restored) is not logged
        twice; the tags go with the first epoch that carries them."""
        trial = ops[0].trial
        run_id = self._open(trial) if any(op.opening for op in ops) else self._run_id(trial)
        done = self._logged.get(trial.trial_id, 0)
        metrics: list[Metric] = []
        tags: list[RunTag] = []
        for op in ops:
            if op.step > done:
                metrics += op.metrics
            tags += op.tags
            done = max(done, op.step)
        closing = ops[-1].closing
        if closing is not None:
            metrics += closing.best
            tags += [RunTag(k, v) for k, v in closing.tags.items()]
        params = self._unsent.get(trial.trial_id, [])
        self.requests += log_batched(self.client, run_id, metrics, tags, params)
        self._unsent.pop(trial.trial_id, None)
        self._logged[trial.trial_id] = done
        if closing is not None:
            end_run_quietly(self.client, run_id, closing.status)
            self._status[trial.trial_id] = closing.status

    def _close(self, trial: Any, status: str, tags: dict[str, str], best: list[Metric]) -> None:
        """Log the best row's per-task scores (once), the ending tags, and end the run."""
        end_run(self.client, self._run_id(trial), status, tags, best)
        self._status[trial.trial_id] = status

    # -- Tune hooks ---------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        """The search starts: the parent run gets the dataset input now, not only at the end."""
        dataset = self.dataset
        if dataset is not None:
            self._submit(
                _Op(
                    "dataset of the job run",
                    lambda: log_dataset(self.client, self.parent_run_id, dataset),
                )
            )

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._tagged.discard(trial.trial_id)  # a retry may run on another node
        self._submit(_Op(f"start {trial.trial_id}", trial=trial, opening=True))

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._tagged.discard(trial.trial_id)
        self._submit(_Op(f"restore {trial.trial_id}", trial=trial, opening=True))

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
        for row in json.loads(result.get(EARLIER_EPOCHS, "[]")):  # a restored trial's
            earlier = int(row["epoch"])
            what = f"earlier result {trial.trial_id}#{earlier}"
            self._submit(
                _Op(what, trial=trial, step=earlier, metrics=result_metrics(row, earlier, now))
            )
        what = f"result {trial.trial_id}#{step}"
        self._submit(_Op(what, trial=trial, step=step, metrics=headline, tags=tags))

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
            run_id = self._run_with_params(trial)
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.log_text(run_id, text, f"errors/attempt-{attempt}.txt")

        self._submit(_Op(f"recover {trial.trial_id}", op, trial.trial_id))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status, reason, epochs = trial_ending(trial.last_result or {}, self.max_epochs)
        tags = ending_tags(status, epochs, reason)
        closing = _Closing(ENDED[status], tags, self._best.pop(trial.trial_id, []))
        self._submit(_Op(f"complete {trial.trial_id}", trial=trial, closing=closing))

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

        best = self._best.pop(trial.trial_id, [])

        def op() -> None:
            run_id = self._run_with_params(trial)
            self.client.log_text(run_id, full, "error.txt")
            self.client.log_text(run_id, latest, f"errors/attempt-{attempt}.txt")
            self._close(trial, "FAILED", tags, best)

        self._submit(_Op(f"error {trial.trial_id}", op, trial.trial_id))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Wait (up to FLUSH_AT_END_S) for everything queued to reach MLflow."""
        end = time.monotonic() + FLUSH_AT_END_S
        self._stop_sender(FLUSH_AT_END_S)
        if not self.flush(timeout_s=max(end - time.monotonic(), 0.0)):
            log.error(
                "MLflow at %s stayed unreachable: %d trial updates were not logged",
                self.tracking_uri,
                len(self._queue),
            )
