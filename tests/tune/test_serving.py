"""The pyfunc model end to end: a real checkpoint, registered, loaded back and served."""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.services import invoke_raw, model_server, strict_json
from tests.tune.conftest import (
    TINY_FEATURIZER,
    TINY_SMILES,
    TINY_TASKS,
    TINY_TRAIN_ROWS,
    tiny_fit,
)
from toxmodel.calibration import Calibration, TaskCalibration
from toxmodel.checkpoint import Predictor, load_checkpoint, save_predictor, uncertainty_columns
from toxmodel.domain import fit_domain
from toxmodel.errors import DataError
from toxmodel.featurize import featurize
from toxmodel.model import Ensemble
from tune import serving
from tune.errors import ServingError
from tune.serving import load_model, output_columns, predict_file
from tune.tracking import Registration, default_tracking_uri, register_best_model, start_job_run

BIN = Path(sys.executable).parent
VERSION_TAGS = {"searcher": "optuna", "seed": "0", "split": "random:0", "data_hash": "abc"}
TASKS, SMILES, FEATURIZER, TRAIN_ROWS = TINY_TASKS, TINY_SMILES, TINY_FEATURIZER, TINY_TRAIN_ROWS


def _predictor(seed: int) -> Predictor:
    """A tiny MLP trained for two epochs on 48 SMILES."""
    return tiny_fit(seed).predictor()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a job registers: an ensemble of two seeds with a calibration and a domain."""
    first, second = _predictor(0), _predictor(1)
    fp = featurize(SMILES, FEATURIZER, n_jobs=1).fingerprint
    calibration = Calibration(
        tuple(TASKS),
        (
            TaskCalibration("platt", slope=0.7, intercept=0.3),
            TaskCalibration(
                "isotonic", knots_x=np.array([0.0, 0.4, 1.0]), knots_y=np.array([0.2, 0.3, 0.9])
            ),
        ),
    )
    ensemble = Predictor(
        Ensemble([first.model, second.model]),
        first.featurizer,
        TASKS,
        first.n_inputs,
        first.model_config,
        first.scaler,
        calibration=calibration,
        domain=fit_domain(fp[:TRAIN_ROWS], fp[TRAIN_ROWS:], FEATURIZER.n_bits),
    )
    return save_predictor(tmp_path_factory.mktemp("ckpt") / "model.pt", ensemble)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One network without calibration or domain, as checkpoints were before both existed."""
    path = tmp_path_factory.mktemp("single") / "model.pt"
    predictor = _predictor(0)
    return save_predictor(path, predictor)


