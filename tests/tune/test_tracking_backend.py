"""The tracking backend without a server: MLflow's HTTP fast-fail settings, held and released."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import ray

from tests.tune.conftest import tiny_job
from tune.errors import JobMismatchError, TrackingError
from tune.job import run_job
from tune.tracking.backend import (
    FAST_FAIL_HTTP,
    check_artifact_client,
    check_artifact_home,
    client_for,
    ensure_experiment,
    fast_fail_http,
)

RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in FAST_FAIL_HTTP:
        monkeypatch.delenv(key, raising=False)


def test_settings_hold_inside_and_go_after() -> None:
    with fast_fail_http():
        assert {k: os.environ.get(k) for k in FAST_FAIL_HTTP} == FAST_FAIL_HTTP
    assert not set(FAST_FAIL_HTTP) & set(os.environ)


def test_a_variable_the_user_set_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RETRIES, "3")
    with fast_fail_http():
        assert os.environ[RETRIES] == "3"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"
    assert os.environ[RETRIES] == "3"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_nested_holders_keep_the_settings_until_the_outer_leaves() -> None:
    with fast_fail_http():
        with fast_fail_http({**FAST_FAIL_HTTP, "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}):
            assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"  # the held value
        assert os.environ[RETRIES] == "0"
    assert RETRIES not in os.environ


def test_a_thread_leaving_does_not_pull_the_settings_from_another() -> None:
    """Two holders in two threads: the first to leave must not unset the other's settings."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[str | None] = []

    def first() -> None:
        with fast_fail_http():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with fast_fail_http():
            second_in.set()
            first_out.wait(10)
            seen.append(os.environ.get(RETRIES))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == ["0"]
    assert RETRIES not in os.environ


def test_an_embedded_store_copied_to_another_folder_is_refused(tmp_path: Path) -> None:
    """MLflow keeps absolute artifact locations: a job continued on a copied SQLite store would
    write its artifacts into the original folder, so the copy is refused, naming both."""
    original = tmp_path / "j8" / "toxtune_results"
    original.mkdir(parents=True)
    uri = f"sqlite:///{original / 'mlflow.db'}"
    ensure_experiment(client_for(uri), uri, "tox")
    check_artifact_home(uri, "tox")  # in its own folder: fine
    copy = tmp_path / "j8b" / "toxtune_results"
    shutil.copytree(original, copy)
    with pytest.raises(JobMismatchError) as err:
        check_artifact_home(f"sqlite:///{copy / 'mlflow.db'}", "tox")
    assert str(original / "mlartifacts") in str(err.value)
    assert str(copy / "mlartifacts") in str(err.value)
    check_artifact_home(f"sqlite:///{copy / 'mlflow.db'}", "another-experiment")


def test_a_bucket_for_artifacts_without_its_client_is_refused_before_the_job_runs(
    tmp_path: Path, small_csv: Path, no_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An experiment whose artifacts go to s3:// needs boto3 on the driver; MLflow would import
    it only at the first upload, after the search: the job is refused at its start instead."""
    job = tiny_job(tmp_path, small_csv)
    client = client_for(job.tracking_uri)
    client.create_experiment(job.tracking.experiment_name, artifact_location="s3://team/mlflow")
    check_artifact_client(job.tracking_uri, job.tracking.experiment_name)  # boto3 here: fine
    monkeypatch.setitem(sys.modules, "boto3", None)  # as on a machine without toxtune[team]
    said = r"'tiny-exp' keeps its artifacts in s3://team/mlflow, which needs the 'boto3' package"
    with pytest.raises(TrackingError, match=said + r".*pip install 'toxtune\[team\]'"):
        run_job(job, progress=False)
    assert not ray.is_initialized()
    # an experiment not made yet in an embedded store keeps its artifacts beside it: no client,
    # and the check makes nothing
    check_artifact_client(job.tracking_uri, "another")
    assert client_for(job.tracking_uri).get_experiment_by_name("another") is None
