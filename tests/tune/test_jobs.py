"""Two jobs in one results folder: a later, unrelated command never changes a finished job."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
from mlflow.tracking import MlflowClient

from tests.tune.conftest import children, tiny_job
from tune.errors import JobMismatchError
from tune.job import run_job

pytestmark = pytest.mark.slow


def _snapshot(client: MlflowClient, run_id: str) -> dict[str, object]:
    run = client.get_run(run_id)
    kids = children(client, run_id)
    return {
        "status": run.info.status,
        "params": dict(run.data.params),
        "metrics": {k: repr(v) for k, v in run.data.metrics.items()},  # NaN-safe
        "children": sorted(k.info.run_id for k in kids),
        "child_status": sorted(k.info.status for k in kids),
    }


def test_second_job_on_other_data_leaves_the_first_untouched(
    tmp_path: Path, small_csv: Path, no_ray: None
) -> None:
    other = tmp_path / "sider.csv"
    frame = pd.read_csv(small_csv)
    frame.columns = ["smiles", "hepatobiliary", "renal", "cardiac"]
    frame.iloc[::-1].to_csv(other, index=False)

    first_job = tiny_job(tmp_path, small_csv, **{"tracking.run_name": None})
    first = run_job(first_job, progress=False)
    client = MlflowClient(first_job.tracking_uri)
    before = _snapshot(client, first.parent_run_id)
    study_name = first.name
    n_trials = len(optuna.load_study(study_name=study_name, storage=first_job.study_storage).trials)
    model_before = client.get_model_version_by_alias("toxtune-small", "champion")
    ray.shutdown()

    # Running the finished job again (same data, same name) has nothing to continue: it would
    # only register an identical model version.
    again = tiny_job(tmp_path, small_csv, **{"tracking.run_name": first.name})
    with pytest.raises(JobMismatchError, match="nothing to continue"):
        run_job(again, progress=False)
    assert len(client.search_model_versions(f"name='{first_job.model_name}'")) == 1
    assert _snapshot(client, first.parent_run_id) == before

    second_job = tiny_job(tmp_path, other, **{"tracking.run_name": None})
    second = run_job(second_job, progress=False)

    # Each job has a name of its own, a study of its own, a model of its own.
    assert second.name != first.name
    assert second.parent_run_id != first.parent_run_id
    assert _snapshot(client, first.parent_run_id) == before
    study = optuna.load_study(study_name=study_name, storage=first_job.study_storage)
    assert len(study.trials) == n_trials
    assert client.get_model_version_by_alias("toxtune-small", "champion").version == (
        model_before.version
    )
    assert str(client.get_model_version_by_alias("toxtune-sider", "champion").version) == "1"
    ray.shutdown()

    # Continuing the first job on the second job's data is refused before Ray starts.
    mixed = tiny_job(tmp_path, other, **{"tracking.run_name": first.name})
    with pytest.raises(JobMismatchError, match="data content") as err:
        run_job(mixed, progress=False)
    assert "targets" in str(err.value)
    # ... and so is continuing it on the same data with trials scored over folds (issue 26).
    refolded = tiny_job(tmp_path, small_csv, **{"tracking.run_name": first.name, "search.folds": 2})
    with pytest.raises(JobMismatchError, match=r"split\.folds \(1 saved, 2 now\)"):
        run_job(refolded, progress=False)
    assert not ray.is_initialized()
    assert _snapshot(client, first.parent_run_id) == before