@pytest.fixture(scope="module")
def store(checkpoint: Path, single: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as `toxtune tune` leaves it: toxtune_results/mlflow.db holding the models `tox`
    (the ensemble) and `toxtune-tox21` (a single network), each with its @champion (registered
    once for the predict tests)."""
    root = tmp_path_factory.mktemp("tuned")
    uri = default_tracking_uri(root / "toxtune_results")
    _register(uri, checkpoint, "tox", "0.7", "t1")
    _register(uri, single, "toxtune-tox21", "0.7", "t2")
    return root


def _register(
    uri: str, checkpoint: Path, name: str, score: str, trial: str, **tags: str
) -> Registration:
    parent = start_job_run(uri, "exp", f"job-{trial}", {}, resume=False)
    tags = {**VERSION_TAGS, "trial_id": trial, "val_roc_auc": score, **tags}
    return register_best_model(uri, parent, checkpoint, name, tags=tags)


def _expected(checkpoint: Path, smiles: list[str]) -> pd.DataFrame:
    """What the checkpoint's own Predictor says about `smiles` (the reference)."""
    return load_checkpoint(checkpoint).predict(smiles)


NUMBERS = [*TASKS, *(f"{t}_std" for t in TASKS), "nn_similarity"]


def _check_predictions(out: pd.DataFrame, checkpoint: Path) -> None:
    """Rows: CCO (valid), not-a-smiles, "" and None (invalid), c1ccccc1O (valid). Valid rows
    equal the checkpoint's own predictions, spread and domain included; invalid rows have None
    (JSON null), not NaN, in every column but `error`."""
    assert list(out.columns) == [*TASKS, "error", *uncertainty_columns(TASKS)]
    assert len(out) == 5
    want = _expected(checkpoint, ["CCO", "c1ccccc1O"])
    for row, ref in ((0, 0), (4, 1)):
        assert out["error"][row] == ""
        for name in NUMBERS:
            assert out[name][row] == pytest.approx(float(want[name][ref]), abs=1e-6)
        assert out["in_domain"][row] is bool(want["in_domain"][ref])
    assert out[f"{TASKS[0]}_std"][0] > 0  # two members that disagree
    for row in (1, 2, 3):
        assert out["error"][row] != ""
        assert all(out[name][row] is None for name in [*NUMBERS, "in_domain"])


def test_register_alias_load_and_predict(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri(tmp_path / "store")
    client = MlflowClient(uri)
    first = _register(uri, checkpoint, "tox", "0.700000", "t1")
    assert (first.version, first.alias_moved) == ("1", True)
    worse = _register(uri, checkpoint, "tox", "0.600000", "t2")
    assert (worse.version, worse.alias_moved) == ("2", False)
    assert "stays on version 1" in worse.note and "0.7000" in worse.note
    assert str(client.get_model_version_by_alias("tox", "champion").version) == "1"
    better = _register(uri, checkpoint, "tox", "0.800000", "t3")
    assert (better.version, better.alias_moved) == ("3", True)
    assert better.note.startswith("@champion moved to version 3")
    champion = client.get_model_version_by_alias("tox", "champion")
    assert str(champion.version) == "3"
    assert champion.tags == {
        **VERSION_TAGS,
        "trial_id": "t3",
        "val_roc_auc": "0.800000",
        "toxtune.alias_note": better.note,
    }
    assert champion.run_id and champion.source

    model = load_model("models:/tox@champion", uri)
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["smiles"]
    assert signature.outputs.input_names() == output_columns(TASKS)
    assert [s.type.name for s in signature.outputs.inputs] == [
        *("double", "double", "string"),
        *("double", "double", "double", "boolean"),
    ]
    frame = pd.DataFrame(
        {"smiles": ["CCO", "not-a-smiles", "", None, "c1ccccc1O"], "extra": range(5)}
    )
    _check_predictions(model.predict(frame), checkpoint)
    with pytest.raises(Exception, match="smiles"):
        model.predict(pd.DataFrame({"SMILES_col": ["CCO"]}))
    assert model.metadata.model_id and model.metadata.run_id == champion.run_id
    assert load_model("models:/tox/2", uri).metadata.model_id != model.metadata.model_id
    assert not {"mlruns", "mlflow.db", "mlartifacts"} & {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize(
    ("changed", "value"), [("data_hash", "other-data"), ("split", "stratified:0")]
)
def test_alias_is_never_taken_by_a_model_scored_on_other_data_or_split(
    checkpoint: Path, tmp_path: Path, changed: str, value: str
) -> None:
    """A higher validation score on other data or another split is not a better model."""
    uri = default_tracking_uri(tmp_path / "store")
    _register(uri, checkpoint, "tox", "0.700000", "t1")
    other = _register(uri, checkpoint, "tox", "0.990000", "t2", **{changed: value})
    assert (other.version, other.alias_moved) == ("2", False)
    assert changed in other.note and "not comparable" in other.note
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("tox", "champion").version) == "1"
    assert client.get_model_version("tox", "2").tags["toxtune.alias_note"] == other.note


def test_predict_file_keeps_columns_and_flags_bad_rows(
    checkpoint: Path, store: Path, tmp_path: Path
) -> None:
    uri = default_tracking_uri(store / "toxtune_results")
    source = tmp_path / "in.csv"
    source.write_text("id,structure\n007,CCO\n2,not-a-smiles\n3,\n4,c1ccccc1O\n")
    out = predict_file("models:/tox@champion", source, tmp_path / "out" / "p.csv", uri, "structure")
    assert out.rows == 4 and out.notes == []  # an ensemble with a domain and a calibration
    table = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert list(table.columns) == [
        *("id", "structure", "p_NR-AR", "p_SR-p53", "error"),
        *("p_NR-AR_std", "p_SR-p53_std", "nn_similarity", "in_domain"),
    ]
    assert list(table["id"]) == ["007", "2", "3", "4"]  # cells written back as they were
    assert table["error"][0] == "" and table["error"][3] == ""
    assert table["error"][1] != "" and table["error"][2] != ""
    want = _expected(checkpoint, ["CCO"])
    for name in NUMBERS:
        column = name if name == "nn_similarity" else f"p_{name}"
        assert float(table[column][0]) == pytest.approx(float(want[name][0]), abs=1e-6)
        assert table[column][1] == "" and table[column][2] == ""
    assert table["in_domain"][0] == str(bool(want["in_domain"][0]))
    assert table["in_domain"][1] == "" and table["in_domain"][2] == ""
    with pytest.raises(DataError, match="'smiles'"):
        predict_file("models:/tox@champion", source, tmp_path / "x.csv", uri)
    with pytest.raises(DataError, match="not found"):
        predict_file("models:/tox@champion", tmp_path / "missing.csv", tmp_path / "x.csv", uri)


def test_predict_reads_input_as_toxtune_data_does(
    checkpoint: Path, store: Path, tmp_path: Path
) -> None:
    """gzip content named .csv used to fail with UnicodeDecodeError, and a header `smiles ` (a
    trailing space) was refused; both are read as `toxtune data` reads them."""
    uri = default_tracking_uri(store / "toxtune_results")
    gz = tmp_path / "gz.csv"
    gz.write_bytes(gzip.compress(b"smiles\nCCO\nc1ccccc1O\n"))
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("id;smiles \n1;CCO\n2;c1ccccc1O\n")  # semicolons, padded header
    want = _expected(checkpoint, ["CCO", "c1ccccc1O"])
    for source in (gz, spaced):
        out = predict_file("models:/tox@champion", source, tmp_path / f"{source.stem}.out", uri)
        table = pd.read_csv(out)
        assert list(table["smiles"]) == ["CCO", "c1ccccc1O"]
        assert table["p_SR-p53"].to_numpy() == pytest.approx(want["SR-p53"].to_numpy(), abs=1e-6)
    duplicated = tmp_path / "dup.csv"
    duplicated.write_text("smiles,t1,t1\nCCO,0,1\n")
    with pytest.raises(DataError, match="t1"):
        predict_file("models:/tox@champion", duplicated, tmp_path / "d.out", uri)


def test_predict_refuses_bad_outputs_and_models_before_scoring(
    checkpoint: Path, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each used to be a traceback (IsADirectoryError after scoring everything, PermissionError,
    MlflowException, EmptyDataError) or, for --output equal to the input, to overwrite it."""
    uri = default_tracking_uri(store / "toxtune_results")
    source = tmp_path / "in.csv"
    source.write_text("smiles\nCCO\n")
    (tmp_path / "a_file").write_text("x")
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")

    def must_not_load(*args: object, **kwargs: object) -> None:
        pytest.fail("the model was loaded although the output could not be written")

    with monkeypatch.context() as m:
        m.setattr(serving, "load_model", must_not_load)
        with pytest.raises(ServingError, match="is a folder"):
            predict_file("models:/tox@champion", source, tmp_path, uri)
        with pytest.raises(ServingError, match="is the input file"):
            predict_file("models:/tox@champion", source, source, uri)
        with pytest.raises(ServingError, match="cannot be written"):
            predict_file("models:/tox@champion", source, tmp_path / "a_file" / "p.csv", uri)
        with pytest.raises(DataError, match="empty"):
            predict_file("models:/tox@champion", empty, tmp_path / "p.csv", uri)
    assert source.read_text() == "smiles\nCCO\n"
    for wrong in ("models:/nope@champion", "models:/tox@nope", "models:/tox/9"):
        with pytest.raises(ServingError, match=f"cannot load model {wrong}.*tox @champion"):
            predict_file(wrong, source, tmp_path / "p.csv", uri)
    with pytest.raises(ServingError, match="no MLflow store"):
        predict_file(
            "models:/tox@champion", source, tmp_path / "p.csv", f"sqlite:///{tmp_path}/x.db"
        )
    assert not (tmp_path / "x.db").exists()  # no empty store left behind
    assert not list(tmp_path.glob(".*.part"))


def test_predict_without_tracking_uri_finds_the_store_tune_used(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The README's line, `toxtune predict --model models:/toxtune-tox21@champion molecules.csv
    --output preds.csv`, used to look in a fresh ./mlflow.db instead of toxtune_results/. That
    model is a single network without domain or calibration: the command says so."""
    from tune.cli import main
    from tune.config import load_config

    monkeypatch.chdir(store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = load_config().tracking_uri  # what `toxtune tune` and `toxtune ui` use here
    assert uri == f"sqlite:///{store / 'toxtune_results' / 'mlflow.db'}"
    (store / "molecules.csv").write_text("smiles\nCCO\n")
    argv = "predict --model models:/toxtune-tox21@champion molecules.csv --output preds.csv"
    assert main(argv.split()) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.splitlines()
    assert "preds.csv" in printed[0]
    assert any("single network" in line and "_std" in line for line in printed[1:])
    assert any("no applicability domain" in line for line in printed[1:])
    preds = pd.read_csv(store / "preds.csv")
    assert list(preds.columns) == [
        "smiles",
        *(f"p_{t}" for t in TASKS),
        "error",
        *(f"p_{t}_std" for t in TASKS),
        "nn_similarity",
        "in_domain",
    ]
    assert preds[[f"p_{t}_std" for t in TASKS]].isna().all().all()  # no spread made up
    assert preds[["nn_similarity", "in_domain"]].isna().all().all()
    assert not (store / "mlflow.db").exists()


def _post(app: Any, path: str, body: bytes) -> tuple[int, str, bytes]:
    """POST `body` (JSON) to an ASGI app as its server would; (status, content type, body)."""
    sent: list[dict] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 5001),
    }

    async def call() -> None:
        request = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if request:
                return request.pop()
            await asyncio.Event().wait()  # the client stays connected until the reply is sent
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)

    asyncio.run(call())
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers.get("content-type", ""), content


def test_served_app_answers_over_nested_json_with_400_and_a_json_error(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 25 item 9d: a body of 100,000 nested lists got HTTP 500 and a plain-text body from
    the app `mlflow models serve` runs (RecursionError in its JSON parsing)."""
    from mlflow.pyfunc import scoring_server

    monkeypatch.setattr(scoring_server, "invocations", scoring_server.invocations)  # restored
    monkeypatch.setenv(
        scoring_server._MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, "true"
    )  # init sets it
    model = load_model("models:/tox@champion", default_tracking_uri(store / "toxtune_results"))
    app = scoring_server.init(model)  # what `mlflow models serve` serves, with this model loaded
    deep = b"[" * 100_000 + b"]" * 100_000
    body = b'{"dataframe_split": {"columns": ["smiles"], "data": ' + deep + b"}}"
    status, kind, content = _post(app, "/invocations", body)
    assert (status, kind) == (400, "application/json"), content[:300]
    error = json.loads(content)
    assert error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert error["message"] == (
        "the request body nests JSON arrays or objects too deeply to be parsed (more than about "
        f"{sys.getrecursionlimit()} levels); send a table of SMILES, e.g. "
        '{"dataframe_split": {"columns": ["smiles"], "data": [["CCO"]]}}'
    )
    good = json.dumps({"dataframe_split": {"columns": ["smiles"], "data": [["CCO"], ["x("]]}})
    status, kind, content = _post(app, "/invocations", good.encode())
    assert (status, kind) == (200, "application/json"), content[:300]
    rows = strict_json(content)["predictions"]  # type: ignore[index]
    assert rows[0]["error"] == "" and rows[1]["error"] != ""


@pytest.mark.slow
def test_readme_serve_line_answers_strict_json_with_null_for_invalid_smiles(
    checkpoint: Path, tmp_path: Path
) -> None:
    """README: `MLFLOW_TRACKING_URI=sqlite:///toxtune_results/mlflow.db mlflow models serve -m
    models:/toxtune-tox21@champion --env-manager local` (on a free port here), run in the folder
    `toxtune tune` ran in. Invalid SMILES used to come back as a bare NaN, which strict JSON
    parsers refuse."""
    store = tmp_path / "toxtune_results"
    _register(default_tracking_uri(store), checkpoint, "toxtune-tox21", "0.7", "t1")
    relative = "sqlite:///toxtune_results/mlflow.db"  # as the README writes it, from tmp_path
    with model_server("models:/toxtune-tox21@champion", relative, tmp_path) as url:
        raw = invoke_raw(url, ["CCO", "not-a-smiles"])
    assert b"NaN" not in raw and b"null" in raw
    rows = strict_json(raw)["predictions"]  # type: ignore[index]
    assert rows[1]["error"] != "" and all(rows[1][n] is None for n in [*NUMBERS, "in_domain"])
    want = _expected(checkpoint, ["CCO"])
    assert all(rows[0][n] == pytest.approx(float(want[n][0]), abs=1e-6) for n in NUMBERS)
    assert rows[0]["in_domain"] is bool(want["in_domain"][0])


def test_the_served_model_pins_every_package_its_code_imports() -> None:
    """The logged model's requirements name every third-party distribution that toxmodel and
    tune/serving.py import directly (numba, for the domain check, came in without a pin)."""
    import ast
    import importlib.metadata

    root = Path(__file__).resolve().parents[2]
    modules: set[str] = set()
    for path in [*(root / "toxmodel").glob("*.py"), root / "tune" / "serving.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"__future__", "toxmodel", "tune"}
    distributions = importlib.metadata.packages_distributions()
    pinned = {pin.split("==")[0].lower() for pin in serving.requirements()}
    missing = {m for m in third_party if not pinned & {d.lower() for d in distributions[m]}}
    assert not missing, f"imported, not pinned in the served model: {sorted(missing)}"
    assert {"numba", "torch", "rdkit"} <= third_party  # the scan sees the imports
