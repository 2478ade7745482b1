"""The servable model: an MLflow pyfunc that takes a table of SMILES and returns probabilities.

Input: a DataFrame with a `smiles` column (other columns are ignored). Output: one probability
column per task (calibrated when the checkpoint holds a calibration), an `error` column ("" when
the row was scored; the reason when the SMILES could not be parsed), then what a toxicologist
needs to judge each number: `<task>_std` per task (the ensemble's spread; null for a single
network, which has none), `nn_similarity` (nearest-neighbour Tanimoto similarity to the training
set) and `in_domain` (true when that similarity reaches the threshold chosen on validation).
An empty cell is None, so the served JSON holds `null` there (NaN is not JSON, and strict
parsers refuse it); a number column is floats when it has no empty cell, objects (floats and
None) otherwise, and `in_domain` holds True/False/None. Bad SMILES never raise.

The model is logged as MLflow 3 "models from code": the model's code is a three-line entry file
(`toxtune_model.py`, written at log time) that builds `ToxicityModel`; the checkpoint travels as
the `checkpoint` artifact and is read with `torch.load(weights_only=True)`. Nothing is pickled,
so loading a model cannot run code other than the entry file and the installed `toxtune`
package. Serving therefore needs `toxtune` importable, e.g.
`mlflow models serve -m models:/NAME@champion --env-manager local` in the project's venv.

MLflow's scoring server parses a request's JSON before the model sees it, and a body nested
deeper than Python's recursion limit (`[[[[...]]]]`) made it answer HTTP 500 with a plain-text
body. `guard_scoring_server` (run when the model is loaded) makes that a 400 with MLflow's JSON
error body instead.

Logging uses an explicit `MlflowClient` (a logged model under the job run's experiment, linked
to that run), never MLflow's global tracking URI or active run.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.metadata
import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from toxmodel.checkpoint import IN_DOMAIN, SIMILARITY, STD_SUFFIX, load_checkpoint
from toxmodel.data import read_table
from tune.errors import ServingError

__all__ = [
    "PredictedFile",
    "ToxicityModel",
    "guard_scoring_server",
    "log_pyfunc_model",
    "model_signature",
    "predict_file",
    "requirements",
]

SMILES = "smiles"
ERROR = "error"
CHECKPOINT_ARTIFACT = "checkpoint"
ENTRY_FILE = "toxtune_model.py"
ENTRY_CODE = '''"""toxtune pyfunc entry point (MLflow models from code): see tune/serving.py."""

from mlflow.models import set_model

from tune.serving import ToxicityModel

set_model(ToxicityModel())
'''
# Third-party packages the model code imports (toxmodel, this module), pinned in the logged
# model (toxtune itself must be installed where it is served).
RUNTIME_PACKAGES = (
    "mlflow",
    "torch",
    "rdkit",
    "numpy",
    "pandas",
    "scikit-learn",
    "scipy",
    "numba",
    "lightgbm",  # a fold ensemble blended with trees (search.trees) predicts with them
    "tqdm",
)
PREDICT_CHUNK = 50_000  # rows per chunk in predict_file
# Output names pandas would read as compressed but predict_file cannot write so (it writes gzip
# for a name ending in .gz, plain CSV otherwise): refused rather than written as plain CSV.
UNWRITTEN_COMPRESSION = (".bz2", ".xz", ".zip", ".zst", ".tar")
EXAMPLE_SMILES = ["CCO", "c1ccccc1O"]  # the logged input example (validated at log time)
_GUARDED = "_toxtune_guarded"  # marks MLflow's scoring-server function once it is wrapped

log = logging.getLogger(__name__)


class ToxicityModel(PythonModel):
    """Wraps a toxmodel checkpoint; invalid SMILES are flagged per row, never raised."""

    def load_context(self, context: Any) -> None:
        """Load the checkpoint artifact on CPU (`TOXTUNE_SERVE_DEVICE` overrides)."""
        guard_scoring_server()
        device = os.environ.get("TOXTUNE_SERVE_DEVICE", "cpu")
        self._predictor = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT], device=device)
        self.tasks = list(self._predictor.tasks)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """SMILES table -> probabilities per task, `error`, then the uncertainty columns."""
        smiles = _smiles_column(model_input)
        out = self._predictor.predict(smiles)
        return empty_as_none(out[output_columns(self.tasks)].reset_index(drop=True))

    def notes(self) -> list[str]:
        """What a reader of the predictions must know about this model's extra columns."""
        return model_notes(
            self._predictor.has_spread,
            self._predictor.domain is not None,
            self._predictor.calibration is not None,
        )


