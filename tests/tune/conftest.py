"""Fixtures for the orchestration tests: real MLflow and Ray services on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import MlflowServer, mlflow_server


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
