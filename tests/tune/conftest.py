"""Fixtures for the orchestration tests: real MLflow and Ray services on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.services import MlflowServer, mlflow_server
from toxmodel.featurize import FeaturizerConfig, featurize
from toxmodel.model import ModelConfig
from toxmodel.split import Split
from toxmodel.train import FitResult, TrainConfig, fit
from tune import settings
from tune.config import JobConfig, load_config


@pytest.fixture(scope="session", autouse=True)
def toxtune_process() -> None:
    """The process-wide settings the `toxtune` entry point makes (tests call run_job directly)."""
    settings.configure_process()


@pytest.fixture
def mlflow_http(tmp_path: Path) -> Iterator[MlflowServer]:
    """A real `mlflow server` on a free 127.0.0.1 port, stopped after the test."""
    with mlflow_server(tmp_path / "mlflow-server") as server:
        yield server


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    """The embedded default tracking backend, in the test's own folder."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


SHARED_TOX21 = Path(__file__).resolve().parents[3] / "shared" / "data" / "tox21.csv"
TASKS = ["NR-AhR", "SR-ARE", "SR-MMP"]


def _synthetic_rows() -> list[tuple[str, float, float, float]]:
    """Distinct small molecules whose labels follow learnable substructure rules."""
    heads = ["C" * n for n in range(1, 9)] + ["c1ccccc1", "c1ccncc1", "C1CCCCC1", "CC(C)"]
    tails = ["O", "N", "Cl", "F", "C(=O)O", "C(=O)N", "S", "Br", "C#N", "OC", "NC", "c1ccccc1"]
    rows = []
    for h in heads:
        for t in tails:
            smi = h + t
            rows.append((smi, float("N" in t), float("Cl" in t or "Br" in t), float("c1" in smi)))
    return rows


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~300 molecules with 3 tasks: a slice of the real Tox21 when present, else synthetic."""
    import pandas as pd

    path = tmp_path_factory.mktemp("data") / "small.csv"
    if SHARED_TOX21.exists():
        frame = pd.read_csv(SHARED_TOX21).iloc[:400][["smiles", *TASKS]]
    else:
        frame = pd.DataFrame(_synthetic_rows(), columns=["smiles", *TASKS])
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def no_ray() -> Iterator[None]:
    """Each test gets its own local Ray, shut down afterwards even on failure."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def tiny_job(tmp_path: Path, data: Path, **overrides: object) -> JobConfig:
    base: dict[str, object] = {
        "data.source": str(data),
        "data.cache_dir": str(tmp_path / "cache"),
        "featurizer.n_bits": 256,
        "search.num_samples": 4,
        "search.max_epochs": 3,
        "search.grace_period": 1,
        "search.reduction_factor": 2,
        "search.max_concurrent": 2,
        "search.patience": 0,
        "search.space": {
            "n_layers": {"low": 1, "high": 2},
            "width_0": {"choices": [32, 64]},
            "width_1": {"choices": [32]},
            "batch_size": {"choices": [64]},
        },
        "resources.cpus_per_trial": 1,
        "ray.storage_path": str(tmp_path / "results"),
        "ray.num_cpus": 2,
        "tracking.run_name": "tiny",
        "tracking.experiment_name": "tiny-exp",
        "tracking.registered_model_name": None,
    }
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(overrides=base)


def children(client: MlflowClient, parent_id: str) -> list:
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=500
    )


# A tiny model for the prediction-side tests (serving, explain): 48 SMILES whose two labels follow
# substructure rules (a nitrogen in the tail; an aromatic ring); the first 36 train, 12 validate.
TINY_TASKS = ["NR-AR", "SR-p53"]
TINY_SMILES = [
    h + t
    for h in ["C", "CC", "CCC", "CC(C)", "c1ccccc1", "c1ccncc1", "C1CCCCC1", "OCC"]
    for t in ["O", "N", "Cl", "F", "C(=O)O", "C(=O)N"]
]
TINY_FEATURIZER = FeaturizerConfig(n_bits=128)
TINY_TRAIN_ROWS = 36


def tiny_fit(seed: int = 0, epochs: int = 2) -> FitResult:
    """A 16-unit MLP trained on TINY_SMILES for `epochs` epochs (seconds on one thread)."""
    feats = featurize(TINY_SMILES, TINY_FEATURIZER, n_jobs=1)
    labels = [[float("N" in s), float("c1" in s)] for s in TINY_SMILES]
    rows = np.arange(len(TINY_SMILES))
    split = Split(train=rows[:TINY_TRAIN_ROWS], valid=rows[TINY_TRAIN_ROWS:], test=rows[:0])
    return fit(
        feats,
        np.array(labels, dtype=np.float32),
        split,
        TINY_TASKS,
        ModelConfig(hidden=(16,)),
        TrainConfig(epochs=epochs, batch_size=8, patience=0, seed=seed),
        num_threads=1,
    )