def guard_scoring_server() -> None:
    """Make MLflow's scoring server answer an over-nested JSON body with HTTP 400 and a JSON error
    that says so, not 500 and a plain-text body.

    Checked on MLflow 3.17: `/invocations` calls `mlflow.pyfunc.scoring_server.invocations(data,
    content_type, model, input_schema)` (looked up by name at each request), which parses the
    body with `json.loads`; a body nested deeper than Python's recursion limit raises
    RecursionError, which nothing in the server catches. The function is wrapped once per
    process so that such an error becomes an invalid-parameter MlflowException (the server's handler
    turns it into 400 with `{"error_code": "INVALID_PARAMETER_VALUE", "message": ...}`). On an
    MLflow without that function nothing is changed.
    """
    from mlflow.pyfunc import scoring_server

    invocations = getattr(scoring_server, "invocations", None)
    if not callable(invocations):
        log.debug("mlflow.pyfunc.scoring_server has no invocations(); not guarded")
        return
    if getattr(invocations, _GUARDED, False):
        return

    @functools.wraps(invocations)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return invocations(*args, **kwargs)
        except RecursionError:
            raise MlflowException.invalid_parameter_value(
                "the request body nests JSON arrays or objects too deeply to be parsed (more "
                f"than about {sys.getrecursionlimit()} levels); send a table of SMILES, e.g. "
                + json.dumps({"dataframe_split": {"columns": [SMILES], "data": [["CCO"]]}})
            ) from None

    setattr(guarded, _GUARDED, True)
    scoring_server.invocations = guarded


def output_columns(tasks: Sequence[str]) -> list[str]:
    """The served model's columns, in order."""
    return [*tasks, ERROR, *(f"{t}{STD_SUFFIX}" for t in tasks), SIMILARITY, IN_DOMAIN]


def model_notes(has_spread: bool, has_domain: bool, calibrated: bool) -> list[str]:
    """One line per extra column a model leaves empty (or probabilities it leaves raw)."""
    notes = []
    if not has_spread:
        notes.append(
            "the model is a single network, so the uncertainty (<task>_std) columns are empty"
        )
    if not has_domain:
        notes.append(
            "the model holds no applicability domain (made before toxtune recorded one), so "
            "nn_similarity and in_domain are empty"
        )
    if not calibrated:
        notes.append("the model holds no calibration: its probabilities are uncalibrated")
    return notes


def empty_as_none(frame: pd.DataFrame) -> pd.DataFrame:
    """Empty cells (NaN, <NA>) become None, and booleans plain Python bools.

    MLflow's scoring server writes a DataFrame with `to_dict` + `json.dump`, which turns NaN into
    the bare token `NaN` and cannot encode pandas' <NA>; None becomes `null`.
    """
    out = frame.copy()
    for name in out.columns:
        if name == ERROR:
            continue
        column = out[name]
        empty = column.isna()
        if str(column.dtype) == "boolean":
            values = [None if e else bool(v) for v, e in zip(column, empty, strict=True)]
            out[name] = pd.Series(values, index=out.index, dtype=object)
        elif empty.any():
            column = column.astype(object)
            column[empty] = None
            out[name] = column
    return out


