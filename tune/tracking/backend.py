"""The tracking backend: URIs, explicit clients, health checks, experiments, HTTP fast-fail.

Contract: every MLflow call in toxtune goes through a client from `client_for(uri)` (never
MLflow's global tracking URI or active run); `check_tracking(uri)` refuses an unusable backend
before any trial runs; `ensure_experiment` returns an experiment tagged as a model-training one.

MLflow HTTP retries. MLflow 3 (checked on 3.17) reads `MLFLOW_HTTP_REQUEST_MAX_RETRIES`,
`..._BACKOFF_FACTOR` and `..._TIMEOUT` from the environment on every request
(`mlflow.utils.rest_utils.http_request`); neither `MlflowClient` nor `RestStore` accepts them,
and `call_endpoint` passes none, so there is no per-client or per-thread setting. Its defaults
(7 retries with exponential backoff, a 120 s timeout) would stall the Tune loop for minutes while
a server is down, and toxtune has its own replay queue (`callback.py`). So `fast_fail_http()`
sets them for the process while a block of toxtune's own MLflow calls runs, leaving alone any the
user set. It is counted: nested or concurrent holders share one setting, and the variables go
only when the last holder leaves. Other threads' MLflow calls in the same process see the same
values while a holder is inside; in a toxtune driver there are none.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tune.errors import JobMismatchError, TrackingError

if TYPE_CHECKING:
    from mlflow.entities import Run

log = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow's HTTP settings while toxtune logs (see the module docstring).
FAST_FAIL_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
MAX_BACKOFF_S = 15.0

# The experiment tag MLflow 3's UI reads for an experiment's kind (the experiment-kind selector
# in mlflow/server/js; `mlflow/demo` sets it too). MLflow 3.17's UI opens an experiment in the
# view of its workflow switch (GenAI by default, or `?workflowType=` in the URL) whatever the
# tag says, so links toxtune prints carry `workflowType=machine_learning` (`experiment_url`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
UI_WORKFLOW = "workflowType=machine_learning"


def default_tracking_uri(root: Path) -> str:
    """`sqlite:///<root>/mlflow.db` with an absolute path: the embedded default backend."""
    return f"sqlite:///{Path(root).expanduser().resolve() / 'mlflow.db'}"


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> Path | None:
    """Where a SQLite backend keeps artifacts: `mlartifacts/` beside the database, never cwd."""
    path = sqlite_path(uri)
    return path.expanduser().resolve().parent / "mlartifacts" if path else None


def check_artifact_home(uri: str, experiment_name: str) -> None:
    """Refuse an embedded (SQLite) store that was copied or moved from another folder.

    MLflow records absolute artifact locations, so such a store keeps sending the experiment's
    artifacts (models, plots, trial files) to `mlartifacts/` of the folder it came from: a job
    resumed in a copy would write into the original. JobMismatchError naming both folders.
    """
    root, path = artifact_root(uri), sqlite_path(uri)
    if root is None or path is None or not path.exists():
        return
    exp = client_for(uri).get_experiment_by_name(experiment_name)
    location = exp.artifact_location if exp is not None else ""
    if not location.startswith("file:"):
        return
    home = Path(url2pathname(urlparse(location).path)).parent
    if home.name == root.name and home != root:
        raise JobMismatchError(
            f"the MLflow store {path} keeps experiment {experiment_name!r}'s artifacts in "
            f"{home}, not beside it in {root}: it was copied or moved from {home.parent}, and "
            "MLflow would write this job's artifacts there. Continue the job in its original "
            "folder, or track it on an MLflow server (--tracking-uri http://...)"
        )


# The package MLflow's client imports for an artifact location's scheme, on the first upload:
# a job whose experiment keeps its artifacts in a bucket needs it on the driver.
ARTIFACT_CLIENTS = {"s3": "boto3"}


def check_artifact_client(uri: str, experiment_name: str) -> None:
    """Refuse, before the job runs, an experiment whose artifacts go to an object store whose
    client package is missing (an MLflow server started with `--default-artifact-root s3://...`
    without `--serve-artifacts`): MLflow would import it at the first upload, after trials.
    Makes nothing in an embedded store (a store that vanished must still be found missing);
    on a server it makes the job's experiment, as `start_job_run` would, to learn where."""
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        return  # a new embedded store: its experiments keep their artifacts beside it
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None and path is not None:
        return  # likewise a new experiment in an embedded store (`ensure_experiment`)
    if exp is None:  # on a server, where it will keep them is the server's to say
        exp = client.get_experiment(ensure_experiment(client, uri, experiment_name))
    package = ARTIFACT_CLIENTS.get(urlparse(exp.artifact_location).scheme)
    if package is None:
        return
    try:
        importlib.import_module(package)
    except ImportError as exc:
        raise TrackingError(
            f"MLflow experiment {experiment_name!r} keeps its artifacts in "
            f"{exp.artifact_location}, which needs the {package!r} package on this machine: "
            "install it with: pip install 'toxtune[team]'"
        ) from exc


