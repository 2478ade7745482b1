"""The pyfunc model end to end: a real checkpoint, registered, loaded back and served."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.services import MlflowServer, invoke, model_server
from toxmodel.data import DataError
from toxmodel.featurize import FeaturizerConfig, featurize
from toxmodel.model import ModelConfig
from toxmodel.split import Split
from toxmodel.train import TrainConfig, fit
from tune.serving import load_model, predict_file
from tune.tracking import Registration, default_tracking_uri, register_best_model, start_job_run

BIN = Path(sys.executable).parent
TASKS = ["NR-AR", "SR-p53"]
HEADS = ["C", "CC", "CCC", "CC(C)", "c1ccccc1", "c1ccncc1", "C1CCCCC1", "OCC"]
TAILS = ["O", "N", "Cl", "F", "C(=O)O", "C(=O)N"]
VERSION_TAGS = {"searcher": "optuna", "seed": "0", "split": "random:0", "data_hash": "abc"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real toxmodel checkpoint: a tiny MLP trained for two epochs on 48 SMILES."""
    smiles = [h + t for h in HEADS for t in TAILS]
    feats = featurize(smiles, FeaturizerConfig(n_bits=128), n_jobs=1)
    labels = np.array([[float("N" in s), float("c1" in s)] for s in smiles], dtype=np.float32)
    rows = np.arange(len(smiles))
    split = Split(train=rows[:36], valid=rows[36:], test=rows[:0])
    result = fit(
        feats,
        labels,
        split,
        TASKS,
        ModelConfig(hidden=(16,)),
        TrainConfig(epochs=2, batch_size=8, patience=0),
        num_threads=1,
    )
    return result.save(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _register(
    uri: str, checkpoint: Path, name: str, score: str, trial: str, **tags: str
) -> Registration:
    parent = start_job_run(uri, "exp", f"job-{trial}", {}, resume=False)
    tags = {**VERSION_TAGS, "trial_id": trial, "val_roc_auc": score, **tags}
    return register_best_model(uri, parent, checkpoint, name, tags=tags)


def _check_predictions(out: pd.DataFrame) -> None:
    """Rows: CCO (valid), not-a-smiles, "" and None (invalid), c1ccccc1O (valid)."""
    assert list(out.columns) == [*TASKS, "error"]
    assert len(out) == 5
    for row in (0, 4):
        assert out["error"][row] == ""
        assert all(0.0 <= out[t][row] <= 1.0 for t in TASKS)
    for row in (1, 2, 3):
        assert out["error"][row] != ""
        assert all(math.isnan(out[t][row]) for t in TASKS)


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
    assert signature.outputs.input_names() == [*TASKS, "error"]
    assert [s.type.name for s in signature.outputs.inputs] == ["double", "double", "string"]
    frame = pd.DataFrame(
        {"smiles": ["CCO", "not-a-smiles", "", None, "c1ccccc1O"], "extra": range(5)}
    )
    _check_predictions(model.predict(frame))
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


def test_predict_file_keeps_columns_and_flags_bad_rows(checkpoint: Path, tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path / "store")
    _register(uri, checkpoint, "tox", "0.7", "t1")
    source = tmp_path / "in.csv"
    source.write_text("id,structure\n1,CCO\n2,not-a-smiles\n3,\n4,c1ccccc1O\n")
    out = predict_file("models:/tox@champion", source, tmp_path / "out" / "p.csv", uri, "structure")
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["id", "structure", "p_NR-AR", "p_SR-p53", "error"]
    assert list(table["id"]) == [1, 2, 3, 4]
    assert table["error"][0] == "" and table["error"][3] == ""
    assert table["error"][1] != "" and table["error"][2] != ""
    assert 0.0 <= float(table["p_NR-AR"][0]) <= 1.0 and table["p_NR-AR"][1] == ""
    with pytest.raises(DataError, match="'smiles'"):
        predict_file("models:/tox@champion", source, tmp_path / "x.csv", uri)
    with pytest.raises(DataError, match="not found"):
        predict_file("models:/tox@champion", tmp_path / "missing.csv", tmp_path / "x.csv", uri)


@pytest.mark.slow
def test_served_over_http_from_the_tracking_server(
    checkpoint: Path, mlflow_http: MlflowServer, tmp_path: Path
) -> None:
    uri = mlflow_http.url
    _register(uri, checkpoint, "tox-http", "0.7", "t1")
    frame = pd.DataFrame({"smiles": ["CCO", "not-a-smiles", "", None, "c1ccccc1O"]})
    _check_predictions(load_model("models:/tox-http@champion", uri).predict(frame))

    with model_server("models:/tox-http@champion", uri, tmp_path) as url:
        rows = invoke(url, ["CCO", "not-a-smiles"])
    assert len(rows) == 2
    assert rows[0]["error"] == ""
    assert all(0.0 <= rows[0][t] <= 1.0 for t in TASKS)
    assert rows[1]["error"] != ""
    assert all(rows[1][t] is None or math.isnan(rows[1][t]) for t in TASKS)
