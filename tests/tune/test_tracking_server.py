"""A tiny tuning job against a real `mlflow server` over HTTP, and the served model."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import ray
from mlflow.tracking import MlflowClient

from tests.services import MlflowServer, free_port, invoke, model_server
from tests.tune.conftest import children, tiny_job
from tune.job import run_job
from tune.serving import load_model
from tune.tracking import TrackingError, check_tracking

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_unreachable_server_is_refused_before_any_trial(tmp_path: Path, small_csv: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match="unreachable"):
        check_tracking(url, timeout=2)
    job = tiny_job(tmp_path, small_csv, **{"tracking.tracking_uri": url})
    with pytest.raises(TrackingError, match=url):
        run_job(job, progress=False)
    assert not (job.storage_root / job.name).exists()  # nothing ran
    assert not ray.is_initialized()


def test_job_over_http_logs_tree_metrics_artifacts_and_registers(
    tmp_path: Path, small_csv: Path, mlflow_http: MlflowServer, no_ray: None
) -> None:
    job = tiny_job(tmp_path, small_csv, **{"tracking.tracking_uri": mlflow_http.url})
    result = run_job(job, progress=False)
    client = MlflowClient(mlflow_http.url)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    content_hash = hashlib.sha256(small_csv.read_bytes()).hexdigest()  # the table's hash
    assert parent.data.tags["dataset.content_hash"] == content_hash
    dataset = [(small_csv.stem, content_hash[:16])]  # the UI's Datasets column: name (digest)
    assert [(d.dataset.name, d.dataset.digest) for d in parent.inputs.dataset_inputs] == dataset
    assert parent.data.tags["mlflow.source.name"] == "toxtune"
    assert int(parent.data.tags["dataset.rows"]) > 0
    assert parent.data.tags["best_trial_id"] == result.best_trial_id
    assert "test_roc_auc" in parent.data.metrics
    assert any(k.startswith("test_roc_auc/") for k in parent.data.metrics)
    # Calibration and applicability domain, measured on test by finalize.
    trust = ("test_ece", "test_ece_uncalibrated", "test_brier", "test_brier_uncalibrated")
    for key in (*trust, "domain_threshold", "test_in_domain"):
        assert key in parent.data.metrics, key
    assert 0.0 < parent.data.metrics["domain_threshold"] < 1.0
    assert parent.data.params["search.num_samples"] == str(job.search.num_samples)
    arts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"config.json", "search_space.json", "trials.csv", "plots", "calibration.json"} <= arts
    plots = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert {
        "plots/optimization_history.png",
        "plots/roc_curves.png",
        "plots/reliability.png",
    } <= plots
    # Pictures of the test split's most confident true positives, a folder per task.
    folders = [a.path for a in client.list_artifacts(result.parent_run_id, "explanations")]
    assert folders, "no explanation pictures on the parent run"
    for folder in folders:
        files = [a.path for a in client.list_artifacts(result.parent_run_id, folder)]
        assert any(f.endswith(".png") for f in files), files

    kids = children(client, result.parent_run_id)
    assert len(kids) == job.search.num_samples
    for kid in kids:
        assert kid.data.tags["toxtune.status"] in ("finished", "early_stopped")
        assert kid.data.tags["device"] == "cpu"
        assert kid.data.tags["node_id"]
        history = client.get_metric_history(kid.info.run_id, "val_roc_auc")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        assert "lr" in kid.data.params
        # Per-task scores: logged once, at the trial's best (checkpointed) epoch.
        best_epoch = int(kid.data.metrics["best_epoch"])
        per_task = [k for k in kid.data.metrics if k.startswith(("val_roc_auc/", "val_pr_auc/"))]
        assert len(per_task) == 2 * 3
        for key in per_task:
            assert [m.step for m in client.get_metric_history(kid.info.run_id, key)] == [best_epoch]
        inputs = client.get_run(kid.info.run_id).inputs.dataset_inputs
        assert [(d.dataset.name, d.dataset.digest) for d in inputs] == dataset
        assert kid.data.tags["mlflow.source.name"] == "toxtune"
    version = client.get_model_version_by_alias(job.model_name, "champion")
    assert version.tags["searcher"] == "optuna"
    assert version.tags["trial_id"] == result.best_trial_id
    assert version.tags["split"].startswith("random")

    # toxtune predict against the registered model, for real.
    inp = tmp_path / "in.csv"
    pd.DataFrame({"smiles": ["CCO", "c1ccccc1O", "bogus((", ""]}).to_csv(inp, index=False)
    out = tmp_path / "out.csv"
    proc = subprocess.run(
        [
            str(BIN / "toxtune"),
            "predict",
            str(inp),
            "--model",
            f"models:/{job.model_name}@champion",
            "--output",
            str(out),
            "--tracking-uri",
            mlflow_http.url,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "single network" in proc.stdout  # tiny_job registers one network: no spread
    preds = pd.read_csv(out, keep_default_na=False)
    assert len(preds) == 4
    assert preds["error"].iloc[0] == "" and preds["error"].iloc[2] != ""
    assert preds["error"].iloc[3] != ""
    tasks = [
        c.removeprefix("p_") for c in preds.columns if c.startswith("p_") and c.endswith("_std")
    ]
    tasks = [t.removesuffix("_std") for t in tasks]
    assert len(tasks) == 3
    assert list(preds.columns)[-5:] == [
        *(f"p_{t}_std" for t in tasks),
        "nn_similarity",
        "in_domain",
    ]
    assert float(preds["nn_similarity"].iloc[0]) > 0 and preds["in_domain"].iloc[0] in (
        "True",
        "False",
    )
    assert preds["in_domain"].iloc[2] == "" and preds["nn_similarity"].iloc[2] == ""
    assert (preds[[f"p_{t}_std" for t in tasks]] == "").all().all()
    # The registered model's own predictions of the same molecules, loaded in this process.
    model_uri = f"models:/{job.model_name}@champion"
    own = load_model(model_uri, mlflow_http.url).predict(pd.DataFrame({"smiles": ["CCO"]}))
    expected = [float(own[task].iloc[0]) for task in tasks]
    got = [float(preds[f"p_{task}"].iloc[0]) for task in tasks]
    assert got == pytest.approx(expected, abs=1e-6)

    # mlflow models serve answers REST requests with SMILES.
    with model_server(model_uri, mlflow_http.url, tmp_path) as url:
        rows = invoke(url, ["CCO", "not-a-smiles"])
    assert rows[0]["error"] == ""
    assert [rows[0][task] for task in tasks] == pytest.approx(expected, abs=1e-6)
    assert rows[0]["nn_similarity"] == pytest.approx(float(own["nn_similarity"].iloc[0]))
    assert rows[0]["in_domain"] is bool(own["in_domain"].iloc[0])
    assert all(rows[0][f"{task}_std"] is None for task in tasks)  # one network: no spread
    assert rows[1]["error"] != ""
    assert all(rows[1][k] is None for k in ("nn_similarity", "in_domain", f"{tasks[0]}_std"))