def _smiles_column(model_input: Any) -> list[str]:
    """The `smiles` values as strings ("" for missing cells), or ValueError naming the column."""
    if isinstance(model_input, pd.DataFrame):
        if SMILES not in model_input.columns:
            raise ValueError(
                f"the model input needs a `{SMILES}` column of SMILES strings; "
                f"got columns {list(model_input.columns)}"
            )
        values = model_input[SMILES].tolist()
    elif isinstance(model_input, dict):
        if SMILES not in model_input:
            raise ValueError(f"the model input needs a `{SMILES}` field; got {sorted(model_input)}")
        values = list(np.atleast_1d(np.asarray(model_input[SMILES], dtype=object)))
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    return ["" if _missing(v) else str(v) for v in values]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def model_signature(tasks: Sequence[str]) -> ModelSignature:
    """Input: string column `smiles`. Output: a double per task, the string `error`, an optional
    double `<task>_std` per task, the optional double `nn_similarity` and boolean `in_domain`."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", SMILES)]),
        outputs=Schema(
            [
                *(ColSpec("double", t) for t in tasks),
                ColSpec("string", ERROR),
                *(ColSpec("double", f"{t}{STD_SUFFIX}", required=False) for t in tasks),
                ColSpec("double", SIMILARITY, required=False),
                ColSpec("boolean", IN_DOMAIN, required=False),
            ]
        ),
    )


def requirements() -> list[str]:
    """Pinned third-party requirements of the served model (local version labels dropped)."""
    pins = []
    for name in RUNTIME_PACKAGES:
        try:
            version = importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
        else:
            pins.append(f"{name}=={version}")
    return pins


def log_pyfunc_model(
    tracking_uri: str,
    run_id: str,
    checkpoint_path: Path,
    name: str = "model",
    tasks: Sequence[str] | None = None,
) -> ModelInfo:
    """Log the checkpoint as a pyfunc logged model of run `run_id`; returns its ModelInfo.

    `info.model_uri` (`models:/<model_id>`) is what a registered version points at. `tasks`
    default to the checkpoint's own.
    """
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    checkpoint_path = Path(checkpoint_path)
    if tasks is None:
        tasks = load_checkpoint(checkpoint_path).tasks
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        model_type="toxtune-mlp",
    )
    meta = Model(
        artifact_path=logged.artifact_location,
        model_uuid=logged.model_id,
        run_id=run_id,
        model_id=logged.model_id,
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            entry = Path(tmp) / ENTRY_FILE
            entry.write_text(ENTRY_CODE)
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                path=str(local),
                python_model=str(entry),
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_path)},
                signature=model_signature(list(tasks)),
                input_example=pd.DataFrame({SMILES: EXAMPLE_SMILES}),
                pip_requirements=requirements(),
                mlflow_model=meta,
            )
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    return meta.get_model_info(client.finalize_logged_model(logged.model_id, "READY"))


def resolve_model_uri(model_uri: str, tracking_uri: str) -> str:
    """Where a `models:/` URI's files are stored, looked up with a client bound to the URI.

    MLflow's own `models:/` resolution reads the global registry URI; this does not. Accepts
    models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest and models:/<model id>; any
    other URI is returned as it is.
    """
    if not model_uri.startswith("models:/"):
        return model_uri
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    head, _, rest = model_uri.removeprefix("models:/").strip("/").partition("/")
    if "@" in head:
        name, alias = head.split("@", 1)
        version, sub = client.get_model_version_by_alias(name, alias).version, rest
    elif rest:
        name = head
        version, _, sub = rest.partition("/")
        if version == "latest":
            found = client.search_model_versions(
                f"name = '{name}'", max_results=1, order_by=["version_number DESC"]
            )
            if not found:
                raise mlflow.MlflowException(f"registered model {name!r} has no version")
            version = found[0].version
    else:
        return client.get_logged_model(head).artifact_location
    location = client.get_model_version_download_uri(name, str(version))
    return f"{location.rstrip('/')}/{sub}" if sub else location


def load_model(model_uri: str, tracking_uri: str | None = None, dst: Path | None = None) -> Any:
    """Download `model_uri` (models:/NAME@alias, models:/<id>, runs:/, a path) and load it.

    With `tracking_uri` the URIs are resolved through explicit clients, so MLflow's global
    tracking/registry URI is neither read nor changed; without it MLflow's defaults apply
    (`MLFLOW_TRACKING_URI`).
    """
    if tracking_uri is None:
        return mlflow.pyfunc.load_model(model_uri, dst_path=str(dst) if dst else None)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=resolve_model_uri(model_uri, tracking_uri),
        dst_path=str(dst) if dst else None,
        tracking_uri=tracking_uri,
        registry_uri=tracking_uri,
    )
    return mlflow.pyfunc.load_model(local)


@dataclass(frozen=True)
class PredictedFile:
    """What `predict_file` wrote, and what its reader must know (usable as a path)."""

    path: Path
    rows: int
    notes: list[str] = field(default_factory=list)  # e.g. "the model is a single network, ..."

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def predict_file(
    model_uri: str,
    input_csv: Path,
    output_csv: Path,
    tracking_uri: str | None = None,
    smiles_column: str = "smiles",
    overwrite: bool = False,
) -> PredictedFile:
    """Score a CSV of SMILES with a logged/registered model into `output_csv`.

    The input is read as `toxtune data` reads it (`toxmodel.data.read_table`: gzip by content,
    comma/semicolon/tab, BOM, stripped header names, duplicate names refused) and its cells are
    written back as they were. The output keeps the input's columns and adds `p_<task>` per task,
    `error`, `p_<task>_std` per task, `nn_similarity` and `in_domain` (columns already in the
    input get a `_pred` suffix); it is checked before the model is loaded (not a folder, not the
    input file, writable, not named for a compression other than gzip, not an existing file unless
    `overwrite`: earlier predictions are never replaced unasked) and written atomically,
    gzip-compressed when its name ends in `.gz`. The result's `notes` say which extra columns
    the model leaves empty (a single network has no spread). Errors: DataError for the input,
    ServingError for the model and the output.
    """
    input_csv, output_csv = Path(input_csv), Path(output_csv)
    frame = read_table(input_csv, smiles_column)
    part = _claim_output(output_csv, input_csv, overwrite)
    try:
        with tempfile.TemporaryDirectory() as tmp, _open_output(part, output_csv) as text:
            model = load_model_or_explain(model_uri, tracking_uri, Path(tmp) / "model")
            notes = _notes_of(model)
            for start in range(0, max(len(frame), 1), PREDICT_CHUNK):
                chunk = frame.iloc[start : start + PREDICT_CHUNK].reset_index(drop=True)
                if len(chunk):
                    preds = _file_columns(
                        model.predict(pd.DataFrame({SMILES: chunk[smiles_column]}))
                    )
                    names = {c: f"{c}_pred" if c in chunk.columns else c for c in preds.columns}
                    chunk = pd.concat([chunk, preds.rename(columns=names)], axis=1)
                chunk.to_csv(text, header=start == 0, index=False)
        os.replace(part, output_csv)
    finally:
        part.unlink(missing_ok=True)
    return PredictedFile(output_csv, len(frame), notes)


def _file_columns(preds: pd.DataFrame) -> pd.DataFrame:
    """The served columns as the CSV writes them: task columns prefixed `p_`, None (empty) back
    to NaN so every chunk writes its numbers alike (float32), `in_domain` True/False/empty."""
    out = preds.astype({c: "float32" for c in preds.columns if c not in (ERROR, IN_DOMAIN)})
    if IN_DOMAIN in out.columns:
        out[IN_DOMAIN] = out[IN_DOMAIN].astype("boolean")
    keep = (ERROR, SIMILARITY, IN_DOMAIN)
    return out.rename(columns={c: c if c in keep else f"p_{c}" for c in out.columns})


def _notes_of(model: Any) -> list[str]:
    """The loaded pyfunc model's notes (`ToxicityModel.notes`); none for another kind."""
    try:
        python_model = model.unwrap_python_model()
    except Exception:  # not a python-function model of ours: nothing to say about it
        return []
    notes = getattr(python_model, "notes", None)
    return list(notes()) if callable(notes) else []


