"""MLflow tracking (the record stage): one parent run per job, one child run per trial.

    check_tracking(uri)                         # backend.py: refuse an unusable backend first
    check_artifact_home(uri, exp)               # ... or a copied embedded store
    check_artifact_client(uri, exp)             # ... or a bucket without its client (boto3)
    parent = start_job_run(uri, exp, name, config, resume)     # runs.py: the job's run
    MlflowTrialCallback(uri, exp, parent, max_epochs, dataset)  # callback.py: trial runs
    log_job_summary(uri, parent, JobSummary(...))              # summary.py: metrics, plots, text
    register_best_model(uri, parent, checkpoint, name)         # registry.py: version, alias
    settle_trial_runs(uri, parent, endings)     # callback.py: runs a killed driver left open
    finish_job_run(uri, parent, status)                        # runs.py: closed whatever happens

Modules, one idea each: `backend` (URIs, clients, health checks, experiments, HTTP fast-fail),
`names` (tag keys, MLflow-safe keys), `provenance` (dataset input, source tags), `runs` (the
parent run's lifecycle, orphans, params), `callback` (the Ray Tune callback and its replay
queue), `summary` (the job summary and Description), `registry` (registration, alias policy).
Every call uses an explicit client for the job's URI; nothing sets MLflow's global state.
"""

from tune.errors import TrackingError
from tune.tracking.backend import (
    check_artifact_client,
    check_artifact_home,
    check_tracking,
    client_for,
    default_tracking_uri,
    ensure_experiment,
    experiment_url,
    fast_fail_http,
)
from tune.tracking.callback import (
    MlflowTrialCallback,
    TrialEnding,
    settle_trial_runs,
    trial_ending,
)
from tune.tracking.names import JOB_TAG, KIND_TAG, PARENT_TAG, STATUS_TAG, TRIAL_TAG
from tune.tracking.provenance import DatasetInfo, dataset_info, source_tags
from tune.tracking.registry import Registration, register_best_model
from tune.tracking.runs import child_runs, close_orphans, finish_job_run, start_job_run
from tune.tracking.summary import JobSummary, log_job_summary

__all__ = [
    "JOB_TAG",
    "KIND_TAG",
    "PARENT_TAG",
    "STATUS_TAG",
    "TRIAL_TAG",
    "DatasetInfo",
    "JobSummary",
    "MlflowTrialCallback",
    "Registration",
    "TrackingError",
    "TrialEnding",
    "check_artifact_client",
    "check_artifact_home",
    "check_tracking",
    "child_runs",
    "client_for",
    "close_orphans",
    "dataset_info",
    "default_tracking_uri",
    "ensure_experiment",
    "experiment_url",
    "fast_fail_http",
    "finish_job_run",
    "log_job_summary",
    "register_best_model",
    "settle_trial_runs",
    "source_tags",
    "start_job_run",
    "trial_ending",
]
