"""Resume after the driver is SIGKILLed, and growing a finished study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import ray
import sqlalchemy.exc
import yaml
from mlflow.tracking import MlflowClient

from tune.config import load_config
from tune.job import run_job
from tune.study import rdb

pytestmark = pytest.mark.slow

TOXTUNE = str(Path(sys.executable).parent / "toxtune")


def write_config(
    tmp_path: Path,
    data: Path,
    num_samples: int,
    ray_: dict | None = None,
    tracking: dict | None = None,
) -> Path:
    cfg = {
        "data": {"source": str(data), "cache_dir": str(tmp_path / "cache")},
        "featurizer": {"n_bits": 256},
        "search": {
            "num_samples": num_samples,
            "max_epochs": 3,
            "scheduler": "fifo",
            "max_concurrent": 2,
            "patience": 0,
            "space": {"n_layers": {"low": 1, "high": 1}, "width_0": {"choices": [32, 64]}},
        },
        "resources": {"cpus_per_trial": 1},
        "ray": {"storage_path": str(tmp_path / "results"), "num_cpus": 2, **(ray_ or {})},
        "tracking": {"run_name": "killme", "experiment_name": "resume", **(tracking or {})},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def finished_trials(storage: str, name: str) -> int:
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
        return 0
    try:
        study = optuna.load_study(study_name=name, storage=rdb(storage))
    except KeyError:
        return 0
    except sqlalchemy.exc.SQLAlchemyError:  # the driver is creating the database right now
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_driver_killed_mid_search_resumes_without_rerunning_or_orphans(
    tmp_path: Path, small_csv: Path
) -> None:
    kill_and_resume(tmp_path, write_config(tmp_path, small_csv, num_samples=6))


def kill_and_resume(tmp_path: Path, config: Path) -> None:
    """SIGKILL the driver after two trials finished, `--resume` it, and check that no trial was
    lost, duplicated or trained twice and no run was left RUNNING (any storage/tracking)."""
    job = load_config(config)
    env = {**os.environ, "TOXTUNE_FAULT_PLAN": json.dumps({"slow_epochs_s": 1.0})}
    log = open(tmp_path / "driver1.log", "w")  # noqa: SIM115
    driver = subprocess.Popen(
        [TOXTUNE, "tune", "--config", str(config)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while finished_trials(job.study_storage, job.name) < 2:
            assert driver.poll() is None, (tmp_path / "driver1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done_before = finished_trials(job.study_storage, job.name)
    assert done_before < 6, "the search finished before the kill: widen the window"
    before = {
        t.user_attrs["ray_trial_id"]: t.params
        for t in optuna.load_study(study_name=job.name, storage=job.study_storage).trials
        if t.state == optuna.trial.TrialState.COMPLETE
    }

    out = subprocess.run(
        [
            TOXTUNE,
            "tune",
            "--resume",
            job.name,
            "--storage-path",
            job.storage.uri,
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    study = optuna.load_study(study_name=job.name, storage=job.study_storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    # Trials finished before the kill kept their results and were not trained again.
    for t in complete:
        if t.user_attrs["ray_trial_id"] in before:
            assert t.params == before[t.user_attrs["ray_trial_id"]]
    client = MlflowClient(job.tracking_uri)
    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trial_ids = [k.data.tags["toxtune.trial_id"] for k in kids]
    assert len(trial_ids) == len(set(trial_ids))  # no duplicate child per trial
    finished = [k for k in kids if k.info.status == "FINISHED"]
    assert len(finished) >= 6
    for k in finished:
        if k.data.tags["toxtune.trial_id"] in before:
            history = client.get_metric_history(k.info.run_id, "train_loss")
            assert len(history) == 3  # one value per epoch: not trained twice


def test_finished_study_grows_and_learns_from_earlier_trials(
    tmp_path: Path, small_csv: Path
) -> None:
    config = write_config(tmp_path, small_csv, num_samples=3)
    job = load_config(config, {"ray.num_cpus": 2})
    try:
        first = run_job(job, progress=False)
    finally:
        ray.shutdown()
    study = optuna.load_study(study_name=job.name, storage=job.study_storage)
    before = [(t.number, t.params, t.value) for t in study.trials]
    assert len(before) == 3

    grown = load_config(config, {"ray.num_cpus": 2, "search.num_samples": 5})
    try:
        second = run_job(grown, progress=False)
    finally:
        ray.shutdown()
    study = optuna.load_study(study_name=job.name, storage=job.study_storage)
    assert len(study.trials) == 5
    assert [(t.number, t.params, t.value) for t in study.trials[:3]] == before
    assert second.parent_run_id == first.parent_run_id  # one MLflow job run, grown
    client = MlflowClient(grown.tracking_uri)
    exp = client.get_run(first.parent_run_id).info.experiment_id
    kids = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{first.parent_run_id}'"
    )
    assert len(kids) == 5
    assert len(second.trials) == 5
