"""Explanations and MLflow: a model's `Predictor` from the registry, and pictures logged to a run.

Contract: `load_predictor(model, tracking_uri, dst)` gives the `Predictor` behind a checkpoint
file or a `models:/`/`runs:/` URI (the model's checkpoint artifact, downloaded and read with
`load_checkpoint`, so nothing is unpickled); `log_explanations(...)` draws, per task, the test
split's most confident true positives (`toxmodel.explain`) and logs them to a run under
`explanations/<task>/`. Both use an explicit client for the URI, no global MLflow state.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from toxmodel.checkpoint import CheckpointError, Predictor, load_checkpoint
from toxmodel.explain import explain, safe_name, write_explanations
from tune.errors import ServingError, TrackingError
from tune.serving import CHECKPOINT_ARTIFACT, resolve_model_uri
from tune.tracking.backend import client_for, sqlite_path

log = logging.getLogger(__name__)

ARTIFACT_DIR = "explanations"  # the run's artifact folder: explanations/<task>/000_<task>.png
MODEL_URI_SCHEMES = ("models:/", "runs:/")


def load_predictor(model: str, tracking_uri: str | None, dst: Path) -> Predictor:
    """The Predictor of a checkpoint file, or of a logged/registered model's checkpoint artifact.

    `model` is a path or `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/<model id>`,
    `runs:/<run id>/<path>`; URIs are resolved in `tracking_uri` (the MLflow default when None)
    and the checkpoint is downloaded under `dst`. A model that cannot be found or read is one
    ServingError naming it; a file that is not a checkpoint is toxmodel's CheckpointError.
    """
    if not model.startswith(MODEL_URI_SCHEMES):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ServingError(
                f"--model {model}: no such checkpoint file (give a checkpoint path or a "
                "models:/NAME@ALIAS URI)"
            )
        return _load_checkpoint(path)
    where = f" in {tracking_uri}" if tracking_uri else ""
    store = sqlite_path(tracking_uri) if tracking_uri else None
    if store is not None and not store.is_file():
        raise ServingError(
            f"no MLflow store at {store}: run `toxtune tune` in this folder first, or pass "
            "--tracking-uri (or --storage-path) of the store the model was registered in"
        )
    try:
        location = resolve_model_uri(model, tracking_uri) if tracking_uri else model
        location = location.rstrip("/")
        mlmodel = download_artifacts(
            artifact_uri=f"{location}/MLmodel",
            dst_path=str(dst),
            tracking_uri=tracking_uri,
            registry_uri=tracking_uri,
        )
        artifacts = Model.load(mlmodel).flavors.get("python_function", {}).get("artifacts", {})
        if CHECKPOINT_ARTIFACT not in artifacts:
            raise ServingError(f"{model}{where} is not a toxtune model (no checkpoint artifact)")
        local = download_artifacts(
            artifact_uri=f"{location}/{artifacts[CHECKPOINT_ARTIFACT]['path']}",
            dst_path=str(dst),
            tracking_uri=tracking_uri,
            registry_uri=tracking_uri,
        )
    except (MlflowException, OSError) as exc:
        reason = str(getattr(exc, "message", exc)).strip().splitlines()[0]
        raise ServingError(f"cannot load model {model}{where}: {reason}") from exc
    return _load_checkpoint(Path(local))


def _load_checkpoint(path: Path) -> Predictor:
    """`load_checkpoint`, its error cut to the first line (torch's unpickling errors run to
    several lines, and the CLI prints one)."""
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        lines = str(exc).strip().splitlines()
        if len(lines) <= 1:
            raise
        raise CheckpointError(lines[0].rstrip(" :") + " ...)") from exc


def confident_positives(labels: np.ndarray, probs: np.ndarray, k: int) -> list[int]:
    """Rows with label 1 and a finite probability, most confident first (ties: lower row)."""
    labels, probs = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    rows = np.flatnonzero((labels == 1.0) & np.isfinite(probs))
    order = rows[np.lexsort((rows, -probs[rows]))]
    return [int(r) for r in order[: max(0, k)]]


def log_explanations(
    tracking_uri: str,
    run_id: str,
    predictor: Predictor,
    smiles: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    tasks: Sequence[str],
    per_task: int = 3,
) -> dict[str, int]:
    """Log, per task, pictures of the `per_task` most confident true positives to the run.

    `smiles`, `labels` and `probs` are the test split's rows (labels and probabilities with one
    column per entry of `tasks`, NaN for a missing label). Each task's folder
    `explanations/<task>/` holds `000_<task>.png` (000 = the most confident), its atom-weight
    CSV and `explanations.csv` (SMILES, probability, MACCS/descriptor shares). Tasks the
    predictor lacks or without a positive are skipped; so is a molecule that cannot be explained
    (a warning). Returns the pictures logged per task. MLflow failures raise TrackingError.
    """
    labels, probs = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    tasks = list(tasks)
    want = (len(smiles), len(tasks))
    if labels.shape != want or probs.shape != want:
        raise ValueError(
            f"labels {labels.shape} and probs {probs.shape} must both be (molecules, tasks) = "
            f"{want}"
        )
    client = client_for(tracking_uri)
    logged: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="toxtune-explain-") as tmp:
        for j, task in enumerate(tasks):
            if task not in predictor.tasks:
                log.warning("explanations: the model has no task %r; skipped", task)
                continue
            rows = confident_positives(labels[:, j], probs[:, j], per_task)
            if not rows:
                continue
            found = explain(predictor, [str(smiles[r]) for r in rows], task)
            for item in found:
                if not item.ok:
                    log.warning("explanations: %s %s: %s", task, item.smiles, item.error)
            folder = Path(tmp) / safe_name(task)
            pictures = write_explanations(found, folder, "png")
            try:
                client.log_artifacts(run_id, str(folder), f"{ARTIFACT_DIR}/{folder.name}")
            except MlflowException as exc:
                raise TrackingError(f"cannot log explanations to run {run_id}: {exc}") from exc
            logged[task] = len(pictures)
    return logged