@contextlib.contextmanager
def _open_output(part: Path, output_csv: Path) -> Iterator[IO[str]]:
    """The temporary `.part` file as UTF-8 text: gzip-compressed when the output's name ends in
    `.gz` (the gzip header names the output, not the `.part` file)."""
    with contextlib.ExitStack() as stack:
        stream: IO[bytes] = stack.enter_context(part.open("wb"))
        if output_csv.name.lower().endswith(".gz"):
            name = output_csv.name[:-3]
            stream = stack.enter_context(gzip.GzipFile(name, "wb", fileobj=stream))
        yield stack.enter_context(io.TextIOWrapper(stream, encoding="utf-8", newline=""))


def _claim_output(output_csv: Path, input_csv: Path, overwrite: bool) -> Path:
    """Check the output path before any work, and create its temporary `.part` file."""
    if output_csv.name.lower().endswith(UNWRITTEN_COMPRESSION):
        raise ServingError(
            f"--output {output_csv}: only gzip compression is written; name the file .csv, or "
            ".csv.gz for gzip"
        )
    if output_csv.is_dir():
        raise ServingError(f"--output {output_csv} is a folder; give a file name, e.g. preds.csv")
    same = output_csv.exists() and os.path.samefile(output_csv, input_csv)
    if same or output_csv.resolve() == input_csv.resolve():
        raise ServingError(
            f"--output {output_csv} is the input file; write the predictions to another file"
        )
    if output_csv.exists() and not overwrite:
        raise ServingError(
            f"--output {output_csv} exists (earlier predictions?); pass --overwrite to replace "
            "it, or give another --output"
        )
    part = output_csv.with_name(f".{output_csv.name}.part")
    try:
        output_csv.parent.mkdir(parents=True, exist_ok=True)
        part.touch()
    except OSError as exc:
        why = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        raise ServingError(f"--output {output_csv} cannot be written ({why})") from exc
    if output_csv.exists() and not os.access(output_csv, os.W_OK):
        part.unlink(missing_ok=True)
        raise ServingError(f"--output {output_csv} cannot be written (permission denied)")
    return part


