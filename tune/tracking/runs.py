"""The job's parent run: opened (or reopened) before the search, closed whatever happens.

Contract: `start_job_run` returns the one parent run of a job (tagged `toxtune.job=<name>`,
`toxtune.kind=job`, with the flattened config as params and the source tags); `finish_job_run`
ends it and any trial run left open, and never raises (it runs in `finally` blocks);
`close_orphans` ends trial runs a killed driver left RUNNING. Params are logged once: MLflow
params are immutable, so a resumed run keeps its first ones and a change is only warned about.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlflow.entities import Param, RunTag, ViewType

from tune.tracking.backend import (
    client_for,
    end_run_quietly,
    ensure_experiment,
    retrying,
    search_all,
)
from tune.tracking.names import (
    JOB_TAG,
    KIND_TAG,
    PARENT_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    flat_params,
    jsonable,
)
from tune.tracking.provenance import source_tags

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


def log_params(
    client: MlflowClient,
    run_id: str,
    params: Mapping[str, str],
    existing: Mapping[str, str] | None = None,
) -> None:
    """Log params once; those already there (a resumed/retried run) are left as they are.
    `existing`: the run's params when the caller has them (a run it just made has none)."""
    if existing is None:
        existing = client.get_run(run_id).data.params
    new = new_params(run_id, params, existing)
    for i in range(0, len(new), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[i : i + PARAMS_PER_BATCH])


PARAMS_PER_BATCH = 100  # MLflow's limit on params in one log_batch


def new_params(run_id: str, params: Mapping[str, str], existing: Mapping[str, str]) -> list[Param]:
    """The params of `params` the run does not hold yet; one whose value changed since it was
    first logged is kept as it was (MLflow params are immutable), with a warning."""
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed:
        log.warning("run %s: params changed since first logged, kept the old: %s", run_id, changed)
    return [Param(k, v) for k, v in params.items() if k not in existing]


def child_runs(client: MlflowClient, parent_run_id: str) -> list[Run]:
    """All trial runs of a job run."""
    exp = client.get_run(parent_run_id).info.experiment_id
    return search_all(client, [exp], f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def job_runs(
    client: MlflowClient, exp_id: str, job_key: str, view: int = ViewType.ACTIVE_ONLY
) -> list[Run]:
    """The parent runs of job `job_key` in the experiment, newest first (a resume reopens the
    first)."""
    runs = search_all(client, [exp_id], f"tags.`{KIND_TAG}` = 'job'", view)
    return [
        r for r in runs if r.data.tags.get(JOB_TAG) == job_key and PARENT_TAG not in r.data.tags
    ]


def find_job_run(tracking_uri: str, experiment_name: str, job_key: str) -> str | None:
    """The id of the parent run a resume of `job_key` would reopen, or None; creates nothing
    (no experiment; the caller makes sure a SQLite database exists: opening one creates it).
    A deleted experiment counts with its runs: `start_job_run` restores both."""
    client = client_for(tracking_uri)
    exp = retrying("find_job_run", lambda: client.get_experiment_by_name(experiment_name))
    if exp is None:
        return None
    deleted = exp.lifecycle_stage == "deleted"
    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    runs = retrying("find_job_run", lambda: job_runs(client, exp.experiment_id, job_key, view))
    return runs[0].info.run_id if runs else None


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
    plain = jsonable(config)
    if resume:
        parents = job_runs(client, exp_id, job_key)
        if parents:
            run = parents[0]
            run_id = run.info.run_id
            count = int(run.data.tags.get("toxtune.resumes", "0")) + 1
            client.update_run(run_id, status="RUNNING")
            tags = {**source_tags(), "toxtune.resumes": str(count), STATUS_TAG: "running"}
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            log_params(client, run_id, flat_params(plain))
            client.log_dict(run_id, plain, f"config/resume-{count}.json")
            return run_id
    run = client.create_run(
        exp_id,
        run_name=job_key,
        tags={**source_tags(), JOB_TAG: job_key, KIND_TAG: "job", STATUS_TAG: "running"},
    )
    run_id = run.info.run_id
    log_params(client, run_id, flat_params(plain))
    client.log_dict(run_id, plain, "config.json")
    client.log_dict(run_id, plain, "config.yaml")
    return run_id


def close_orphans(tracking_uri: str, parent_run_id: str, keep_trial_ids: set[str]) -> list[str]:
    """Trial runs left RUNNING (e.g. by a killed driver) that will not continue become KILLED.

    Returns the ids of the runs it ended; those of trials in `keep_trial_ids` stay open.
    """
    client = client_for(tracking_uri)
    closed = []
    for run in retrying("close_orphans", lambda: child_runs(client, parent_run_id)):
        if run.info.status != "RUNNING" or run.data.tags.get(TRIAL_TAG) in keep_trial_ids:
            continue
        run_id = run.info.run_id
        retrying("close_orphans", lambda rid=run_id: client.set_tag(rid, STATUS_TAG, "killed"))
        retrying("close_orphans", lambda rid=run_id: end_run_quietly(client, rid, "KILLED"))
        closed.append(run_id)
    return closed


def finish_job_run(tracking_uri: str, parent_run_id: str, status: str) -> None:
    """End the job run with `status` (FINISHED, FAILED, KILLED); trial runs still open are
    ended KILLED first. Errors are logged, not raised: this runs in `finally` blocks."""
    status = status.upper()
    client = client_for(tracking_uri)
    try:
        close_orphans(tracking_uri, parent_run_id, keep_trial_ids=set())
        retrying(
            "finish_job_run",
            lambda: client.set_tag(parent_run_id, STATUS_TAG, status.lower()),
        )
        retrying("finish_job_run", lambda: client.set_terminated(parent_run_id, status))
    except Exception as exc:
        log.error("could not end MLflow run %s as %s: %s", parent_run_id, status, exc)
