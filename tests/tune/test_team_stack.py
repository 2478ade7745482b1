"""A team's stack, for real: results in an S3-compatible bucket, MLflow on PostgreSQL with its
artifacts in the bucket, the Optuna study in PostgreSQL. Nothing is left on the driver's disk."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.team_stack import (
    Postgres,
    S3Server,
    TeamMlflow,
    bucket_keys,
    postgres_available,
    postgres_server,
    s3_server,
    team_mlflow,
)
from tests.tune.conftest import tiny_job
from tune.job import run_job

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not postgres_available(), reason="PostgreSQL server binaries not installed"),
]


@dataclass
class Stack:
    s3: S3Server
    pg: Postgres
    mlflow: TeamMlflow
    study_storage: str


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with s3_server() as s3, postgres_server() as pg:
        backend = pg.create_database("mlflow")
        study = pg.create_database("optuna")
        with team_mlflow(backend, f"{s3.uri}/mlartifacts", tmp_path / "mlflow.log") as server:
            yield Stack(s3, pg, server, study)


def test_object_store_job_keeps_everything_in_the_bucket_and_registers_a_servable_model(
    tmp_path: Path,
    small_csv: Path,
    no_ray: None,
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    job = tiny_job(
        tmp_path,
        small_csv,
        **{
            "ray.storage_path": f"{stack.s3.uri}/toxtune",
            "tracking.tracking_uri": stack.mlflow.url,
            "tracking.study_storage": stack.study_storage,
            "search.ensemble": 2,
        },
    )
    result = run_job(job, progress=False)

    keys = bucket_keys(stack.s3, f"toxtune/{result.name}/")
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"toxtune_job.yaml", "toxtune_fingerprint.json", "toxtune_done.json"} <= names
    assert "invalid_smiles.csv" in names
    assert any(k.rsplit("/", 1)[-1].startswith("experiment_state") for k in keys)
    checkpoints = [k for k in keys if "/checkpoint_" in k and k.endswith("/model.pt")]
    assert len(checkpoints) >= 1
    assert f"toxtune/{result.name}/ensemble/model.pt" in keys
    assert result.experiment_path == f"{stack.s3.uri}/toxtune/{result.name}"
    # Nothing under the working directory: no ./s3:, no mlflow.db, no optuna.db.
    assert list(workdir.iterdir()) == []
    assert not (Path.cwd() / "s3:").exists()

    # The study is in PostgreSQL, with every trial.
    study = optuna.load_study(study_name=result.name, storage=stack.study_storage)
    assert len(study.trials) == job.search.num_samples

    # The model's artifacts went to the bucket through the server; it loads and predicts.
    assert any(k.startswith("mlartifacts/") for k in bucket_keys(stack.s3))
    client = MlflowClient(stack.mlflow.url)
    version = client.get_model_version_by_alias(job.model_name, "champion")
    assert version.tags["data_hash"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow.url)
    model = mlflow.pyfunc.load_model(f"models:/{job.model_name}@champion")
    out = model.predict(pd.DataFrame({"smiles": ["CCO", "not a smiles"]}))
    assert out["error"].iloc[0] == "" and out["error"].iloc[1] != ""
