"""The servable model: an MLflow pyfunc that takes a table of SMILES and returns probabilities.

Input: a DataFrame with a `smiles` column. Output: one probability column per task and an
`error` column ("" when the row was scored; the reason, with NaN probabilities, when not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from toxmodel.checkpoint import load_checkpoint
from toxmodel.data import DataError

REQUIREMENTS = ["toxtune", "torch", "rdkit", "pandas", "numpy", "scikit-learn"]


class ToxicityModel(PythonModel):
    """Wraps a toxmodel checkpoint; invalid SMILES are flagged per row, never raised."""

    def load_context(self, context: Any) -> None:
        self._predictor = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context: Any, model_input: Any, params: dict | None = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if "smiles" not in model_input.columns:
                raise ValueError(
                    f"input needs a `smiles` column; got columns {list(model_input.columns)}"
                )
            smiles = model_input["smiles"]
        else:
            smiles = pd.Series(list(model_input))
        smiles = smiles.fillna("").astype(str).tolist()
        out = self._predictor.predict(smiles)
        return out[[*self._predictor.tasks, "error"]].reset_index(drop=True)


def signature(tasks: list[str]) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("string", "smiles")]),
        outputs=Schema([*(ColSpec("double", t) for t in tasks), ColSpec("string", "error")]),
    )


def log_pyfunc_model(uri: str, run_id: str, checkpoint_path: Path) -> str:
    """Log the checkpoint as a pyfunc model under `run_id`; returns the logged model's URI."""
    predictor = load_checkpoint(checkpoint_path)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ToxicityModel(),
            artifacts={"checkpoint": str(checkpoint_path)},
            signature=signature(list(predictor.tasks)),
            pip_requirements=REQUIREMENTS,
        )
    return info.model_uri


def predict_file(
    model_uri: str,
    input_csv: Path,
    output_csv: Path,
    tracking_uri: str | None = None,
    smiles_column: str = "smiles",
) -> Path:
    """Score a CSV of SMILES with a logged/registered model; input columns are kept."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if not input_csv.is_file():
        raise DataError(f"input file not found: {input_csv}")
    frame = pd.read_csv(input_csv)
    if smiles_column not in frame.columns:
        raise DataError(
            f"{input_csv}: no SMILES column {smiles_column!r}; columns: {list(frame.columns)} "
            "(choose one with --smiles-column)"
        )
    model = mlflow.pyfunc.load_model(model_uri)
    preds = model.predict(pd.DataFrame({"smiles": frame[smiles_column].fillna("").astype(str)}))
    out = pd.concat(
        [frame.reset_index(drop=True), preds.add_prefix("p_").rename(columns={"p_error": "error"})],
        axis=1,
    )
    output_csv.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(output_csv, index=False)
    return output_csv