def _check_store(tracking_uri: str) -> None:
    """A SQLite store that does not exist is an error, not a new empty database."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ServingError(
                f"no MLflow store at {path}: run `toxtune tune` in this folder first, or pass "
                "--tracking-uri (or --storage-path) of the store the model was registered in"
            )


def _registered_models(tracking_uri: str, limit: int = 10) -> str:
    """`name @alias..., ...` of the registry's models, for an error message ('' if none)."""
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        models = client.search_registered_models(max_results=limit)
    except Exception:  # only a hint for an error message: never hide the real error
        return ""
    shown = []
    for m in models:
        aliases = " ".join(f"@{a}" for a in sorted(m.aliases or {}))
        shown.append(f"{m.name} {aliases}".strip())
    return ", ".join(shown)


def load_model_or_explain(model_uri: str, tracking_uri: str | None, dst: Path | None = None) -> Any:
    """`load_model`, with a missing or unreadable model as one ServingError naming the URI."""
    if tracking_uri is not None and model_uri.startswith(("models:/", "runs:/")):
        _check_store(tracking_uri)
    try:
        return load_model(model_uri, tracking_uri, dst)
    except (mlflow.MlflowException, OSError) as exc:
        where = f" in {tracking_uri}" if tracking_uri else ""
        reason = str(exc.message if hasattr(exc, "message") else exc).strip().splitlines()[0]
        known = _registered_models(tracking_uri) if tracking_uri else ""
        hint = f"; registered models there: {known}" if known else ""
        raise ServingError(f"cannot load model {model_uri}{where}: {reason}{hint}") from exc