def client_for(uri: str) -> MlflowClient:
    """A client bound to `uri` for tracking and registry (no global MLflow state)."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_url(ui: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment (its training-runs table) or of one run in it."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/{page}?{UI_WORKFLOW}"


def end_run_quietly(client: MlflowClient, run_id: str, status: str) -> None:
    """End a run as `MlflowClient.set_terminated` does (status, end time now), without what it
    adds on a server: a read of the whole run and two "View run / View experiment" lines on
    stdout, per trial: at 64 trials in flight, a request and two console lines for every trial
    that ends. MLflow's client has no public call for this (checked on 3.17): it goes to the
    client's store, as `set_terminated` itself does after printing."""
    from mlflow.entities import RunStatus
    from mlflow.utils.time import get_current_time_millis

    client._tracking_client.store.update_run_info(
        run_id, RunStatus.from_string(status), end_time=get_current_time_millis(), run_name=None
    )


# --------------------------------------------------------------------------------------------
# HTTP fast-fail (see the module docstring for why it is process-wide)

_held_lock = threading.Lock()
_held: dict[str, int] = {}  # variable -> holders, for the variables fast_fail_http set


@contextlib.contextmanager
def fast_fail_http(settings: Mapping[str, str] = FAST_FAIL_HTTP) -> Iterator[None]:
    """Turn MLflow's HTTP retries down for the process while the block runs.

    A variable the user set is left as it is. One this context set stays until its last holder
    leaves; a holder that asks for another value of a variable already held gets the held one.
    """
    mine = []
    with _held_lock:
        for key, value in settings.items():
            if key in _held:
                _held[key] += 1
            elif key in os.environ:
                continue  # the user's choice
            else:
                os.environ[key] = value
                _held[key] = 1
            mine.append(key)
    try:
        yield
    finally:
        with _held_lock:
            for key in mine:
                _held[key] -= 1
                if not _held[key]:
                    del _held[key]
                    os.environ.pop(key, None)


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


def retrying(what: str, fn: Callable[[], T], deadline_s: float = 60.0) -> T:
    """Run `fn` with HTTP fast-fail, retrying transient failures until `deadline_s` passes."""
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


def server_alive(uri: str, timeout: float = 3.0) -> bool:
    """A tracking server answers /health (always True for a database URI)."""
    if not is_http(uri):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# Checks and experiments


def check_tracking(uri: str, timeout: float = 10) -> None:
    """Refuse an unreachable tracking server or an unusable SQLite path, saying what to do.

    Called before any trial runs, so a typo in the URI costs seconds, not a search.
    """
    if is_http(uri):
        _check_server(uri, timeout)
        return
    path = sqlite_path(uri)
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
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:  # a database URI (postgresql://, mysql://): its driver is imported on first use
        url = make_url(uri)
        dialect = url.get_dialect()
    except ArgumentError:  # not a database URI (databricks://, ...): MLflow's to judge
        return
    try:
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()  # SQLAlchemy 2 or 1.4
    except ImportError as exc:
        driver = exc.name or url.drivername
        fix = (
            "install the PostgreSQL drivers with: pip install 'toxtune[team]'"
            if url.get_backend_name() == "postgresql"
            else f"install the package that provides {driver!r} (toxtune[team] brings "
            "PostgreSQL's only)"
        )
        raise TrackingError(
            f"tracking URI {url.render_as_string(hide_password=True)}: the database driver "
            f"{driver!r} is not installed; {fix}"
        ) from exc


def _check_server(uri: str, timeout: float) -> None:
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


def ensure_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """The experiment's id, tagged as a model-training experiment (`EXPERIMENT_KIND_TAG`).

    A new one on SQLite keeps its artifacts under `mlartifacts/`; a deleted one is restored; an
    existing one without a kind gets it (a kind someone chose is left alone).
    """
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = artifact_root(uri)
        location = (root / re.sub(r"[^\w.-]+", "_", name)).as_uri() if root else None
        try:
            return client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}
            )
        except MlflowException:  # created concurrently
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def search_all(
    client: MlflowClient, exp_ids: list[str], filter_string: str, view: int | None = None
) -> list[Run]:
    """Every run matching the filter (all pages), newest first; `view` an MLflow ViewType
    (default: active runs only)."""
    from mlflow.entities import ViewType

    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            exp_ids,
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY if view is None else view,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs
