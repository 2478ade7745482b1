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
